"""#AC(0): an unaligned data access at CPL 3 with CR0.AM = 1 and RFLAGS.AC = 1 (SDM Vol. 3A
"Interrupt 17—Alignment Check Exception (#AC)"): word accesses must be 2-aligned,
doublewords 4, quadwords 8; bytes never fault; the implicit stack access of PUSH counts.
A fault with error code 0: saved RIP = the instruction, RF = 1, nothing done; delivered
on TSS.RSP0 (CPL 3 -> 0). No #AC at CPL 0, with CR0.AM = 0, or with RFLAGS.AC = 0.

The CPL0 code sets or clears CR0.AM, then IRETs to the CPL3 code with the RFLAGS image
given; the CPL3 code ends with INT3 (a DPL3 gate). Every handler halts. Both counting
modes: the engine looks at RFLAGS.AC per translation block (fast) or per instruction
(timed).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.delivery.rig import (
    CODE,
    DATA,
    KERNEL_STACK,
    RFLAGS_RF,
    RSP0_TOP,
    USER_CS,
    USER_DS,
    USER_STACK,
    Frame,
    gate,
)
from tests.events.kit import Frames, build, expect

MODES = ["fast", "timed"]
AC, BP = 17, 3
RFLAGS_AC = 1 << 18
CR0_AM = 1 << 18


def run(user: str, *, mode: str, user_rflags: int = 0x2 | RFLAGS_AC, am: bool = True,
        cpl3: bool = True) -> tuple[Any, dict[str, int], Any, Frames]:
    cr0 = f"or rax, {CR0_AM:#x}" if am else f"and rax, {~CR0_AM:#x}"
    to_user = f"""
        push {USER_DS:#x}
        push {USER_STACK:#x}
        push {user_rflags:#x}
        push {USER_CS:#x}
        lea rax, [rip + user]
        push rax
        iretq""" if cpl3 else f"""
        push {user_rflags:#x}
        popfq
        jmp user"""
    m, sym = build(f"""
    start:
        mov rax, cr0
        {cr0}
        mov cr0, rax
        mov rbx, {DATA:#x}
        {to_user}
    user:
        {user}
    after_int3:
        nop
    ac_handler:
        hlt
    bp_handler:
        hlt
    """, gates={AC: gate("ac_handler"), BP: gate("bp_handler", dpl=3)}, mode=mode)
    frames = Frames(m)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, max_insns=200)
    assert r.outcome == "hlt"
    return m, sym, r, frames


def user_frame(rip: int, rflags: int, rsp: int = USER_STACK, error_code: int | None = None) -> Frame:
    return Frame(rip=rip, cs=USER_CS, rflags=rflags, rsp=rsp, ss=USER_DS, error_code=error_code)


@pytest.mark.parametrize(("access", "rsp"), [
    ("mov eax, dword ptr [rbx + 2]", USER_STACK),     # a doubleword at DATA + 2
    ("mov ax, word ptr [rbx + 1]", USER_STACK),       # a word at an odd address
    ("mov qword ptr [rbx + 4], rax", USER_STACK),     # a quadword store at DATA + 4
    ("push rax", USER_STACK - 4),                     # the stack slot at RSP - 8, 4 off
])
@pytest.mark.parametrize("mode", MODES)
def test_an_unaligned_access_at_cpl3_with_am_and_ac_is_ac_0(access: str, rsp: int, mode: str) -> None:
    prefix = "lea rsp, [rsp - 4]\n    " if rsp != USER_STACK else ""
    m, sym, r, frames = run(f"""mov rcx, 7
        {prefix}mov eax, dword ptr [rbx + 4]   # aligned: no #AC
        mov al, byte ptr [rbx + 3]              # a byte: never
    the_access:
        {access}
        int3""", mode=mode)

    assert r.rip == sym["ac_handler"] + 1
    (seen,) = frames.seen
    expect(seen, vector=AC, stack="rsp0", stack_top=RSP0_TOP, source="exception",
           handler=sym["ac_handler"],
           frame=user_frame(sym["the_access"], 0x2 | RFLAGS_AC | RFLAGS_RF, rsp=rsp, error_code=0))
    # CPL0: three for CR0, mov rbx, seven for the IRET; CPL3: the setup before the access.
    assert seen[0]["icount"] == 11 + (4 if prefix else 3)
    assert m.phys.read(DATA + 4, 8) == bytes(8)  # a store that faulted wrote nothing


@pytest.mark.parametrize(("user_rflags", "am", "cpl3"), [
    (0x2, True, True),               # RFLAGS.AC = 0
    (0x2 | RFLAGS_AC, False, True),  # CR0.AM = 0
    (0x2 | RFLAGS_AC, True, False),  # CPL 0
])
@pytest.mark.parametrize("mode", MODES)
def test_no_ac_without_all_three_of_cpl3_cr0_am_and_rflags_ac(user_rflags: int, am: bool,
                                                               cpl3: bool, mode: str) -> None:
    _, sym, r, frames = run("mov eax, dword ptr [rbx + 2]\n        int3", mode=mode,
                            user_rflags=user_rflags, am=am, cpl3=cpl3)
    (seen,) = frames.seen
    assert (seen[0]["vector"], r.rip) == (BP, sym["bp_handler"] + 1)
    if cpl3:
        expect(seen, vector=BP, stack="rsp0", stack_top=RSP0_TOP, source="software",
               handler=sym["bp_handler"], frame=user_frame(sym["after_int3"], user_rflags))


@pytest.mark.parametrize("mode", MODES)
def test_ac_set_by_popf_at_cpl3_checks_from_the_next_instruction_on(mode: str) -> None:
    _, sym, _, frames = run(f"""mov eax, dword ptr [rbx + 2]   # AC = 0: runs
        pushfq
        or dword ptr [rsp], {RFLAGS_AC:#x}
        popfq
    the_access:
        mov eax, dword ptr [rbx + 2]
        int3""", mode=mode, user_rflags=0x2)

    (seen,) = frames.seen
    expect(seen, vector=AC, stack="rsp0", stack_top=RSP0_TOP, source="exception",
           handler=sym["ac_handler"],
           frame=user_frame(sym["the_access"], 0x2 | RFLAGS_AC | RFLAGS_RF, error_code=0))
    assert seen[0]["icount"] == 11 + 4
