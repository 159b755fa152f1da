"""Booting multiboot images: the 32-bit entry state, the guest's own switch to long mode
on a 32-bit engine, the migration to the 64-bit engine (a `mode_switch` record, counts
that continue), events through the guest's own IDT, and the clear ends of a 32-bit phase
that needs the event model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpu import multiboot as mb
from cpu.decode import decode
from cpu.machine import Machine
from cpu.platform import SHUTDOWN_DETAIL
from tests.multiboot.mbkit import MEMORY, boot, build, inline

SERIAL = "boot64: in long mode\nboot64: #BP\nboot64: done\n"


def count_32bit_insns(image: mb.MultibootImage) -> int:
    """Instructions from `start` to `start64` (straight-line 32-bit code), decoded as 32-bit."""
    start, end = image.symbols["start"], image.symbols["start64"]
    p = image.physical(start)
    assert p is not None
    seg = next(s for s in image.segments if s.paddr <= p < s.paddr + len(s.data))
    code = seg.data[p - seg.paddr:p - seg.paddr + end - start]
    insns = list(decode(code, start, bits=32))
    assert insns[-1].mnemonic == "ljmp" and insns[-1].address + insns[-1].size == end
    return len(insns)


@pytest.mark.parametrize("mode", ["fast", "timed"])
@pytest.mark.parametrize("elf32", [True, False], ids=["elf32", "elf64"])
def test_the_boot64_image_switches_to_long_mode_prints_and_exits(mode: str, elf32: bool) -> None:
    m, image, info, r = boot("boot64.S", elf32=elf32, mode=mode)
    assert (r.outcome, r.exit_code, r.serial) == ("exit", 0, SERIAL)
    boot_rec, switch = r.trace.of_kind("boot", "mode_switch")
    assert boot_rec == {"seq": 0, "icount": 0, "cycle": 0, "kind": "boot", "protocol": "multiboot",
                        "entry": image.symbols["start"], "info": info.address,
                        "eax": 0x2BADB002, "cmdline": Path(image.name).name}
    n32 = count_32bit_insns(image)
    assert n32 == 17
    cpi = m.profile.cycles_per_instruction
    assert switch == {"seq": 1, "icount": n32, "cycle": n32 * cpi, "kind": "mode_switch",
                      "from": "32-bit", "to": "64-bit", "rip": image.symbols["start64"],
                      "cs": 0x18}
    # The guest saw the loader's EAX and EBX.
    assert m.phys.read_uint(image.symbols["boot_magic"], 4) == 0x2BADB002
    assert m.phys.read_uint(image.symbols["boot_info"], 4) == info.address
    end = r.trace.of_kind("end")[0]
    assert end["rip"] == r.rip and r.rip == image.symbols["after_bp"] + 0x17  # after `out 0xf4`
    assert r.icount > n32 and r.cycles > switch["cycle"]


def test_counts_are_the_same_in_fast_and_timed_mode_and_for_both_elf_forms() -> None:
    counts = {(mode, elf32): boot("boot64.S", elf32=elf32, mode=mode)[3].icount
              for mode in ("fast", "timed") for elf32 in (True, False)}
    assert len(set(counts.values())) == 1, counts


def test_a_bp_after_the_switch_is_delivered_through_the_guests_idt_on_its_ist1() -> None:
    m, image, _info, r = boot("boot64.S")
    s = image.symbols
    (d,) = r.deliveries
    frame_rsp = (s["ist1_top"] & ~0xF) - 40
    assert {k: d[k] for k in ("vector", "source", "error_code", "rip", "cs", "rflags", "old_rsp",
                              "ss", "rsp", "stack", "handler", "cpl")} == {
        "vector": 3, "source": "software", "error_code": None, "rip": s["after_bp"],
        "cs": 0x18, "rflags": 0x2, "old_rsp": s["stack_top"], "ss": 0x10, "rsp": frame_rsp,
        "stack": "ist1", "handler": s["bp_handler"], "cpl": 0}
    # The frame in guest memory, slot by slot, and what the handler and main saw.
    assert [m.phys.read_uint(frame_rsp + 8 * i, 8) for i in range(5)] == [
        s["after_bp"], 0x18, 0x2, s["stack_top"], 0x10]
    assert m.phys.read_uint(s["bp_rsp"], 8) == frame_rsp
    assert m.phys.read_uint(s["rsp_after"], 8) == s["stack_top"]
    (iret,) = r.trace.of_kind("iret")
    assert (iret["to_rip"], iret["to_rsp"]) == (s["after_bp"], s["stack_top"])


def test_the_machine_writes_none_of_its_own_structures_in_a_multiboot_run() -> None:
    m, image, _info, r = boot("boot64.S")
    assert r.outcome == "exit"
    assert m.engine.read_table("idtr")[1:] == (image.symbols["idt"], 256 * 16 - 1)
    assert m.engine.read_table("gdtr")[1:] == (image.symbols["gdt"], 0x2F)
    assert m.engine.read_table("tr") == (0x20, image.symbols["tss"], 0x67)
    assert m.engine.read_reg("cr3") == image.symbols["pml4"]
    assert m.phys.read(0x1000, 0x1000) == bytes(0x1000)  # where Machine() keeps its GDT


def test_run_with_an_entry_is_refused_on_a_multiboot_machine() -> None:
    m = Machine(MEMORY)
    mb.load(m, mb.read_image(build("boot64.S")))
    with pytest.raises(ValueError, match="a multiboot machine starts at its image's entry"):
        m.run(entry=0x100000)


FAULT = inline("""
    movl $1, %eax
    movl $0, %ecx
    .globl fault_site
