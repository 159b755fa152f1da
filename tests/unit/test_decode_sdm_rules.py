"""cpu.decode, the SDM-corner helpers: LOCK legality, write intent of read-modify-write
instructions, the segment of a memory operand (#SS vs #GP), branch targets before the
branch executes and the state to restore after it, and the #AC condition. The byte
strings are the encodings GNU as gives for the instructions of guest_images/mb."""

from __future__ import annotations

import pytest

from cpu.decode import (
    ILLEGAL_LOCK,
    AccessRange,
    SiteKind,
    access_ranges,
    alignment_check_faults,
    branch_target,
    decode_loaded,
    faulting_segment,
    has_write_intent,
    is_read_modify_write,
    lock_is_legal,
    memory_operand_segment,
    site_kind,
    state_before_branch,
)
from idt.state import is_canonical, is_canonical_range

AT = 0x10_0000
NONCANON = 0x8000_0000_0000_0000


# -- LOCK (rule 10) ---------------------------------------------------------------------

@pytest.mark.parametrize(("code", "legal"), [
    (bytes.fromhex("f0 01 05 00 00 00 00"), True),       # lock add [rip], eax
    (bytes.fromhex("f0 48 87 05 00 00 00 00"), True),    # lock xchg [rip], rax
    (bytes.fromhex("f0 0f b1 0d 00 00 00 00"), True),    # lock cmpxchg [rip], ecx
    (bytes.fromhex("f0 48 ff 05 00 00 00 00"), True),    # lock inc qword [rip]
    (bytes.fromhex("48 89 05 00 00 00 00"), True),       # mov [rip], rax (no lock)
    (bytes.fromhex("f0 89 05 00 00 00 00"), False),      # lock mov [rip], eax
    (bytes.fromhex("f0 01 d8"), False),                  # lock add eax, ebx
    (bytes.fromhex("f0 39 05 00 00 00 00"), False),      # lock cmp [rip], eax
    (bytes.fromhex("f0 90"), False),                     # lock nop
    (bytes.fromhex("66 f0 87 c3"), False),               # lock xchg bx, ax (registers)
])
def test_lock_is_legal_only_on_lockable_instructions_with_a_memory_destination(
        code: bytes, legal: bool) -> None:
    assert lock_is_legal(code, AT) is legal


@pytest.mark.parametrize("locked", [
    bytes.fromhex("f0 89 05 00 00 00 00"),   # lock mov [rip], eax (capstone refuses it)
    bytes.fromhex("66 f0 87 c3"),            # lock xchg bx, ax (capstone decodes it)
    bytes.fromhex("f0 90"),                  # lock nop
])
def test_the_load_time_decode_marks_an_illegal_lock_form_and_goes_on_after_it(locked: bytes) -> None:
    code = bytes.fromhex("90") + locked + bytes.fromhex("fb f4")  # nop; <locked>; sti; hlt
    insns = list(decode_loaded(code, AT))
    assert [(i.address, i.size, i.mnemonic) for i in insns] == [
        (AT, 1, "nop"), (AT + 1, len(locked), ILLEGAL_LOCK), (AT + 1 + len(locked), 1, "sti"),
        (AT + 2 + len(locked), 1, "hlt")]
    assert [site_kind(i) for i in insns] == [None, SiteKind.LOCK_UD, SiteKind.STI, SiteKind.HLT]


def test_the_load_time_decode_still_ends_at_bytes_that_are_no_instruction() -> None:
    code = bytes.fromhex("90 ff ff f4")  # nop; (ff ff: no instruction); hlt
    assert [i.mnemonic for i in decode_loaded(code, AT)] == ["nop"]


# -- write intent (rule 12) -------------------------------------------------------------

