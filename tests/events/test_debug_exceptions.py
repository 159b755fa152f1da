"""The debug registers in the machine (SDM Vol. 3B "Debug Registers", "Debug Exceptions";
the pure rules are tests/unit/test_debug_registers.py): MOV DR and its faults, general
detect, instruction breakpoints (faults, suppressed by RF = 1 for exactly the instruction
an IRETQ returns to), data breakpoints (traps after the access, one #DB with a single
step; held by MOV SS until the next instruction has run), I/O breakpoints with CR4.DE.

Every #DB handler here sets RF and clears TF in its frame, then returns; the frame and
DR6/DR7 are captured at delivery. A #DB never pushes RF = 1 (only other faults do).
Both counting modes.
"""

from __future__ import annotations

from typing import Any

import pytest

from cpu.machine import Machine
from tests.delivery.rig import (
    CODE,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_RF,
    RSP0_TOP,
    START_RFLAGS,
    USER_CS,
    USER_DS,
    USER_STACK,
    Frame,
    gate,
    handler_rsp,
)
from tests.events.kit import Frames, build, expect

MODES = ["fast", "timed"]
DB, UD, GP = 1, 6, 13
DR6_INIT, DR6_BD, DR6_BS = 0xFFFF0FF0, 1 << 13, 1 << 14
DR7_INIT, DR7_GD = 0x400, 1 << 13
RFLAGS_TF = 0x100
HANDLERS = """
db_handler:
    bts qword ptr [rsp + 16], 16        # RF: the faulting instruction runs once
    btr qword ptr [rsp + 16], 8         # TF off: one #DB per test
    iretq
fault_handler:
    hlt
"""


class Run:
    def __init__(self, m: Machine, sym: dict[str, int], result: Any, frames: Frames,
                 drs: list[tuple[int, int]]) -> None:
        self.m, self.sym, self.r, self.frames, self.drs = m, sym, result, frames, drs


def run(code: str, *, mode: str, cpl: int = 0) -> Run:
    m, sym = build("start:\n" + code + "\n    hlt\n" + HANDLERS,
                   gates={DB: gate("db_handler"), UD: gate("fault_handler"),
                          GP: gate("fault_handler")}, mode=mode)
    frames = Frames(m)
    drs: list[tuple[int, int]] = []
    m.on_deliver.append(lambda rec: drs.append((m.engine.read_reg("dr6"), m.engine.read_reg("dr7"))))
    r = m.run(entry=CODE, rsp=USER_STACK if cpl else KERNEL_STACK, cpl=cpl,
              rflags=START_RFLAGS, max_insns=500)
    assert r.outcome == "hlt", r.reason
    return Run(m, sym, r, frames, drs)


def db_at(ran: Run, rip: int, rflags: int = START_RFLAGS) -> None:
    """Exactly one #DB, pushed with RIP = `rip` and `rflags` (never RF)."""
    (seen,) = ran.frames.seen
    expect(seen, vector=DB, stack="current", stack_top=KERNEL_STACK, source="exception",
           handler=ran.sym["db_handler"],
           frame=Frame(rip=rip, cs=KERNEL_CS, rflags=rflags, rsp=KERNEL_STACK, ss=KERNEL_DS))


def arm(dr: int, address: str, dr7: int) -> str:
    return f"""    lea rax, [rip + {address}]
    mov dr{dr}, rax
    mov eax, {DR7_INIT | dr7:#x}
    mov dr7, rax"""


# -- MOV DR -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_mov_to_and_from_debug_registers_keeps_the_bits_that_read_as_fixed(mode: str) -> None:
    ran = run("""
    mov rax, 0x123456789
    mov dr3, rax
    xor eax, eax
    mov dr6, rax            # reads back with its fixed ones: 0xffff0ff0
    mov dr7, rax            # bit 10 reads as 1
    mov r8, dr3
    mov r9, dr6
    mov r10, dr7
    mov r11, dr4            # CR4.DE = 0: DR4 is DR6
""", mode=mode)
    assert ran.m.engine.read(("r8", "r9", "r10", "r11")) == [0x123456789, DR6_INIT, DR7_INIT,
                                                            DR6_INIT]
    assert ran.frames.seen == []


