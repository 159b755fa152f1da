"""The pure VMX event model (idt/vmx_events.py): information-field layouts, the
exception bitmap, and the host's Table 6-5 reflection, on literal values from SDM Vol. 3C
("Format of the VM-Exit Interruption-Information Field", "Format of the IDT-Vectoring
Information Field", "Exception Bitmap") and Vol. 3A Table 6-5."""

from __future__ import annotations

import pytest

from idt.state import Event, Source
from idt.vmx_events import (
    INVALID,
    EventInfo,
    EventType,
    ExceptionBitmap,
    event_type,
    info_of,
    reflect,
)


@pytest.mark.parametrize(("raw", "vector", "type_", "ec"), [
    (0x80000B0E, 14, 3, True), (0x80000202, 2, 2, False), (0x80000603, 3, 6, False),
    (0x80000421, 0x21, 4, False), (0x80000030, 0x30, 0, False), (0x80000501, 1, 5, False),
    (0x80000314, 20, 3, False), (0x80000B08, 8, 3, True),
])
def test_an_information_word_decodes_to_its_fields_and_encodes_back(
        raw: int, vector: int, type_: int, ec: bool) -> None:
    info = EventInfo.decode(raw)
    assert (info.vector, info.type, info.error_code_valid, info.valid) == (vector, type_, ec, True)
    assert info.raw == raw


def test_bit_12_round_trips_and_is_named_in_the_text() -> None:
    info = EventInfo.decode(0x80001B0E)
    assert info.nmi_unblocking and info.raw == 0x80001B0E
    assert "NMI unblocked by IRET" in info.text()
    assert INVALID.raw == 0 and INVALID.text() == "invalid"


@pytest.mark.parametrize(("ev", "type_"), [
    (Event(3, Source.SOFTWARE, 0x101, 0x100), EventType.SOFTWARE_EXCEPTION),      # CC
    (Event(3, Source.SOFTWARE, 0x102, 0x100), EventType.SOFTWARE_INTERRUPT),      # CD 03
    (Event(4, Source.SOFTWARE, 0x101, 0x100), EventType.SOFTWARE_EXCEPTION),      # INTO
    (Event(0x80, Source.SOFTWARE, 0x102, 0x100), EventType.SOFTWARE_INTERRUPT),
    (Event(1, Source.PRIV_SOFTWARE, 0x101, 0x100), EventType.PRIVILEGED_SOFTWARE_EXCEPTION),
    (Event(2, Source.NMI, 0x100, 0x100), EventType.NMI),
    (Event(0x30, Source.INTERRUPT, 0x100, 0x100), EventType.EXTERNAL_INTERRUPT),
    (Event.exception(6, 0x100), EventType.HARDWARE_EXCEPTION),                   # UD2
])
def test_each_event_source_has_its_interruption_type(ev: Event, type_: EventType) -> None:
    assert event_type(ev) is type_


def test_info_of_sets_error_code_valid_only_for_an_event_that_pushes_one() -> None:
    assert info_of(Event.exception(13, 0x100, 0)).raw == 0x80000B0D
    assert info_of(Event.exception(6, 0x100)).raw == 0x80000306


def test_int_n_is_never_subject_to_the_bitmap_but_int3_and_int1_are() -> None:
    eb = ExceptionBitmap(0xFFFFFFFF)
    assert not eb.event_exits(Event(14, Source.SOFTWARE, 0x102, 0x100))
    assert eb.event_exits(Event(3, Source.SOFTWARE, 0x101, 0x100))
    assert eb.event_exits(Event(1, Source.PRIV_SOFTWARE, 0x101, 0x100))
    assert not eb.event_exits(Event(2, Source.NMI, 0x100, 0x100))


def test_the_pfec_filter_compares_only_bits_15_0() -> None:
    eb = ExceptionBitmap(1 << 14, pfec_mask=0xFFFF, pfec_match=0x2)
    assert eb.exits(14, 0x2) and eb.exits(14, 0x10002)


GP, PF, DF, SS, NMI_INFO = (EventInfo(13, 3, True), EventInfo(14, 3, True),
                            EventInfo(8, 3, True), EventInfo(12, 3, True), EventInfo(2, 2))


@pytest.mark.parametrize(("first", "second", "injects", "ec"), [
    (GP, PF, 0x80000B0E, 0x2),       # contributory then #PF: serial
    (GP, GP, 0x80000B08, 0),         # contributory, contributory: #DF
    (SS, GP, 0x80000B08, 0),
    (PF, PF, 0x80000B08, 0),         # #PF, #PF: #DF
    (PF, GP, 0x80000B08, 0),         # #PF, contributory: #DF
    (NMI_INFO, PF, 0x80000B0E, 0x2),  # benign first: serial
    (INVALID, GP, 0x80000B0D, 0x2),   # no vectoring event: as is
    (EventInfo(1, 3), GP, 0x80000B0D, 0x2),  # #DB is benign
])
def test_reflection_follows_table_6_5_one_level_up(first: EventInfo, second: EventInfo,
                                                   injects: int, ec: int) -> None:
    r = reflect(first, second, 0x2)
    assert r.inject is not None and (r.inject.raw, r.error_code) == (injects, ec)


def test_reflecting_anything_that_interrupted_df_is_a_triple_fault() -> None:
    r = reflect(DF, PF, 0x2)
    assert r.shutdown and r.inject is None


def test_reflection_never_copies_bit_12() -> None:
    r = reflect(INVALID, EventInfo.decode(0x80001B0E), 0)
    assert r.inject is not None and r.inject.raw == 0x80000B0E
