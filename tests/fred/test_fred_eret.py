"""ERETS and ERETU: test-plan cases 14-16 of docs/fred.md, on the pure model
(`idt.fred.erets`/`eretu` over a scripted memory) and on the machine."""

from __future__ import annotations

import struct

import pytest

from idt.descriptors import SegmentDescriptor
from idt.fred import EretResult, FredMsrs, erets, eretu
from idt.state import ArchFault
from tests.fred.rig import CODE, ERETS, ERETU, KERNEL_ENTRY, build, records, start
from tests.unit.fakes import World, make_state

FRAME_AT = 0x8000  # RSP at the ERET: the error-code slot
STAR_B = 0x33  # IA32_STAR[63:48]: the standard pair is CS 0x43, SS 0x3B


def msrs(csl: int = 0) -> FredMsrs:
    return FredMsrs(config=0x400040 | csl, rsp=(0, 0, 0, 0), stklvls=0)


def world_with(rip: int, cs: int, rflags: int, rsp: int, ss: int) -> World:
    w = World()
    w.mem.poke(FRAME_AT, struct.pack("<6Q", 0xEEEE, rip, cs, rflags, rsp, ss))
    return w


def do_erets(rip: int = 0x1000, cs: int = 0x08, rflags: int = 0x202, rsp: int = 0x9000,
             ss: int = 0x10, *, csl: int = 0, **state: int) -> EretResult:
    w = world_with(rip, cs, rflags, rsp, ss)
    st = make_state(rsp=FRAME_AT, **state)
    return erets(w.mem, st, msrs(csl), fred=True)


def gp0(fn: object, *args: object, **kw: object) -> None:
    with pytest.raises(ArchFault) as info:
        fn(*args, **kw)  # type: ignore[operator]
    assert (info.value.vector, info.value.error_code) == (13, 0), info.value


def test_case14_erets_with_a_clean_frame_returns_and_keeps_cs_and_ss() -> None:
    r = do_erets()
    assert (r.rip, r.cs, r.rflags, r.rsp, r.ss, r.new_csl) == (0x1000, 0x08, 0x202, 0x9000,
                                                              0x10, 0)
    assert (r.unblock_nmi, r.sti_shadow, r.single_step) == (False, False, False)


@pytest.mark.parametrize("change", [
    {"cs": 0x08 | 1 << 19}, {"cs": 0x10}, {"rflags": 0x200}, {"rflags": 0x202 | 1 << 17},
    {"rflags": 0x202 | 8}, {"ss": 0x10 | 1 << 20}, {"rip": 0x0000_8000_0000_0000},
])
def test_case14_each_bad_erets_slot_is_gp0(change: dict[str, int]) -> None:
    gp0(do_erets, **change)


def test_case14_erets_ignores_ss_bits_63_32_and_allows_iopl_3() -> None:
    assert do_erets(ss=0xFFFF_FFFF_0000_0010).rip == 0x1000
    assert do_erets(rflags=0x3202).rflags == 0x3202


def test_case14_erets_never_raises_the_stack_level() -> None:
    assert do_erets(cs=0x08 | 3 << 16, csl=1).new_csl == 1
    assert do_erets(cs=0x08 | 0 << 16, csl=2).new_csl == 0


def test_case14_erets_at_cpl3_or_without_cr4_fred_is_ud() -> None:
    w = world_with(0x1000, 0x08, 0x202, 0x9000, 0x10)
    for st, fred in ((make_state(rsp=FRAME_AT, cpl=3), True), (make_state(rsp=FRAME_AT), False)):
        with pytest.raises(ArchFault) as info:
            erets(w.mem, st, msrs(), fred=fred)
        assert info.value.vector == 6


def test_case14_a_faulting_erets_on_the_machine_leaves_rip_and_rsp_unchanged() -> None:
    main = f"""
        push 0x10
        push 0x9000
        push 0x200
        push 0x08
        push 0x1000
        push 0
    bad_erets:
        {ERETS}
    """
    m, sym = build(main)
    start(m, CODE)
    (fault,) = records(m, "eret_fault")
    (d,) = records(m, "deliver")
    assert (fault["vector"], d["name"], d["rip"], d["old_rsp"]) == (13, "#GP", sym["bad_erets"],
                                                                   0x70000 - 48)


def do_eretu(rip: int = 0x60_0000, cs: int = 0x43, rflags: int = 0x246, rsp: int = 0x70_0123,
             ss: int = 0x3B, *, csl: int = 0, world: World | None = None) -> EretResult:
    w = world or World()
    w.mem.poke(FRAME_AT, struct.pack("<6Q", 0, rip, cs, rflags, rsp, ss))
    st = make_state(rsp=FRAME_AT)
    return eretu(w.mem, st, msrs(csl), fred=True, star=STAR_B << 48)


def test_case15_eretu_to_the_standard_pair_loads_flat_64bit_ring3_without_the_gdt() -> None:
    w = World()
    w.mem.not_present.add(0x1000)  # the GDT page: any GDT read would fault
    r = do_eretu(world=w)
    assert (r.rip, r.cs, r.ss, r.rsp, r.rflags, r.compat) == (0x60_0000, 0x43, 0x3B, 0x70_0123,
                                                             0x246, False)
    assert (r.cs_flags, r.ss_flags) == (0x00AFFB00, 0x00CFF300)  # L=1 DPL3; B=1 DPL3


