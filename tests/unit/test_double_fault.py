"""idt.double_fault: the class matrix (SDM Vol. 3A Table 6-4/6-5) and
`deliver_event`, the driver that turns faults during delivery into serial delivery, #DF or
shutdown."""

from __future__ import annotations

import itertools

import pytest
from fakes import (
    INSN_RIP,
    IST,
    RSP0,
    World,
    exception,
    interrupt,
    make_state,
    nmi,
    software,
    user_state,
)

from idt.double_fault import Combine, combine, deliver_event
from idt.error_codes import PFErr
from idt.state import Event, Source
from idt.vectors import DFClass, Vector, df_class

# SDM Table 6-4, written out here rather than read from idt.vectors.
BENIGN = [1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19]
CONTRIBUTORY = [0, 10, 11, 12, 13, 21]
PAGE_FAULT = [14, 20]  # #PF and #VE
CLASS = {**{v: "B" for v in BENIGN}, **{v: "C" for v in CONTRIBUTORY},
         **{v: "P" for v in PAGE_FAULT}}
DOUBLE = {("C", "C"), ("P", "C"), ("P", "P")}  # Table 6-5's #DF cells
ALL = BENIGN + CONTRIBUTORY + PAGE_FAULT


# -- the matrix ------------------------------------------------------------------------

@pytest.mark.parametrize(("first", "second"), list(itertools.product(ALL, ALL)))
def test_the_double_fault_matrix_for_every_pair_of_exception_classes(
        first: int, second: int) -> None:
    expected = (Combine.DOUBLE_FAULT if (CLASS[first], CLASS[second]) in DOUBLE
                else Combine.SERIAL)
    assert combine(Event.exception(first, INSN_RIP), second) is expected


@pytest.mark.parametrize("vector", ALL)
def test_the_exception_classes_are_those_of_sdm_table_6_4(vector: int) -> None:
    expected = {"B": DFClass.BENIGN, "C": DFClass.CONTRIBUTORY, "P": DFClass.PAGE_FAULT}
    assert df_class(vector) is expected[CLASS[vector]]


def test_ve_is_in_the_page_fault_class_unlike_qemu_and_kvm() -> None:
    assert combine(Event.exception(Vector.VE, INSN_RIP), Vector.PF) is Combine.DOUBLE_FAULT
    assert combine(Event.exception(Vector.PF, INSN_RIP), Vector.VE) is Combine.DOUBLE_FAULT
    assert combine(Event.exception(Vector.VE, INSN_RIP), Vector.GP) is Combine.DOUBLE_FAULT


@pytest.mark.parametrize("second", [*ALL, 8])
def test_any_exception_while_delivering_a_double_fault_is_a_shutdown(second: int) -> None:
    assert combine(Event.exception(Vector.DF, INSN_RIP, 0), second) is Combine.SHUTDOWN


@pytest.mark.parametrize("source", [Source.SOFTWARE, Source.INTERRUPT, Source.NMI,
                                    Source.PRIV_SOFTWARE])
@pytest.mark.parametrize("second", [Vector.GP, Vector.NP, Vector.PF, Vector.TS, Vector.SS])
def test_int_n_interrupts_and_nmi_are_benign_first_events_even_on_fault_vectors(
        source: Source, second: int) -> None:
    for vector in (Vector.GP, Vector.PF, Vector.DF, 0x80):
        assert combine(Event(vector, source, INSN_RIP, INSN_RIP), second) is Combine.SERIAL


@pytest.mark.parametrize("vector", [0x20, 0x80, 0xFF])
def test_user_vectors_are_benign(vector: int) -> None:
    assert df_class(vector) is DFClass.BENIGN


# -- deliver_event: serial -------------------------------------------------------------

@pytest.fixture
def world() -> World:
    w = World()
    for v in (Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF):
        w.set_gate(v)
    return w