fault_site:
    divl %ecx
    hlt
""")


def test_an_exception_in_the_32_bit_phase_ends_the_run_naming_vector_and_eip() -> None:
    _m, image, _info, r = boot(FAULT)
    site = image.symbols["fault_site"]
    assert (r.outcome, r.rip, r.icount) == ("unsupported", site, 2)
    assert r.reason == (f"an exception in 32-bit protected mode: #DE (vector 0) at {site:#x}; "
                        "events are modelled in real-address mode and from the switch to 64-bit "
                        "mode on")
    assert r.trace.of_kind("mode_switch") == [] and r.deliveries == []


def test_an_int3_in_the_32_bit_phase_ends_the_run_after_the_int3() -> None:
    _m, image, _info, r = boot(inline("nop\n.globl bp\nbp: int3\nhlt\n"))
    after = image.symbols["bp"] + 1
    assert (r.outcome, r.rip, r.icount) == ("unsupported", after, 2)
    assert r.reason.startswith(f"an exception in 32-bit protected mode: #BP (vector 3) at "
                               f"{after:#x}")


def test_an_invalid_opcode_in_the_32_bit_phase_is_a_ud_outcome() -> None:
    _m, image, _info, r = boot(inline("nop\n.globl bad\nbad: ud2\n"))
    assert (r.outcome, r.rip, r.icount) == ("unsupported", image.symbols["bad"], 1)
    assert "#UD (vector 6)" in r.reason


def test_hlt_in_the_32_bit_phase_ends_the_run_as_hlt() -> None:
    _m, image, _info, r = boot(inline("nop\n.globl h\nh: hlt\n"))
    assert (r.outcome, r.rip, r.icount) == ("hlt", image.symbols["h"] + 1, 2)


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_the_exit_port_in_the_32_bit_phase_ends_the_run_right_after_the_out(mode: str) -> None:
    _m, image, _info, r = boot(inline("movb $7, %al\noutb %al, $0xf4\n.globl after\nafter: cli\nhlt\n"),
                               mode=mode)
    assert (r.outcome, r.exit_code, r.rip, r.icount) == ("exit", 7, image.symbols["after"], 2)


def test_paging_without_long_mode_ends_the_run() -> None:
    src = inline("""
    movl %cr4, %eax
    orl $0x10, %eax              # CR4.PSE: a 4-MiB page maps the first 4 MiB
    movl %eax, %cr4
    movl $pd, %eax
    movl %eax, %cr3
    movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0              # 32-bit paging, no long mode
    .globl paged