@pytest.mark.parametrize("change", [
    {"rflags": 0x3246}, {"cs": 0x40}, {"cs": 0x1_0043}, {"ss": 0x3B | 1 << 19}, {"csl": 1},
    {"rip": 0x0000_8000_0000_0000},
])
def test_case15_each_bad_eretu_frame_is_gp0(change: dict[str, int]) -> None:
    gp0(do_eretu, **change)


def test_case15_eretu_at_stack_level_1_faults_before_reading_the_frame() -> None:
    w = World()
    w.mem.not_present.add(FRAME_AT & ~0xFFF)
    gp0(do_eretu, csl=1, world=w)


def test_case16_eretu_to_the_compatibility_pair_truncates_rip_and_rsp() -> None:
    r = do_eretu(cs=0x33, ss=0x3B, rip=0xFFFF_FFFF_0040_1000, rsp=0x1234_5678_0070_0000)
    assert (r.rip, r.rsp, r.compat, r.cs_flags) == (0x0040_1000, 0x0070_0000, True, 0x00CFFB00)


def test_case16_eretu_to_another_selector_reads_the_gdt_as_iret_does() -> None:
    w = World()
    w.set_descriptor(0x38, SegmentDescriptor(type=0xB, dpl=3, l=1, present=True))
    r = do_eretu(cs=0x3B, ss=0x23, world=w)
    assert (r.cs, r.ss, r.cs_flags, r.compat) == (0x3B, 0x23, None, False)
    w.set_descriptor(0x38, SegmentDescriptor(type=0xB, dpl=3, l=1, present=False))
    with pytest.raises(ArchFault) as info:
        do_eretu(cs=0x3B, ss=0x23, world=w)
    assert (info.value.vector, info.value.error_code) == (11, 0x38)


def test_eretu_without_cr4_fred_or_at_cpl3_is_ud() -> None:
    w = World()
    w.mem.poke(FRAME_AT, bytes(48))
    for st, fred in ((make_state(rsp=FRAME_AT, cpl=3), True), (make_state(rsp=FRAME_AT), False)):
        with pytest.raises(ArchFault) as info:
            eretu(w.mem, st, msrs(), fred=fred, star=0)
        assert info.value.vector == 6


def test_case15_eretu_on_the_machine_enters_ring3_with_the_standard_cs_and_swaps_gs() -> None:
    main = f"""
        push 0x3B
        push 0x700123
        push 0x246
        push 0x43
        push user_code
        push 0
        {ERETU}
    user_code:
        ud2
    """
    m, sym = build(main)
    start(m, CODE)
    (eret,) = records(m, "eret")
    assert (eret["insn"], eret["to_cpl"], eret["to_rip"]) == ("eretu", 3, sym["user_code"])
    (d,) = records(m, "deliver")  # the #UD in ring 3 enters at the ring-3 entry
    assert (d["name"], d["cs"], d["ss"] & 0xFFFF, d["old_rsp"], d["stack"]) == (
        "#UD", 0x43, 0x3B, 0x700123, "rsp0")
    e = m.engine
    # GS: swapped by ERETU, then back by the ring-3 event: the kernel's again.
    assert (e.read_msr(0xC0000101), e.read_msr(0xC0000102)) == (0xFFFF_8000_0000_1000,
                                                                0x7000_0000)
    assert d["handler"] != KERNEL_ENTRY


def test_eretu_to_a_gdt_compatibility_segment_checks_the_cs_limit() -> None:
    w = World()
    w.set_descriptor(0x38, SegmentDescriptor(type=0xB, dpl=3, db=1, limit=0xFFFF, g=0,
                                             present=True))
    r = do_eretu(cs=0x3B, ss=0x23, rip=0xFFFF, rsp=0x1_0000_8000, world=w)
    assert (r.rip, r.rsp, r.compat) == (0xFFFF, 0x8000, True)
    gp0(do_eretu, cs=0x3B, ss=0x23, rip=0x1_0000, world=w)


def test_case15_a_faulting_eretu_leaves_nmis_blocked_even_with_bit_18_in_its_frame() -> None:
    kernel = f"""
        cmp byte ptr [rsp+0x2e], 3       # the #GP (type 3): stop
        je stop
        push {0x23 | 1 << 18:#x}
        push 0x7F0123
        push 0x3246
        push 0x1B
        push 0x100000
        push 0
    bad_eretu:
        {ERETU}
    stop:
        hlt
    """
    # NMI on stack level 0 (STKLVLS without Linux's NMI level), so the CSL check passes
    # and the IOPL check is the one that fails.
    m, sym = build("nop\nhlt\n", kernel=kernel, stklvls=0x0000_0020_0003_0004)
    m.nmi()
    start(m, CODE)
    (fault,) = records(m, "eret_fault")
    assert (fault["insn"], fault["rip"], fault["vector"], fault["error_code"]) == (
        "eretu", sym["bad_eretu"], 13, 0)
    assert m.intr.nmi_blocked
    assert records(m, "eret") == []
