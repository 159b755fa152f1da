"""Sites follow execution (cpu/sites.py): an IRET, HLT or other intercepted instruction is
found where execution actually goes, whatever lies between it and the code loaded before
it, and follows code the guest writes.

The failure each test guards against is silent: an IRETQ the engine runs natively still
returns, but NMIs stay blocked (SDM Vol. 3A "NMI Handling": blocking lasts "until the next
IRET") and there is no `iret` record; a HLT overwritten with a NOP that still stops as a
HLT ends the run early.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

import cpu.engine_counting as counting
import cpu.sites as sites
from cpu.decode import decode as capstone_decode
from cpu.decode import decode_loaded
from cpu.events import Before, Nmi
from cpu.machine import Machine
from idtlab.assemble import CodeBlock, assemble_blocks

CODE = 0x100000
BUFFER = 0x200000  # guest RAM that holds no loaded code
STACK = 0x70000
NMI = 2
UD = 6
BP = 3


def build(source: str, gates: dict[int, str | int], *, mode: str = "fast") -> tuple[Machine, dict[str, int]]:
    blocks, symbols = assemble_blocks(
        [CodeBlock(CODE, textwrap.dedent(source), origin="test", first_line=1)],
        known={"BUFFER": BUFFER})
    m = Machine(16 << 20, mode=mode)
    for b in blocks:
        m.load(b.at, b.code, code=True)
    for vector, handler in gates.items():
        m.set_gate(vector, symbols[handler] if isinstance(handler, str) else handler)
    return m, symbols


def kinds(records: list[dict[str, Any]]) -> list[str]:
    return [r["kind"] for r in records if r["kind"] in ("deliver", "iret", "end")]


def test_an_iretq_after_an_undecodable_byte_is_emulated_and_unblocks_nmis() -> None:
    # The NMI handler's IRETQ follows a #UD test byte (0x06 is #UD in 64-bit mode): a
    # linear decode of the loaded code stops there and never sees the IRETQ.
    m, s = build("""
        start:
            nop
        second:
            nop
            hlt
        ud_test:
            .byte 0x06
        nmi_handler:
            iretq
    """, {NMI: "nmi_handler"})
    m.inject(Nmi(), Before(s["start"]))
    m.inject(Nmi(), Before(s["second"]))
    result = m.run(entry=s["start"], rsp=STACK)
    irets = [r for r in result.trace.records if r["kind"] == "iret"]
    assert [(r["rip"], r["nmi_unblocked"]) for r in irets] == [
        (s["nmi_handler"], True), (s["nmi_handler"], True)]
    assert [d["rip"] for d in result.deliveries] == [s["start"], s["second"]]
    assert result.outcome == "hlt"
    assert not m.nmi_blocked


def test_a_ud_test_at_the_entry_does_not_hide_the_handler_after_it() -> None:
    # The very first instruction the engine runs faults: its handler must be found too.
    m, s = build("""
        start:
            .byte 0x06
            hlt
        ud_handler:
            add qword ptr [rsp], 1
            iretq
    """, {UD: "ud_handler"})
    result = m.run(entry=s["start"], rsp=STACK)
    assert kinds(result.trace.records) == ["deliver", "iret", "end"]
    iret = next(r for r in result.trace.records if r["kind"] == "iret")
    assert (iret["rip"], iret["to_rip"]) == (s["ud_handler"] + 4 + 1, s["start"] + 1)
    assert (result.outcome, result.rip) == ("hlt", s["start"] + 2)


def test_a_string_and_a_jump_table_before_a_handler_do_not_hide_its_sites() -> None:
    m, s = build("""
        start:
            int3
            hlt
        message:
            .byte 0x06, 0x0f, 0xff
            .ascii "bytes that are not code"
        table:
            .quad 0x0f0f0f0f0f0f0f0f, 0xffffffffffffffff
        bp_handler:
            sti
            nop
            iretq
    """, {BP: "bp_handler"})
    result = m.run(entry=s["start"], rsp=STACK)
    assert kinds(result.trace.records) == ["deliver", "iret", "end"]
    assert m.sites.kinds[s["bp_handler"]].value == "sti"
    assert (result.outcome, result.rip) == ("hlt", s["start"] + 2)


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_self_modifying_code_turns_an_iret_into_nops_and_back(mode: str) -> None:
    m, s = build("""
        start:
            int3
            mov word ptr [h], 0x9066
            int3
            mov word ptr [h], 0xcf48
            int3
            hlt
        h:
            iretq
            iretq
    """, {BP: "h"}, mode=mode)
    result = m.run(entry=s["start"], rsp=STACK)
    irets = [r["rip"] for r in result.trace.records if r["kind"] == "iret"]
    # Second #BP: `h` holds a 2-byte NOP (66 90), and the IRETQ after it returns.
    assert irets == [s["h"], s["h"] + 2, s["h"]]
    assert (result.outcome, result.rip) == ("hlt", s["h"])
    # Three INT3, two MOV, one HLT, and the handler's 1 + 2 + 1 instructions.
    assert result.icount == 3 + 2 + 1 + 4


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_an_overwritten_hlt_runs_as_a_nop(mode: str) -> None:
    m, s = build("""
        start:
            mov byte ptr [spot], 0x90
        spot:
            hlt
            mov rax, 0x1234
            hlt
    """, {}, mode=mode)
    result = m.run(entry=s["start"], rsp=STACK)
    assert (result.outcome, result.rip) == ("hlt", s["spot"] + 1 + 7 + 1)
    assert m.engine.read_reg("rax") == 0x1234
    assert result.icount == 4


def test_code_the_guest_writes_and_then_runs_has_its_sites() -> None:
    # The guest writes an NMI handler (IRETQ, 48 cf) into RAM that held no code.
    m, s = build("""
        start:
            mov word ptr [BUFFER], 0xcf48
        after_copy:
            nop
            hlt
    """, {NMI: BUFFER})
    m.inject(Nmi(), Before(s["after_copy"]))
    result = m.run(entry=s["start"], rsp=STACK)
    iret = next(r for r in result.trace.records if r["kind"] == "iret")
    assert (iret["rip"], iret["to_rip"], iret["nmi_unblocked"]) == (BUFFER, s["after_copy"], True)
    assert not m.nmi_blocked
    assert result.outcome == "hlt"


def test_a_rollback_puts_back_code_a_schedule_changed() -> None:
    # The run overwrites its own HLT; after a rollback to before the write, the HLT is
    # there again and stops the run as it did the first time.
    m, s = build("""
        start:
            nop
            mov byte ptr [spot], 0x90
        spot:
            hlt
            mov rax, 0x1234
            hlt
    """, {})
    first = m.run(entry=s["start"], rsp=STACK, pause_at=(s["start"], 1))
    assert first.outcome == "pause"
    cp = m.checkpoint()
    one = m.run()
    m.rollback(cp)
    m.engine.write({"rax": 0})
    again = m.run()
    assert (one.outcome, one.rip, one.icount) == (again.outcome, again.rip, again.icount) == (
        "hlt", s["spot"] + 9, 5)
    # And the code in memory is the checkpoint's again, so a fresh start stops at `spot`
    # only if the guest's write did not happen: the rollback restored the HLT byte.
    m.rollback(cp)
    assert m.phys.read(s["spot"], 1) == b"\xf4"


def test_an_iretq_hidden_inside_another_instructions_bytes_is_found_when_run() -> None:
    # `mov rax, imm64` whose immediate holds 48 cf (IRETQ): a linear decode sees one
    # MOV; the #BP handler jumps into the immediate and runs the IRETQ there.
    m, s = build("""
        start:
            int3
            hlt
        bp_handler:
            jmp inner
        outer:
            .byte 0x48, 0xb8
        inner:
            .byte 0x48, 0xcf, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90
    """, {BP: "bp_handler"})
    assert s["inner"] not in m.sites.kinds  # the load-time decode did not see it
    result = m.run(entry=s["start"], rsp=STACK)
    iret = next(r for r in result.trace.records if r["kind"] == "iret")
    assert (iret["rip"], iret["to_rip"]) == (s["inner"], s["start"] + 1)
    assert (result.outcome, result.rip) == ("hlt", s["start"] + 2)


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_a_store_that_rewrites_its_own_bytes_runs_once(mode: str) -> None:
    # c6 05 disp32 imm8 writes 0xc6 over its own first byte (the same value): QEMU drops
    # the block and runs the store again in a block of its own (found by the fuzzer: it
    # looped for ever).
    m, s = build("""
        start:
            mov byte ptr [start], 0xc6
            mov byte ptr [start], 0xc6
            hlt
    """, {}, mode=mode)
    result = m.run(entry=s["start"], rsp=STACK, max_insns=100)
    assert (result.outcome, result.rip, result.icount) == ("hlt", s["start"] + 15, 3)


def test_a_block_that_is_the_tail_of_a_decoded_block_is_not_decoded_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An NMI before `mid` splits the straight-line block at `start`: the engine then
    # generates a block at `mid`, which is the tail of the one decoded at `start`. Its
    # sites (the HLT) and its instruction starts are those of that decode: neither the
    # site table nor the block counter decodes it again, and the run counts the same.
    source = """
        start:
            mov eax, 1
            mov ebx, 2
        mid:
            mov ecx, 3
            mov edx, 4
            hlt
        nmi_handler:
            iretq
    """
    scan, decode = decode_loaded, capstone_decode  # what the two modules call

    def run(reuse: bool) -> tuple[Any, list[int], list[int]]:
        m, s = build(source, {NMI: "nmi_handler"})
        scanned: list[int] = []
        counted: list[int] = []
        def scanning(code: bytes, pc: int) -> Any:
            scanned.append(pc)
            return scan(code, pc)

        def counting_decode(code: bytes, pc: int, bits: int = 64) -> Any:
            counted.append(pc)
            return decode(code, pc, bits=bits)
        monkeypatch.setattr(sites, "decode_loaded", scanning)
        monkeypatch.setattr(counting, "decode", counting_decode)
        if not reuse:
            monkeypatch.setattr(m.sites, "_decoded_around", lambda pc, end: None)
            monkeypatch.setattr(m.engine, "starts_hint", lambda pc, size: None)
        m.inject(Nmi(), Before(s["mid"]))
        r = m.run(entry=s["start"], rsp=STACK)
        return (r.outcome, r.rip, r.icount, r.cycles, r.trace.records), scanned, counted
    (got, scanned, counted), (want, scanned_all, counted_all) = run(True), run(False)
    _m, s = build(source, {NMI: "nmi_handler"})
    assert got == want
    assert got[0] == "hlt" and [r["vector"] for r in got[4] if r["kind"] == "deliver"] == [NMI]
    assert s["mid"] in scanned_all and s["mid"] not in scanned
    assert s["mid"] in counted_all and s["mid"] not in counted