@pytest.mark.parametrize("mode", MODES)
def test_a_mov_dr_at_cpl3_is_gp_0(mode: str) -> None:
    ran = run("the_mov:\n    mov rax, dr7", mode=mode, cpl=3)
    (seen,) = ran.frames.seen
    expect(seen, vector=GP, stack="rsp0", stack_top=RSP0_TOP, source="exception",
           handler=ran.sym["fault_handler"],
           frame=Frame(error_code=0, rip=ran.sym["the_mov"], cs=USER_CS,
                       rflags=START_RFLAGS | RFLAGS_RF, rsp=USER_STACK, ss=USER_DS))


@pytest.mark.parametrize("mode", MODES)
def test_with_cr4_de_a_mov_from_dr5_is_ud(mode: str) -> None:
    ran = run("""
    mov rax, cr4
    or rax, 8
    mov cr4, rax
    push 0x202
    popfq
the_mov:
    mov rax, dr5""", mode=mode)
    (seen,) = ran.frames.seen
    expect(seen, vector=UD, stack="current", stack_top=KERNEL_STACK, source="exception",
           handler=ran.sym["fault_handler"],
           frame=Frame(rip=ran.sym["the_mov"], cs=KERNEL_CS, rflags=START_RFLAGS | RFLAGS_RF,
                       rsp=KERNEL_STACK, ss=KERNEL_DS))


@pytest.mark.parametrize("mode", MODES)
def test_dr7_gd_makes_the_next_mov_dr_a_db_fault_with_bd_and_clears_gd(mode: str) -> None:
    ran = run(f"""
    mov eax, {DR7_INIT | DR7_GD:#x}
    mov dr7, rax
the_mov:
    mov rax, dr0
    mov r8, dr7             # after the handler: GD is clear, so this one runs""", mode=mode)
    db_at(ran, ran.sym["the_mov"])
    assert ran.drs == [(DR6_INIT | DR6_BD, DR7_INIT)]
    assert ran.frames.seen[0][0]["icount"] == 2
    assert ran.m.engine.read_reg("r8") == DR7_INIT


# -- instruction breakpoints ---------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_an_instruction_breakpoint_is_a_fault_before_the_instruction_which_then_runs_once(
        mode: str) -> None:
    ran = run(arm(1, "target", 0x4) + """
    mov qword ptr [rip + counter], 0
target:
    inc qword ptr [rip + counter]
    mov r8, qword ptr [rip + counter]
    hlt
counter:
    .quad 0""", mode=mode)
    db_at(ran, ran.sym["target"])
    assert ran.drs == [(DR6_INIT | 0x2, DR7_INIT | 0x4)]
    assert ran.frames.seen[0][0]["icount"] == 5  # the INC did not retire
    assert ran.m.engine.read_reg("r8") == 1      # RF = 1 from the IRETQ: it ran once


@pytest.mark.parametrize("mode", MODES)
def test_rf_from_an_iretq_suppresses_only_the_instruction_it_returns_to(mode: str) -> None:
    # IRETQ with RF = 1 to `first`; the breakpoint is on `second`, in the same straight
    # line (the engine clears RF only at the end of a translation block).
    ran = run(arm(0, "second", 0x1) + """
    mov rax, rsp
    push 0x10
    push rax
    push 0x10002
    push 0x8
    lea rax, [rip + first]
    push rax
    iretq
first:
    nop
second:
    nop""", mode=mode)
    db_at(ran, ran.sym["second"], rflags=0x2)
    assert ran.drs == [(DR6_INIT | 0x1, DR7_INIT | 0x1)]


# -- data breakpoints ---------------------------------------------------------------------

