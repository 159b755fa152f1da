"""The STI flag, the software-event flag and GS under FRED: test-plan cases 17-19 of
docs/fred.md."""

from __future__ import annotations

from typing import Any

from cpu.fred import FredConfig
from tests.fred.rig import (
    CODE,
    ERETS,
    ERETU,
    KCS,
    KSS,
    RSP,
    UCS,
    USER_ENTRY,
    USER_RSP,
    USS,
    build,
    expect_frame,
    frame,
    records,
    ss,
    start,
)

TYPE = """
    mov rax, [rsp+0x28]
    shr rax, 48
    and eax, 0xf
"""


def sti_case(clear_bit16: bool) -> int:
    """Case 17: IF = 0 with an interrupt pending; STI; UD2. The #UD handler returns past
    the UD2 to a NOP with ERETS. Returns the RIP slot of the interrupt's frame."""
    kernel = TYPE + f"""
        cmp eax, 0
        je interrupt
        {"btr qword ptr [rsp+0x28], 16" if clear_bit16 else "nop"}
        mov qword ptr [rsp+8], {CODE + 3:#x}
        {ERETS}
    interrupt:
        hlt
    """
    m, _ = build("sti\nud2\nnop\nnop\nhlt\n", kernel=kernel)
    m.interrupt(0x30)
    start(m, CODE, rflags=0x2)
    ud, intr = records(m, "deliver")
    assert ud["name"] == "#UD"
    # The interrupt's frame later lands on the same spot: the #UD's slots from its record
    # (#UD has no error code: the record says null, slot 0 held 0).
    assert (ud["error_code"], ud["rip"], ud["cs"], ud["rflags"], ud["old_rsp"], ud["ss"],
            ud["event_data"]) == (None, CODE + 1, KCS, 0x10202, 0x70000,
                                  ss(KSS, 3, 6, 1 << 16), 0)
    assert intr["vector"] == 0x30
    return int(intr["rip"])


def test_case17_an_event_in_the_sti_shadow_records_bit_16_and_erets_restores_the_shadow() -> None:
    assert sti_case(clear_bit16=False) == CODE + 4  # held for the NOP at CODE + 3


def test_case17_without_bit_16_erets_opens_no_shadow() -> None:
    assert sti_case(clear_bit16=True) == CODE + 3


def step_case(user: str, *, clear_bit17: bool = False) -> list[dict[str, Any]]:
    """Case 18: ERETU (bit 17 = 0, TF = 1) to `user`; the ring-3 entry ERETUs straight
    back from SYSCALL/INT3 frames (optionally clearing bit 17) and HLTs on anything else."""
    main = f"""
        push 0x23
        push 0x7F0123
        push 0x346
        push 0x1B
        push user_code
        push 0
        {ERETU}
    user_code:
        {user}
        nop
        nop
        hlt
    """
    handler = TYPE + f"""
        cmp eax, 3
        je stop
        {"btr qword ptr [rsp+0x28], 17" if clear_bit17 else "nop"}
        {ERETU}
    stop:
        hlt
    """
    m, sym = build(main, user=handler)
    start(m, CODE)
    return [*records(m, "deliver"), {"user_code": sym["user_code"], "erets": records(m, "eret")}]


def test_case18_eretu_of_a_syscall_frame_with_tf_pends_a_single_step_db_at_once() -> None:
    *delivered, syms = step_case("syscall")
    user_code = int(syms["user_code"])
    syscall, db = delivered
    assert (syscall["type"], syscall["vector"], syscall["rflags"]) == (7, 1, 0x346)
    assert int(syscall["ss"]) & (1 << 17)
    assert (db["type"], db["vector"], db["rip"], db["event_data"], db["stack_level"],
            db["stack"]) == (3, 1, user_code + 2, 0x4000, 0, "rsp0")
    # No user instruction ran between the handler's ERETU and the #DB.
    assert db["icount"] == syms["erets"][-1]["icount"]


def test_case18_without_bit_17_the_db_comes_after_the_next_instruction() -> None:
    *delivered, syms = step_case("syscall", clear_bit17=True)
    user_code = int(syms["user_code"])
    _syscall, db = delivered
    assert (db["vector"], db["rip"]) == (1, user_code + 3)  # after the NOP


def test_case18_int3_with_tf_does_not_pend_a_step_on_eretu() -> None:
    *delivered, syms = step_case("int3")
    user_code = int(syms["user_code"])
    bp, db = delivered
    assert (bp["type"], bp["vector"]) == (6, 3)
    assert not int(bp["ss"]) & (1 << 17)
    assert (db["vector"], db["rip"]) == (1, user_code + 2)  # after the NOP past INT3


