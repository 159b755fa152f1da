"""idt.deliver.deliver on success: stack selection, alignment, every frame slot, RFLAGS
(SDM Vol. 3A "Stack Switching in IA-32e Mode", "Interrupt Stack Table", "64-Bit Mode Stack
Frame"; Bochs exception.cc `long_mode_int`)."""

from __future__ import annotations

import pytest
from fakes import (
    HANDLER,
    INSN_RIP,
    IST,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_RSP,
    RSP0,
    SPARE_SEL,
    USER_CS,
    USER_DS,
    USER_RSP,
    World,
    exception,
    icebp,
    interrupt,
    make_state,
    nmi,
    software,
    user_state,
)

from idt.deliver import deliver
from idt.descriptors import GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP, SegmentDescriptor
from idt.error_codes import PFErr
from idt.state import (
    RFLAGS_AC,
    RFLAGS_DF,
    RFLAGS_IF,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    ArchFault,
    Event,
    Source,
)
from idt.vectors import Vector


@pytest.fixture
def world() -> World:
    return World()


# -- stack selection -------------------------------------------------------------------

@pytest.mark.parametrize("n", range(1, 8))
def test_an_ist_gate_switches_to_its_ist_stack_even_at_the_same_cpl(world: World, n: int) -> None:
    world.set_gate(Vector.NMI, ist=n)
    d = deliver(world.mem, make_state(), nmi())
    assert d.stack == f"ist{n}"
    assert d.new_rsp == IST[n] - 40
    assert d.new_ss == 0  # NULL selector, RPL = new CPL (the SDM's IST prose)
    assert d.new_cpl == 0


def test_an_ist_gate_from_cpl3_uses_the_ist_stack_not_rsp0(world: World) -> None:
    world.set_gate(Vector.DB, ist=4)
    d = deliver(world.mem, user_state(), exception(Vector.DB))
    assert (d.stack, d.new_rsp, d.new_ss, d.new_cpl) == ("ist4", IST[4] - 40, 0, 0)


def test_a_privilege_change_without_ist_switches_to_rsp0_with_a_null_ss(world: World) -> None:
    world.set_gate(0x80, dpl=3)
    d = deliver(world.mem, user_state(), software(0x80))
    assert (d.stack, d.new_rsp, d.new_ss, d.new_cpl) == ("rsp0", RSP0 - 40, 0, 0)
    assert d.new_cs == KERNEL_CS


def test_the_same_cpl_without_ist_stays_on_the_current_stack_with_ss_unchanged(
        world: World) -> None:
    world.set_gate(0x30)
    world.set_tss(rsp0=0xDEAD_0000)  # must not be used
    d = deliver(world.mem, make_state(), interrupt(0x30))
    assert (d.stack, d.new_rsp, d.new_ss, d.new_cpl) == ("current", KERNEL_RSP - 40, KERNEL_DS, 0)


def test_a_conforming_target_keeps_the_cpl_and_the_current_stack(world: World) -> None:
    world.set_descriptor(SPARE_SEL, SegmentDescriptor(type=0xF, dpl=0, l=1))  # conforming
    world.set_gate(0x30, selector=SPARE_SEL)
    d = deliver(world.mem, user_state(), interrupt(0x30))
    assert (d.stack, d.new_rsp, d.new_ss, d.new_cpl) == ("current", USER_RSP - 40, USER_DS, 3)
    assert d.new_cs == SPARE_SEL | 3


def test_a_user_code_target_from_cpl3_stays_at_cpl3(world: World) -> None:
    world.set_gate(0x80, selector=USER_CS, dpl=3)
    d = deliver(world.mem, user_state(), software(0x80))
    assert (d.stack, d.new_cpl, d.new_cs) == ("current", 3, USER_CS)


# -- alignment and frame ---------------------------------------------------------------

@pytest.mark.parametrize("rsp", [0x8000, 0x8001, 0x8008, 0x800F])
def test_the_new_rsp_is_aligned_down_to_16_before_the_pushes(world: World, rsp: int) -> None:
    world.set_gate(0x30)
    d = deliver(world.mem, make_state(rsp=rsp), interrupt(0x30))
    assert d.new_rsp == 0x8000 - 40
    assert d.frame.rsp == rsp  # the pushed RSP is the value before alignment


def test_an_ist_top_that_is_not_aligned_is_aligned_too(world: World) -> None:
    world.set_gate(Vector.NMI, ist=1)
    world.set_tss(ist1=0x31008)
    d = deliver(world.mem, make_state(), nmi())
    assert d.new_rsp == 0x31000 - 40


