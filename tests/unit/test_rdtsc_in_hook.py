"""An RDTSC or RDTSCP executed inside its code hook (cpu/emulated.py `rdtsc_in_hook`, the
engine keeps running), or natively in its site hook once Python vouched for it
(cpu/native_paths.py), gives exactly the trace, counts, cycles and registers of the same
instruction executed at a held boundary (`rdtsc`, the engine stopped), in fast mode
(where the native counter counted the whole block at its start and is settled to just
after the RDTSC) and in timed mode: every case runs three ways (native, Python in the
hook, held) and is compared, and each test checks how often the paths were taken."""

from __future__ import annotations

from typing import Any

import pytest

from cpu.layout import PageSpec
from cpu.machine import Machine
from idtlab.assemble import CodeBlock, assemble_blocks
from tests.cpu_model import kit
from tests.delivery import rig
from tests.events import kit as kit_events

CODE, HANDLER, STACK = 0x100000, 0x101000, 0x70000
MSR_TSC, MSR_TSC_AUX = 0x10, 0xC0000103
CHECKED = ("rip", "rsp", "rflags", "rax", "rcx", "rdx", "rbx", "rsi", "rdi", "r8", "r9", "r10",
           "r11", "r12")

# kvm-unit-tests' delay(): `pause; rdtsc` in a loop, the RDTSC in the middle of its block;
# every value read is folded into R8-R10 so that one wrong TSC shows in the registers.
DELAY = """
    mov esi, {n}
l:
    pause
    {insn}
    mov r8, rax
    add r9, rdx
    xor r10, rax
    add r10, rcx
    dec esi
    jnz l
    hlt
"""


def asm(source: str, at: int) -> bytes:
    blocks, _ = assemble_blocks([CodeBlock(at, source, origin="test", first_line=1)], known={})
    return blocks[0].code


def forbid_in_hook(m: Machine) -> None:
    def never(address: int, rdtscp: bool = False) -> bool:
        return False
    m.emulated.rdtsc_in_hook = never  # type: ignore[method-assign]


def forbid_native(m: Machine) -> None:
    def never(address: int, block: tuple[int, int, int], **_: int) -> None:
        return None
    m.engine.paths.learn = never  # type: ignore[method-assign]


def count_in_hook(m: Machine) -> list[int]:
    """The addresses of the RDTSCs Python executed in the hook (see `ran_in_hook`)."""
    taken: list[int] = []
    inner = m.emulated.rdtsc_in_hook

    def spy(address: int, rdtscp: bool = False) -> bool:
        done = inner(address, rdtscp=rdtscp)
        if done:
            taken.append(address)
        return done
    m.emulated.rdtsc_in_hook = spy  # type: ignore[method-assign]
    return taken


def outcome(m: Machine, **run: Any) -> tuple[Any, ...]:
    r = m.run(**run)
    return r.outcome, r.icount, r.cycles, m.engine.read(CHECKED), m.trace.records


def both(build: Any, mode: str, **run: Any) -> tuple[tuple[Any, ...], tuple[Any, ...], int]:
    """(outcome with the native path, outcome held at the boundary, how many RDTSCs ran
    without stopping the engine), after checking that Python's in-hook path alone gives
    the same outcome too."""
    native, python, held = build(mode), build(mode), build(mode)
    taken = count_in_hook(native)
    python_taken = count_in_hook(python)
    forbid_native(python)
    forbid_in_hook(held)
    got, want = outcome(native, **run), outcome(held, **run)
    assert outcome(python, **run) == want
    in_hook = len(taken) + native.engine.paths.hits
    assert len(python_taken) == in_hook and python.engine.paths.hits == 0
    return got, want, in_hook


def delay_machine(insn: str, n: int, mode: str, prologue: str = "") -> Machine:
    m = Machine(2 << 20, mode=mode, max_insns=100_000)
    m.load(CODE, asm(prologue + DELAY.format(n=n, insn=insn), CODE), code=True)
    return m


