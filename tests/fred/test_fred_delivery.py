"""FRED event delivery on the machine: test-plan cases 1-8, 12 and 13 of docs/fred.md.
Every case checks all eight frame slots and the state after delivery."""

from __future__ import annotations

from cpu.fred import FredConfig
from cpu.layout import PageSpec
from tests.fred.rig import (
    CODE,
    ERETS,
    K_GS,
    KCS,
    KERNEL_ENTRY,
    KERNEL_RSP,
    KSS,
    RSP,
    U_GS,
    UCS,
    USER_ENTRY,
    USER_RSP,
    USS,
    build,
    csl,
    expect_frame,
    frame,
    records,
    ss,
    start,
)

SAME_LEVEL_FRAME = (KERNEL_RSP - 0x40 & ~0x3F) - 64  # 0x6FF80: red zone 64, aligned


def gs_bases(m: object) -> tuple[int, int]:
    e = m.engine  # type: ignore[attr-defined]
    return e.read_msr(0xC0000101), e.read_msr(0xC0000102)


def test_case1_a_ud_at_cpl0_is_pushed_on_the_same_stack_below_the_red_zone() -> None:
    m, _ = build("ud2\n")
    m.build()
    m.engine.write_table("idtr", 0, 0x2000, 0)  # IDTR.limit 0: the IDT is never read
    result = start(m, CODE)
    assert result.outcome == "hlt"
    assert frame(m, SAME_LEVEL_FRAME) == expect_frame(
        rip=CODE, cs=KCS, rflags=0x10202, rsp=KERNEL_RSP, ss=ss(KSS, 3, 6))
    (d,) = records(m, "deliver")
    assert (d["fred"], d["handler"], d["rsp"], d["stack"], d["stack_level"]) == (
        True, KERNEL_ENTRY, SAME_LEVEL_FRAME, "current", 0)
    assert result.rip == KERNEL_ENTRY + 1  # the HLT at the ring-0 entry ran
    assert csl(m) == 0
    assert gs_bases(m) == (K_GS, U_GS)  # a ring-0 event does not swap GS


def test_case1_rflags_after_delivery_are_exactly_2() -> None:
    m, _ = build("ud2\n", kernel="mov rax, 0\npushfq\npop rbx\nhlt\n")
    start(m, CODE, rflags=0x246 | (1 << 18) | (1 << 10))
    assert m.engine.read_reg("rbx") == 0x2


def test_case2_a_pf_at_cpl0_carries_cr2_as_event_data() -> None:
    m, _ = build("mov rax, 0xDEAD000\nmov rbx, [rax]\nhlt\n")
    start(m, CODE)
    fault_rip = CODE + 7  # mov rax, imm32 sign-extended is 7 bytes
    assert frame(m, SAME_LEVEL_FRAME) == expect_frame(
        error_code=0, rip=fault_rip, cs=KCS, rflags=0x10202, rsp=KERNEL_RSP,
        ss=ss(KSS, 3, 14), event_data=0xDEAD000)
    assert m.engine.read_reg("cr2") == 0xDEAD000
    (d,) = records(m, "deliver")
    assert d["event_data"] == 0xDEAD000 and d["cr2"] == 0xDEAD000


def test_case3_a_pf_from_ring3_switches_to_rsp0_and_swaps_gs() -> None:
    m, _ = build("mov qword ptr [0x610000], 1\nhlt\n",
                 pages=[PageSpec(va=0x610000, pa=0x610000, writable=False)])
    start(m, CODE, cpl=3)
    top = RSP[0] - 64
    assert frame(m, top) == expect_frame(
        error_code=0x7, rip=CODE, cs=UCS, rflags=0x10246, rsp=USER_RSP,
        ss=ss(USS, 3, 14), event_data=0x610000)
    e = m.engine
    assert (e.read_reg("cs"), e.read_reg("ss"), m.cpl) == (KCS, KSS, 0)
    (d,) = records(m, "deliver")
    assert (d["handler"], d["rsp"], d["stack"], d["stack_level"]) == (USER_ENTRY, top, "rsp0", 0)
    assert csl(m) == 0
    assert gs_bases(m) == (K_GS, U_GS)  # swapped: the kernel's GS.base is live


