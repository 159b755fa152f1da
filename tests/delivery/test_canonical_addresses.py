"""Non-canonical addresses (SDM Vol. 1 "Canonical Addressing"; Vol. 2 MOV/PUSH/POP/CALL,
"64-Bit Mode Exceptions"): the check is on every byte's linear address, before paging,
and the fault is decided by the segment of the access:

* #SS(0) for a stack access: the implicit one of PUSH/POP/CALL/RET, or an explicit
  operand whose *base* is RSP or RBP without an FS/GS override;
* #GP(0) for everything else: a DS-default operand (a memory operand of PUSH/POP/CALL
  included), an FS/GS override (even on an RBP or RSP base), an RBP *index*. CS, DS, ES
  and SS overrides are ignored in 64-bit mode.

An access whose first bytes are canonical and last bytes are not (it straddles
0x0000_7FFF_FFFF_FFFF) is #GP/#SS too, never a #PF on the last canonical page (which is
not mapped here). Both are faults: saved RIP = the instruction, RF = 1 in the pushed
RFLAGS, nothing of the instruction done (RSP as before a PUSH).

The #SS gate uses IST1 (a non-canonical RSP cannot take a frame).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from cpu.machine import Machine
from tests.delivery.rig import (
    CODE,
    IST1_TOP,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_RF,
    START_RFLAGS,
    Frame,
    PageSpec,
    assert_delivered,
    build,
    deliveries,
    gate,
)
from tests.events.kit import build as kit_build

MODES = ["fast", "timed"]  # fast counts per translation block, timed per instruction

GP, SS = 13, 12
NON_CANONICAL = 0x8000_0000_0000_0000
LAST_CANONICAL = 0x0000_8000_0000_0000  # one past the last canonical byte of the lower half
MSR_FS_BASE = 0xC0000100


def run_access(access: str, *, rbx: int = 0, rbp: int = 0, rsp: int = KERNEL_STACK,
               fs_base: int = 0) -> tuple[Any, Any, dict[str, int]]:
    """Set RBX, RBP and FS.base, then RSP, then `access`; #GP and #SS handlers halt."""
    m, sym = build(f"""
    start:
        mov ecx, {MSR_FS_BASE:#x}
        mov rax, {fs_base:#x}
        mov rdx, rax
        shr rdx, 32
        wrmsr
        push {START_RFLAGS:#x}
        popfq
        mov rbx, {rbx:#x}
        mov rbp, {rbp:#x}
        mov rsp, {rsp:#x}
    access:
        {access}
        hlt
    gp_handler:
        hlt
    ss_handler:
        hlt
    """, gates={GP: gate("gp_handler"), SS: gate("ss_handler", ist=1)})
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)
    assert r.outcome == "hlt"
    return m, r, sym