def gs(m: object) -> tuple[int, int, int]:
    e = m.engine  # type: ignore[attr-defined]
    return e.read_reg("gs"), e.read_msr(0xC0000101), e.read_msr(0xC0000102)


def test_case19_swapgs_sysret_and_sysexit_are_ud_under_fred() -> None:
    for insn in ("swapgs", "sysret", "sysexit"):
        m, _ = build(f"{insn}\nhlt\n")
        start(m, CODE)
        (d,) = records(m, "deliver")
        assert (d["name"], d["rip"]) == ("#UD", CODE), insn


def test_case19_swapgs_without_fred_runs_natively() -> None:
    m, _ = build("swapgs\nhlt\n", enable=False)
    start(m, CODE)
    assert records(m, "deliver") == []
    assert gs(m)[1:] == (0x7000_0000, 0xFFFF_8000_0000_1000)


def test_case19_lkgs_loads_the_selector_and_the_kernel_gs_base_only() -> None:
    m, _ = build("mov ax, 0x23\n.byte 0xf2, 0x0f, 0x00, 0xf0\nhlt\n")
    # The user data descriptor (0x23) with base 0x1234_0000.
    m.phys.write(0x1000 + 0x20, bytes.fromhex("ffff0000 34f3cf12".replace(" ", "")))
    start(m, CODE)
    assert records(m, "deliver") == []
    assert gs(m) == (0x23, 0xFFFF_8000_0000_1000, 0x1234_0000)


def test_case19_lkgs_with_a_null_selector_zeroes_the_kernel_gs_base() -> None:
    m, _ = build("xor eax, eax\n.byte 0xf2, 0x0f, 0x00, 0xf0\nhlt\n")
    start(m, CODE)
    assert gs(m) == (0, 0xFFFF_8000_0000_1000, 0)


def test_case19_lkgs_at_cpl3_is_ud() -> None:
    m, _ = build("xor eax, eax\n.byte 0xf2, 0x0f, 0x00, 0xf0\nhlt\n")
    start(m, CODE, cpl=3)
    (d,) = records(m, "deliver")
    assert (d["name"], d["rip"], d["handler"]) == ("#UD", CODE + 2, USER_ENTRY)


def test_case19_lkgs_without_the_lkgs_feature_is_ud() -> None:
    m, _ = build("xor eax, eax\n.byte 0xf2, 0x0f, 0x00, 0xf0\nhlt\n",
                 fred=FredConfig(lkgs=False))
    start(m, CODE)
    (d,) = records(m, "deliver")
    assert (d["name"], d["rip"]) == ("#UD", CODE + 2)


def test_case3_the_frame_from_ring3_has_the_ring3_selectors() -> None:
    m, _ = build("ud2\n")
    start(m, CODE, cpl=3)
    assert frame(m, RSP[0] - 64) == expect_frame(
        rip=CODE, cs=UCS, rflags=0x10246, rsp=USER_RSP, ss=ss(USS, 3, 6))


def test_iret_to_ring3_under_fred_is_gp_with_the_cs_selector() -> None:
    main = """
        push 0x23
        push 0x7F0123
        push 0x246
        push 0x1B
        push 0x100000
    the_iret:
        iretq
    """
    m, sym = build(main)
    start(m, CODE)
    (fault,) = records(m, "iret_fault")
    (d,) = records(m, "deliver")
    assert (fault["vector"], fault["error_code"]) == (13, 0x18)
    assert (d["name"], d["error_code"], d["rip"], m.cpl) == ("#GP", 0x18, sym["the_iret"], 0)


def test_a_same_ring_iret_under_fred_still_returns_and_unblocks_nmis() -> None:
    kernel = """
        push 0x10
        lea rax, [rsp + 8]
        push rax
        push 0x2
        push 0x08
        lea rax, [rip + after]
        push rax
        iretq
    after:
        hlt
    """
    m, _ = build("nop\nhlt\n", kernel=kernel)
    m.nmi()
    start(m, CODE)
    (iret,) = records(m, "iret")
    assert iret["nmi_unblocked"] is True and not m.intr.nmi_blocked


def test_an_event_in_a_mov_ss_shadow_sets_bit_16_only_with_the_option() -> None:
    main = "mov ax, 0x10\nmov ss, ax\nud2\n"
    for option, bit in ((False, 0), (True, 1 << 16)):
        m, _ = build(main, fred=FredConfig(mov_ss_sets_sti_bit=option))
        start(m, CODE)
        (d,) = records(m, "deliver")
        assert (d["name"], d["ss"]) == ("#UD", ss(KSS, 3, 6, bit)), option
