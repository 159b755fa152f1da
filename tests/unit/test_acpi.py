"""cpu.devices.acpi: the tables a PC firmware leaves in the BIOS area, found and read the
way kvm-unit-tests' lib/acpi.c does (RSDP scan of 0xE0000-0xFFFFF, RSDT, FADT, FACS via
FIRMWARE_CTRL, MADT subtables), with the layouts of the ACPI specification."""

from __future__ import annotations

import itertools
import struct

import pytest

from cpu.devices import acpi

MEMORY = 0x100000


def installed(tables: acpi.AcpiTables) -> bytearray:
    mem = bytearray(MEMORY)

    def write(address: int, data: bytes) -> None:
        mem[address:address + len(data)] = data

    tables.install(write)
    return mem


def get_rsdp(mem: bytearray) -> int | None:
    """lib/acpi.c get_rsdp: the first 16-byte boundary in 0xE0000-0xFFFFF holding
    "RSD PTR "."""
    for addr in range(0xE0000, 0x100000, 16):
        if mem[addr:addr + 8] == b"RSD PTR ":
            return addr
    return None


def u32(mem: bytearray, at: int) -> int:
    value: int = struct.unpack_from("<I", mem, at)[0]
    return value


def find_table(mem: bytearray, signature: bytes) -> int | None:
    """lib/acpi.c find_acpi_table_addr, for a revision-0 RSDP (the RSDT path)."""
    if signature == b"FACS":
        fadt = find_table(mem, b"FACP")
        return None if fadt is None else u32(mem, fadt + 36)
    rsdp = get_rsdp(mem)
    assert rsdp is not None
    rsdt = u32(mem, rsdp + 16)
    assert mem[rsdt:rsdt + 4] == b"RSDT"
    for entry in range(rsdt + 36, rsdt + u32(mem, rsdt + 4), 4):
        table = u32(mem, entry)
        if mem[table:table + 4] == signature:
            return table
    return None


@pytest.fixture(scope="module")
def mem() -> bytearray:
    return installed(acpi.build())


def test_the_rsdp_is_found_by_the_bios_area_scan_and_is_revision_0_with_a_valid_checksum(
        mem: bytearray) -> None:
    at = get_rsdp(mem)
    assert at == 0xF0000
    assert sum(mem[at:at + 20]) % 256 == 0
    signature, _, oem, revision, rsdt = struct.unpack_from("<8sB6sBI", mem, at)
    assert (signature, oem, revision, rsdt) == (b"RSD PTR ", b"IDTLAB", 0, 0xF0020)


def test_every_table_has_a_valid_header_and_checksum_except_the_facs(mem: bytearray) -> None:
    for sig in (b"RSDT", b"FACP", b"APIC", b"HPET", b"DSDT"):
        at = find_table(mem, sig) if sig != b"RSDT" else u32(mem, 0xF0000 + 16)
        if sig == b"DSDT":
            fadt = find_table(mem, b"FACP")
            assert fadt is not None
            at = u32(mem, fadt + 40)
        assert at is not None, sig
        (signature, length, revision, _, oem, oem_table, oem_rev, creator,
         creator_rev) = struct.unpack_from("<4sIBB6s8sI4sI", mem, at)
        assert (signature, revision, oem, oem_table, oem_rev, creator, creator_rev) == (
            sig, 1, b"IDTLAB", b"IDTLAB  ", 1, b"IDTL", 1)
        assert sum(mem[at:at + length]) % 256 == 0, sig


def test_the_rsdt_lists_fadt_madt_and_hpet(mem: bytearray) -> None:
    rsdt = u32(mem, 0xF0000 + 16)
    entries = [u32(mem, e) for e in range(rsdt + 36, rsdt + u32(mem, rsdt + 4), 4)]
    assert [bytes(mem[e:e + 4]) for e in entries] == [b"FACP", b"APIC", b"HPET"]


def test_the_fadt_points_at_facs_and_dsdt_and_at_the_piix4_pm_blocks(mem: bytearray) -> None:
    fadt = find_table(mem, b"FACP")
    assert fadt is not None
    assert u32(mem, fadt + 4) == 116  # revision 1 length
    f = dict(firmware_ctrl=u32(mem, fadt + 36), dsdt=u32(mem, fadt + 40), model=mem[fadt + 44],
             sci_int=struct.unpack_from("<H", mem, fadt + 46)[0], smi_cmd=u32(mem, fadt + 48),
             pm1a_evt_blk=u32(mem, fadt + 56), pm1b_evt_blk=u32(mem, fadt + 60),
             pm1a_cnt_blk=u32(mem, fadt + 64), pm_tmr_blk=u32(mem, fadt + 76),
             gpe0_blk=u32(mem, fadt + 80), lens=bytes(mem[fadt + 88:fadt + 94]),
             century=mem[fadt + 108], flags=u32(mem, fadt + 112))
    assert f == dict(firmware_ctrl=0xF01C0, dsdt=0xF0160, model=1, sci_int=9, smi_cmd=0,
                     pm1a_evt_blk=0x600, pm1b_evt_blk=0, pm1a_cnt_blk=0x604, pm_tmr_blk=0x608,
                     gpe0_blk=0xAFE0, lens=bytes([4, 2, 0, 4, 4, 0]), century=0x32,
                     flags=0b1010_0101)