def test_a_fault_during_int_n_is_delivered_serially_with_the_int_as_its_rip(
        world: World) -> None:
    world.set_gate(0x80, dpl=3, present=False)
    out = deliver_event(world.mem, make_state(), software(0x80))
    assert out.delivery is not None
    assert out.double_fault_of is None
    assert [(n.during.vector, n.fault.vector, n.action) for n in out.nested] == [
        (0x80, Vector.NP, Combine.SERIAL)]
    d = out.delivery
    assert (d.event.vector, d.frame.error_code, d.frame.rip) == (Vector.NP, 0x402, INSN_RIP)
    assert d.event.source is Source.EXCEPTION


def test_a_benign_exception_whose_gate_is_missing_is_replaced_by_np(world: World) -> None:
    out = deliver_event(world.mem, make_state(), exception(Vector.UD))
    assert out.delivery is not None and out.double_fault_of is None
    assert (out.delivery.event.vector, out.delivery.frame.error_code) == (Vector.NP, 0x33)


def test_a_contributory_exception_then_a_page_fault_is_serial(world: World) -> None:
    world.set_gate(Vector.GP, ist=1)
    world.mem.not_present.add(IST[1] - 0x1000)
    st = make_state()
    out = deliver_event(world.mem, st, exception(Vector.GP, 0))
    assert out.delivery is not None and out.double_fault_of is None
    assert out.delivery.event.vector == Vector.PF
    assert out.delivery.frame.error_code == PFErr.W
    assert st.cr2 == IST[1] - 8


def test_a_page_fault_during_an_external_interrupt_is_serial_and_loads_cr2(world: World) -> None:
    world.set_gate(0x30, ist=2)
    world.mem.not_present.add(IST[2] - 0x1000)
    st = make_state()
    out = deliver_event(world.mem, st, interrupt(0x30))
    assert out.delivery is not None
    assert out.delivery.event.vector == Vector.PF
    assert out.delivery.frame.rip == INSN_RIP
    assert st.cr2 == IST[2] - 8


# -- deliver_event: #DF ----------------------------------------------------------------

def test_a_contributory_fault_while_delivering_gp_becomes_a_double_fault(world: World) -> None:
    world.set_gate(Vector.GP, present=False)
    out = deliver_event(world.mem, make_state(), exception(Vector.GP, 0))
    assert out.double_fault_of == (Vector.GP, Vector.NP)
    d = out.delivery
    assert d is not None
    assert d.event.vector == Vector.DF
    assert d.frame.error_code == 0  # EXT is not applied to #DF
    assert d.frame.rip == INSN_RIP
    assert [n.action for n in out.nested] == [Combine.DOUBLE_FAULT]


def test_a_page_fault_while_delivering_a_page_fault_becomes_a_double_fault(world: World) -> None:
    world.set_gate(Vector.PF, ist=3)
    world.set_gate(Vector.DF, ist=1)
    world.mem.not_present.add(IST[3] - 0x1000)
    st = make_state()
    out = deliver_event(world.mem, st, exception(Vector.PF, PFErr.U, cr2=0x5000))
    assert out.double_fault_of == (Vector.PF, Vector.PF)
    assert out.delivery is not None and out.delivery.stack == "ist1"
    assert st.cr2 == IST[3] - 8, "CR2 is loaded by the second #PF even though it became #DF"


def test_a_contributory_fault_while_delivering_a_page_fault_becomes_a_double_fault(
        world: World) -> None:
    world.set_gate(Vector.PF, ist=1)
    world.set_tss(ist1=0x8000_0000_0000_0000)  # -> #SS
    out = deliver_event(world.mem, make_state(), exception(Vector.PF, 0, cr2=0x5000))
    assert out.double_fault_of == (Vector.PF, Vector.SS)


def test_a_serially_delivered_fault_can_itself_double_fault(world: World) -> None:
    """INT n → #NP (serial: INT n is benign) → #NP's gate is missing too → #DF."""
    world.set_gate(0x80, dpl=3, present=False)
    world.set_gate(Vector.NP, present=False)
    out = deliver_event(world.mem, make_state(), software(0x80))
    assert [(n.during.vector, n.fault.vector, n.action) for n in out.nested] == [
        (0x80, Vector.NP, Combine.SERIAL), (Vector.NP, Vector.NP, Combine.DOUBLE_FAULT)]
    assert out.double_fault_of == (Vector.NP, Vector.NP)
    assert out.delivery is not None and out.delivery.event.vector == Vector.DF


