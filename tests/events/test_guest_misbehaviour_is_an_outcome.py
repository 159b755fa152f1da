"""Guest misbehaviour is an outcome or a failed expectation, never a Python exception:
byte and word stores to the local APIC, self-modifying code over an OUT, a multiboot run
that ends in its 32-bit phase under a register expectation; and the time-stamp counter
the guest reads is the machine's, so two runs agree."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cpu.machine import Machine
from guest_images.build import build_mb_image
from idtlab import scenario as scn
from idtlab.assemble import CodeBlock, assemble_blocks

APIC = 0xFEE00000


def run(source: str, **kw: object) -> tuple[Machine, dict[str, int], object]:
    blocks, s = assemble_blocks([CodeBlock(0x100000, textwrap.dedent(source), "test", 1)],
                                {"APIC": APIC})
    m = Machine(16 << 20, **kw)  # type: ignore[arg-type]
    for b in blocks:
        m.load(b.at, b.code, code=True)
    return m, s, m.run(entry=s["start"], rsp=0x70000, max_insns=1000)


@pytest.mark.parametrize("store", ["mov byte ptr [rbx], al", "mov word ptr [rbx], ax",
                                   "mov byte ptr [rbx + 1], 0x12"])
def test_a_narrow_store_to_an_apic_register_ends_the_run_cleanly(store: str) -> None:
    _m, _s, result = run(f"""
        start:
            mov rbx, APIC + 0x80
            mov eax, 0x1234
            {store}
            hlt
    """)
    assert result.outcome in ("hlt", "unsupported")  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_self_modifying_code_over_an_out_runs_what_is_there_now(mode: str) -> None:
    # `out 0xf4, al` (e6 f4: the exit port) becomes `nop; hlt` before it runs.
    _m, s, result = run("""
        start:
            mov word ptr [spot], 0xf490
            mov al, 3
        spot:
            out 0xf4, al
            hlt
    """, mode=mode)
    assert (result.outcome, result.rip) == ("hlt", s["spot"] + 2)  # type: ignore[attr-defined]
    assert not [r for r in result.trace.records if r["kind"] == "port"]  # type: ignore[attr-defined]


def test_a_multiboot_run_ending_in_32_bit_mode_fails_a_64_bit_register_expectation(
        tmp_path: Path) -> None:
    elf = build_mb_image("int_gates").elf
    toml = tmp_path / "early.toml"
    toml.write_text(f'[[image]]\nelf = "{elf}"\nmultiboot = true\n[run]\nmax_insns = 5\n'
                    '[[expect]]\nreg = "r15"\nequals = 0\n')
    sc = scn.load(toml)
    result = scn.run(sc)
    assert result.outcome == "max_insns"
    failures = scn.check(sc, result)
    assert [f.what for f in failures] == ["r15"]
    assert "no such register" in failures[0].actual


def test_rdtsc_reads_the_machines_cycle_count_so_two_runs_agree() -> None:
    source = """
        start:
            nop
            nop
            rdtsc
            mov rbx, rax
            mov rcx, rdx
            rdtscp
            hlt
    """
    first, _s, _r1 = run(source)
    second, _s, _r2 = run(source)
    regs = ("rax", "rbx", "rcx", "rdx")
    assert first.engine.read(regs) == second.engine.read(regs)
    # Fast mode: one cycle per instruction; the TSC is the cycles retired before it.
    assert first.engine.read(("rbx", "rcx")) == [2, 0]
    assert first.engine.read(("rax", "rdx")) == [5, 0]
    assert first.engine.read_reg("rcx") == 0  # IA32_TSC_AUX after reset