@pytest.mark.parametrize(("dr7", "access", "hit"), [
    (0x1 | 0x1 << 16 | 0x2 << 18, "mov qword ptr [rip + data], rax", True),    # write, 8 bytes
    (0x1 | 0x1 << 16 | 0x2 << 18, "mov rax, qword ptr [rip + data]", False),   # write ignores reads
    (0x1 | 0x3 << 16 | 0x3 << 18, "mov eax, dword ptr [rip + data]", True),    # read/write, 4
    (0x1 | 0x1 << 16 | 0x1 << 18, "mov dword ptr [rip + data - 2], eax", True),  # overlaps 2 bytes
    (0x1 | 0x1 << 16 | 0x1 << 18, "mov byte ptr [rip + data + 2], al", False),   # next to it
    (0x1 | 0x1 << 16 | 0x2 << 18, "add qword ptr [rip + data], 1", True),      # read-modify-write
])
@pytest.mark.parametrize("mode", MODES)
def test_a_data_breakpoint_is_a_trap_after_an_access_that_overlaps_it(
        dr7: int, access: str, hit: bool, mode: str) -> None:
    ran = run(arm(0, "data", dr7) + f"""
    mov rax, 0x1122334455667788
the_access:
    {access}
after:
    mov ecx, 0x400
    mov dr7, rcx            # disarmed: the read below is not a hit
    mov r8, qword ptr [rip + data]
    hlt
    .balign 16
    .quad 0
data:
    .quad 0""", mode=mode)
    if hit:
        db_at(ran, ran.sym["after"])
        assert ran.drs == [(DR6_INIT | 0x1, DR7_INIT | dr7)]
        assert ran.frames.seen[0][0]["icount"] == 6  # the access retired
    else:
        assert ran.frames.seen == []
    # The access was done, once.
    expect_data = {"mov qword ptr [rip + data], rax": 0x1122334455667788,
                   "add qword ptr [rip + data], 1": 1,
                   "mov dword ptr [rip + data - 2], eax": 0x5566,
                   "mov byte ptr [rip + data + 2], al": 0x880000}.get(access, 0)
    assert ran.m.engine.read_reg("r8") == expect_data


@pytest.mark.parametrize("mode", MODES)
def test_a_single_step_and_a_data_breakpoint_of_one_instruction_are_one_db(mode: str) -> None:
    ran = run(arm(0, "data", 0x1 | 0x1 << 16 | 0x2 << 18) + """
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    mov qword ptr [rip + data], rax
after:
    hlt
    .balign 8
data:
    .quad 0""", mode=mode)
    db_at(ran, ran.sym["after"], rflags=START_RFLAGS | RFLAGS_TF)
    assert ran.drs == [(DR6_INIT | DR6_BS | 0x1, DR7_INIT | 0x1 | 0x1 << 16 | 0x2 << 18)]


@pytest.mark.parametrize("mode", MODES)
def test_a_data_breakpoint_hit_by_mov_ss_is_reported_after_the_next_instruction(mode: str) -> None:
    ran = run(arm(0, "sel", 0x1 | 0x3 << 16 | 0x1 << 18) + """
    mov ss, word ptr [rip + sel]
    nop
after_next:
    hlt
sel:
    .word 0x10""", mode=mode)
    db_at(ran, ran.sym["after_next"])
    assert ran.drs[0][0] == DR6_INIT | 0x1
    assert ran.frames.seen[0][0]["icount"] == 6  # lea, mov dr0, mov eax, mov dr7, MOV SS, nop


@pytest.mark.parametrize("mode", MODES)
def test_an_instruction_breakpoint_right_after_mov_ss_is_not_reported_and_is_gone(mode: str) -> None:
    # Intel (the declared vendor): the breakpoint on `target` is inhibited by the MOV-SS
    # shadow; `target` runs; nothing is owed after it (kvm-unit-tests x86/emulator.c
    # test_mov_pop_ss_code_db).
    ran = run(arm(0, "target", 0x2) + """
    mov ss, word ptr [rip + sel]
target:
    mov r9, 7
    hlt
sel:
    .word 0x10""", mode=mode)
    assert ran.frames.seen == []
    assert ran.r.rip == ran.sym["target"] + 7 + 1 and ran.r.icount == 7
    assert ran.m.engine.read_reg("r9") == 7


@pytest.mark.parametrize("mode", MODES)
def test_an_instruction_breakpoint_two_instructions_after_mov_ss_is_reported(mode: str) -> None:
    ran = run(arm(0, "target", 0x2) + """
    mov ss, word ptr [rip + sel]
    nop
target:
    mov r9, 7
    hlt
sel:
    .word 0x10""", mode=mode)
    db_at(ran, ran.sym["target"])
    assert ran.drs[0][0] == DR6_INIT | 0x1