def test_case4_syscall_from_ring3_is_an_event_of_type_7() -> None:
    m, _ = build("syscall\nhlt\n")
    m.engine.write_msr(0xC0000082, 0xDEAD_BEEF_0000)  # IA32_LSTAR: never used
    start(m, CODE, cpl=3, regs={"rcx": 0x1111, "r11": 0x2222})
    assert frame(m, RSP[0] - 64) == expect_frame(
        rip=CODE + 2, cs=UCS, rflags=0x246, rsp=USER_RSP,
        ss=ss(USS, 7, 1, 1 << 17, 2))
    assert frame(m, RSP[0] - 64)["ss"] == 0x2207_0001_0002_0023
    e = m.engine
    assert (e.read_reg("rcx"), e.read_reg("r11")) == (0x1111, 0x2222)
    assert e.read_reg("rip") == USER_ENTRY + 1  # HLT at the ring-3 entry


def test_case4_syscall_with_efer_sce_0_is_still_delivered_by_the_sdm_reading() -> None:
    m, _ = build("syscall\nhlt\n")
    m.engine.write_msr(0xC0000080, m.engine.read_msr(0xC0000080) & ~1)
    start(m, CODE, cpl=3)
    (d,) = records(m, "deliver")
    assert (d["type"], d["vector"]) == (7, 1)


def test_case4_syscall_with_efer_sce_0_is_ud_in_the_bochs_reading() -> None:
    m, _ = build("syscall\nhlt\n", fred=FredConfig(syscall_requires_sce=True))
    m.engine.write_msr(0xC0000080, m.engine.read_msr(0xC0000080) & ~1)
    start(m, CODE, cpl=3)
    (d,) = records(m, "deliver")
    assert (d["type"], d["vector"], d["rip"]) == (3, 6, CODE)


def test_case5_int_0x80_from_ring3_needs_no_gate() -> None:
    m, _ = build("int 0x80\nhlt\n")
    start(m, CODE, cpl=3)
    assert frame(m, RSP[0] - 64) == expect_frame(
        rip=CODE + 2, cs=UCS, rflags=0x246, rsp=USER_RSP, ss=ss(USS, 4, 0x80, 1 << 17, 2))
    assert frame(m, RSP[0] - 64)["ss"] == 0x2204_0080_0002_0023


def test_case5_int_0x0e_from_ring3_is_a_software_interrupt_not_a_page_fault() -> None:
    m, _ = build("int 0x0e\nhlt\n")
    m.build()
    m.engine.write({"cr2": 0x5555000})
    start(m, CODE, cpl=3)
    assert frame(m, RSP[0] - 64) == expect_frame(
        rip=CODE + 2, cs=UCS, rflags=0x246, rsp=USER_RSP, ss=ss(USS, 4, 0x0E, 1 << 17, 2))
    assert m.engine.read_reg("cr2") == 0x5555000


def test_case6a_int3_at_cpl0_is_a_software_exception_on_the_same_stack() -> None:
    m, _ = build("int3\nhlt\n")
    start(m, CODE)
    assert frame(m, SAME_LEVEL_FRAME) == expect_frame(
        rip=CODE + 1, cs=KCS, rflags=0x202, rsp=KERNEL_RSP, ss=ss(KSS, 6, 3, 0, 1))


def test_case6b_cd_03_is_int_n_with_the_software_event_bit() -> None:
    m, _ = build(".byte 0xcd, 0x03\nhlt\n")
    start(m, CODE)
    assert frame(m, SAME_LEVEL_FRAME) == expect_frame(
        rip=CODE + 2, cs=KCS, rflags=0x202, rsp=KERNEL_RSP, ss=ss(KSS, 4, 3, 1 << 17, 2))


def test_case6c_int1_takes_the_db_stack_level_and_switches_to_rsp1() -> None:
    m, _ = build(".byte 0xf1\nhlt\n")
    start(m, CODE)
    top = RSP[1] - 64
    assert frame(m, top) == expect_frame(
        rip=CODE + 1, cs=KCS, rflags=0x202, rsp=KERNEL_RSP, ss=ss(KSS, 5, 1, 0, 1))
    assert csl(m) == 1
    (d,) = records(m, "deliver")
    assert (d["stack"], d["stack_level"], d["event_data"]) == ("rsp1", 1, 0)


def test_case7_an_external_interrupt_uses_the_config_interrupt_level() -> None:
    m, _ = build("nop\nhlt\n", config=0x0000_0000_0040_0440)
    m.interrupt(0x30)
    start(m, CODE)
    top = RSP[2] - 64
    assert frame(m, top) == expect_frame(
        rip=CODE, cs=KCS, rflags=0x202, rsp=KERNEL_RSP, ss=ss(KSS, 0, 0x30))
    assert csl(m) == 2


def test_case7_with_interrupt_level_0_the_interrupt_stays_on_the_current_stack() -> None:
    m, _ = build("nop\nhlt\n")
    m.interrupt(0x30)
    start(m, CODE)
    assert frame(m, SAME_LEVEL_FRAME) == expect_frame(
        rip=CODE, cs=KCS, rflags=0x202, rsp=KERNEL_RSP, ss=ss(KSS, 0, 0x30))
    assert csl(m) == 0