@pytest.mark.parametrize("mode", ["fast", "timed"])
@pytest.mark.parametrize("insn", ["rdtsc", "rdtscp"])
def test_a_delay_loop_reads_the_same_tsc_in_the_hook_as_at_a_held_boundary(
        insn: str, mode: str) -> None:
    got, want, taken = both(lambda md: delay_machine(insn, 50, md), mode, entry=CODE, rsp=STACK)
    assert got == want
    assert got[0] == "hlt" and taken == 50
    # The last TSC read: the cycles of the 1 + 49 * 8 + 2 instructions before it.
    per = delay_machine(insn, 1, mode).profile.cycles_per_instruction
    if mode == "fast":
        assert got[3][CHECKED.index("r8")] == (1 + 49 * 8 + 1) * per


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_rdtscp_after_writes_of_the_tsc_and_tsc_aux_reads_the_same_in_the_hook(mode: str) -> None:
    prologue = f"""
    mov ecx, {MSR_TSC}
    mov eax, 0xFFFFFF00
    mov edx, 7
    wrmsr
    mov ecx, {MSR_TSC_AUX}
    mov eax, 0xABCD
    xor edx, edx
    wrmsr
    """
    got, want, taken = both(lambda md: delay_machine("rdtscp", 40, md, prologue), mode,
                            entry=CODE, rsp=STACK)
    assert got == want
    assert taken == 40
    assert got[3][CHECKED.index("rcx")] == 0xABCD
    if mode == "fast":
        # The i-th RDTSCP: 7 instructions from the TSC's WRMSR (itself included), then 8
        # per iteration; EDX goes from 7 to 8 inside the loop.
        per = delay_machine("rdtscp", 1, mode).profile.cycles_per_instruction
        edx = [(0x7FFFFFF00 + (7 + 8 * i) * per) >> 32 for i in range(40)]
        assert 7 in edx and 8 in edx
        assert got[3][CHECKED.index("r9")] == sum(edx)


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_nmis_arriving_by_cycle_inside_a_delay_loop_trace_the_same(mode: str) -> None:
    """NMIs due at cycles inside the loop's blocks (the counter splits the block there)
    whose handler reads the TSC too: the RDTSCs around them run in the hook or not, and
    the deliveries come at the same boundaries either way."""
    def build(md: str) -> Machine:
        m = delay_machine("rdtsc", 400, md)
        m.load(HANDLER, asm("rdtsc\nmov r11, rax\nadd r12, rax\niretq\n", HANDLER), code=True)
        m.set_gate(2, HANDLER)
        for cycle in (37, 901, 1702, 2503, 3304):
            m.inject("nmi", cycle=cycle)
        return m
    got, want, taken = both(build, mode, entry=CODE, rsp=STACK)
    assert got == want
    assert sum(r["kind"] == "deliver" for r in got[4]) == 5
    assert 350 < taken <= 405


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_an_injection_point_after_the_rdtsc_holds_it_at_the_boundary(mode: str) -> None:
    def build(md: str) -> Machine:
        m = delay_machine("rdtsc", 10, md)
        m.load(HANDLER, asm("iretq\n", HANDLER), code=True)
        m.set_gate(2, HANDLER)
        # The MOV after the RDTSC: `mov esi, n` 5 bytes, PAUSE 2, RDTSC 2.
        m.inject("nmi", before=CODE + 9, hit=4)
        return m
    got, want, taken = both(build, mode, entry=CODE, rsp=STACK)
    assert got == want
    assert [r["kind"] for r in got[4]].count("deliver") == 1
    assert taken == 0  # every RDTSC of the loop has the point after it


def test_an_instruction_limit_inside_the_delay_loop_stops_at_the_same_instruction() -> None:
    for limit in (3, 50, 51, 52, 53, 200):
        got, want, _ = both(lambda md: delay_machine("rdtsc", 50, md), "fast", entry=CODE,
                            rsp=STACK, max_insns=limit)
        assert got == want, limit
        assert got[0] == "max_insns" and got[1] == limit


def test_rdtsc_at_cpl3_with_cr4_tsd_is_held_and_faults() -> None:
    src = "main:\n    pause\n    rdtsc\n    hlt\n"
    taken: list[list[int]] = []
    got = kit.run(src, cpl=3, cr4=1 << 2, setup=lambda m: taken.append(count_in_hook(m)))
    want = kit.run(src, cpl=3, cr4=1 << 2, setup=forbid_in_hook)
    assert got.result.trace.records == want.result.trace.records
    assert got.fault() == want.fault() == (13, 0, got.sym["main"] + 2)
    assert taken == [[]]