paged:
    hlt
""", """
    .data
    .balign 4096
pd: .long 0x83
    .fill 1023, 4, 0
""")
    _m, image, _info, r = boot(src)
    assert (r.outcome, r.rip, r.icount) == ("unsupported", image.symbols["paged"], 8)
    assert r.reason == (f"paging enabled without long mode (32-bit or PAE paging) at "
                        f"{image.symbols['paged']:#x}: only 4-level paging in long mode is "
                        "modelled")


def test_an_injection_due_in_the_32_bit_phase_ends_the_run() -> None:
    m = Machine(MEMORY)
    mb.load(m, mb.read_image(build(inline("nop\n" * 10 + "hlt\n"))))
    m.inject("nmi", icount=3)
    r = m.run()
    assert (r.outcome, r.icount) == ("unsupported", 3)
    assert r.reason == ("an injected NMI arrives in 32-bit mode ({'at_icount': 3}); events are "
                        "modelled in real-address mode and from the switch to 64-bit mode on")


def test_the_instruction_limit_applies_in_the_32_bit_phase() -> None:
    _m, _image, _info, r = boot(inline("1: jmp 1b\n"), max_insns=500)
    assert (r.outcome, r.icount) == ("max_insns", 500)


def test_cpuid_in_the_32_bit_phase_answers_as_the_machine_does() -> None:
    src = inline("""
    movl $1, %eax
    cpuid
    movl %ecx, ecx1
    movl %edx, edx1
    movl $0x80000001, %eax
    cpuid
    movl %edx, edx_ext
    movb $0, %al
    outb %al, $0xf4
""", """
    .data
    .globl ecx1, edx1, edx_ext
ecx1: .long 0
edx1: .long 0
edx_ext: .long 0
""")
    for apic in (True, False):
        m, image, _info, r = boot(src, apic=apic)
        assert r.outcome == "exit"
        edx1 = m.phys.read_uint(image.symbols["edx1"], 4)
        assert bool(edx1 & (1 << 9)) is apic  # CPUID.1:EDX.APIC
        assert m.phys.read_uint(image.symbols["ecx1"], 4) & (1 << 31) == 0  # no hypervisor
        assert m.phys.read_uint(image.symbols["edx_ext"], 4) & (1 << 26)  # 1-GiB pages
        assert m.phys.read_uint(image.symbols["edx_ext"], 4) & (1 << 29)  # long mode


def test_cpuid_in_the_32_bit_phase_passes_ecx_as_the_subleaf() -> None:
    src = inline("""
    movl $0xd, %eax
    xorl %ecx, %ecx
    cpuid
    movl %eax, d0
    movl $0xd, %eax
    movl $1, %ecx
    cpuid
    movl %eax, d1
    movb $0, %al
    outb %al, $0xf4
""", """
    .data
    .globl d0, d1