def test_the_facs_is_64_byte_aligned_with_a_zero_waking_vector_for_s3_to_write(mem: bytearray) -> None:
    facs = find_table(mem, b"FACS")
    assert facs is not None and facs % 64 == 0
    assert struct.unpack_from("<4sIIIII", mem, facs) == (b"FACS", 64, 0, 0, 0, 0)


def madt_entries(mem: bytearray) -> list[bytes]:
    """lib/acpi.c acpi_table_parse_madt: subtables after the 44-byte MADT head."""
    madt = find_table(mem, b"APIC")
    assert madt is not None
    out, at, end = [], madt + 44, madt + u32(mem, madt + 4)
    while at < end:
        out.append(bytes(mem[at:at + mem[at + 1]]))
        at += mem[at + 1]
    assert at == end
    return out


def test_the_madt_has_the_local_apic_the_ioapic_the_irq0_override_and_lint1_nmi(mem: bytearray) -> None:
    madt = find_table(mem, b"APIC")
    assert madt is not None
    assert (u32(mem, madt + 36), u32(mem, madt + 40)) == (0xFEE00000, 1)  # PCAT_COMPAT
    assert madt_entries(mem) == [
        struct.pack("<BBBBI", 0, 8, 0, 0, 1),                 # CPU 0, APIC ID 0, enabled
        struct.pack("<BBBBII", 1, 12, 0, 0, 0xFEC00000, 0),   # I/O APIC 0, GSI base 0
        struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0),            # ISA IRQ 0 -> GSI 2
        struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1),              # NMI on LINT1, all CPUs
    ]


def test_the_madt_lists_one_enabled_local_apic_per_cpu() -> None:
    entries = madt_entries(installed(acpi.build(cpus=3)))
    assert [e for e in entries if e[0] == 0] == [struct.pack("<BBBBI", 0, 8, n, n, 1) for n in range(3)]


def test_the_hpet_table_names_the_block_at_0xfed00000(mem: bytearray) -> None:
    at = find_table(mem, b"HPET")
    assert at is not None
    assert u32(mem, at + 4) == 56
    assert struct.unpack_from("<IBBBBQBHB", mem, at + 36) == (
        0x8086A201, 0, 64, 0, 0, 0xFED00000, 0, 0, 0)


def test_without_an_hpet_there_is_no_hpet_table() -> None:
    mem = installed(acpi.build(hpet=False))
    assert find_table(mem, b"HPET") is None
    assert find_table(mem, b"APIC") is not None and find_table(mem, b"FACS") is not None


def test_everything_lies_in_the_reserved_bios_area_without_overlap() -> None:
    tables = acpi.build(cpus=8)
    assert tables.reserved == (0xE0000, 0x100000)
    spans = sorted((b.address, b.address + len(b.data)) for b in tables.blobs)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    assert spans[0][0] >= 0xE0000 and spans[-1][1] <= 0x100000
    assert tables.address("FACS") == spans[-1][0]


def test_a_base_off_a_16_byte_boundary_or_outside_the_bios_area_is_refused() -> None:
    with pytest.raises(ValueError, match="must be 16-byte aligned inside the BIOS area"):
        acpi.build(base=0xF0008)
    with pytest.raises(ValueError, match="must be 16-byte aligned inside the BIOS area"):
        acpi.build(base=0x9F000)
    with pytest.raises(KeyError, match="no ACPI table 'XSDT'"):
        acpi.build().address("XSDT")


def test_with_an_iommu_the_dmar_table_reports_the_vtd_unit_and_the_ioapic_scope() -> None:
    """VT-d spec "DMA Remapping Reporting Structure": host address width 39 (field 38),
    INTR_REMAP; one DRHD (type 0, 24 bytes, INCLUDE_PCI_ALL, segment 0, base 0xFED90000)
    with an I/O APIC device scope (type 3, length 8, enumeration ID 0, bus 0xFF, 00.0)."""
    mem = installed(acpi.build(iommu=True))
    at = find_table(mem, b"DMAR")
    assert at is not None
    length = u32(mem, at + 4)
    assert length == 36 + 12 + 24 and sum(mem[at:at + length]) % 256 == 0
    assert (mem[at + 36], mem[at + 37]) == (38, 0x01)
    assert struct.unpack_from("<HHBBHQ", mem, at + 48) == (0, 24, 0x01, 0, 0, 0xFED90000)
    assert struct.unpack_from("<BBHBBBB", mem, at + 64) == (3, 8, 0, 0, 0xFF, 0, 0)


def test_without_an_iommu_there_is_no_dmar_table_and_no_mcfg(mem: bytearray) -> None:
    assert find_table(mem, b"DMAR") is None and find_table(mem, b"MCFG") is None