@pytest.mark.parametrize(("code", "write", "rmw"), [
    (bytes.fromhex("01 04 25 10 00 30 00"), True, True),      # add [0x300010], eax
    (bytes.fromhex("48 ff 04 25 18 00 30 00"), True, True),   # inc qword [0x300018]
    (bytes.fromhex("48 87 04 25 20 00 30 00"), True, True),   # xchg [0x300020], rax
    (bytes.fromhex("0f b1 0c 25 28 00 30 00"), True, True),   # cmpxchg [0x300028], ecx
    (bytes.fromhex("f0 01 04 25 30 00 30 00"), True, True),   # lock add [0x300030], eax
    (bytes.fromhex("d1 24 25 00 00 30 00"), True, True),      # shl dword [0x300000], 1
    (bytes.fromhex("48 89 04 25 00 00 30 00"), True, False),  # mov [0x300000], rax
    (bytes.fromhex("39 04 25 38 00 30 00"), False, False),    # cmp [0x300038], eax
    (bytes.fromhex("03 04 25 00 00 30 00"), False, False),    # add eax, [0x300000]
    (bytes.fromhex("01 d8"), False, False),                   # add eax, ebx
])
def test_write_intent_and_read_modify_write(code: bytes, write: bool, rmw: bool) -> None:
    assert (has_write_intent(code, AT), is_read_modify_write(code, AT)) == (write, rmw)


# -- segments (rule 2) ------------------------------------------------------------------

@pytest.mark.parametrize(("code", "segment"), [
    (bytes.fromhex("ff 33"), "ds"),                  # push qword [rbx]
    (bytes.fromhex("8f 03"), "ds"),                  # pop qword [rbx]
    (bytes.fromhex("ff 13"), "ds"),                  # call qword [rbx]
    (bytes.fromhex("ff 75 00"), "ss"),               # push qword [rbp]
    (bytes.fromhex("48 8b 45 08"), "ss"),            # mov rax, [rbp + 8]
    (bytes.fromhex("48 8b 04 0c"), "ss"),            # mov rax, [rsp + rcx]
    (bytes.fromhex("48 8b 04 2b"), "ds"),            # mov rax, [rbx + rbp]: RBP is the index
    (bytes.fromhex("36 48 8b 03"), "ds"),            # mov rax, ss:[rbx]: ss: ignored
    (bytes.fromhex("3e 48 8b 45 00"), "ss"),         # mov rax, ds:[rbp]: ds: ignored
    (bytes.fromhex("64 48 8b 45 00"), "fs"),         # mov rax, fs:[rbp]
    (bytes.fromhex("65 48 8b 04 0c"), "gs"),         # mov rax, gs:[rsp + rcx]
    (bytes.fromhex("aa"), "es"),                     # stosb: es:[rdi]
    (bytes.fromhex("50"), None),                     # push rax: no explicit operand
])
def test_the_segment_of_the_explicit_memory_operand(code: bytes, segment: str | None) -> None:
    assert memory_operand_segment(code, AT) == segment


REGS = {"rax": 0, "rbx": NONCANON + 0x100, "rcx": NONCANON, "rdx": 0, "rsi": 0, "rdi": 0,
        "rbp": NONCANON + 0x200, "rsp": 0x10_43F8, "r8": 0, "r9": 0, "r10": 0, "r11": 0,
        "r12": 0, "r13": 0, "r14": 0, "r15": 0, "rflags": 0x2}


def test_a_push_of_a_non_canonical_memory_operand_is_gp_and_its_stack_write_would_be_ss() -> None:
    push_mem = bytes.fromhex("ff 33")                                 # push qword [rbx]
    assert faulting_segment(push_mem, AT, NONCANON + 0x100, REGS) == "ds"
    assert faulting_segment(bytes.fromhex("50"), AT, NONCANON + 0x1000 - 8,
                            {**REGS, "rsp": NONCANON + 0x1000}) == "ss"


def test_an_fs_override_on_rbp_is_gp_and_the_fs_base_counts() -> None:
    code = bytes.fromhex("64 48 8b 45 00")                            # mov rax, fs:[rbp]
    regs = {**REGS, "rbp": 0x7FFF_FFFF_0000, "fs_base": 0x1_0000}
    assert faulting_segment(code, AT, 0x8000_0000_0000, regs) == "fs"


