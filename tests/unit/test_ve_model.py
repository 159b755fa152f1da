"""idt/ve.py on its own: the VE-information area layout, the EPT-violation exit
qualification bits, and the #VE-or-VM-exit decision for every combination of its inputs
(SDM Vol. 3C "Virtualization Exceptions", "Exit Qualification for EPT Violations",
"EPT Violations")."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idt.ve import (
    EXIT_REASON_EPT_VIOLATION,
    VE_BUSY,
    VE_INFO_BUSY,
    VE_INFO_EPTP_INDEX,
    VE_INFO_EXIT_REASON,
    VE_INFO_GLA,
    VE_INFO_GPA,
    VE_INFO_QUALIFICATION,
    VE_INFO_SIZE,
    VE_VECTOR,
    EptQual,
    VeInfo,
    convert_to_ve,
    decode_qualification,
    ept_qualification,
)
from idt.vectors import Vector

# -- the VE-information area -----------------------------------------------------------


def test_the_area_offsets_are_those_of_struct_vmx_ve_information() -> None:
    assert (VE_INFO_EXIT_REASON, VE_INFO_BUSY, VE_INFO_QUALIFICATION, VE_INFO_GLA, VE_INFO_GPA,
            VE_INFO_EPTP_INDEX, VE_INFO_SIZE) == (0, 4, 8, 0x10, 0x18, 0x20, 0x28)
    assert EXIT_REASON_EPT_VIOLATION == 48 and VE_BUSY == 0xFFFFFFFF
    assert VE_VECTOR == int(Vector.VE) == 20


def test_a_sample_area_packs_to_exactly_these_bytes() -> None:
    info = VeInfo(exit_reason=48, busy=VE_BUSY, qualification=0x18A, guest_linear=0xFFFF888000123456,
                  guest_physical=0x123456, eptp_index=0x0203)
    raw = info.pack()
    assert raw == bytes.fromhex(
        "30000000" "ffffffff"            # exit reason 48, busy
        "8a01000000000000"                # qualification
        "56341200" "8088ffff"             # guest-linear address
        "5634120000000000"                # guest-physical address
        "0302" "000000000000")            # EPTP index, then tail padding
    assert len(raw) == VE_INFO_SIZE


def test_the_defaults_are_what_the_cpu_writes_on_a_conversion() -> None:
    info = VeInfo()
    assert info.exit_reason == EXIT_REASON_EPT_VIOLATION and info.busy == VE_BUSY
    assert struct.unpack_from("<I", info.pack(), VE_INFO_BUSY)[0] == VE_BUSY


@given(st.builds(VeInfo, exit_reason=st.integers(0, 2**32 - 1), busy=st.integers(0, 2**32 - 1),
                 qualification=st.integers(0, 2**64 - 1), guest_linear=st.integers(0, 2**64 - 1),
                 guest_physical=st.integers(0, 2**64 - 1), eptp_index=st.integers(0, 2**16 - 1)))
def test_pack_and_unpack_round_trip(info: VeInfo) -> None:
    assert VeInfo.unpack(info.pack()) == info


def test_unpack_needs_only_the_architectural_0x22_bytes_and_ignores_the_rest() -> None:
    info = VeInfo(qualification=5, guest_physical=0x1000, eptp_index=7)
    assert VeInfo.unpack(info.pack()[:0x22]) == info
    assert VeInfo.unpack(info.pack()[:0x22] + b"\xff" * 6) == info
    with pytest.raises(ValueError, match="0x22"):
        VeInfo.unpack(info.pack()[:0x21])


@pytest.mark.parametrize(("field", "value"), [
    ("exit_reason", 1 << 32), ("busy", 1 << 32), ("qualification", 1 << 64),
    ("guest_linear", -1), ("guest_physical", 1 << 64), ("eptp_index", 1 << 16)])
def test_pack_refuses_a_value_wider_than_its_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        VeInfo(**{field: value}).pack()


# -- the exit qualification ------------------------------------------------------------

NONE = dict(read=False, write=False, fetch=False, readable=False, writable=False, executable=False,
            gla_valid=False, final_translation=False, nmi_unblocked_by_iret=False)


@pytest.mark.parametrize(("name", "bit"), [
    ("read", 0), ("write", 1), ("fetch", 2), ("readable", 3), ("writable", 4), ("executable", 5),
    ("gla_valid", 7), ("nmi_unblocked_by_iret", 12)])
def test_each_flag_sets_its_sdm_bit_alone(name: str, bit: int) -> None:
    assert ept_qualification(**{**NONE, name: True}) == 1 << bit


def test_bit_8_needs_bit_7_final_translation_vs_paging_structure_access() -> None:
    final = ept_qualification(**{**NONE, "gla_valid": True, "final_translation": True})
    walk = ept_qualification(**{**NONE, "gla_valid": True, "final_translation": False})
    assert final == (1 << 7) | (1 << 8) and walk == 1 << 7
    assert ept_qualification(**{**NONE, "final_translation": True}) == 0  # reserved without bit 7


@pytest.mark.parametrize(("access", "rights", "expected"), [
    # a write to a read-only, executable page, through the final translation
    ("write", "rx", 0b1_1010_1010),
    # a read from a not-present page: no rights at all
    ("read", "", 0b1_1000_0001),
    # a fetch from a read/write page
    ("fetch", "rw", 0b1_1001_1100),
])
def test_qualification_for_read_write_fetch_with_rights(access: str, rights: str, expected: int) -> None:
    qual = ept_qualification(read=access == "read", write=access == "write", fetch=access == "fetch",
                             readable="r" in rights, writable="w" in rights, executable="x" in rights,
                             gla_valid=True, final_translation=True, nmi_unblocked_by_iret=False)
    assert qual == expected


def test_an_iret_violation_with_nmis_blocked_before_it_sets_bit_12() -> None:
    qual = ept_qualification(read=True, write=False, fetch=False, readable=False, writable=False,
                             executable=False, gla_valid=True, final_translation=True,
                             nmi_unblocked_by_iret=True)
    assert qual & (1 << 12) and qual & EptQual.NMI_UNBLOCKED_BY_IRET
    assert decode_qualification(qual)["nmi_unblocked_by_iret"]


@pytest.mark.parametrize("flags", [dict(zip(NONE, bits, strict=True))
                                   for bits in itertools.product([False, True], repeat=len(NONE))
                                   if bits[6] or not bits[7]])  # bit 8 only with bit 7
def test_decode_qualification_inverts_ept_qualification(flags: dict[str, bool]) -> None:
    qual = ept_qualification(**flags)
    assert decode_qualification(qual) == flags
    assert ept_qualification(**decode_qualification(qual)) == qual


# -- the conversion decision -----------------------------------------------------------


def reference(ve_enabled: bool, suppress_ve: bool, cr0_pe: bool, during: bool, busy: int) -> str | None:
    """The SDM's conditions written out independently: None means "converted"; otherwise the
    first failing condition in the documented order."""
    failures = [(not ve_enabled, "#VE not enabled"), (suppress_ve, "suppress-#VE bit set"),
                (not cr0_pe, "CR0.PE=0"), (during, "during event delivery"),
                (busy != 0, f"busy word is {busy:#x}")]
    return next((why for failed, why in failures if failed), None)


@pytest.mark.parametrize(("ve_enabled", "suppress_ve", "cr0_pe", "during", "busy"),
                         list(itertools.product([False, True], [False, True], [False, True],
                                                [False, True], [0, VE_BUSY, 1])))
def test_convert_to_ve_for_every_combination(ve_enabled: bool, suppress_ve: bool, cr0_pe: bool,
                                             during: bool, busy: int) -> None:
    convert, why = convert_to_ve(ve_enabled=ve_enabled, suppress_ve=suppress_ve, busy=busy,
                                 during_delivery=during, cr0_pe=cr0_pe)
    expected = reference(ve_enabled, suppress_ve, cr0_pe, during, busy)
    assert (convert, why) == ((True, "") if expected is None else (False, expected))


def test_the_reasons_read_as_documented() -> None:
    def decide(*, ve_enabled: bool = True, suppress_ve: bool = False, busy: int = 0,
               during_delivery: bool = False, cr0_pe: bool = True) -> tuple[bool, str]:
        return convert_to_ve(ve_enabled=ve_enabled, suppress_ve=suppress_ve, busy=busy,
                             during_delivery=during_delivery, cr0_pe=cr0_pe)

    assert decide() == (True, "")
    assert decide(ve_enabled=False) == (False, "#VE not enabled")
    assert decide(suppress_ve=True) == (False, "suppress-#VE bit set")
    assert decide(busy=VE_BUSY) == (False, "busy word is 0xffffffff")
    assert decide(during_delivery=True) == (False, "during event delivery")
    assert decide(cr0_pe=False) == (False, "CR0.PE=0")


def test_a_busy_word_wider_than_32_bits_is_refused() -> None:
    with pytest.raises(ValueError, match="busy"):
        convert_to_ve(ve_enabled=True, suppress_ve=False, busy=1 << 32, during_delivery=False)