def test_single_stepping_an_rdtsc_holds_it_and_traps_after_it() -> None:
    def build(md: str) -> Machine:
        m = delay_machine("rdtsc", 2, md, prologue="pushfq\nor qword ptr [rsp], 0x100\npopfq\n")
        m.load(HANDLER, asm("iretq\n", HANDLER), code=True)
        m.set_gate(1, HANDLER)
        return m
    got, want, taken = both(build, "fast", entry=CODE, rsp=STACK)
    assert got == want
    assert taken == 0
    assert sum(r["kind"] == "deliver" and r["vector"] == 1 for r in got[4]) > 10


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_a_delay_loop_runs_every_rdtsc_after_the_first_natively(mode: str) -> None:
    m = delay_machine("rdtsc", 200, mode)
    taken = count_in_hook(m)
    assert m.run(entry=CODE, rsp=STACK).outcome == "hlt"
    assert (len(taken), m.engine.paths.hits) == (1, 199)
    # A new run vouches again: the first RDTSC of it runs in Python.
    assert m.run(entry=CODE, rsp=STACK, max_insns=m.engine.icount + 20).outcome == "max_insns"
    # Three RDTSCs in 20 instructions: Python, native, and (in fast mode) the last one
    # held, as it falls in the block the instruction limit splits.
    assert len(taken) == 2 and m.engine.paths.hits in (200, 201)


IPI_THEN_DELAY = f"""
start:
    mov rbx, {kit_events.APIC_BASE:#x}
    mov dword ptr [rbx+{kit_events.SVR:#x}], {kit_events.SVR_ENABLED:#x}
    cli
    mov dword ptr [rbx+{kit_events.ICR_LOW:#x}], {kit_events.ICR_SELF | 0x40:#x}
    mov esi, 300
spin:
    pause
    rdtsc
    add r8, rax
    dec esi
    jnz spin
{{ending}}
h40:
    add r9, 1
    mov dword ptr [rbx+{kit_events.EOI:#x}], 0
    iretq
"""


@pytest.mark.parametrize("mode", ["fast", "timed"])
@pytest.mark.parametrize("ending", ["sti\n    nop\n    hlt", "push 0x202\n    popfq\n    nop\n    hlt",
                                    "hlt"], ids=["sti", "popfq", "never"])
def test_a_delay_loop_with_an_interrupt_held_by_if_0_reads_the_tsc_in_the_hook(
        ending: str, mode: str) -> None:
    """kvm-unit-tests' eventinj: self-IPIs sent with IF = 0, then `io_delay()`. The
    boundary after each RDTSC holds the interrupt still (IF = 0), so the RDTSCs run
    without stopping the engine, and the interrupt comes after the STI/POPFQ either way."""
    def build(md: str) -> Machine:
        m, _ = kit_events.build(IPI_THEN_DELAY.format(ending=ending),
                                gates={0x40: rig.gate("h40")}, mode=md)
        return m
    got, want, taken = both(build, mode, entry=rig.CODE, rsp=rig.KERNEL_STACK,
                            rflags=rig.START_RFLAGS, max_insns=20_000)
    assert got == want
    assert taken == 300
    delivered = [r["vector"] for r in got[4] if r["kind"] == "deliver"]
    assert delivered == ([] if ending == "hlt" else [0x40])
    assert got[3][CHECKED.index("r8")] != 0


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_an_rdtsc_right_before_an_instruction_whose_fetch_faults_counts_once(mode: str) -> None:
    """The next instruction crosses into a page that is not present: the engine first
    runs up to it (`Stops.fetch_boundary_before`, a run whose last block ends with the
    RDTSC), so that run ends right where the RDTSC redirected RIP; the #PF then comes
    at the MOV with the RDTSC counted once."""
    start = 0x101FF8  # pause (2 bytes), rdtsc (2), then a 10-byte MOV across 0x102000

    def build(md: str) -> Machine:
        m = Machine(2 << 20, mode=md, max_insns=1_000)
        m.load(start, asm("pause\nrdtsc\nmovabs rax, 0x1122334455667788\nhlt\n", start),
               code=True)
        m.load(HANDLER, asm("hlt\n", HANDLER), code=True)
        m.set_gate(14, HANDLER)
        m.set_page(PageSpec(0x102000, 0x102000, present=False))
        return m
    got, want, taken = both(build, mode, entry=start, rsp=STACK)
    assert got == want
    assert taken == 1
    pf = [r for r in got[4] if r["kind"] == "deliver"]
    assert [(r["vector"], r["rip"], r["icount"]) for r in pf] == [(14, 0x101FFC, 2)]
