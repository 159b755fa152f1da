"""idt.deliver.deliver: each check of IA-32e event delivery, in order, with its exact error
code (SDM Vol. 3A "64-Bit Mode IDT", "Error Code"; the order Bochs exception.cc
`long_mode_int` and QEMU `do_interrupt64` implement).

Error codes are written out as numbers on purpose (0x402, 0x13, ...): building them with
`idt.error_codes` here would hide exactly the class of bug (v*16+2) they guard against.
"""

from __future__ import annotations

import pytest
from fakes import (
    BEYOND_GDT_SEL,
    IST,
    KERNEL_CS,
    KERNEL_DS,
    SPARE_SEL,
    TSS_SEL,
    USER_CS,
    World,
    exception,
    fault_of,
    icebp,
    interrupt,
    make_state,
    nmi,
    software,
    user_state,
)

from idt.deliver import deliver
from idt.descriptors import GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP, SegmentDescriptor
from idt.state import ArchFault, Event
from idt.vectors import Vector

GP, NP, TS, SS = int(Vector.GP), int(Vector.NP), int(Vector.TS), int(Vector.SS)


@pytest.fixture
def world() -> World:
    return World()


# -- 1. IDT limit ----------------------------------------------------------------------

def test_a_gate_whose_last_byte_is_beyond_idtr_limit_raises_gp_naming_the_idt_entry(
        world: World) -> None:
    world.set_gate(0x21)
    st = make_state(idtr_limit=0x21 * 16 + 14)
    assert fault_of(world, interrupt(0x21), st) == (GP, 0x10B)  # 0x21<<3 | IDT | EXT


def test_a_gate_whose_last_byte_is_exactly_at_idtr_limit_is_delivered(world: World) -> None:
    world.set_gate(0x21)
    deliver(world.mem, make_state(idtr_limit=0x21 * 16 + 15), interrupt(0x21))


def test_int_n_beyond_the_idt_limit_reports_the_vector_with_ext_clear(world: World) -> None:
    st = make_state(idtr_limit=0x7FF)  # vectors 0..127
    assert fault_of(world, software(0x80), st) == (GP, 0x402)


def test_the_idt_limit_check_comes_before_the_gate_is_read(world: World) -> None:
    world.mem.not_present.add(0x2000 + 0x800)  # the page holding IDT[0x80]
    st = make_state(idtr_limit=0x7FF)
    assert fault_of(world, software(0x80), st) == (GP, 0x402)
    assert not world.mem.log


# -- 2. gate type ----------------------------------------------------------------------

@pytest.mark.parametrize("gate_type", [t for t in range(16)
                                       if t not in (GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP)])
def test_every_type_but_64_bit_interrupt_and_trap_gates_raises_gp_idt(
        world: World, gate_type: int) -> None:
    world.set_gate(0x30, type=gate_type)
    assert fault_of(world, interrupt(0x30), make_state()) == (GP, 0x183)


@pytest.mark.parametrize(("gate_type", "what"), [(5, "task gate"), (6, "286 interrupt gate"),
                                                 (7, "286 trap gate")])
def test_a_task_gate_or_16_bit_gate_raises_gp_with_the_idt_format_code_as_bochs_and_qemu(
        world: World, gate_type: int, what: str) -> None:
    world.set_gate(0x40, type=gate_type)
    assert fault_of(world, software(0x40)) == (GP, 0x202), what


def test_a_gate_with_the_s_bit_set_is_not_a_gate(world: World) -> None:
    world.set_gate(0x30, s=1)
    assert fault_of(world, interrupt(0x30)) == (GP, 0x183)


def test_the_type_check_comes_before_the_present_check(world: World) -> None:
    world.set_gate(0x30, type=0, present=False)
    assert fault_of(world, interrupt(0x30)) == (GP, 0x183)


# -- 3. software DPL check, before the present check -----------------------------------