def assert_fault(m: Any, r: Any, sym: dict[str, int], *, vector: int, rsp: int = KERNEL_STACK) -> None:
    """One #GP(0) on the current stack or #SS(0) on IST1, with the fault frame of the
    instruction at `access`, RSP as it was before it, and nothing after it retired."""
    (rec,) = deliveries(r.trace.records)
    handler = "gp_handler" if vector == GP else "ss_handler"
    assert r.rip == sym[handler] + 1
    stack, top = ("current", rsp) if vector == GP else ("ist1", IST1_TOP)
    assert_delivered(m, rec, vector=vector, stack=stack, stack_top=top, cpl=0,
                     frame=Frame(error_code=0, rip=sym["access"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=rsp, ss=KERNEL_DS))
    assert rec["icount"] == 10  # the ten setup instructions, not the access


# -- rule 2: the segment decides ----------------------------------------------------------


@pytest.mark.parametrize(("access", "vector"), [
    ("push qword ptr [rbx]", GP),     # the operand (DS), not the stack, is non-canonical
    ("pop qword ptr [rbx]", GP),
    ("call qword ptr [rbx]", GP),
    ("mov rax, qword ptr [rbx]", GP),
    ("mov rax, qword ptr ss:[rbx]", GP),  # an SS override is ignored in 64-bit mode
    ("mov rax, qword ptr [rax + rbx]", GP),
])
def test_a_non_canonical_ds_operand_is_gp_0_whatever_the_mnemonic(access: str, vector: int) -> None:
    m, r, sym = run_access(access.replace("rax + rbx", "rbx + rax"), rbx=NON_CANONICAL)
    assert_fault(m, r, sym, vector=vector)


@pytest.mark.parametrize("access", [
    "mov rax, qword ptr [rbp]",
    "mov rax, qword ptr ds:[rbp]",    # a DS override is ignored: the RBP base decides
    "push qword ptr [rbp]",
])
def test_a_non_canonical_rbp_based_operand_is_ss_0(access: str) -> None:
    m, r, sym = run_access(access, rbp=NON_CANONICAL)
    assert_fault(m, r, sym, vector=SS)


def test_an_rbp_index_is_not_a_stack_reference_gp_0() -> None:
    m, r, sym = run_access("mov rax, qword ptr [rbx + rbp]", rbp=NON_CANONICAL)
    assert_fault(m, r, sym, vector=GP)


def test_an_fs_override_on_an_rbp_base_is_gp_0() -> None:
    # FS.base + RBP is non-canonical (FS.base itself is canonical: WRMSR refuses anything
    # else); the FS segment, not SS, is the operand's.
    m, r, sym = run_access("mov rax, qword ptr fs:[rbp]", rbp=0x2000, fs_base=0x7FFF_FFFF_F000)
    assert_fault(m, r, sym, vector=GP)


def test_a_push_with_a_non_canonical_rsp_is_ss_0_on_ist1_with_rsp_unchanged() -> None:
    m, r, sym = run_access("push rax", rsp=NON_CANONICAL + 0x100)
    assert_fault(m, r, sym, vector=SS, rsp=NON_CANONICAL + 0x100)


# -- rule 3: canonical before paging ----------------------------------------------------


@pytest.mark.parametrize("access", ["mov rax, qword ptr [rbx]", "mov qword ptr [rbx], rax"])
def test_an_access_straddling_the_canonical_boundary_is_gp_0_not_a_page_fault(access: str) -> None:
    # Bytes 0x7fff_ffff_fffc..0x7fff_ffff_ffff are canonical (and not mapped): a #PF
    # there would come first if the check were per page.
    m, r, sym = run_access(access, rbx=LAST_CANONICAL - 4)
    assert_fault(m, r, sym, vector=GP)
    assert m.engine.read_reg("cr2") == 0  # no #PF was raised


def test_a_push_straddling_the_canonical_boundary_is_ss_0() -> None:
    # PUSH writes [RSP - 8, RSP) = 0x7fff_ffff_fffc .. 0x8000_0000_0003.
    m, r, sym = run_access("push rax", rsp=LAST_CANONICAL + 4)
    assert_fault(m, r, sym, vector=SS, rsp=LAST_CANONICAL + 4)
    assert m.engine.read_reg("cr2") == 0


# -- rule 1: a branch to a non-canonical target faults on the branch ----------------------
# SDM Vol. 2 JMP, CALL, RET, Jcc, LOOP: "#GP(0) If the target offset is non-canonical".
# The branch itself faults: saved RIP = the branch, RSP as before it (a CALL has not
# pushed, a RET has not popped), RCX as before a LOOP, the branch not retired. The engine
# (like QEMU) jumps first and faults fetching the target; the machine undoes the branch.
# Direct branches run from the last canonical page, HIGH (mapped to guest-physical
# HIGH_PA), so that a rel32/rel8 reaches past 0x0000_7FFF_FFFF_FFFF.

HIGH = 0x7FFF_FFFF_F000
HIGH_PA = 0x500000
RF_START = START_RFLAGS | RFLAGS_RF


def run_branch(setup: str, high_code: bytes = b"", *, at: int = 0xF00, mode: str = "fast"
               ) -> tuple[Machine, Any, dict[str, int]]:
    """`setup` at CODE (a #GP handler that halts follows it), `high_code` at HIGH + `at`."""
    m, sym = kit_build(f"""
    start:
        {setup}
    gp_handler:
        hlt
    """, gates={GP: gate("gp_handler")}, mode=mode)
    m.set_page(PageSpec(HIGH, HIGH_PA))
    m.load(HIGH_PA + at, high_code)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)
    assert (r.outcome, r.rip) == ("hlt", sym["gp_handler"] + 1)
    return m, r, sym


def assert_branch_fault(m: Machine, r: Any, *, rip: int, icount: int, rsp: int = KERNEL_STACK,
                        rflags: int = RF_START) -> None:
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=GP, stack="current", stack_top=rsp, cpl=0,
                     frame=Frame(error_code=0, rip=rip, cs=KERNEL_CS, rflags=rflags, rsp=rsp,
                                 ss=KERNEL_DS))
    assert rec["icount"] == icount  # the branch did not retire


def rel32(insn_end: int, target: int) -> bytes:
    return struct.pack("<i", target - insn_end)


FROM_HIGH = f"mov rax, {HIGH + 0xF00:#x}\n        jmp rax"
PAST = 0x8000_0000_0000  # the first non-canonical address above the lower half


