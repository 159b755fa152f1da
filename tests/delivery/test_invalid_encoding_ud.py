"""Encodings the SDM makes #UD that the engine executes anyway (cpu/decode.py
`invalid_encoding`): MOVBE with a register operand (SDM Vol. 2 MOVBE has memory forms
only; kvm-unit-tests x86/emulator.c test_illegal_movbe). A fault: saved RIP = the
instruction, RF = 1, the register unchanged; the decode goes on after it, so the HLT
behind it is still a site. With F2, the same opcode is CRC32, whose register form runs."""

from __future__ import annotations

import pytest

from cpu.decode import invalid_encoding
from tests.delivery.rig import (
    CODE,
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
    mov eax, 0x11223344
the_insn:
    .byte {code}
after:
    hlt
ud_handler:
    add qword ptr [rsp], {length}
    iretq
"""


@pytest.mark.parametrize("code", [
    "0x0f, 0x38, 0xf0, 0xc0",        # movbe eax, eax (load form, register source)
    "0x0f, 0x38, 0xf1, 0xc0",        # movbe eax, eax (store form, register destination)
    "0x48, 0x0f, 0x38, 0xf0, 0xc0",  # REX.W
    "0x66, 0x0f, 0x38, 0xf1, 0xc8",  # operand-size prefix
])
def test_movbe_with_a_register_operand_is_ud_and_changes_nothing(code: str) -> None:
    length = code.count(",") + 1
    m, sym = build(SOURCE.format(code=code, length=length), gates={UD: gate("ud_handler")})
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    (seen,) = frames.seen
    expect(seen, vector=UD, stack="current", stack_top=KERNEL_STACK, source="exception",
           handler=sym["ud_handler"],
           frame=Frame(rip=sym["the_insn"], cs=KERNEL_CS, rflags=START_RFLAGS | RFLAGS_RF,
                       rsp=KERNEL_STACK, ss=KERNEL_DS))
    assert seen[0]["icount"] == 1
    assert m.engine.read_reg("rax") == 0x11223344
    assert one(r.trace.records, "iret")["to_rip"] == sym["after"]
    assert (r.outcome, r.rip) == ("hlt", sym["after"] + 1)


def test_crc32_the_same_opcode_with_f2_runs_with_a_register_operand() -> None:
    m, sym = build(SOURCE.format(code="0xf2, 0x0f, 0x38, 0xf1, 0xc0", length=5),  # crc32 eax, eax
                   gates={UD: gate("ud_handler")})
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)
    assert deliveries(r.trace.records) == []
    assert (r.outcome, r.rip) == ("hlt", sym["after"] + 1)
    assert m.engine.read_reg("rax") != 0x11223344


def test_only_movbe_register_forms_are_named_invalid() -> None:
    assert invalid_encoding(bytes.fromhex("0f38f0c0")) == (4, "MOVBE with a register operand")
    assert invalid_encoding(bytes.fromhex("0f38f000")) is None      # movbe eax, [rax]
    assert invalid_encoding(bytes.fromhex("f20f38f0c0")) is None    # crc32 eax, al
    assert invalid_encoding(bytes.fromhex("90")) is None