def test_a_frame_without_error_code_has_ss_rsp_rflags_cs_rip_from_the_top(world: World) -> None:
    world.set_gate(0x80, dpl=3)
    st = user_state(rsp=USER_RSP + 8, rflags=0x246)
    d = deliver(world.mem, st, software(0x80))
    assert d.new_rsp == RSP0 - 40
    rip, cs, rflags, rsp, ss = world.stack(d.new_rsp, 5)
    assert rip == INSN_RIP + 2, "RIP: after INT n"
    assert cs == USER_CS, "CS"
    assert rflags == 0x246, "RFLAGS"
    assert rsp == USER_RSP + 8, "RSP"
    assert ss == USER_DS, "SS"
    assert d.frame.slots() == [("rip", rip), ("cs", cs), ("rflags", rflags), ("rsp", rsp),
                               ("ss", ss)]


def test_a_frame_with_error_code_has_it_at_the_final_rsp(world: World) -> None:
    world.set_gate(Vector.GP)
    d = deliver(world.mem, make_state(rflags=0x2), exception(Vector.GP, 0x1238))
    assert d.new_rsp == KERNEL_RSP - 48
    error_code, rip, cs, rflags, rsp, ss = world.stack(d.new_rsp, 6)
    assert error_code == 0x1238, "error code"
    assert rip == INSN_RIP, "RIP: the faulting instruction"
    assert cs == KERNEL_CS, "CS"
    assert rflags == 0x2 | RFLAGS_RF, "RFLAGS (RF=1 for a fault)"
    assert rsp == KERNEL_RSP, "RSP"
    assert ss == KERNEL_DS, "SS"


def test_ss_and_rsp_are_pushed_even_without_a_privilege_change(world: World) -> None:
    world.set_gate(Vector.BP)
    d = deliver(world.mem, make_state(), software(Vector.BP, length=1))
    assert world.stack(d.new_rsp, 5)[3:] == [KERNEL_RSP, KERNEL_DS]


@pytest.mark.parametrize(("vector", "has_code"), [
    (Vector.DE, False), (Vector.DB, False), (Vector.BP, False), (Vector.UD, False),
    (Vector.DF, True), (Vector.TS, True), (Vector.NP, True), (Vector.SS, True),
    (Vector.GP, True), (Vector.PF, True), (Vector.AC, True), (Vector.VE, False),
    (Vector.CP, True), (Vector.MC, False),
])
def test_only_the_architectural_exceptions_push_an_error_code(
        world: World, vector: Vector, has_code: bool) -> None:
    world.set_gate(vector)
    d = deliver(world.mem, make_state(), exception(vector, 0 if has_code else None))
    assert (d.frame.error_code is not None) == has_code
    assert d.new_rsp == KERNEL_RSP - (48 if has_code else 40)


@pytest.mark.parametrize("vector", [Vector.DF, Vector.PF, Vector.GP, Vector.TS, 0x80])
def test_int_n_never_pushes_an_error_code_even_on_an_error_code_vector(
        world: World, vector: int) -> None:
    world.set_gate(vector, dpl=3)
    d = deliver(world.mem, make_state(), software(vector))
    assert d.frame.error_code is None
    assert d.new_rsp == KERNEL_RSP - 40


@pytest.mark.parametrize("make_event", [nmi, lambda: interrupt(Vector.GP)],
                         ids=["nmi", "interrupt-on-13"])
def test_nmi_and_external_interrupts_never_push_an_error_code(
        world: World, make_event: object) -> None:
    ev = make_event()  # type: ignore[operator]
    assert isinstance(ev, Event)
    world.set_gate(ev.vector)
    assert deliver(world.mem, make_state(), ev).frame.error_code is None


def test_the_frame_is_pushed_slot_by_slot_from_ss_down_as_supervisor_stack_writes(
        world: World) -> None:
    world.set_gate(Vector.PF)
    world.mem.log.clear()
    d = deliver(world.mem, user_state(), exception(Vector.PF, 4, cr2=0x1000))
    writes = world.mem.writes()
    assert [w.linear for w in writes] == [RSP0 - 8 * i for i in range(1, 7)]
    assert all(w.size == 8 and w.stack and not w.user for w in writes)
    assert d.new_rsp == writes[-1].linear


def test_every_implicit_read_during_delivery_from_cpl3_is_a_supervisor_access(
        world: World) -> None:
    world.set_gate(0x80, dpl=3)
    world.mem.log.clear()
    deliver(world.mem, user_state(), software(0x80))
    reads = [a for a in world.mem.log if a.kind == "read"]
    assert {a.linear for a in reads} == {0x2800, 0x1008, 0x1104}  # IDT[0x80], GDT[1], RSP0
    assert not any(a.user for a in world.mem.log)