d0: .long 0
d1: .long 0
""")
    m, image, _info, r = boot(src)
    assert r.outcome == "exit"
    assert m.phys.read_uint(image.symbols["d0"], 4) == m.model.cpuid(0xD, 0)[0]
    assert m.phys.read_uint(image.symbols["d1"], 4) == m.model.cpuid(0xD, 1)[0]
    assert m.model.cpuid(0xD, 0)[0] != m.model.cpuid(0xD, 1)[0]


def test_the_shutdown_string_ends_the_boot64_run_when_the_exit_port_does_not(tmp_path: Path) -> None:
    # boot64 writes 0xF4 then "Shutdown": with the 0xF4 write turned into a write to an
    # unknown port, the Bochs port ends the run.
    path = build("boot64.S")
    raw = bytearray(path.read_bytes())
    image = mb.read_image(path)
    p = image.physical(image.symbols["after_bp"] + 0x15)  # the `out %al, $0xf4`
    seg = image.segments[0]
    off = next(i for i in range(len(raw)) if raw[i:i + len(seg.data)] == seg.data)
    at = off + (p - seg.paddr)
    assert raw[at:at + 2] == b"\xe6\xf4"
    raw[at + 1] = 0xF5
    patched = tmp_path / "boot64-noexit.mb"
    patched.write_bytes(bytes(raw))
    m = Machine(MEMORY)
    mb.load(m, mb.read_image(patched))
    r = m.run()
    assert (r.outcome, r.exit_code, r.reason) == ("exit", None, SHUTDOWN_DETAIL)
    assert [(p["direction"], p["port"]) for p in r.trace.of_kind("port")] == [("out", 0xF5)]
    assert r.trace.of_kind("end")[0]["detail"] == 'Bochs shutdown port 0x8900: "Shutdown"'


def test_idtlab_run_image_prints_the_serial_lines_and_a_summary() -> None:
    path = build("boot64.S")
    proc = subprocess.run([sys.executable, "-m", "idtlab.cli", "run", "--image", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == SERIAL.splitlines()
    assert lines[3].startswith("idtlab: boot64.mb: exit (exit device: 0x0) at after_bp+0x17; ")
    assert len(lines) == 4


def test_idtlab_run_image_exits_1_when_the_image_fails_and_2_on_bad_input(tmp_path: Path) -> None:
    fail = build(inline("movb $1, %al\noutb %al, $0xf4\n"))
    proc = subprocess.run([sys.executable, "-m", "idtlab.cli", "run", "--image", str(fail)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "exit (exit device: 0x1)" in proc.stdout
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"\x7fELF" + bytes(100))
    proc = subprocess.run([sys.executable, "-m", "idtlab.cli", "run", "--image", str(junk)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr == (f"idtlab: error: {junk}: no multiboot header (magic 0x1badb002, "
                           "4-byte aligned) in the first 8 KiB\n")


def test_a_multiboot_scenario_runs_without_a_run_entry(tmp_path: Path) -> None:
    from idtlab import scenario as scn

    path = build("boot64.S")
    toml = tmp_path / "mb.toml"
    toml.write_text(f"""
[machine]
memory = "64M"
[[image]]
elf = "{path}"
multiboot = true
cmdline = "hello"
[[expect]]
outcome = "exit"
[[expect]]
exit_code = 0
[[expect]]
serial = {json.dumps(SERIAL)}
[[expect]]
kinds = ["boot", "mode_switch", "deliver", "iret", "end"]
[[expect]]
deliveries = ["#BP"]
""")
    sc = scn.load(toml)
    result = scn.run(sc)
    assert scn.check(sc, result) == []
    assert result.trace.of_kind("boot")[0]["cmdline"] == "hello"
    assert sc.symbols["bp_handler"] == mb.read_image(path).symbols["bp_handler"]


@pytest.mark.parametrize(("extra", "message"), [
    ("[idt]\n3 = { handler = 0x100000 }\n", "[idt]: not with a multiboot image (the image builds "
                                            "its own structures and loads its own code)"),
    ("[run]\nentry = 0x100000\n", "[run] entry: not with a multiboot image (it starts at its own "
                                  "32-bit entry, in the state the multiboot specification defines)"),
])
def test_a_multiboot_scenario_refuses_what_the_image_owns(tmp_path: Path, extra: str,
                                                          message: str) -> None:
    from idtlab import scenario as scn
    from idtlab.errors import BadInput

    toml = tmp_path / "mb.toml"
    toml.write_text(f'[[image]]\nelf = "{build("boot64.S")}"\nmultiboot = true\n{extra}')
    with pytest.raises(BadInput) as exc:
        scn.load(toml)
    assert str(exc.value) == f"mb.toml: {message}"


def test_a_multiboot_scenario_prints_the_serial_lines_as_they_come(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from idtlab.cli import main

    toml = tmp_path / "live.toml"
    toml.write_text(f'[[image]]\nelf = "{build("boot64.S")}"\nmultiboot = true\n'
                    '[[expect]]\nexit_code = 0\n')
    assert main(["run", str(toml)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [f"idtlab: {toml}: serial output",
                       *(f"  | {line}" for line in SERIAL.splitlines())]
    assert "serial output:" not in out  # not printed a second time after the timeline
    assert out[-1] == "1/1 expectations hold"
