"""cpu.devices.vtd and vtd_tables: an Intel VT-d unit (VT-d Architecture Specification
rev 3.x) — its capability values, GCMD/GSTS, queued invalidation, DMA remapping through
root, context and second-level tables, fault recording and events, and interrupt
remapping — against a fake host with 1 MiB of RAM. No engine."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from cpu.devices.vtd import IntelIommu, Passed, VtdUnsupported
from cpu.devices.vtd_tables import RemapFault, RemappedInterrupt, translate

GCMD, GSTS, RTADDR, CCMD, FSTS, FECTL, FEDATA, FEADDR = 0x18, 0x1C, 0x20, 0x28, 0x34, 0x38, 0x3C, 0x40
IQH, IQT, IQA, ICS, IECTL, IRTA, IOTLB, FRCD = 0x80, 0x88, 0x90, 0x9C, 0xA0, 0xB8, 0xF8, 0x220
TE, SRTP, QIE, IRE, SIRTP, CFI = 1 << 31, 1 << 30, 1 << 26, 1 << 25, 1 << 24, 1 << 23
EDU_SID = 0x0010


class FakeHost:
    def __init__(self) -> None:
        self.ram = bytearray(1 << 20)
        self.events: list[tuple[str, int, int]] = []
        self.records: list[tuple[str, dict[str, Any]]] = []

    def read_memory(self, address: int, size: int) -> bytes | None:
        return bytes(self.ram[address:address + size]) if address + size <= len(self.ram) else None

    def write_memory(self, address: int, data: bytes) -> bool:
        if address + len(data) > len(self.ram):
            return False
        self.ram[address:address + len(data)] = data
        return True

    def event_message(self, kind: str, address: int, data: int) -> None:
        self.events.append((kind, address, data))

    def record(self, kind: str, **fields: Any) -> None:
        self.records.append((kind, fields))

    def q(self, address: int, value: int) -> None:
        struct.pack_into("<Q", self.ram, address, value)


def unit() -> tuple[IntelIommu, FakeHost]:
    host = FakeHost()
    return IntelIommu(host), host


# Tables for DMA: root 0x1000 -> context 0x2000 -> level 3 at 0x3000 -> level 2 at
# 0x4000 -> level 1 at 0x5000.
R, W, PS = 1, 2, 1 << 7


def tables(host: FakeHost, *, fpd: bool = False) -> None:
    host.q(0x1000, 0x2000 | 1)                                   # bus 0
    host.q(0x2000 + 16 * EDU_SID, 0x3000 | (2 if fpd else 0) | 1)  # 00:02.0, TT 00b
    host.q(0x2000 + 16 * EDU_SID + 8, 0x0010 << 8 | 1)           # domain 0x10, AW 39 bits
    host.q(0x3000, 0x4000 | R | W)                               # IOVA 0 - 1 GiB
    host.q(0x3008, 0x4000_0000 | PS | R | W)                     # IOVA 1 GiB: a 1-GiB page
    host.q(0x4000, 0x5000 | R | W)                               # IOVA 0 - 2 MiB
    host.q(0x4008, 0x60_0000 | PS | R)                           # IOVA 2 MiB: a 2-MiB page, RO
    host.q(0x5000, 0x8_0000 | R | W)                             # IOVA 0 -> 0x80000


def test_version_capability_and_extended_capability_are_qemus_intremap_on_eim_off_values() -> None:
    u, _ = unit()
    assert (u.read(0x00, 4), u.read(0x08, 8), u.read(0x10, 8)) == \
        (0x10, 0x00D2008C22260206, 0x0000000000F00F4A)
    assert (u.read(0x08, 4), u.read(0x0C, 4)) == (0x22260206, 0x00D2008C)
    cap = u.read(0x08, 8)
    assert (cap >> 8 & 0x1F, cap >> 34 & 0xF, (cap >> 24 & 0x3FF) * 16) == (0b00010, 0b0011, 0x220)


def test_gcmd_reads_zero_and_each_persistent_control_sets_its_status_bit() -> None:
    u, _ = unit()
    u.write(GCMD, 4, QIE)
    assert (u.read(GCMD, 4), u.read(GSTS, 4)) == (0, QIE)
    u.write(GCMD, 4, QIE | TE)
    assert u.read(GSTS, 4) == QIE | TE
    u.write(GCMD, 4, TE)                       # QIE written 0: queued invalidation off
    assert u.read(GSTS, 4) == TE


def test_srtp_latches_rtaddr_and_a_later_rtaddr_write_waits_for_the_next_srtp() -> None:
    u, _ = unit()
    u.write(RTADDR, 8, 0x1000)
    u.write(GCMD, 4, SRTP)
    u.write(RTADDR, 8, 0x7000)
    assert (u.read(GSTS, 4), u.read(RTADDR, 8), u.state.root) == (SRTP, 0x7000, 0x1000)
    u.write(GCMD, 4, u.read(GSTS, 4) | TE)     # kvm-unit-tests' GSTS | command: SRTP again
    assert (u.read(GSTS, 4), u.state.root) == (SRTP | TE, 0x7000)


def test_ire_needs_a_latched_interrupt_remapping_table() -> None:
    u, _ = unit()
    with pytest.raises(VtdUnsupported, match="IRTPS = 0"):
        u.write(GCMD, 4, IRE)
    u.write(IRTA, 8, 0x8000 | 0xF)
    u.write(GCMD, 4, SIRTP)
    u.write(GCMD, 4, SIRTP | IRE)
    assert u.read(GSTS, 4) == SIRTP | IRE


def test_accesses_to_no_register_or_of_the_wrong_width_are_unsupported() -> None:
    u, _ = unit()
    with pytest.raises(VtdUnsupported, match="offset 0x68"):
        u.read(0x68, 4)              # PLMBASE: CAP.PLMR = 0
    with pytest.raises(VtdUnsupported, match="GCMD"):
        u.write(GCMD, 8, 0)


def test_a_register_based_context_invalidation_completes_with_the_granularity_asked() -> None:
    u, _ = unit()
    u.write(CCMD, 8, 1 << 63 | 0b01 << 61)
    assert u.read(CCMD, 8) == 0b01 << 61 | 0b01 << 59
    u.write(IOTLB, 8, 1 << 63 | 0b10 << 60 | 0x10 << 32)
    assert u.read(IOTLB, 8) == 0b10 << 60 | 0b10 << 57 | 0x10 << 32


def queue(u: IntelIommu, host: FakeHost) -> None:
    u.write(IQA, 8, 0x9000)          # one page: 256 descriptors
    u.write(GCMD, 4, QIE)


def test_an_invalidation_wait_descriptor_writes_its_status_and_advances_iqh() -> None:
    u, host = unit()
    queue(u, host)
    host.q(0x9000, 0x1234ABCD << 32 | 1 << 5 | 0x5)   # wait, SW, status data
    host.q(0x9008, 0xA000)
    u.write(IQT, 8, 0x10)
    assert (host.ram[0xA000:0xA004], u.read(IQH, 8), u.read(FSTS, 4)) == \
        (struct.pack("<I", 0x1234ABCD), 0x10, 0)


def test_a_wait_descriptor_with_if_sets_iwc_and_a_masked_event_stays_pending() -> None:
    u, host = unit()
    queue(u, host)
    host.q(0x9000, 1 << 4 | 0x5)
    u.write(IQT, 4, 0x10)
    assert (u.read(ICS, 4), u.read(IECTL, 4), host.events) == (1, 0xC0000000, [])
    u.write(0xA8, 4, 0xFEE00000)
    u.write(0xA4, 4, 0x41)
    u.write(IECTL, 4, 0)              # unmasked: the pending event is sent
    assert (u.read(IECTL, 4), host.events) == (0, [("invalidation", 0xFEE00000, 0x41)])


def test_an_unsupported_descriptor_type_sets_iqe_and_stops_with_iqh_at_it() -> None:
    u, host = unit()
    queue(u, host)
    host.q(0x9000, 0x1 | 0b01 << 4)    # context-cache, global
    host.q(0x9010, 0x3)                # device-TLB: ECAP.DT = 0
    u.write(IQT, 8, 0x20)
    assert (u.read(IQH, 8), u.read(FSTS, 4) & 0x10) == (0x10, 0x10)
    host.q(0x9010, 0x2 | 0b01 << 4)    # fixed: a global IOTLB invalidation
    u.write(FSTS, 4, 0x10)             # clearing IQE resumes
    assert (u.read(IQH, 8), u.read(FSTS, 4)) == (0x20, 0)


def test_dma_translation_walks_three_levels_to_a_4_kib_page() -> None:
    _, host = unit()
    tables(host)
    t = translate(host.read_memory, 0x1000, EDU_SID, 0x123, write=True)
    assert (t.address, t.page_size, t.domain) == (0x80123, 0x1000, 0x10)


def test_a_2_mib_and_a_1_gib_page_translate_with_their_offsets() -> None:
    _, host = unit()
    tables(host)
    t = translate(host.read_memory, 0x1000, EDU_SID, 0x2ABCDE, write=False)
    assert (t.address, t.page_size) == (0x6ABCDE, 2 << 20)
    t = translate(host.read_memory, 0x1000, EDU_SID, 0x4123_4567, write=True)
    assert (t.address, t.page_size) == (0x4123_4567, 1 << 30)


@pytest.mark.parametrize(("change", "iova", "write", "reason"), [
    (lambda h: h.q(0x1000, 0), 0, False, 0x1),                            # root not present
    (lambda h: h.q(0x2000 + 16 * EDU_SID, 0), 0, False, 0x2),             # context not present
    (lambda h: h.q(0x2000 + 16 * EDU_SID + 8, 0x2), 0, False, 0x3),       # AW 48 bits
    (lambda h: None, 1 << 39, False, 0x4),                                # beyond 39 bits
    (lambda h: None, 0x200000, True, 0x5),                                # write to an RO page
    (lambda h: None, 0x1000, False, 0x6),                                 # unmapped IOVA
    (lambda h: h.q(0x4008, 0x60_1000 | PS | R), 0x200000, False, 0xC),    # 2-MiB page misaligned
    (lambda h: h.q(0x1000, 0x2000 | 1 << 5 | 1), 0, False, 0xA),          # root reserved bit
    (lambda h: h.q(0x4000, 0x7000_0000 | R | W), 0, False, 0x7),          # level 1 beyond RAM
    (lambda h: h.q(0x1000, 0x20_0000 | 1), 0, False, 0x9),                # context beyond RAM
    (lambda h: h.q(0x2000 + 16 * EDU_SID, 0x3000 | 1 << 5 | 1), 0, False, 0xB),  # ctx reserved
])
def test_each_blocked_dma_request_faults_with_its_reason(change: Any, iova: int, write: bool,
                                                         reason: int) -> None:
    _, host = unit()
    tables(host)
    change(host)
    with pytest.raises(RemapFault) as fault:
        translate(host.read_memory, 0x1000, EDU_SID, iova, write=write)
    assert fault.value.reason == reason


def test_a_root_table_outside_memory_faults_8h() -> None:
    _, host = unit()
    with pytest.raises(RemapFault) as fault:
        translate(host.read_memory, 0x20_0000, EDU_SID, 0, write=False)
    assert fault.value.reason == 0x8


def enabled(host: FakeHost) -> IntelIommu:
    u = IntelIommu(host)
    u.write(RTADDR, 8, 0x1000)
    u.write(GCMD, 4, SRTP)
    u.write(GCMD, 4, SRTP | TE)
    return u


def test_dma_with_translation_off_uses_the_bus_address() -> None:
    u, _ = unit()
    assert u.dma(EDU_SID, 0x1234, 8, write=False) == [(0x1234, 8)]


def test_an_unmapped_iova_is_recorded_in_the_fault_recording_register() -> None:
    host = FakeHost()
    tables(host)
    u = enabled(host)
    assert u.dma(EDU_SID, 0xFF0, 0x20, write=False) == [(0x80FF0, 0x10)]   # stops at 0x1000
    assert (u.read(FRCD, 8), u.read(FRCD + 8, 8)) == (0x1000, 1 << 63 | 1 << 62 | 0x6 << 32 | 0x10)
    assert (u.read(FSTS, 4), u.read(FECTL, 4)) == (0x2, 0xC0000000)   # PPF; IM, IP
    assert host.records[-1][0] == "vtd_fault"


def test_a_second_fault_while_the_record_is_full_sets_pfo_and_keeps_the_first() -> None:
    host = FakeHost()
    tables(host)
    u = enabled(host)
    u.dma(EDU_SID, 0x1000, 4, write=False)
    u.dma(EDU_SID, 0x200000, 4, write=True)
    assert (u.read(FSTS, 4), u.read(FRCD + 8, 8) >> 32 & 0xFF) == (0x3, 0x6)
    u.write(FRCD + 12, 4, 1 << 31)     # clear F
    u.write(FSTS, 4, 0x1)              # clear PFO
    assert (u.read(FSTS, 4), u.read(FRCD + 8, 8) >> 63, u.read(FECTL, 4)) == (0, 0, 0x80000000)


def test_an_unmasked_fault_event_sends_feaddr_and_fedata() -> None:
    host = FakeHost()
    tables(host)
    u = enabled(host)
    u.write(FEADDR, 4, 0xFEE00000)
    u.write(FEDATA, 4, 0x50)
    u.write(FECTL, 4, 0)
    u.dma(EDU_SID, 0x1000, 4, write=True)
    assert (host.events, u.read(FECTL, 4)) == ([("fault", 0xFEE00000, 0x50)], 0)


def test_fault_processing_disable_blocks_the_request_without_recording_it() -> None:
    host = FakeHost()
    tables(host, fpd=True)
    u = enabled(host)
    assert u.dma(EDU_SID, 0x1000, 4, write=False) == []
    assert (u.read(FSTS, 4), u.read(FRCD + 8, 8)) == (0, 0)


# Interrupt remapping: the table at 0x8000, 2^16 entries.
def irte(host: FakeHost, index: int, *, vector: int, dest: int = 0, sid: int = EDU_SID,
         svt: int = 1, level: bool = False) -> None:
    host.q(0x8000 + 16 * index, 1 | 2 | (16 if level else 0) | vector << 16 | dest << 40)
    host.q(0x8000 + 16 * index + 8, sid | svt << 18)


def remapping(host: FakeHost) -> IntelIommu:
    u = IntelIommu(host)
    u.write(IRTA, 8, 0x8000 | 0xF)
    u.write(GCMD, 4, SIRTP)
    u.write(GCMD, 4, SIRTP | IRE)
    return u


def test_interrupts_pass_unchanged_while_remapping_is_off() -> None:
    u, _ = unit()
    assert u.interrupt(0xFEE00050, 0, EDU_SID) == Passed(0xFEE00050, 0)


def test_a_remappable_msi_takes_its_irtes_vector_and_destination() -> None:
    host = FakeHost()
    irte(host, 2, vector=0xEE, dest=0x00)
    irte(host, 5, vector=0x41, dest=0x03, level=True)
    u = remapping(host)
    assert u.interrupt(0xFEE00050, 0, EDU_SID) == RemappedInterrupt(
        index=2, vector=0xEE, delivery_mode=0, logical=False, redirection_hint=False,
        level=False, destination=0)
    # SHV: handle 3 + subhandle 2 = index 5.
    r = u.interrupt(0xFEE00000 | 3 << 5 | 1 << 4 | 1 << 3, 2, EDU_SID)
    assert isinstance(r, RemappedInterrupt) and (r.index, r.vector, r.destination, r.level) == \
        (5, 0x41, 3, True)


def test_an_ioapic_rte_in_remappable_format_reaches_its_irte_without_source_validation() -> None:
    """The I/O APIC's request: RTE bits 63:49 (index 14:0) and 48 (format) in address
    bits 19:4; no source-id (cpu/q35.py)."""
    host = FakeHost()
    irte(host, 1, vector=0xED, sid=0x0010)
    u = remapping(host)
    rte = 0xED | 1 << 48 | 1 << 49
    address = 0xFEE00000 | (rte >> 48 & 0xFFFF) << 4
    r = u.interrupt(address, rte & 0xFF, 0xFF00, validate=False)
    assert isinstance(r, RemappedInterrupt) and (r.index, r.vector) == (1, 0xED)


def test_a_requester_failing_source_validation_is_blocked_with_fault_0x26() -> None:
    host = FakeHost()
    irte(host, 2, vector=0xEE)
    host.q(0x8000 + 32, 1 | 0xEE << 16)    # FPD clear
    u = remapping(host)
    assert u.interrupt(0xFEE00050, 0, 0x0018) is None
    assert (u.read(FRCD, 8), u.read(FRCD + 8, 8)) == (2 << 48, 1 << 63 | 0x26 << 32 | 0x18)


def test_a_compatibility_format_interrupt_is_blocked_unless_cfis_is_set() -> None:
    host = FakeHost()
    u = remapping(host)
    assert u.interrupt(0xFEE00000, 0x30, EDU_SID) is None
    assert u.read(FRCD + 8, 8) >> 32 & 0xFF == 0x25
    u.write(GCMD, 4, SIRTP | IRE | CFI)
    assert u.interrupt(0xFEE00000, 0x30, EDU_SID) == Passed(0xFEE00000, 0x30)


@pytest.mark.parametrize(("setup", "address", "reason"), [
    (lambda h: None, 0xFEE00000 | 7 << 5 | 1 << 4, 0x22),                       # not present
    (lambda h: h.q(0x8000 + 16 * 7, 1 | 1 << 15), 0xFEE00000 | 7 << 5 | 1 << 4, 0x24),  # posted
])
def test_a_missing_or_reserved_irte_is_blocked_with_its_reason(setup: Any, address: int,
                                                               reason: int) -> None:
    host = FakeHost()
    setup(host)
    u = remapping(host)
    assert u.interrupt(address, 0, EDU_SID) is None
    assert u.read(FRCD + 8, 8) >> 32 & 0xFF == reason


@pytest.mark.parametrize(("irta", "address", "data", "reason", "info"), [
    (0x8000 | 0xF, 0xFEE00050, 0x10000, 0x20, 0),        # data bits 31:16 reserved: no index
    (0x8000 | 0x0, 0xFEE00050, 0, 0x21, 2 << 48),         # index 2 of a 2-entry table
    (0x20_0000 | 0xF, 0xFEE00050, 0, 0x23, 2 << 48),      # the table is outside memory
])
def test_a_request_the_table_cannot_serve_is_blocked_with_its_reason(
        irta: int, address: int, data: int, reason: int, info: int) -> None:
    host = FakeHost()
    irte(host, 2, vector=0xEE)
    u = IntelIommu(host)
    u.write(IRTA, 8, irta)
    u.write(GCMD, 4, SIRTP)
    u.write(GCMD, 4, SIRTP | IRE)
    assert u.interrupt(address, data, EDU_SID) is None
    assert (u.read(FRCD, 8), u.read(FRCD + 8, 8) >> 32 & 0xFF) == (info, reason)