@pytest.mark.parametrize("mode", MODES)
def test_icebp_with_prefixes_is_a_db_trap_after_all_its_bytes(mode: str) -> None:
    ran = run("""
    clc
the_icebp:
    .byte 0x2e, 0x2e, 0xf1                 # cs cs int1 (kvm-unit-tests x86/debug.c)
after:
    hlt""", mode=mode)
    (seen,) = ran.frames.seen
    expect(seen, vector=DB, stack="current", stack_top=KERNEL_STACK, source="software",
           handler=ran.sym["db_handler"],
           frame=Frame(rip=ran.sym["after"], cs=KERNEL_CS, rflags=START_RFLAGS,
                       rsp=KERNEL_STACK, ss=KERNEL_DS))


BP = 3


@pytest.mark.parametrize(("insn", "vector", "length"), [("int3", BP, 1), ("int 3", BP, 2),
                                                        ("int 1", DB, 2)])
@pytest.mark.parametrize("mode", MODES)
def test_a_data_breakpoint_held_by_mov_ss_traps_at_the_handler_of_the_software_interrupt_after_it(
        insn: str, vector: int, length: int, mode: str) -> None:
    # MOV SS hits the watchpoint; the #DB is held until the next instruction completes:
    # here a software interrupt, which completes by delivering itself. The #DB trap comes
    # at the next boundary, the software interrupt handler's first instruction
    # (kvm-unit-tests x86/debug.c "MOV SS + watchpoint + int $1" / "+ INT3").
    m, sym = build("start:\n" + arm(0, "sel", 0x1 | 0x3 << 16 | 0x1 << 18) + f"""
    mov ss, word ptr [rip + sel]
the_int:
    {insn}
after:
    hlt
sel:
    .word 0x10
""" + HANDLERS + """
bp_handler:
    iretq
""", gates={DB: gate("db_handler", dpl=3), BP: gate("bp_handler", dpl=3),
            GP: gate("fault_handler")}, mode=mode)
    frames = Frames(m)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=500)
    assert (r.outcome, r.rip) == ("hlt", sym["after"] + 1)
    first, second = frames.seen
    handler = sym["bp_handler"] if vector == BP else sym["db_handler"]
    expect(first, vector=vector, stack="current", stack_top=KERNEL_STACK, source="software",
           handler=handler,
           frame=Frame(rip=sym["the_int"] + length, cs=KERNEL_CS, rflags=START_RFLAGS,
                       rsp=KERNEL_STACK, ss=KERNEL_DS))
    expect(second, vector=DB, stack="current", stack_top=handler_rsp(KERNEL_STACK, error_code=False),
           source="exception", handler=sym["db_handler"],
           frame=Frame(rip=handler, cs=KERNEL_CS, rflags=START_RFLAGS & ~0x200,
                       rsp=handler_rsp(KERNEL_STACK, error_code=False), ss=KERNEL_DS))
    assert second[0]["icount"] == first[0]["icount"]  # the same boundary: no instruction between


# -- I/O breakpoints ------------------------------------------------------------------------

@pytest.mark.parametrize(("cr4_de", "hit"), [(True, True), (False, False)])
@pytest.mark.parametrize("mode", MODES)
def test_an_io_breakpoint_traps_after_the_out_only_with_cr4_de(cr4_de: bool, hit: bool,
                                                              mode: str) -> None:
    de = ("mov rax, cr4\n    or rax, 8\n    mov cr4, rax" if cr4_de else "nop\n    nop\n    nop")
    de += "\n    push 0x202\n    popfq"
    ran = run(f"""
    {de}
    mov eax, 0x80
    mov dr2, rax
    mov eax, {DR7_INIT | 0x10 | 0x2 << 24:#x}
    mov dr7, rax
    out 0x80, al
after:
    nop""", mode=mode)
    if hit:
        db_at(ran, ran.sym["after"])
        assert ran.drs[0][0] == DR6_INIT | 0x4
        assert ran.frames.seen[0][0]["icount"] == 10
    else:
        assert ran.frames.seen == []
