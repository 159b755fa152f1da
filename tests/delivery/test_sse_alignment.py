"""A legacy SSE instruction's 128-bit memory operand must be 16-byte aligned, and the
aligned VEX moves' 16/32-byte ones too: #GP(0) otherwise (SDM Vol. 1 "Data Alignment for
128-Bit Data"; Vol. 2 MOVAPS, MOVDQA, ADDPS...). The engine checks none of them, so each
such instruction is a checked site (cpu/checked_sites.py `CheckedSites.sse_align`). A
fault: saved RIP = the instruction, RF = 1, memory and registers unchanged. MOVUPS,
MOVDQU, LDDQU and the VEX forms other than the aligned moves need no alignment
(kvm-unit-tests x86/emulator.c test_sse_exceptions)."""

from __future__ import annotations

import pytest

from cpu.machine import Machine
from cpu.outcomes import RunResult
from tests.delivery.rig import (
    CODE,
    DATA,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_RF,
    START_RFLAGS,
    Frame,
    build,
    deliveries,
    gate,
    one,
)
from tests.events.kit import Frames, expect

GP = 13
SOURCE = """
start:
    mov rbx, {address}
    pcmpeqb xmm0, xmm0
the_insn:
    {insn}
after:
    hlt
gp_handler:
    add rsp, 8                          # the error code
    add qword ptr [rsp], {length}
    iretq
"""


def run(insn: str, length: int, address: int) -> tuple[Machine, dict[str, int], Frames, RunResult]:
    m, sym = build(SOURCE.format(insn=insn, length=length, address=address),
                   gates={GP: gate("gp_handler")})
    m.phys.write(DATA, bytes(64))
    frames = Frames(m)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)
    return m, sym, frames, r


@pytest.mark.parametrize(("insn", "length"), [
    ("movaps xmmword ptr [rbx], xmm0", 3),
    ("movaps xmm1, xmmword ptr [rbx]", 3),
    ("movdqa xmmword ptr [rbx], xmm0", 4),
    ("addps xmm1, xmmword ptr [rbx]", 3),
    ("pxor xmm1, xmmword ptr [rbx]", 4),
    ("movntdq xmmword ptr [rbx], xmm0", 4),
])
@pytest.mark.parametrize("offset", [8, 1])
def test_a_misaligned_128_bit_sse_operand_is_gp0_and_writes_nothing(
        insn: str, length: int, offset: int) -> None:
    m, sym, frames, r = run(insn, length, DATA + offset)
    (seen,) = frames.seen
    expect(seen, vector=GP, stack="current", stack_top=KERNEL_STACK, source="exception",
           handler=sym["gp_handler"],
           frame=Frame(rip=sym["the_insn"], cs=KERNEL_CS, rflags=START_RFLAGS | RFLAGS_RF,
                       rsp=KERNEL_STACK, ss=KERNEL_DS, error_code=0))
    assert seen[0]["icount"] == 2  # the MOV and PCMPEQB; the SSE instruction did not retire
    assert m.phys.read(DATA, 64) == bytes(64)
    assert one(r.trace.records, "iret")["to_rip"] == sym["after"]


@pytest.mark.parametrize(("insn", "length"), [
    ("movaps xmmword ptr [rbx], xmm0", 3),
    ("movups xmmword ptr [rbx + 8], xmm0", 4),
    ("movdqu xmmword ptr [rbx + 8], xmm0", 5),
    ("vmovups xmmword ptr [rbx + 8], xmm0", 5),
])
def test_an_aligned_operand_or_an_unaligned_form_runs(insn: str, length: int) -> None:
    m, sym, _frames, r = run(insn, length, DATA + 16)
    assert deliveries(r.trace.records) == []
    assert (r.outcome, r.rip) == ("hlt", sym["after"] + 1)
    written = m.phys.read(DATA, 64)
    assert written.count(0xFF) == 16
