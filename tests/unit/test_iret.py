"""idt.iret.iret64: NMI unblocking before the checks, each check's fault, and which RFLAGS
bits IRETQ may write at which CPL/IOPL (SDM Vol. 3A "Handling Multiple NMIs"; Vol. 2A
"IRET/IRETD/IRETQ")."""

from __future__ import annotations

import struct

import pytest
from fakes import (
    BEYOND_GDT_SEL,
    KERNEL_CS,
    KERNEL_DS,
    SPARE_SEL,
    USER_CS,
    USER_DS,
    World,
    make_state,
)

from idt.descriptors import SegmentDescriptor
from idt.error_codes import PFErr
from idt.iret import UnsupportedIret, iret64, segments_to_null
from idt.state import (
    RFLAGS_AC,
    RFLAGS_DF,
    RFLAGS_ID,
    RFLAGS_IF,
    RFLAGS_IOPL,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VIF,
    RFLAGS_VIP,
    RFLAGS_VM,
    ArchFault,
    ArchState,
    DataSegment,
)
from idt.vectors import Vector

FRAME_AT = 0x7000
RET_RIP = 0x40_2000
RET_RSP = 0x6_0000
STATUS = 0x8D5  # CF PF AF ZF SF OF


@pytest.fixture
def world() -> World:
    return World()


def frame(world: World, *, rip: int = RET_RIP, cs: int = KERNEL_CS, rflags: int = 0x202,
          rsp: int = RET_RSP, ss: int = KERNEL_DS, at: int = FRAME_AT) -> None:
    world.mem.poke(at, struct.pack("<5Q", rip, cs, rflags, rsp, ss))


def handler_state(**overrides: object) -> ArchState:
    """The state inside a CPL0 handler about to IRETQ from FRAME_AT."""
    fields: dict[str, object] = dict(rsp=FRAME_AT, rflags=0x2, nmi_blocked=True)
    fields.update(overrides)
    return make_state(**fields)


def iret_fault(world: World, st: ArchState) -> tuple[int, int | None]:
    with pytest.raises(ArchFault) as info:
        iret64(world.mem, st)
    return int(info.value.vector), info.value.error_code


# -- success ---------------------------------------------------------------------------

def test_iret_to_the_same_cpl_pops_rip_cs_rflags_rsp_ss(world: World) -> None:
    frame(world, rflags=0x246)
    res = iret64(world.mem, handler_state())
    assert (res.rip, res.cs, res.rflags, res.rsp, res.ss, res.cpl) == (
        RET_RIP, KERNEL_CS, 0x246, RET_RSP, KERNEL_DS, 0)


def test_iret_to_cpl3_returns_at_cs_rpl(world: World) -> None:
    frame(world, cs=USER_CS, ss=USER_DS)
    res = iret64(world.mem, handler_state())
    assert (res.cs, res.ss, res.cpl) == (USER_CS, USER_DS, 3)


def test_iret_to_cpl0_accepts_a_null_ss(world: World) -> None:
    frame(world, ss=0)
    assert iret64(world.mem, handler_state()).ss == 0


def test_a_successful_iret_unblocks_nmis_and_says_so(world: World) -> None:
    frame(world)
    st = handler_state()
    res = iret64(world.mem, st)
    assert res.nmi_unblocked and not st.nmi_blocked


def test_an_iret_outside_an_nmi_handler_reports_no_unblocking(world: World) -> None:
    frame(world)
    st = handler_state(nmi_blocked=False)
    assert not iret64(world.mem, st).nmi_unblocked


def test_iret_pops_upper_bits_of_the_cs_and_ss_slots_as_garbage(world: World) -> None:
    frame(world, cs=0xFFFF_0000_0000_0000 | KERNEL_CS, ss=0x1234_0000_0000_0000 | KERNEL_DS)
    res = iret64(world.mem, handler_state())
    assert (res.cs, res.ss) == (KERNEL_CS, KERNEL_DS)


# -- NMI unblocking comes first --------------------------------------------------------

@pytest.mark.parametrize("breakage", ["null-cs", "stack-not-present", "stack-non-canonical",
                                      "rip-non-canonical", "ss-not-present"])
