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

from typing import Any

import pytest

from tests.delivery.rig import (
    CODE,
    IST1_TOP,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_RF,
    START_RFLAGS,
    Frame,
    assert_delivered,
    build,
    deliveries,
    gate,
)

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
    # FS.base + RBP is non-canonical; the FS segment, not SS, is the operand's.
    m, r, sym = run_access("mov rax, qword ptr fs:[rbp]", rbp=0x1000, fs_base=NON_CANONICAL)
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