def test_a_straddling_load_is_found_by_any_of_its_bytes() -> None:
    code = bytes.fromhex("48 8b 03")                                  # mov rax, [rbx]
    regs = {**REGS, "rbx": 0x7FFF_FFFF_FFFC}
    assert faulting_segment(code, AT, 0x8000_0000_0000, regs) == "ds"
    assert not is_canonical_range(0x7FFF_FFFF_FFFC, 8)
    assert is_canonical_range(0x7FFF_FFFF_FFF8, 8)
    assert not is_canonical_range(0xFFFF_7FFF_FFFF_FFFC, 8)
    assert is_canonical_range(0xFFFF_8000_0000_0000, 8)


# -- branches (rule 1) ------------------------------------------------------------------

TOP = 0x7FFF_FFFF_F000


def no_memory(addr: int) -> int:
    raise AssertionError(f"read {addr:#x}")


@pytest.mark.parametrize(("code", "address", "regs", "kind", "taken", "target"), [
    (bytes.fromhex("e9 00 10 00 00"), TOP + 0x100, {}, "jmp", True, 0x8000_0000_0105),
    (bytes.fromhex("0f 84 00 10 00 00"), TOP + 0x200, {"rflags": 0x42}, "jcc", True,
     0x8000_0000_0206),
    (bytes.fromhex("0f 85 00 10 00 00"), TOP + 0x206, {"rflags": 0x42}, "jcc", False,
     0x8000_0000_020C),
    (bytes.fromhex("e8 00 10 00 00"), TOP + 0x300, {}, "call", True, 0x8000_0000_0305),
    (bytes.fromhex("e2 7f"), TOP + 0xFF5, {"rcx": 2}, "loop", True, 0x8000_0000_0076),
    (bytes.fromhex("e2 7f"), TOP + 0xFF5, {"rcx": 1}, "loop", False, 0x8000_0000_0076),
    (bytes.fromhex("e1 7f"), TOP + 0xFF5, {"rcx": 2, "rflags": 0x2}, "loop", False,
     0x8000_0000_0076),                                                # loope, ZF = 0
    (bytes.fromhex("e3 10"), AT, {"rcx": 0}, "jrcxz", True, AT + 0x12),
    (bytes.fromhex("ff e0"), AT, {"rax": NONCANON}, "jmp", True, NONCANON),
    (bytes.fromhex("ff d0"), AT, {"rax": NONCANON + 0x40}, "call", True, NONCANON + 0x40),
    (bytes.fromhex("7c 10"), AT, {"rflags": 0x800}, "jcc", True, AT + 0x12),   # jl: OF != SF
    (bytes.fromhex("7f 10"), AT, {"rflags": 0x880}, "jcc", True, AT + 0x12),   # jg: SF = OF
])
def test_the_branch_target_before_the_branch_executes(
        code: bytes, address: int, regs: dict[str, int], kind: str, taken: bool,
        target: int) -> None:
    b = branch_target(code, address, {**REGS, **regs}, no_memory)
    assert b is not None
    assert (b.kind, b.taken, b.target, b.length) == (kind, taken, target, len(code))
    assert is_canonical(b.target) is (target < 2**47)


def test_indirect_memory_and_ret_targets_come_from_memory() -> None:
    memory = {0x10_2000: NONCANON + 0x20, 0x10_43F8: NONCANON + 0xC0}
    jmp_mem = bytes.fromhex("ff 25 fa 1f 00 00")          # jmp [rip + 0x1ffa] -> 0x102000
    b = branch_target(jmp_mem, AT, REGS, memory.__getitem__)
    assert b is not None and (b.kind, b.target) == ("jmp", NONCANON + 0x20)
    ret_imm = bytes.fromhex("c2 10 00")                   # ret 16
    b = branch_target(ret_imm, AT, REGS, memory.__getitem__)
    assert b is not None and (b.kind, b.target, b.release) == ("ret", NONCANON + 0xC0, 16)


def test_not_a_near_branch_gives_none() -> None:
    assert branch_target(bytes.fromhex("48 cf"), AT, REGS, no_memory) is None   # iretq
    assert branch_target(bytes.fromhex("90"), AT, REGS, no_memory) is None