def test_an_iret_that_faults_still_unblocks_nmis(world: World, breakage: str) -> None:
    st = handler_state()
    if breakage == "null-cs":
        frame(world, cs=0)
    elif breakage == "stack-not-present":
        world.mem.not_present.add(FRAME_AT)
    elif breakage == "stack-non-canonical":
        st.rsp = 0x8000_0000_0000_0000
    elif breakage == "rip-non-canonical":
        frame(world, rip=0x0000_8000_0000_0000)
    else:
        world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0x3, dpl=0, present=False))
        frame(world, ss=SPARE_SEL)
    with pytest.raises(ArchFault):
        iret64(world.mem, st)
    assert not st.nmi_blocked


def test_an_iret_that_is_not_modelled_still_unblocks_nmis(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, db=0))  # 16-bit code
    frame(world, cs=SPARE_SEL)
    st = handler_state()
    with pytest.raises(UnsupportedIret):
        iret64(world.mem, st)
    assert not st.nmi_blocked


def test_an_iret_to_32_bit_compatibility_mode_code_returns_there(world: World) -> None:
    """IA-32e mode IRET to a CS with L = 0, D = 1 (SDM Vol. 2 IRET: the return is to
    compatibility mode; EIP must lie within the CS limit)."""
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, db=1))  # 32-bit code
    frame(world, cs=SPARE_SEL, rip=0x401000)
    res = iret64(world.mem, handler_state())
    assert (res.cs, res.rip, res.cpl) == (SPARE_SEL, 0x401000, 0)


def test_an_iret_to_compatibility_mode_beyond_the_cs_limit_is_gp0(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, db=1, limit=0xF, g=0))
    frame(world, cs=SPARE_SEL, rip=0x10)
    with pytest.raises(ArchFault) as info:
        iret64(world.mem, handler_state())
    assert (info.value.vector, info.value.error_code) == (Vector.GP, 0)


# -- each check ------------------------------------------------------------------------

def test_a_frame_on_a_not_present_page_raises_pf_as_a_supervisor_read(world: World) -> None:
    world.mem.not_present.add(FRAME_AT)
    with pytest.raises(ArchFault) as info:
        iret64(world.mem, handler_state())
    assert (info.value.vector, info.value.error_code, info.value.cr2) == (Vector.PF, 0, FRAME_AT)


def test_a_frame_read_at_cpl3_is_a_user_access(world: World) -> None:
    world.mem.not_present.add(FRAME_AT)
    st = handler_state(cpl=3, cs=USER_CS, ss=USER_DS)
    with pytest.raises(ArchFault) as info:
        iret64(world.mem, st)
    assert info.value.error_code == PFErr.U


def test_a_non_canonical_rsp_raises_ss_0(world: World) -> None:
    assert iret_fault(world, handler_state(rsp=0x8000_0000_0000_0000)) == (Vector.SS, 0)


@pytest.mark.parametrize("cs", [0, 3])
def test_a_null_cs_raises_gp_0(world: World, cs: int) -> None:
    frame(world, cs=cs)
    assert iret_fault(world, handler_state()) == (Vector.GP, 0)


def test_a_cs_beyond_the_gdt_raises_gp_selector(world: World) -> None:
    frame(world, cs=BEYOND_GDT_SEL)
    assert iret_fault(world, handler_state()) == (Vector.GP, BEYOND_GDT_SEL)


def test_a_cs_that_is_not_code_raises_gp_selector(world: World) -> None:
    frame(world, cs=KERNEL_DS)
    assert iret_fault(world, handler_state()) == (Vector.GP, KERNEL_DS)


def test_returning_to_a_more_privileged_rpl_raises_gp_selector(world: World) -> None:
    frame(world, cs=KERNEL_CS)
    st = handler_state(cpl=3, cs=USER_CS, ss=USER_DS)
    assert iret_fault(world, st) == (Vector.GP, KERNEL_CS)


def test_a_non_conforming_cs_whose_dpl_differs_from_its_rpl_raises_gp_selector(
        world: World) -> None:
    frame(world, cs=KERNEL_CS | 3, ss=USER_DS)  # DPL0 code with RPL3
    assert iret_fault(world, handler_state()) == (Vector.GP, KERNEL_CS)


def test_a_conforming_cs_whose_dpl_exceeds_its_rpl_raises_gp_selector(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xF, dpl=3, l=1))
    frame(world, cs=SPARE_SEL)
    assert iret_fault(world, handler_state()) == (Vector.GP, SPARE_SEL)


