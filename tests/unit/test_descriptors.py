"""idt.descriptors: the declared layouts round-trip, sit where the SDM figures put them, and
refuse values wider than their fields."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idt.descriptors import (
    GATE_SIZE,
    TSS_IOMAP_BASE_OFFSET,
    TSS_IST_OFFSET,
    TSS_RSP_OFFSET,
    TSS_SIZE,
    GateDescriptor,
    SegmentDescriptor,
    kernel_code64,
    kernel_data,
    tss64_descriptor,
    user_code64,
    user_data,
)

# -- the IDT gate ----------------------------------------------------------------------

gates = st.builds(
    GateDescriptor,
    offset=st.integers(0, 2**64 - 1),
    selector=st.integers(0, 0xFFFF),
    ist=st.integers(0, 7),
    type=st.integers(0, 15),
    dpl=st.integers(0, 3),
    present=st.booleans(),
    s=st.integers(0, 1),
    reserved_ist=st.integers(0, 31),
    reserved_high=st.integers(0, 2**32 - 1),
)


@given(gates)
def test_a_gate_survives_pack_then_unpack(gate: GateDescriptor) -> None:
    raw = gate.pack()
    assert len(raw) == GATE_SIZE
    assert GateDescriptor.unpack(raw) == gate


@given(st.binary(min_size=16, max_size=16))
def test_any_16_bytes_unpack_to_a_gate_that_packs_back_to_the_same_bytes(raw: bytes) -> None:
    assert GateDescriptor.unpack(raw).pack() == raw


def test_a_gate_lays_its_fields_out_as_the_sdm_figure() -> None:
    raw = GateDescriptor(offset=0x1122_3344_5566_7788, selector=0x0008, ist=5, type=0xE,
                         dpl=0, present=True).pack()
    assert raw[0:2] == b"\x88\x77", "offset 15:0"
    assert raw[2:4] == b"\x08\x00", "selector"
    assert raw[4] == 5, "IST in bits 34:32"
    assert raw[5] == 0x8E, "P=1 DPL=0 interrupt gate"
    assert raw[6:8] == b"\x66\x55", "offset 31:16"
    assert raw[8:12] == b"\x44\x33\x22\x11", "offset 63:32"
    assert raw[12:16] == bytes(4), "reserved"


@pytest.mark.parametrize(("fields", "byte5"), [
    (dict(type=0xE, dpl=0), 0x8E), (dict(type=0xF, dpl=0), 0x8F), (dict(type=0xE, dpl=3), 0xEE),
    (dict(type=0xE, dpl=0, present=False), 0x0E),
])
def test_the_typical_type_byte_values(fields: dict[str, int], byte5: int) -> None:
    assert GateDescriptor(offset=0, selector=8, **fields).pack()[5] == byte5  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), [
    ("offset", 2**64), ("offset", -1), ("selector", 0x10000), ("ist", 8), ("type", 16),
    ("dpl", 4), ("s", 2), ("reserved_ist", 32), ("reserved_high", 2**32),
])
def test_a_gate_refuses_a_field_wider_than_its_bits(field: str, value: int) -> None:
    gate = GateDescriptor(**{"offset": 0, "selector": 8, field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        gate.pack()


# -- segment descriptors ---------------------------------------------------------------

segments = st.builds(
    SegmentDescriptor,
    base=st.integers(0, 2**32 - 1),
    limit=st.integers(0, 2**20 - 1),
    type=st.integers(0, 15),
    s=st.integers(0, 1),
    dpl=st.integers(0, 3),
    present=st.booleans(),
    avl=st.integers(0, 1),
    l=st.integers(0, 1),
    db=st.integers(0, 1),
    g=st.integers(0, 1),
)


@given(segments)
def test_a_segment_descriptor_survives_pack_then_unpack(desc: SegmentDescriptor) -> None:
    assert SegmentDescriptor.unpack(desc.pack()) == desc


@given(st.binary(min_size=8, max_size=8))
def test_any_8_bytes_unpack_to_a_descriptor_that_packs_back_to_the_same_bytes(raw: bytes) -> None:
    assert SegmentDescriptor.unpack(raw).pack() == raw


@pytest.mark.parametrize(("desc", "raw"), [
    (kernel_code64(), 0x00AF9B000000FFFF),
    (kernel_data(), 0x00CF93000000FFFF),
    (user_code64(), 0x00AFFB000000FFFF),
    (user_data(), 0x00CFF3000000FFFF),
])
def test_the_flat_segments_have_the_values_every_64_bit_kernel_uses(
        desc: SegmentDescriptor, raw: int) -> None:
    assert desc.raw == raw
    assert desc.pack() == struct.pack("<Q", raw)


def test_segment_predicates_follow_the_type_bits() -> None:
    assert kernel_code64().is_64bit_code and not kernel_code64().conforming
    assert SegmentDescriptor(type=0xF, l=1).conforming
    assert not SegmentDescriptor(type=0xB, l=1, db=1).is_64bit_code
    assert kernel_data().writable and not SegmentDescriptor(type=0x1).writable
    assert not SegmentDescriptor(type=0xB, s=0).is_code


@pytest.mark.parametrize(("field", "value"), [
    ("base", 2**32), ("limit", 2**20), ("type", 16), ("dpl", 4), ("s", 2), ("avl", 2),
    ("l", 2), ("db", 2), ("g", 2), ("base", -1),
])
def test_a_segment_descriptor_refuses_a_field_wider_than_its_bits(field: str, value: int) -> None:
    desc = SegmentDescriptor(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        desc.pack()


# -- the 64-bit TSS --------------------------------------------------------------------

def test_the_tss_stack_slots_are_at_the_sdm_offsets() -> None:
    assert [TSS_RSP_OFFSET(n) for n in range(3)] == [0x04, 0x0C, 0x14]
    assert [TSS_IST_OFFSET(n) for n in range(1, 8)] == [0x24, 0x2C, 0x34, 0x3C, 0x44, 0x4C,
                                                         0x54]
    assert (TSS_IOMAP_BASE_OFFSET, TSS_SIZE) == (0x66, 0x68)


@pytest.mark.parametrize("n", [-1, 3])
def test_there_is_no_rsp3(n: int) -> None:
    with pytest.raises(ValueError):
        TSS_RSP_OFFSET(n)


@pytest.mark.parametrize("n", [0, 8])
def test_ist_slots_are_numbered_1_to_7(n: int) -> None:
    with pytest.raises(ValueError):
        TSS_IST_OFFSET(n)


def test_a_tss_descriptor_is_16_bytes_with_the_base_split_across_both_halves() -> None:
    raw = tss64_descriptor(0xFFFF_8880_1234_5678)
    assert len(raw) == 16
    low = SegmentDescriptor.unpack(raw[:8])
    assert (low.base, low.limit, low.type, low.s, low.present) == (0x1234_5678, 0x67, 0xB, 0,
                                                                   True)
    assert struct.unpack("<II", raw[8:]) == (0xFFFF_8880, 0)
    assert SegmentDescriptor.unpack(tss64_descriptor(0x1000, busy=False)[:8]).type == 0x9
