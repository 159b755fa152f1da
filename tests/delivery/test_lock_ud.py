"""LOCK on an instruction or form that cannot be locked is #UD (SDM Vol. 2 LOCK: "An
undefined opcode exception will also be generated if the LOCK prefix is used with any
instruction not in the above list ... or with an instruction whose destination is not a
memory operand"). A fault: saved RIP = the LOCK-prefixed instruction, RF = 1, nothing
written. The engine runs some of these forms (QEMU runs LOCK MOV), so the machine finds
them when code is loaded (`cpu.decode.decode_loaded`) and raises the #UD itself; the
decode goes on after them, so the sites behind them still work.
"""

from __future__ import annotations

import pytest

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

UD = 6
SOURCE = """
start:
    mov rbx, DATA
    mov rax, 0x1234
the_lock:
    .byte {code}
after_lock:
    hlt
ud_handler:
    add qword ptr [rsp], {length}
    iretq
"""


@pytest.mark.parametrize("code", [
    "0xf0, 0x48, 0x89, 0x03",   # lock mov qword ptr [rbx], rax
    "0xf0, 0x48, 0x01, 0xd8",   # lock add rax, rbx (register destination)
    "0xf0, 0x48, 0x39, 0x03",   # lock cmp qword ptr [rbx], rax (not lockable)
    "0xf0, 0x48, 0x8b, 0x03",   # lock mov rax, qword ptr [rbx]
])
def test_a_lock_prefix_on_a_form_that_cannot_be_locked_is_ud_and_writes_nothing(code: str) -> None:
    length = code.count(",") + 1
    m, sym = build(SOURCE.format(code=code, length=length), gates={UD: gate("ud_handler")})
    m.phys.write(DATA, bytes(8))
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    (seen,) = frames.seen
    expect(seen, vector=UD, stack="current", stack_top=KERNEL_STACK, source="exception",
           handler=sym["ud_handler"],
           frame=Frame(rip=sym["the_lock"], cs=KERNEL_CS, rflags=START_RFLAGS | RFLAGS_RF,
                       rsp=KERNEL_STACK, ss=KERNEL_DS))
    assert seen[0]["icount"] == 2  # the two MOVs; the locked instruction did not retire
    assert m.phys.read(DATA, 8) == bytes(8)
    assert m.engine.read_reg("rax") == 0x1234
    assert one(r.trace.records, "iret")["to_rip"] == sym["after_lock"]
    # The HLT after the illegal form was decoded at load time: it is emulated (a site).
    assert (r.outcome, r.rip, r.reason) == ("hlt", sym["after_lock"] + 1,
                                            "HLT with no event that can wake the CPU")


def test_a_lock_prefix_on_a_lockable_instruction_with_a_memory_destination_runs() -> None:
    m, sym = build(SOURCE.format(code="0xf0, 0x48, 0x01, 0x03", length=4),  # lock add [rbx], rax
                   gates={UD: gate("ud_handler")})
    m.phys.write(DATA, (5).to_bytes(8, "little"))

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert deliveries(r.trace.records) == []
    assert m.phys.read(DATA, 8) == (5 + 0x1234).to_bytes(8, "little")
    assert (r.outcome, r.rip) == ("hlt", sym["after_lock"] + 1)