def test_a_not_present_cs_raises_np_selector(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, l=1, present=False))
    frame(world, cs=SPARE_SEL)
    assert iret_fault(world, handler_state()) == (Vector.NP, SPARE_SEL)


def test_a_null_ss_returning_to_cpl3_raises_gp_0(world: World) -> None:
    frame(world, cs=USER_CS, ss=0)
    assert iret_fault(world, handler_state()) == (Vector.GP, 0)


def test_an_ss_beyond_the_gdt_raises_gp_selector(world: World) -> None:
    frame(world, ss=BEYOND_GDT_SEL)
    assert iret_fault(world, handler_state()) == (Vector.GP, BEYOND_GDT_SEL)


def test_an_ss_whose_rpl_differs_from_the_cs_rpl_raises_gp_selector(world: World) -> None:
    frame(world, cs=USER_CS, ss=USER_DS & ~3)
    assert iret_fault(world, handler_state()) == (Vector.GP, USER_DS & ~3)


def test_an_ss_that_is_not_writable_data_raises_gp_selector(world: World) -> None:
    frame(world, ss=KERNEL_CS)
    assert iret_fault(world, handler_state()) == (Vector.GP, KERNEL_CS)


def test_an_ss_whose_dpl_differs_from_the_rpl_raises_gp_selector(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0x3, dpl=0, db=1))
    frame(world, cs=USER_CS, ss=SPARE_SEL | 3)
    assert iret_fault(world, handler_state()) == (Vector.GP, SPARE_SEL)


def test_a_not_present_ss_raises_ss_selector(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0x3, dpl=0, present=False))
    frame(world, ss=SPARE_SEL)
    assert iret_fault(world, handler_state()) == (Vector.SS, SPARE_SEL)


def test_a_non_canonical_return_rip_raises_gp_0(world: World) -> None:
    frame(world, rip=0x0000_8000_0000_0000)
    assert iret_fault(world, handler_state()) == (Vector.GP, 0)


def test_an_iret_to_a_16_bit_code_segment_is_unsupported_not_a_crash(
        world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, db=0))
    frame(world, cs=SPARE_SEL)
    with pytest.raises(UnsupportedIret):
        iret64(world.mem, handler_state())


# -- RFLAGS ----------------------------------------------------------------------------

ALWAYS = STATUS | RFLAGS_TF | RFLAGS_DF | RFLAGS_NT | RFLAGS_RF | RFLAGS_AC | RFLAGS_ID


@pytest.mark.parametrize("cpl", [0, 1, 2, 3])
def test_status_tf_df_nt_rf_ac_and_id_are_written_at_every_cpl(world: World, cpl: int) -> None:
    frame(world, cs=USER_CS, ss=USER_DS, rflags=0x2 | ALWAYS)
    res = iret64(world.mem, handler_state(cpl=cpl, rflags=0x2))
    assert res.rflags & ALWAYS == ALWAYS
    frame(world, cs=USER_CS, ss=USER_DS, rflags=0x2)
    # (NT = 1 in the current RFLAGS makes IRETQ itself fault: tested below.)
    res = iret64(world.mem, handler_state(cpl=cpl, rflags=0x2 | (ALWAYS & ~RFLAGS_NT)))
    assert res.rflags & ALWAYS == 0


@pytest.mark.parametrize(("cpl", "iopl", "if_writable", "iopl_writable"), [
    (0, 0, True, True),
    (0, 3, True, True),
    (1, 0, False, False),
    (1, 1, True, False),
    (2, 3, True, False),
    (3, 0, False, False),
    (3, 2, False, False),
    (3, 3, True, False),
])
def test_if_is_written_only_when_cpl_le_iopl_and_iopl_only_at_cpl0(
        world: World, cpl: int, iopl: int, if_writable: bool, iopl_writable: bool) -> None:
    current = 0x2 | RFLAGS_IF | (iopl << 12)
    popped = 0x2 | ((3 - iopl) << 12)  # IF=0 and a different IOPL
    frame(world, cs=USER_CS, ss=USER_DS, rflags=popped)
    res = iret64(world.mem, handler_state(cpl=cpl, rflags=current))
    assert bool(res.rflags & RFLAGS_IF) == (not if_writable)
    assert (res.rflags & RFLAGS_IOPL) >> 12 == ((3 - iopl) if iopl_writable else iopl)


