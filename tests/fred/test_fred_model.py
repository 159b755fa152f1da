"""The pure FRED model (`idt/fred.py`) on a scripted memory: event types, stack levels,
the frame words, nested exceptions, #DF and shutdown, the FMASK option, #DB event data."""

from __future__ import annotations

import struct

import pytest

from idt.fred import (
    EventType,
    FredEvent,
    FredMsrs,
    augmented_ss,
    debug_event_data,
    deliver,
    deliver_event,
    event_level,
    event_type,
    fred_event,
)
from idt.state import ArchFault, Event, Source
from tests.unit.fakes import FakeMemory, make_state, user_state

LINUX_STKLVLS = 0x0000_0020_0003_0024  # #DB 1, NMI 2, #DF 3, #MC 2
RSPS = (0x80000, 0x81000, 0x82000, 0x83000)


def msrs(config: int = 0x40_0040, stklvls: int = LINUX_STKLVLS) -> FredMsrs:
    return FredMsrs(config=config, rsp=RSPS, stklvls=stklvls)


def words(mem: FakeMemory, at: int) -> tuple[int, ...]:
    return struct.unpack("<8Q", bytes(mem.data[at:at + 64]))


@pytest.mark.parametrize(("event", "expected"), [
    (Event.exception(14, 0x1000, 2, cr2=0x5000), EventType.HWEXC),
    (Event(2, Source.NMI, 0x1000, 0x1000), EventType.NMI),
    (Event(0x30, Source.INTERRUPT, 0x1000, 0x1000), EventType.EXTINT),
    (Event(1, Source.PRIV_SOFTWARE, 0x1001, 0x1000), EventType.PRIV_SWEXC),
    (Event(3, Source.SOFTWARE, 0x1001, 0x1000), EventType.SWEXC),  # CC
    (Event(3, Source.SOFTWARE, 0x1002, 0x1000), EventType.SWINT),  # CD 03
    (Event(0x80, Source.SOFTWARE, 0x1002, 0x1000), EventType.SWINT),
])
def test_each_kind_of_event_has_its_fred_event_type(event: Event, expected: EventType) -> None:
    assert event_type(event) is expected


def test_the_event_record_of_a_pf_carries_cr2_and_of_int_n_its_length() -> None:
    pf = fred_event(Event.exception(14, 0x1000, 2, cr2=0x5000))
    assert (pf.error_code, pf.event_data, pf.insn_len, pf.set_rf) == (2, 0x5000, 0, True)
    intn = fred_event(Event(0x80, Source.SOFTWARE, 0x1002, 0x1000))
    assert (intn.error_code, intn.event_data, intn.insn_len, intn.set_rf) == (0, 0, 2, False)


@pytest.mark.parametrize(("ev", "cpl", "level"), [
    (FredEvent(EventType.HWEXC, 14, 0, 0), 3, 0),  # ring 3: level 0
    (FredEvent(EventType.HWEXC, 14, 0, 0, nested=True), 3, 0),  # STKLVLS[14] = 0
    (FredEvent(EventType.HWEXC, 8, 0, 0), 3, 3),  # #DF from ring 3: the ring-0 rule
    (FredEvent(EventType.NMI, 2, 0, 0), 3, 0),
    (FredEvent(EventType.NMI, 2, 0, 0), 0, 2),
    (FredEvent(EventType.HWEXC, 1, 0, 0), 0, 1),
    (FredEvent(EventType.PRIV_SWEXC, 1, 0, 0), 0, 1),
    (FredEvent(EventType.SWINT, 1, 0, 0), 0, 0),  # INT n: always 0
    (FredEvent(EventType.OTHER, 1, 0, 0), 0, 0),  # SYSCALL
    (FredEvent(EventType.EXTINT, 0x30, 0, 0), 0, 0),  # CONFIG[10:9] = 0
    (FredEvent(EventType.EXTINT, 2, 0, 0), 0, 0),  # not STKLVLS[2]: the interrupt level
    (FredEvent(EventType.HWEXC, 40, 0, 0), 0, 0),  # beyond vector 31: level 0
])
def test_the_event_stack_level_follows_the_rules(ev: FredEvent, cpl: int, level: int) -> None:
    assert event_level(ev, msrs(), cpl) == level


def test_a_nested_exception_from_ring3_consults_stklvls() -> None:
    ev = FredEvent(EventType.HWEXC, 14, 0, 0, nested=True)
    assert event_level(ev, msrs(stklvls=LINUX_STKLVLS | 2 << 28), 3) == 2
    assert event_level(ev, msrs(config=0x40_0440), 0) == 0
    assert event_level(FredEvent(EventType.EXTINT, 0x30, 0, 0), msrs(config=0x40_0440), 0) == 2


def test_the_nested_bit_is_never_set_for_df_and_the_length_sits_in_bits_63_60() -> None:
    df = FredEvent(EventType.HWEXC, 8, 0, 0, nested=True)
    assert not augmented_ss(0x10, df, sti=False, long_mode=True) & (1 << 58)
    sysc = FredEvent(EventType.OTHER, 1, 0, 0, insn_len=2)
    assert augmented_ss(0x2B, sysc, sti=True, long_mode=True) == 0x2207_0001_0003_002B


def test_a_same_level_delivery_writes_all_eight_words_below_the_red_zone() -> None:
    mem = FakeMemory(1 << 20)
    st = make_state(rsp=0x9008, cs=0x10, ss=0x18, rflags=0x202)
    ev = fred_event(Event.exception(6, 0x1000))
    d = deliver(mem, st, ev, msrs(config=0x40_00C0))
    assert (d.switched, d.new_csl, d.new_rip, d.new_rflags) == (False, 0, 0x400100, 0x2)
    assert d.new_rsp == ((0x9008 - 0xC0) & ~0x3F) - 64 == 0x8F00
    assert words(mem, 0x8F00) == (0, 0x1000, 0x10, 0x10202, 0x9008, 0x0203_0006_0000_0018, 0, 0)