def test_int_0x80_from_cpl3_into_a_dpl0_gate_raises_gp_0x402(world: World) -> None:
    world.set_gate(0x80, dpl=0)
    assert fault_of(world, software(0x80), user_state()) == (GP, 0x402)


def test_int_n_from_cpl3_into_a_not_present_dpl0_gate_raises_gp_not_np(world: World) -> None:
    world.set_gate(0x80, dpl=0, present=False)
    assert fault_of(world, software(0x80), user_state()) == (GP, 0x402)


def test_int_n_from_cpl3_into_a_not_present_dpl3_gate_raises_np_with_ext_clear(
        world: World) -> None:
    world.set_gate(0x80, dpl=3, present=False)
    assert fault_of(world, software(0x80), user_state()) == (NP, 0x402)


def test_int3_from_cpl3_into_a_dpl3_gate_is_delivered(world: World) -> None:
    world.set_gate(Vector.BP, dpl=3)
    d = deliver(world.mem, user_state(), software(Vector.BP, length=1))
    assert d.new_cpl == 0


@pytest.mark.parametrize("make_event", [
    lambda: exception(Vector.UD),
    lambda: interrupt(0x30),
    nmi,
    icebp,
], ids=["exception", "interrupt", "nmi", "int1"])
def test_hardware_events_and_int1_ignore_the_gate_dpl(world: World, make_event: object) -> None:
    ev = make_event()  # type: ignore[operator]
    assert isinstance(ev, Event)
    world.set_gate(ev.vector, dpl=0)
    d = deliver(world.mem, user_state(), ev)
    assert d.new_cpl == 0


# -- 4. present ------------------------------------------------------------------------

def test_an_nmi_through_a_not_present_gate_raises_np_0x13(world: World) -> None:
    assert fault_of(world, nmi()) == (NP, 0x13)


def test_a_hardware_irq_0x20_through_a_not_present_gate_raises_np_0x103(world: World) -> None:
    assert fault_of(world, interrupt(0x20)) == (NP, 0x103)


def test_an_exception_through_a_not_present_gate_raises_np_with_ext(world: World) -> None:
    assert fault_of(world, exception(Vector.PF, 2, cr2=0x1234)) == (NP, 0x73)


# -- 5-9. the target code segment ------------------------------------------------------

@pytest.mark.parametrize("selector", [0, 1, 2, 3])
def test_a_null_target_selector_raises_gp_0_plus_ext(world: World, selector: int) -> None:
    world.set_gate(0x30, selector=selector)
    assert fault_of(world, interrupt(0x30)) == (GP, 1)


def test_a_null_target_selector_through_int_n_raises_gp_0(world: World) -> None:
    world.set_gate(0x30, selector=0)
    assert fault_of(world, software(0x30)) == (GP, 0)


def test_a_selector_beyond_the_gdt_limit_raises_gp_with_the_selector_and_ext(
        world: World) -> None:
    world.set_gate(0x30, selector=BEYOND_GDT_SEL | 3)
    assert fault_of(world, interrupt(0x30)) == (GP, BEYOND_GDT_SEL | 1)


def test_a_selector_whose_descriptor_straddles_the_gdt_limit_is_beyond_it(world: World) -> None:
    world.set_gate(0x30, selector=SPARE_SEL)
    st = make_state(gdtr_limit=SPARE_SEL + 6)
    assert fault_of(world, interrupt(0x30), st) == (GP, SPARE_SEL | 1)


def test_an_ldt_selector_behaves_as_if_the_ldt_were_empty(world: World) -> None:
    world.set_gate(0x30, selector=KERNEL_CS | 4)
    assert fault_of(world, interrupt(0x30)) == (GP, 0x0D)  # index 1, TI, EXT


@pytest.mark.parametrize("selector", [KERNEL_DS, TSS_SEL])
def test_a_target_that_is_not_a_code_segment_raises_gp_selector(
        world: World, selector: int) -> None:
    world.set_gate(0x30, selector=selector)
    assert fault_of(world, interrupt(0x30)) == (GP, selector | 1)