@pytest.mark.parametrize(("cpl", "writable"), [(0, True), (1, False), (3, False)])
def test_vif_and_vip_are_written_only_at_cpl0(world: World, cpl: int, writable: bool) -> None:
    frame(world, cs=USER_CS, ss=USER_DS, rflags=0x2 | RFLAGS_VIF | RFLAGS_VIP)
    res = iret64(world.mem, handler_state(cpl=cpl, rflags=0x2))
    assert bool(res.rflags & RFLAGS_VIF) == writable
    assert bool(res.rflags & RFLAGS_VIP) == writable


def test_iretq_never_sets_vm_or_reserved_bits_and_always_sets_bit_1(world: World) -> None:
    reserved = (1 << 3) | (1 << 5) | (1 << 15) | (0xFFFF_FFFF_FFC0_0000)
    frame(world, rflags=RFLAGS_VM | reserved)
    res = iret64(world.mem, handler_state(rflags=0x2))
    assert res.rflags & (RFLAGS_VM | reserved) == 0
    assert res.rflags & 0x2


# -- IA-32e mode: NT (SDM-corner rule 5) -----------------------------------------------

def test_an_iretq_with_nt_set_in_long_mode_is_gp0_before_anything_is_popped() -> None:
    # The frame's page is not present: a #GP(0) and not a #PF proves nothing was popped.
    world = World()
    world.mem.not_present.add(FRAME_AT & ~0xFFF)
    st = handler_state(rflags=0x2 | RFLAGS_NT)
    assert iret_fault(world, st) == (Vector.GP, 0)
    assert st.nmi_blocked is False  # NMIs unblocked even so (before the NT check)
    assert [a for a in world.mem.log if a.linear == FRAME_AT] == []
    assert (st.rsp, st.rflags) == (FRAME_AT, 0x2 | RFLAGS_NT)


def test_nt_in_the_popped_rflags_is_loaded_without_a_fault(world: World) -> None:
    frame(world, rflags=0x2 | RFLAGS_NT)
    res = iret64(world.mem, handler_state(rflags=0x2))
    assert (res.rip, res.rflags, res.rsp) == (RET_RIP, 0x2 | RFLAGS_NT, RET_RSP)


# -- RETURN-TO-OUTER-PRIVILEGE-LEVEL: DS/ES/FS/GS (SDM-corner rule 4) -------------------

KDATA = DataSegment(KERNEL_DS, dpl=0)
UDATA = DataSegment(USER_DS, dpl=3)
KCODE = DataSegment(KERNEL_CS, dpl=0, is_code=True)
CONFORMING = DataSegment(0x40, dpl=0, is_code=True, conforming=True)
DPL1_DATA = DataSegment(0x49, dpl=1)


def test_segments_below_the_new_cpl_are_nulled_in_the_sdm_order() -> None:
    segs = {"ds": KDATA, "es": UDATA, "fs": DPL1_DATA, "gs": KCODE}
    assert segments_to_null(3, segs) == ("fs", "gs", "ds")


def test_conforming_code_and_dpl3_data_stay_at_cpl3() -> None:
    assert segments_to_null(3, {"ds": UDATA, "gs": CONFORMING}) == ()


def test_a_dpl1_segment_stays_on_a_return_to_cpl1_and_goes_on_one_to_cpl2() -> None:
    assert segments_to_null(1, {"es": DPL1_DATA}) == ()
    assert segments_to_null(2, {"es": DPL1_DATA}) == ("es",)


def test_a_null_selector_with_an_rpl_becomes_0_and_a_zero_one_is_left_alone() -> None:
    assert segments_to_null(3, {"ds": DataSegment(0x3, dpl=3), "es": DataSegment(0)}) == ("ds",)


def test_an_iretq_to_cpl3_reports_the_segments_to_null(world: World) -> None:
    frame(world, cs=USER_CS, ss=USER_DS)
    st = handler_state(data_segments={"ds": KDATA, "es": UDATA, "fs": KDATA, "gs": KCODE})
    assert iret64(world.mem, st).null_segments == ("fs", "gs", "ds")


def test_an_iretq_to_the_same_cpl_nulls_nothing(world: World) -> None:
    frame(world)
    st = handler_state(data_segments={"ds": KDATA, "gs": KCODE})
    assert iret64(world.mem, st).null_segments == ()