def test_a_user_event_switches_to_rsp0_and_enters_at_the_page() -> None:
    mem = FakeMemory(1 << 20)
    st = user_state(rsp=0x7_0123, cs=0x33, ss=0x2B, rflags=0x246)
    d = deliver(mem, st, fred_event(Event(0x80, Source.SOFTWARE, 0x60002, 0x60000)), msrs())
    assert (d.switched, d.from_user, d.new_rip, d.new_rsp, d.stack) == (
        True, True, 0x400000, RSPS[0] - 64, "rsp0")
    assert words(mem, RSPS[0] - 64) == (0, 0x60002, 0x33, 0x246, 0x7_0123,
                                        0x2204_0080_0002_002B, 0, 0)


def test_the_cs_slot_records_the_old_stack_level() -> None:
    mem = FakeMemory(1 << 20)
    st = make_state(rsp=0x81F00, cs=0x10, ss=0x18)
    d = deliver(mem, st, fred_event(Event(1, Source.PRIV_SOFTWARE, 0x1001, 0x1000)),
                msrs(config=0x40_0042))  # CSL 2
    assert (d.old_csl, d.new_csl, d.switched, d.frame.cs) == (2, 2, False, 0x2_0010)


def test_the_fmask_option_masks_the_old_rflags_instead_of_loading_2() -> None:
    mem = FakeMemory(1 << 20)
    st = make_state(rsp=0x9000, rflags=0x40346)  # AC, IF, TF, PF, ZF...
    d = deliver(mem, st, fred_event(Event.exception(6, 0x1000)), msrs(), fmask=0x47700)
    assert d.new_rflags == 0x46


def test_a_noncanonical_same_level_stack_is_ss0() -> None:
    mem = FakeMemory(1 << 20)
    st = make_state(rsp=0x0000_8000_0000_1040)  # the frame lies above the lower half
    with pytest.raises(ArchFault) as info:
        deliver(mem, st, fred_event(Event.exception(6, 0x1000)), msrs())
    assert (info.value.vector, info.value.error_code) == (12, 0)


def test_a_pf_on_the_push_of_an_nmi_becomes_a_nested_pf_with_the_ring0_level() -> None:
    mem = FakeMemory(1 << 20, not_present={0x81000})  # the top page of RSP2's stack
    st = make_state(rsp=0x9000)
    out = deliver_event(mem, st, fred_event(Event(2, Source.NMI, 0x1000, 0x1000)),
                        msrs(stklvls=LINUX_STKLVLS | 2 << 28))  # #PF -> level 2 as well
    # The NMI's push at 0x81FF8 faults; the nested #PF (level 2) faults the same way: the
    # NMI is a benign first event, so #PF on #PF after it is #DF (level 3, RSP3).
    assert [(n.during.name, n.fault.vector, n.action) for n in out.nested] == [
        ("NMI", 14, "serial"), ("#PF", 14, "double-fault")]
    assert out.delivery is not None and out.delivery.event.vector == 8
    assert (out.delivery.stack, st.cr2, st.nmi_blocked) == ("rsp3", 0x81FF8, True)


def test_a_fault_while_delivering_df_shuts_down() -> None:
    mem = FakeMemory(1 << 20, not_present={0x8000, 0x82000})
    st = make_state(rsp=0x9000)
    out = deliver_event(mem, st, fred_event(Event.exception(13, 0x1000, 0)), msrs())
    assert out.delivery is None and out.shutdown_reason is not None
    assert [n.action for n in out.nested] == ["serial", "double-fault", "shutdown"]


@pytest.mark.parametrize(("dr6", "data"), [
    (0xFFFF0FF0, 0), (0xFFFF4FF0, 0x4000), (0xFFFF0FF1, 0x1), (0xFFFF2FF0, 0x2000),
    (0xFFFE0FF0, 0x10000),  # RTM is active-low in DR6
    (0xFFFF07F0, 0x800),  # BLD is active-low in DR6
])
def test_db_event_data_is_dr6_with_positive_polarity(dr6: int, data: int) -> None:
    assert debug_event_data(dr6) == data


def nested_int_n_from_ring3(*, any_event: bool) -> tuple[list[str], object]:
    """INT 0x80 from ring 3 whose push to RSP0 faults; #PF has stack level 2."""
    mem = FakeMemory(1 << 20, not_present={RSPS[0] - 0x1000})
    st = user_state(rsp=0x7_0123)
    out = deliver_event(mem, st, fred_event(Event(0x80, Source.SOFTWARE, 0x60002, 0x60000)),
                        msrs(stklvls=LINUX_STKLVLS | 2 << 28), nested_after_any_event=any_event)
    return [n.action for n in out.nested], out.delivery


def test_a_fault_while_delivering_int_n_is_nested_by_default() -> None:
    actions, d = nested_int_n_from_ring3(any_event=True)
    assert actions == ["serial"]
    assert d is not None and (d.event.vector, d.event.nested, d.stack) == (14, True, "rsp2")  # type: ignore[attr-defined]
    assert d.frame.ss & (1 << 58)  # type: ignore[attr-defined]


def test_in_the_bochs_reading_it_is_not_nested_and_faults_again_into_df() -> None:
    actions, d = nested_int_n_from_ring3(any_event=False)
    # Not nested: from ring 3 the #PF takes level 0, RSP0 again, and faults again.
    assert actions == ["serial", "double-fault"]
    assert d is not None and (d.event.vector, d.stack) == (8, "rsp3")  # type: ignore[attr-defined]