def test_a_target_code_segment_with_dpl_above_cpl_raises_gp_selector(world: World) -> None:
    world.set_gate(0x30, selector=USER_CS)  # DPL3 code, delivered at CPL0
    assert fault_of(world, interrupt(0x30)) == (GP, 0x19)  # 0x1B & ~3 | EXT


@pytest.mark.parametrize(("l", "db", "what"), [(0, 1, "32-bit"), (0, 0, "16-bit"),
                                               (1, 1, "L=1 D=1")])
def test_a_target_that_is_not_a_64_bit_code_segment_raises_gp_selector(
        world: World, l: int, db: int, what: str) -> None:  # noqa: E741
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, l=l, db=db))
    world.set_gate(0x30, selector=SPARE_SEL)
    assert fault_of(world, interrupt(0x30)) == (GP, SPARE_SEL | 1), what


def test_a_not_present_target_code_segment_raises_np_selector(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, l=1, present=False))
    world.set_gate(0x30, selector=SPARE_SEL)
    assert fault_of(world, interrupt(0x30)) == (NP, SPARE_SEL | 1)


def test_the_64_bit_check_comes_before_the_segment_present_check(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, db=1, present=False))
    world.set_gate(0x30, selector=SPARE_SEL)
    assert fault_of(world, interrupt(0x30)) == (GP, SPARE_SEL | 1)


# -- 10. handler canonical -------------------------------------------------------------

@pytest.mark.parametrize("offset", [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF,
                                    0x1234_5678_9ABC_DEF0])
def test_a_non_canonical_handler_address_raises_gp_0_plus_ext(world: World, offset: int) -> None:
    world.set_gate(0x30, offset=offset)
    assert fault_of(world, interrupt(0x30)) == (GP, 1)


# -- 11-12. the new stack --------------------------------------------------------------

def test_an_ist_slot_beyond_tr_limit_raises_ts_naming_tr(world: World) -> None:
    world.set_gate(0x30, ist=3)  # IST3 at 0x34..0x3B
    st = make_state(tr_limit=0x3A)
    assert fault_of(world, interrupt(0x30), st) == (TS, TSS_SEL | 1)


def test_an_ist_slot_ending_exactly_at_tr_limit_is_readable(world: World) -> None:
    world.set_gate(0x30, ist=3)
    d = deliver(world.mem, make_state(tr_limit=0x3B), interrupt(0x30))
    assert d.stack == "ist3"


def test_an_rsp0_slot_beyond_tr_limit_raises_ts_on_a_privilege_change(world: World) -> None:
    world.set_gate(0x80, dpl=3)
    st = user_state(tr_limit=0x0A)  # RSP0 at 0x04..0x0B
    assert fault_of(world, software(0x80), st) == (TS, TSS_SEL)  # INT n: EXT clear


def test_the_tss_is_not_read_when_the_stack_does_not_change(world: World) -> None:
    world.set_gate(0x30)
    deliver(world.mem, make_state(tr_limit=0), interrupt(0x30))


@pytest.mark.parametrize("stack", ["ist", "rsp0"])
def test_a_non_canonical_rsp_from_the_tss_raises_ss_0_plus_ext(world: World, stack: str) -> None:
    if stack == "ist":
        world.set_gate(Vector.UD, ist=5)
        world.set_tss(ist5=0x8000_0000_0000_0000)
        st = make_state()
    else:
        world.set_gate(Vector.UD)
        world.set_tss(rsp0=0x0000_8000_0000_0000)
        st = user_state()
    assert fault_of(world, exception(Vector.UD), st) == (SS, 1)


def test_a_non_canonical_handler_is_reported_before_the_tss_is_read(world: World) -> None:
    world.set_gate(0x30, offset=0x0000_8000_0000_0000, ist=1)
    assert fault_of(world, interrupt(0x30), make_state(tr_limit=0)) == (GP, 1)


# -- the order as a whole --------------------------------------------------------------