def test_the_state_before_a_branch_that_already_ran() -> None:
    after = {"rsp": 0x11_4FE8, "rcx": 1}
    assert state_before_branch(bytes.fromhex("e8 00 10 00 00"), TOP + 0x300, after) == {
        "rip": TOP + 0x300, "rsp": 0x11_4FF0}
    assert state_before_branch(bytes.fromhex("c2 10 00"), AT, {"rsp": 0x10_9410}) == {
        "rip": AT, "rsp": 0x10_93F8}
    assert state_before_branch(bytes.fromhex("c3"), AT, {"rsp": 0x10_9400}) == {
        "rip": AT, "rsp": 0x10_93F8}
    assert state_before_branch(bytes.fromhex("e2 7f"), TOP + 0xFF5, after) == {
        "rip": TOP + 0xFF5, "rcx": 2}
    assert state_before_branch(bytes.fromhex("ff e0"), AT, after) == {"rip": AT}
    assert state_before_branch(bytes.fromhex("90"), AT, after) == {}


# -- #AC (rule 9) -----------------------------------------------------------------------

def test_ac_needs_cpl3_am_and_ac_and_an_unaligned_access() -> None:
    on = dict(cpl=3, cr0_am=True, rflags_ac=True)
    assert alignment_check_faults(**on, linear=0x10_2001, size=4)
    assert alignment_check_faults(**on, linear=0x11_5FF4, size=8)    # push with RSP % 8 = 4
    assert not alignment_check_faults(**on, linear=0x10_2004, size=4)
    assert not alignment_check_faults(**on, linear=0x10_2001, size=1)
    assert not alignment_check_faults(**on, linear=0x10_2001, size=4, implicit_supervisor=True)
    assert not alignment_check_faults(cpl=0, cr0_am=True, rflags_ac=True, linear=0x10_2001, size=4)
    assert not alignment_check_faults(cpl=3, cr0_am=False, rflags_ac=True, linear=0x10_2001,
                                      size=4)
    assert not alignment_check_faults(cpl=3, cr0_am=True, rflags_ac=False, linear=0x10_2001,
                                      size=4)



# -- every access of an instruction (rules 3, 8) ----------------------------------------

def test_the_access_ranges_of_a_store_a_push_and_a_push_of_memory() -> None:
    store = bytes.fromhex("48 89 03")                                 # mov [rbx], rax
    assert access_ranges(store, AT, {**REGS, "rbx": 0x2F_FFFC}) == [
        AccessRange(0x2F_FFFC, 8, "ds", True)]
    push = bytes.fromhex("50")                                        # push rax
    assert access_ranges(push, AT, {**REGS, "rsp": 0x30_0004}) == [
        AccessRange(0x2F_FFFC, 8, "ss", True, implicit=True)]
    push_mem = bytes.fromhex("ff 33")                                 # push qword [rbx]
    assert access_ranges(push_mem, AT, REGS) == [
        AccessRange(NONCANON + 0x100, 8, "ds", False),
        AccessRange(0x10_43F0, 8, "ss", True, implicit=True)]
    ret = bytes.fromhex("c3")
    assert access_ranges(ret, AT, REGS) == [AccessRange(0x10_43F8, 8, "ss", False, implicit=True)]
    lea = bytes.fromhex("48 8d 03")                                   # lea rax, [rbx]
    assert access_ranges(lea, AT, REGS) == []


def test_a_straddling_store_is_not_canonical_before_any_page_is_walked() -> None:
    store = bytes.fromhex("89 03")                                    # mov [rbx], eax
    (r,) = access_ranges(store, AT, {**REGS, "rbx": 0x7FFF_FFFF_FFFE})
    assert (r.start, r.size, r.write) == (0x7FFF_FFFF_FFFE, 4, True)
    assert not is_canonical_range(r.start, r.size)


def test_an_rmw_destination_is_a_write() -> None:
    (r,) = access_ranges(bytes.fromhex("0f b1 0b"), AT, {**REGS, "rbx": 0x30_0028})  # cmpxchg [rbx], ecx
    assert r == AccessRange(0x30_0028, 4, "ds", True)