# -- deliver_event: shutdown -----------------------------------------------------------

def test_a_fault_while_delivering_the_double_fault_shuts_the_processor_down(world: World) -> None:
    world.set_gate(Vector.GP, present=False)
    world.set_gate(Vector.DF, present=False)
    out = deliver_event(world.mem, make_state(), exception(Vector.GP, 0))
    assert out.delivery is None
    assert out.shutdown_reason is not None and "#DF" in out.shutdown_reason
    assert [(n.during.vector, n.fault.vector, n.action) for n in out.nested] == [
        (Vector.GP, Vector.NP, Combine.DOUBLE_FAULT), (Vector.DF, Vector.NP, Combine.SHUTDOWN)]


def test_a_page_fault_pushing_the_double_fault_frame_shuts_down_and_loads_cr2(
        world: World) -> None:
    world.set_gate(Vector.GP, present=False)
    world.set_gate(Vector.DF, ist=7)
    world.mem.not_present.add(IST[7] - 0x1000)
    st = make_state()
    out = deliver_event(world.mem, st, exception(Vector.GP, 0))
    assert out.delivery is None and out.shutdown_reason
    assert st.cr2 == IST[7] - 8


# -- deliver_event: NMI blocking and CR2 -----------------------------------------------

def test_delivering_an_nmi_blocks_further_nmis(world: World) -> None:
    world.set_gate(Vector.NMI)
    st = make_state()
    out = deliver_event(world.mem, st, nmi())
    assert out.delivery is not None and out.delivery.event.vector == Vector.NMI
    assert st.nmi_blocked


def test_an_nmi_whose_delivery_faults_still_blocks_nmis(world: World) -> None:
    st = make_state()
    out = deliver_event(world.mem, st, nmi())  # NMI gate not present
    assert out.delivery is not None
    assert (out.delivery.event.vector, out.delivery.frame.error_code) == (Vector.NP, 0x13)
    assert st.nmi_blocked


def test_an_nmi_that_ends_in_shutdown_still_blocks_nmis(world: World) -> None:
    world.set_gate(Vector.NP, present=False)
    world.set_gate(Vector.DF, present=False)
    st = make_state()
    out = deliver_event(world.mem, st, nmi())
    assert out.delivery is None and out.shutdown_reason
    assert st.nmi_blocked


def test_int_2_and_an_external_interrupt_on_vector_2_do_not_block_nmis(world: World) -> None:
    world.set_gate(Vector.NMI, dpl=3)
    for ev in (software(Vector.NMI), interrupt(Vector.NMI)):
        st = make_state()
        deliver_event(world.mem, st, ev)
        assert not st.nmi_blocked, ev.source


def test_delivering_a_page_fault_event_loads_cr2_with_its_address(world: World) -> None:
    st = make_state(cr2=0x1111)
    deliver_event(world.mem, st, exception(Vector.PF, PFErr.W, cr2=0xDEAD_B000))
    assert st.cr2 == 0xDEAD_B000


def test_delivering_anything_else_leaves_cr2_alone(world: World) -> None:
    world.set_gate(0x80, dpl=3)
    st = make_state(cr2=0x1111)
    deliver_event(world.mem, st, software(0x80))
    deliver_event(world.mem, st, exception(Vector.GP, 0))
    assert st.cr2 == 0x1111


def test_deliver_event_changes_no_register_of_the_state_it_is_given(world: World) -> None:
    world.set_gate(0x80, dpl=3)
    st = user_state()
    before = (st.rip, st.rsp, st.rflags, st.cs, st.ss, st.cpl)
    out = deliver_event(world.mem, st, software(0x80))
    assert (st.rip, st.rsp, st.rflags, st.cs, st.ss, st.cpl) == before
    assert out.delivery is not None and out.delivery.new_rsp == RSP0 - 40