@pytest.mark.parametrize("mode", MODES)
def test_a_jmp_rel32_to_a_non_canonical_target_faults_on_the_jmp(mode: str) -> None:
    jmp = b"\xe9" + rel32(HIGH + 0xF05, PAST + 0x105)
    m, r, _ = run_branch(FROM_HIGH, jmp, mode=mode)
    assert_branch_fault(m, r, rip=HIGH + 0xF00, icount=2)


@pytest.mark.parametrize("mode", MODES)
def test_a_call_rel32_to_a_non_canonical_target_faults_before_its_push_counts(mode: str) -> None:
    call = b"\xe8" + rel32(HIGH + 0xF05, PAST + 0x305)
    m, r, _ = run_branch(FROM_HIGH, call, mode=mode)
    assert_branch_fault(m, r, rip=HIGH + 0xF00, icount=2)
    assert m.engine.read_reg("rsp") == KERNEL_STACK - 48  # only the #GP frame below RSP


@pytest.mark.parametrize(("flags", "rflags", "taken"), [
    ("cmp eax, eax", 0x246, True),     # ZF = 1: JE taken
    ("cmp eax, 1", 0x297, False),      # EAX = 0: ZF = 0, CF = SF = PF = AF = 1: not taken
])
@pytest.mark.parametrize("mode", MODES)
def test_a_jcc_faults_only_when_it_is_taken(flags: str, rflags: int, taken: bool, mode: str) -> None:
    je = b"\x0f\x84" + rel32(HIGH + 0xF06, PAST + 0x206)
    ud2 = b"\x0f\x0b"  # the fall-through of a JE not taken: #UD at HIGH + 0xF06
    setup = f"xor eax, eax\n        {flags}\n        {FROM_HIGH}"
    if taken:
        m, r, _ = run_branch(setup, je + ud2, mode=mode)
        assert_branch_fault(m, r, rip=HIGH + 0xF00, icount=4, rflags=rflags | RFLAGS_RF)
    else:
        m, _ = kit_build(f"start:\n    {setup}\n", gates={6: gate(CODE + 0x800)}, mode=mode)
        m.set_page(PageSpec(HIGH, HIGH_PA))
        m.load(HIGH_PA + 0xF00, je + ud2)
        m.load(CODE + 0x800, b"\xf4")  # the #UD handler: hlt
        r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)
        (rec,) = deliveries(r.trace.records)
        assert (rec["vector"], rec["rip"]) == (6, HIGH + 0xF06)  # fell through to the UD2


@pytest.mark.parametrize("mode", MODES)
def test_a_loop_to_a_non_canonical_target_faults_with_rcx_as_before_it(mode: str) -> None:
    loop = b"\xe2\x7f"  # loop rel8 +127: at HIGH + 0xFF0, to 0x8000_0000_0071
    m, r, _ = run_branch(f"mov ecx, 2\n        mov rax, {HIGH + 0xFF0:#x}\n        jmp rax",
                         loop, at=0xFF0, mode=mode)
    assert_branch_fault(m, r, rip=HIGH + 0xFF0, icount=3)
    assert m.engine.read_reg("rcx") == 2


@pytest.mark.parametrize(("setup", "label", "icount"), [
    ("mov rax, 0x8000000000000000\n    the_branch:\n        jmp rax", "the_branch", 1),
    ("mov rax, 0x8000000000000000\n    the_branch:\n        call rax", "the_branch", 1),
    ("lea rbx, [rip + slot]\n    the_branch:\n        jmp qword ptr [rbx]", "the_branch", 1),
    ("lea rbx, [rip + slot]\n    the_branch:\n        call qword ptr [rbx]", "the_branch", 1),
])
@pytest.mark.parametrize("mode", MODES)
def test_an_indirect_branch_to_a_non_canonical_target_faults_on_the_branch(
        setup: str, label: str, icount: int, mode: str) -> None:
    m, r, sym = run_branch(setup + "\n    slot:\n        .quad 0x8000000000000020", mode=mode)
    assert_branch_fault(m, r, rip=sym[label], icount=icount)


@pytest.mark.parametrize(("ret", "release"), [("ret", 0), ("ret 0x10", 0x10)])
@pytest.mark.parametrize("mode", MODES)
def test_a_ret_to_a_non_canonical_address_faults_before_it_pops(ret: str, release: int,
                                                                mode: str) -> None:
    m, r, sym = run_branch(f"""mov rax, 0x8000000000000080
        push rax
    the_ret:
        {ret}""", mode=mode)
    # RSP still points at the return address the RET did not pop (nor release).
    assert_branch_fault(m, r, rip=sym["the_ret"], icount=2, rsp=KERNEL_STACK - 8)
