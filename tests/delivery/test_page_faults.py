"""#PF error codes and CR2 for the guest's own accesses (SDM Vol. 3A "Page-Fault
Exceptions", "Access Rights").

Error-code bits: P(0) protection vs not-present, W/R(1) write, U/S(2) CPL3 access,
I/D(4) instruction fetch (reported because EFER.NXE=1). CR2 = the exact linear address of
the access (never page-aligned here, so an off-by-page bug shows). #PF is a fault: the
saved RIP is the faulting instruction and the pushed RFLAGS has RF=1.

The probed page is PROBE + 0x1000 = 0x401000; the access goes to 0x401123.
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
    PROBE,
    RFLAGS_RF,
    RSP0_TOP,
    START_RFLAGS,
    USER_CS,
    USER_DS,
    USER_STACK,
    Frame,
    PageSpec,
    assert_delivered,
    build,
    deliveries,
    gate,
)

PAGE = PROBE + 0x1000
ADDR = PAGE + 0x123

NOT_PRESENT = PageSpec(PAGE, PAGE, present=False)
READ_ONLY = PageSpec(PAGE, PAGE, writable=False)
SUPERVISOR = PageSpec(PAGE, PAGE, user=False)
NO_EXECUTE = PageSpec(PAGE, PAGE, nx=True)


def run_access(access: str, page: PageSpec, *, cpl: int) -> tuple[Any, Any, dict[str, int]]:
    """`mov rbx, ADDR` then `access` (which uses rbx), with a #PF handler that halts.
    Returns (machine, run result, symbols)."""
    m, sym = build(f"""
    start:
        mov rbx, {ADDR:#x}
    access:
        {access}
        hlt
    pf_handler:
        hlt
    """, gates={14: gate("pf_handler")}, pages=[page])
    r = m.run(entry=CODE, rsp=USER_STACK if cpl == 3 else KERNEL_STACK, cpl=cpl,
              rflags=START_RFLAGS)
    assert r.outcome == "hlt" and r.rip == sym["pf_handler"] + 1
    return m, r, sym


def assert_pf(m: Any, r: Any, *, error_code: int, rip: int, cpl_before: int) -> None:
    (rec,) = deliveries(r.trace.records)
    if cpl_before == 3:
        stack, top, cs, ss, old_rsp = "rsp0", RSP0_TOP, USER_CS, USER_DS, USER_STACK
    else:
        stack, top, cs, ss, old_rsp = "current", KERNEL_STACK, KERNEL_CS, KERNEL_DS, KERNEL_STACK
    assert_delivered(m, rec, vector=14, stack=stack, stack_top=top, cpl=0,
                     frame=Frame(error_code=error_code, rip=rip, cs=cs,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=old_rsp, ss=ss))
    assert rec["cr2"] == ADDR
    assert m.engine.read_reg("cr2") == ADDR
    assert m.nmi_blocked is False


def test_a_cpl0_read_of_a_not_present_page_raises_pf_0x0_with_cr2_the_exact_address() -> None:
    m, r, sym = run_access("mov rax, qword ptr [rbx]", NOT_PRESENT, cpl=0)
    assert_pf(m, r, error_code=0x0, rip=sym["access"], cpl_before=0)
    assert deliveries(r.trace.records)[0]["icount"] == 1  # only the mov rbx retired


def test_a_cpl0_write_to_a_not_present_page_raises_pf_0x2() -> None:
    m, r, sym = run_access("mov qword ptr [rbx], rax", NOT_PRESENT, cpl=0)
    assert_pf(m, r, error_code=0x2, rip=sym["access"], cpl_before=0)


def test_a_cpl0_write_to_a_read_only_page_with_cr0_wp_set_raises_pf_0x3() -> None:
    m, r, sym = run_access("mov qword ptr [rbx], rax", READ_ONLY, cpl=0)
    assert m.engine.read_reg("cr0") & (1 << 16)  # CR0.WP=1: supervisor writes honour R/W
    assert_pf(m, r, error_code=0x3, rip=sym["access"], cpl_before=0)


def test_a_cpl3_read_of_a_supervisor_page_raises_pf_0x5_on_rsp0() -> None:
    m, r, sym = run_access("mov rax, qword ptr [rbx]", SUPERVISOR, cpl=3)
    assert_pf(m, r, error_code=0x5, rip=sym["access"], cpl_before=3)
    assert m.engine.read_reg("ss") & 0xFFFF == 0  # NULL SS after the CPL3 -> CPL0 switch


def test_a_cpl3_write_to_a_not_present_page_raises_pf_0x6() -> None:
    m, r, sym = run_access("mov qword ptr [rbx], rax", NOT_PRESENT, cpl=3)
    assert_pf(m, r, error_code=0x6, rip=sym["access"], cpl_before=3)


def test_a_fetch_from_a_not_present_page_raises_pf_0x10_with_the_target_as_rip_and_cr2() -> None:
    m, r, _sym = run_access("jmp rbx", NOT_PRESENT, cpl=0)
    # The fault is on the instruction at the jump target: saved RIP = CR2 = ADDR. I/D is
    # reported because EFER.NXE=1.
    assert_pf(m, r, error_code=0x10, rip=ADDR, cpl_before=0)
    assert deliveries(r.trace.records)[0]["icount"] == 2  # mov rbx and jmp retired


def test_a_fetch_from_an_nx_page_raises_pf_0x11() -> None:
    m, r, _sym = run_access("jmp rbx", NO_EXECUTE, cpl=0)
    assert_pf(m, r, error_code=0x11, rip=ADDR, cpl_before=0)
    assert deliveries(r.trace.records)[0]["icount"] == 2


def run_into_page(tail: bytes, *, lead: int) -> tuple[Any, Any, dict[str, int]]:
    """Jump to PAGE - lead, where `lead - len(tail)` NOPs and then `tail` run on to the
    not-present PAGE. Unicorn translates that straight line as one block, so the fetch
    fault must still name the right instruction and count the NOPs as retired."""
    m, sym = build(f"""
    start:
        mov rbx, {PAGE - lead:#x}
        jmp rbx
    pf_handler:
        hlt
    """, gates={14: gate("pf_handler")}, pages=[NOT_PRESENT])
    m.load(PAGE - lead, b"\x90" * (lead - len(tail)) + tail, code=True)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)
    assert r.outcome == "hlt" and r.rip == sym["pf_handler"] + 1
    return m, r, sym


def check_fetch_fault(m: Any, r: Any, *, rip: int, icount: int) -> None:
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=14, stack="current", stack_top=KERNEL_STACK, cpl=0,
                     frame=Frame(error_code=0x10, rip=rip, cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=KERNEL_STACK,
                                 ss=KERNEL_DS))
    assert rec["cr2"] == m.engine.read_reg("cr2") == PAGE  # the first byte not fetched
    assert rec["icount"] == icount


def test_code_running_off_a_page_into_a_not_present_page_faults_at_the_first_byte_of_that_page() -> None:
    m, r, _sym = run_into_page(b"", lead=16)
    # mov, jmp and all 16 NOPs retire; the fault is on the instruction at PAGE.
    check_fetch_fault(m, r, rip=PAGE, icount=2 + 16)


def test_an_instruction_straddling_into_a_not_present_page_faults_with_its_own_address() -> None:
    mov_eax_cut = b"\xb8\x01\x02"  # mov eax, imm32: opcode and 2 bytes here, 2 on PAGE
    m, r, _sym = run_into_page(mov_eax_cut, lead=16)
    # 13 NOPs retire; the MOV is the faulting instruction, CR2 its first missing byte.
    check_fetch_fault(m, r, rip=PAGE - 3, icount=2 + 13)


def test_a_write_straddling_into_a_not_present_page_faults_with_cr2_at_that_page() -> None:
    # An 8-byte store at PAGE - 4: the first page is fine, the second is not present.
    # CR2 is the first byte of the faulting page, not where the engine split the store.
    m, sym = build(f"""
    start:
        mov rbx, {PAGE - 4:#x}
    access:
        mov qword ptr [rbx], rax
        hlt
    pf_handler:
        hlt
    """, gates={14: gate("pf_handler")}, pages=[NOT_PRESENT])
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)
    assert r.outcome == "hlt" and r.rip == sym["pf_handler"] + 1
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=14, stack="current", stack_top=KERNEL_STACK, cpl=0,
                     frame=Frame(error_code=0x2, rip=sym["access"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=KERNEL_STACK,
                                 ss=KERNEL_DS))
    assert rec["cr2"] == m.engine.read_reg("cr2") == PAGE


def test_a_read_straddling_into_a_not_present_page_faults_with_cr2_at_that_page() -> None:
    m, sym = build(f"""
    start:
        mov rbx, {PAGE - 2:#x}
    access:
        mov eax, dword ptr [rbx]
        hlt
    pf_handler:
        hlt
    """, gates={14: gate("pf_handler")}, pages=[NOT_PRESENT])
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)
    assert r.outcome == "hlt" and r.rip == sym["pf_handler"] + 1
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=14, stack="current", stack_top=KERNEL_STACK, cpl=0,
                     frame=Frame(error_code=0x0, rip=sym["access"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=KERNEL_STACK,
                                 ss=KERNEL_DS))
    assert rec["cr2"] == m.engine.read_reg("cr2") == PAGE


# -- write intent (SDM Vol. 3A "Page-Fault Exceptions", W/R; Bochs read_RMW_virtual_*) ----
# A read-modify-write instruction translates its operand for writing from its first,
# reading part on: a #PF on a not-present page has W = 1 though nothing was written yet.


@pytest.mark.parametrize("access", [
    "add qword ptr [rbx], rax",
    "inc qword ptr [rbx]",
    "xchg qword ptr [rbx], rax",
    "cmpxchg qword ptr [rbx], rcx",
    "lock add qword ptr [rbx], rax",
    "shl qword ptr [rbx], 1",
])
def test_a_read_modify_write_of_a_not_present_page_raises_pf_with_w_set(access: str) -> None:
    m, r, sym = run_access(access, NOT_PRESENT, cpl=0)
    assert_pf(m, r, error_code=0x2, rip=sym["access"], cpl_before=0)


def test_a_read_modify_write_of_a_read_only_page_raises_pf_0x3() -> None:
    m, r, sym = run_access("add qword ptr [rbx], rax", READ_ONLY, cpl=0)
    assert_pf(m, r, error_code=0x3, rip=sym["access"], cpl_before=0)


def test_a_compare_with_a_not_present_page_is_a_read_pf_0x0() -> None:
    m, r, sym = run_access("cmp qword ptr [rbx], rax", NOT_PRESENT, cpl=0)
    assert_pf(m, r, error_code=0x0, rip=sym["access"], cpl_before=0)


@pytest.mark.parametrize(("setup", "error_code"), [
    ("mov rsi, rbx\n        mov rdi, 0x300000", 0x0),  # the source is not present: a read
    ("mov rdi, rbx\n        mov rsi, 0x300000", 0x2),  # the destination: a write
])
def test_movs_reports_the_intent_of_the_access_that_faulted(setup: str, error_code: int) -> None:
    m, r, sym = run_access(f"{setup}\n    movs_insn:\n        movsq", NOT_PRESENT, cpl=0)
    assert_pf(m, r, error_code=error_code, rip=sym["movs_insn"], cpl_before=0)


# -- a faulting store writes nothing (SDM Vol. 3A "Exception Classifications": a fault
# leaves the state as it was before the instruction) -----------------------------------
# The store starts 4 bytes before PAGE, on a present page filled with 0xAA; its second
# half falls on PAGE. The #PF reports CR2 = PAGE (the first byte of the access on the
# faulting page) and the first page keeps its 0xAA bytes.

BEFORE = bytes([0xAA] * 8)


def run_crossing(access: str, page: PageSpec, *, rbx: int = PAGE - 4, rsp: int = KERNEL_STACK,
                 pf_ist: int = 0) -> tuple[Any, Any, dict[str, int]]:
    m, sym = build(f"""
    start:
        mov rbx, {rbx:#x}
        mov rax, 0x1122334455667788
        mov rsp, {rsp:#x}
    access:
        {access}
        hlt
    pf_handler:
        hlt
    """, gates={14: gate("pf_handler", ist=pf_ist)}, pages=[page])
    m.phys.write(PAGE - 8, BEFORE)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)
    assert (r.outcome, r.rip) == ("hlt", sym["pf_handler"] + 1)
    return m, r, sym


@pytest.mark.parametrize(("page", "error_code"), [(NOT_PRESENT, 0x2), (READ_ONLY, 0x3)])
def test_a_store_crossing_into_a_faulting_page_writes_nothing_of_the_first_page(
        page: PageSpec, error_code: int) -> None:
    m, r, sym = run_crossing("mov qword ptr [rbx], rax", page)
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=14, stack="current", stack_top=KERNEL_STACK, cpl=0,
                     frame=Frame(error_code=error_code, rip=sym["access"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=KERNEL_STACK,
                                 ss=KERNEL_DS))
    assert rec["cr2"] == m.engine.read_reg("cr2") == PAGE
    assert m.phys.read(PAGE - 8, 8) == BEFORE
    assert rec["icount"] == 3  # the store did not retire


def test_a_push_crossing_into_a_not_present_page_writes_nothing_and_leaves_rsp() -> None:
    # PUSH writes [RSP - 8, RSP) = PAGE - 4 .. PAGE + 3; the #PF is taken on IST1.
    m, r, sym = run_crossing("push rax", NOT_PRESENT, rsp=PAGE + 4, pf_ist=1)
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=14, stack="ist1", stack_top=IST1_TOP, cpl=0,
                     frame=Frame(error_code=0x2, rip=sym["access"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=PAGE + 4, ss=KERNEL_DS))
    assert rec["cr2"] == PAGE
    assert m.phys.read(PAGE - 8, 8) == BEFORE


def test_a_store_starting_inside_a_faulting_page_reports_its_own_address() -> None:
    # Refused fills find the address from the instruction: the store's first byte here.
    _, r, sym = run_crossing("mov qword ptr [rbx], rax", NOT_PRESENT, rbx=ADDR)
    (rec,) = deliveries(r.trace.records)
    assert (rec["vector"], rec["error_code"], rec["cr2"], rec["rip"]) == (14, 0x2, ADDR,
                                                                          sym["access"])