def test_a_frame_push_into_a_not_present_page_raises_pf_write_supervisor_with_cr2(
        world: World) -> None:
    world.set_gate(0x80, dpl=3)
    world.mem.not_present.add(RSP0 - 0x1000)
    with pytest.raises(ArchFault) as info:
        deliver(world.mem, user_state(), software(0x80))
    f = info.value
    assert (f.vector, f.error_code, f.cr2) == (Vector.PF, PFErr.W, RSP0 - 8)


def test_a_frame_that_straddles_into_a_not_present_page_faults_on_the_first_slot_below(
        world: World) -> None:
    world.set_gate(0x30)
    world.mem.not_present.add(0x7000)
    with pytest.raises(ArchFault) as info:
        deliver(world.mem, make_state(rsp=0x8010), interrupt(0x30))
    assert (info.value.vector, info.value.cr2) == (Vector.PF, 0x7FF8)
    assert world.mem.u64(0x8008) == KERNEL_DS and world.mem.u64(0x8000) == 0x8010


# -- RFLAGS ----------------------------------------------------------------------------

def test_an_interrupt_gate_clears_if(world: World) -> None:
    world.set_gate(0x30, type=GATE_TYPE_INTERRUPT)
    d = deliver(world.mem, make_state(rflags=0x202), interrupt(0x30))
    assert not d.new_rflags & RFLAGS_IF
    assert d.frame.rflags & RFLAGS_IF


def test_a_trap_gate_leaves_if_alone(world: World) -> None:
    world.set_gate(0x30, type=GATE_TYPE_TRAP)
    assert deliver(world.mem, make_state(rflags=0x202), interrupt(0x30)).new_rflags & RFLAGS_IF
    d = deliver(world.mem, make_state(rflags=0x2), interrupt(0x30))
    assert not d.new_rflags & RFLAGS_IF


@pytest.mark.parametrize("gate_type", [GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP])
def test_tf_nt_and_rf_are_cleared_on_entry_but_pushed_as_they_were(
        world: World, gate_type: int) -> None:
    world.set_gate(0x30, type=gate_type)
    before = 0x2 | RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_DF | RFLAGS_AC | 0x3000 | 0x8C5
    d = deliver(world.mem, make_state(rflags=before), interrupt(0x30))
    assert d.new_rflags == before & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF)
    assert d.frame.rflags == before


@pytest.mark.parametrize("vector", [Vector.DE, Vector.UD, Vector.NM, Vector.TS, Vector.NP,
                                    Vector.SS, Vector.GP, Vector.PF, Vector.AC, Vector.VE,
                                    Vector.BR, Vector.XM, Vector.CP])
def test_fault_class_exceptions_push_rf_set(world: World, vector: Vector) -> None:
    world.set_gate(vector)
    d = deliver(world.mem, make_state(rflags=0x202), exception(vector, 0))
    assert d.frame.rflags == 0x202 | RFLAGS_RF
    assert not d.new_rflags & RFLAGS_RF


@pytest.mark.parametrize(("name", "event"), [
    ("#DB fault (code breakpoint)", exception(Vector.DB)),
    ("#DB trap (single step)", Event(Vector.DB, Source.EXCEPTION, INSN_RIP + 3, INSN_RIP + 3,
                                     trap_like=True)),
    ("INT1", icebp()),
    ("INT3", software(Vector.BP, length=1)),
    ("INT n on a fault vector", software(Vector.GP)),
    ("#BP exception (trap)", exception(Vector.BP)),
    ("#OF exception (trap)", exception(Vector.OF)),
    ("NMI", nmi()),
    ("external interrupt on a fault vector", interrupt(Vector.PF)),
])
def test_traps_interrupts_and_every_db_push_rf_unchanged(
        world: World, name: str, event: Event) -> None:
    world.set_gate(event.vector, dpl=3)
    d = deliver(world.mem, make_state(rflags=0x202), event)
    assert d.frame.rflags == 0x202, name


def test_the_handler_runs_at_the_gate_offset_with_cs_rpl_equal_to_the_new_cpl(
        world: World) -> None:
    world.set_gate(0x80, dpl=3)
    d = deliver(world.mem, user_state(), software(0x80))
    assert (d.new_rip, d.new_cs, d.new_cpl) == (HANDLER, KERNEL_CS, 0)