def test_checks_fail_in_the_sdm_order_as_each_broken_thing_is_repaired_in_turn(
        world: World) -> None:
    """Break every check at once, then repair them one at a time: each repair reveals
    the next check's fault, in the order of Bochs' `long_mode_int` (1 IDT limit, 2 type,
    3 software DPL, 4 present, 5 null selector, 6 GDT limit, 7 code/DPL, 8 64-bit,
    9 CS present, 10 canonical handler, 11 TSS slot, 12 canonical new RSP)."""
    v = 0x80
    ev = software(v)
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, l=0, db=1,
                                                      present=False))
    world.set_tss(ist2=0x8000_0000_0000_0000)
    fields = dict(type=6, dpl=0, present=False, selector=0, offset=0x8000_0000_0000_0000,
                  ist=2)
    st = user_state(idtr_limit=v * 16 + 14, gdtr_limit=SPARE_SEL - 1, tr_limit=0)

    def step(expected: tuple[int, int, str]) -> None:
        world.set_gate(v, **fields)
        with pytest.raises(ArchFault) as info:
            deliver(world.mem, st, ev)
        assert (info.value.vector, info.value.error_code) == expected[:2]
        assert expected[2] in info.value.why

    step((GP, 0x402, "IDTR.limit"))
    st.idtr_limit = 0xFFF
    step((GP, 0x402, "not a 64-bit gate"))
    fields["type"] = GATE_TYPE_TRAP
    step((GP, 0x402, "DPL 0 < CPL 3"))
    fields["dpl"] = 3
    step((NP, 0x402, "not present"))
    fields["present"] = True
    step((GP, 0, "null"))
    fields["selector"] = SPARE_SEL
    step((GP, SPARE_SEL, "outside the GDT"))
    st.gdtr_limit = SPARE_SEL + 7
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0x3, dpl=0, present=False))
    step((GP, SPARE_SEL, "not a code segment"))
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, db=1, present=False))
    step((GP, SPARE_SEL, "not a 64-bit code"))
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, l=1, present=False))
    step((NP, SPARE_SEL, "not present"))
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xB, dpl=0, l=1))
    step((GP, 0, "handler"))
    fields["offset"] = 0xFFFF_FFFF_8000_0000
    step((TS, TSS_SEL, "TR.limit"))
    st.tr_limit = 0x67
    step((SS, 0, "new RSP"))
    world.set_tss(ist2=IST[2])
    world.set_gate(v, **fields)
    d = deliver(world.mem, st, ev)  # and then it is delivered
    assert (d.new_rip, d.stack, d.new_cpl) == (0xFFFF_FFFF_8000_0000, "ist2", 0)


# -- EXT -------------------------------------------------------------------------------

@pytest.mark.parametrize(("make_event", "ext"), [
    (lambda: exception(Vector.UD), 1),
    (lambda: exception(Vector.DF, 0), 1),
    (nmi, 1),
    (lambda: interrupt(Vector.UD), 1),
    (icebp, 1),
    (lambda: software(Vector.UD), 0),
    (lambda: software(Vector.BP, length=1), 0),
    (lambda: software(Vector.OF, length=1), 0),
], ids=["exception", "double-fault", "nmi", "interrupt", "int1", "int-n", "int3", "into"])
def test_ext_is_set_for_exceptions_nmi_and_interrupts_and_clear_for_int_n(
        world: World, make_event: object, ext: int) -> None:
    ev = make_event()  # type: ignore[operator]
    assert isinstance(ev, Event)
    world.set_gate(ev.vector, dpl=3, present=False)
    assert fault_of(world, ev) == (NP, (int(ev.vector) << 3) | 2 | ext)


def test_ext_is_ored_into_selector_codes_but_rpl_is_dropped(world: World) -> None:
    world.set_gate(0x30, selector=USER_CS)  # 0x1B: RPL 3, DPL3 > CPL0
    assert fault_of(world, interrupt(0x30)) == (GP, 0x19)
    assert fault_of(world, software(0x30)) == (GP, 0x18)