def test_case8_the_red_zone_is_skipped_and_the_frame_is_64_byte_aligned() -> None:
    m, _ = build("ud2\n", config=0x0000_0000_0040_00C0)
    m.build()
    m.phys.write(0x6FF00, b"\xAA" * 0x200)
    start(m, CODE, rsp=0x70008)
    top = (0x70008 - 0xC0) & ~0x3F
    assert top == 0x6FF40
    assert frame(m, top - 64) == expect_frame(
        rip=CODE, cs=KCS, rflags=0x10202, rsp=0x70008, ss=ss(KSS, 3, 6))
    assert m.read_linear(top, 0x70008 - top) == b"\xAA" * (0x70008 - top)


def test_case12_a_broken_same_level_stack_gives_df_on_the_df_stack_level() -> None:
    m, _ = build("ud2\n", pages=[PageSpec(va=0x4FF000, pa=0x4FF000, present=False)])
    result = start(m, CODE, rsp=0x500040)
    assert result.outcome == "hlt"
    top = RSP[3] - 64
    assert frame(m, top) == expect_frame(
        rip=CODE, cs=KCS, rflags=0x202, rsp=0x500040, ss=ss(KSS, 3, 8))
    assert m.engine.read_reg("cr2") == 0x4FFFF8
    assert csl(m) == 3
    faults = records(m, "delivery_fault")
    assert [(f["name"], f["fault_name"], f["error_code"], f["action"]) for f in faults] == [
        ("#UD", "#PF", 0x2, "serial"), ("#PF", "#PF", 0x2, "double-fault")]
    (d,) = records(m, "deliver")
    assert (d["name"], d["stack"], d["double_fault_of"]) == ("#DF", "rsp3", [14, 14])


def test_case12_with_the_df_stack_broken_too_the_cpu_shuts_down() -> None:
    m, _ = build("ud2\n", pages=[PageSpec(va=0x4FF000, pa=0x4FF000, present=False),
                                 PageSpec(va=0x82F000, pa=0x82F000, present=False)])
    result = start(m, CODE, rsp=0x500040)
    assert result.outcome == "shutdown"
    assert records(m, "deliver") == []


def test_case13_a_nested_pf_from_ring3_uses_the_ring0_level_rule_and_bit_58() -> None:
    user = """
        .byte 0xf3, 0x0f, 0x01, 0xca
    """
    m, _ = build("ud2\n", user=user, stklvls=0x0000_0020_0003_0024 | 2 << 28,
                 pages=[PageSpec(va=0x7FF000, pa=0x7FF000, present=False)])
    start(m, CODE, cpl=3)
    top = RSP[2] - 64
    assert frame(m, top) == expect_frame(
        error_code=0x2, rip=CODE, cs=UCS, rflags=0x10246, rsp=USER_RSP,
        ss=ss(USS, 3, 14, nested=1), event_data=0x7FFFF8)
    first, second = records(m, "deliver")
    assert (first["name"], first["handler"], first["stack_level"], first["nested"]) == (
        "#PF", USER_ENTRY, 2, True)
    # ERETU at stack level 2: #GP(0), delivered at level max(0, 2) = 2 on the same stack.
    (fault,) = records(m, "eret_fault")
    assert (fault["insn"], fault["vector"], fault["error_code"]) == ("eretu", 13, 0)
    gp_top = ((top - 0x40) & ~0x3F) - 64
    assert frame(m, gp_top) == expect_frame(
        rip=USER_ENTRY, cs=KCS | 2 << 16, rflags=0x10002, rsp=top, ss=ss(KSS, 3, 13))
    assert (second["name"], second["handler"], second["stack"]) == ("#GP", KERNEL_ENTRY,
                                                                  "current")
    assert csl(m) == 2
    assert gs_bases(m) == (K_GS, U_GS)  # swapped once, by the one delivery from ring 3


def test_consecutive_engine_raised_faults_at_the_same_level_stay_what_they_are() -> None:
    # Two #DE in a row, each skipped by the handler: the engine's nested-exception
    # bookkeeping must not turn the second into #DF (IDT delivery resets it the same way).
    main = """
        xor ecx, ecx
        mov eax, 1
        div ecx
        div ecx
        div ecx
        hlt
    """
    kernel = f"""
        add qword ptr [rsp+8], 2
        {ERETS}
    """
    m, _ = build(main, kernel=kernel)
    start(m, CODE)
    assert [r["name"] for r in records(m, "deliver")] == ["#DE", "#DE", "#DE"]
