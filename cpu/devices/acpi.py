"""ACPI tables as a PC firmware leaves them for the operating system: RSDP, RSDT, FADT,
FACS, DSDT, MADT, (with an HPET) the HPET table and (with a VT-d unit) the DMAR table
(Advanced Configuration and Power Interface Specification, revision 1.0b for the layouts
used here, which later revisions keep at the same offsets; section titles below are the
ACPI 6.x ones; the HPET table is IA-PC HPET Specification 1.0a, "The ACPI 2.0 HPET
Description Table (HPET)"; the DMAR table is the VT-d specification's).

Where they go ("Finding the RSDP on IA-PC Systems")
---------------------------------------------------
An operating system finds the Root System Description Pointer by its signature
"RSD PTR " on a 16-byte boundary in the first KiB of the EBDA or in the BIOS area
0xE0000-0xFFFFF. kvm-unit-tests' lib/acpi.c get_rsdp scans 0xE0000-0xFFFFF in steps of
16 and follows the pointers from there (find_acpi_table_addr: RSDP -> RSDT -> tables,
FADT.FIRMWARE_CTRL -> FACS). A legacy BIOS keeps the RSDP in its F segment; this one
keeps the tables there too, from `base` (default 0xF0000) up:

    RSDP  20 bytes, revision 0 (ACPI 1.0: an RSDT, no XSDT), as SeaBIOS gives QEMU's
          pc machine, so lib/acpi.c takes the RSDT path
    RSDT  pointers to FADT, MADT, HPET (and DMAR)
    FADT  revision 1, 116 bytes: FIRMWARE_CTRL -> FACS, DSDT, SCI on IRQ 9, and the
          PM1a event/control, PM timer and GPE0 blocks at the PIIX4 addresses QEMU's
          pc machine uses (PM base 0x600: PM1a_EVT 0x600, PM1a_CNT 0x604, PM_TMR 0x608;
          GPE0 0xAFE0); no SMI command port (ACPI is always on)
    FACS  64 bytes, 64-byte aligned ("Firmware ACPI Control Structure"): the waking
          vector that x86/s3.c writes
    DSDT  a definition block with no AML in it (the FADT must point at one)
    MADT  local APIC at 0xFEE00000, PCAT_COMPAT (8259s present); one Processor Local
          APIC entry per CPU (APIC IDs from 0, enabled), the I/O APIC (ID 0 at
          0xFEC00000, GSI base 0), the Interrupt Source Override ISA IRQ 0 -> GSI 2
          (cpu/devices/ioapic.py isa_irq_to_pin), and Local APIC NMI on LINT1 for all
          processors (as QEMU's build_madt)
    HPET  event timer block ID = HPET capabilities bits 31:0, base 0xFED00000 in
          system memory, HPET number 0, minimum periodic tick 0, no page protection
    DMAR  (a q35 machine with an IOMMU only; Intel VT-d Architecture Specification
          "DMA Remapping Reporting Structure", "DMA Remapping Hardware Unit Definition
          Structure") how an OS finds the remapping unit: host address width 39
          (field 38), INTR_REMAP; one DRHD with INCLUDE_PCI_ALL, segment 0, registers at
          0xFED90000, and the I/O APIC's device scope (enumeration ID 0, bus 0xFF, path
          00.0), as QEMU's build_dmar_q35 writes it. kvm-unit-tests does not read it
          (lib/x86/intel-iommu.h hard-codes the address); the architecture reports the
          unit this way. There is no MCFG: the q35 machine here has no MMCONFIG

Every table's bytes sum to 0 (its Checksum field; the RSDP's over its 20 bytes); the
FACS has no checksum.

State
-----
Firmware writes these bytes into RAM once, before the kernel starts; from then on they
are the guest's memory (it may write them: s3 stores its waking vector in the FACS), so
a checkpoint that copies RAM copies them. The model therefore has no mutable state of
its own: `build` returns a frozen `AcpiTables` (blobs and where they go) and
`AcpiTables.install(write)` puts them into memory. `reserved` is the range the memory
map must report as reserved (the BIOS area 0xE0000-0xFFFFF, as on a PC), so that the
kernel does not reuse it as free RAM.

Only what the tables say is modelled: the PM registers they point at (PM timer, PM1
event and control) are hardware of their own, which this module does not provide.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from cpu.devices.apic import APIC_BASE
from cpu.devices.hpet import HPET_BASE
from cpu.devices.ioapic import IOAPIC_BASE, ISA_IRQ0_GSI

BIOS_AREA = (0xE0000, 0x100000)     # searched for the RSDP; reserved in the memory map
DEFAULT_BASE = 0xF0000

OEM_ID = b"IDTLAB"
OEM_TABLE_ID = b"IDTLAB  "
OEM_REVISION = 1
CREATOR_ID = b"IDTL"
CREATOR_REVISION = 1

RSDP_SIGNATURE = b"RSD PTR "
RSDP_LENGTH = 20                    # revision 0 (ACPI 1.0)
HEADER_LENGTH = 36                  # "System Description Table Header"
FADT_LENGTH = 116                   # revision 1
FACS_LENGTH = 64
FACS_ALIGN = 64

# FADT (ACPI 1.0 "Fixed ACPI Description Table (FADT)") field offsets.
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_INT_MODEL = 44
FADT_SCI_INT = 46
FADT_SMI_CMD = 48
FADT_PM1A_EVT_BLK = 56
FADT_PM1A_CNT_BLK = 64
FADT_PM_TMR_BLK = 76
FADT_GPE0_BLK = 80
FADT_PM1_EVT_LEN = 88
FADT_PM1_CNT_LEN = 89
FADT_PM_TMR_LEN = 91
FADT_GPE0_BLK_LEN = 92
FADT_P_LVL2_LAT = 96
FADT_P_LVL3_LAT = 98
FADT_CENTURY = 108
FADT_FLAGS = 112
# FADT flags ("Fixed ACPI Description Table Fixed Feature Flags").
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5
FADT_RTC_S4 = 1 << 7

PIIX4_PM_BASE = 0x600               # QEMU's pc machine (hw/acpi/piix4.c, ACPI_PM_BASE)
PIIX4_GPE0 = 0xAFE0
SCI_IRQ = 9
RTC_CENTURY = 0x32                  # CMOS index of the century byte

# MADT ("Multiple APIC Description Table (MADT)").
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF

HPET_EVENT_TIMER_BLOCK_ID = 0x8086A201   # cpu/devices/hpet.py capabilities, bits 31:0
GAS_SYSTEM_MEMORY = 0

VTD_REGISTERS = 0xFED90000             # cpu/devices/vtd.py VTD_BASE
DMAR_HOST_ADDRESS_WIDTH = 39 - 1       # "Host Address Width": N + 1 bits
DMAR_INTR_REMAP = 1 << 0
DRHD = 0
DRHD_INCLUDE_PCI_ALL = 1 << 0
SCOPE_IOAPIC = 3
IOAPIC_SCOPE_BUS = 0xFF                # QEMU Q35_PSEUDO_BUS_PLATFORM
IOAPIC_SCOPE_PATH = (0x00, 0x00)       # device, function (QEMU Q35_PSEUDO_DEVFN_IOAPIC)


@dataclass(frozen=True)
class AcpiBlob:
    """One table and where it goes."""

    name: str
    address: int
    data: bytes


@dataclass(frozen=True)
class AcpiTables:
    """What the firmware writes: the tables, and the range to report as reserved."""

    blobs: tuple[AcpiBlob, ...]
    reserved: tuple[int, int]

    def install(self, write: Callable[[int, bytes], None]) -> None:
        """Write every table into guest memory through `write(address, data)`."""
        for blob in self.blobs:
            write(blob.address, blob.data)

    def address(self, name: str) -> int:
        """Where table `name` ("RSDP", "RSDT", "FACP", "FACS", "DSDT", "APIC", "HPET",
        "DMAR") is."""
        for blob in self.blobs:
            if blob.name == name:
                return blob.address
        raise KeyError(f"no ACPI table {name!r} (there are {', '.join(b.name for b in self.blobs)})")

    @property
    def end(self) -> int:
        return max(b.address + len(b.data) for b in self.blobs)


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with a 0 in its checksum field) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _header(signature: bytes, body: bytes, revision: int) -> bytes:
    """A System Description Table: the 36-byte header, checksummed, then `body`."""
    length = HEADER_LENGTH + len(body)
    raw = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                      OEM_REVISION, CREATOR_ID, CREATOR_REVISION) + body
    return raw[:9] + bytes([checksum(raw)]) + raw[10:]


def rsdp(rsdt_address: int) -> bytes:
    """The ACPI 1.0 RSDP: signature, checksum, OEM ID, revision 0, RSDT address."""
    raw = struct.pack("<8sB6sBI", RSDP_SIGNATURE, 0, OEM_ID, 0, rsdt_address)
    return raw[:8] + bytes([checksum(raw)]) + raw[9:]


def rsdt(tables: list[int]) -> bytes:
    return _header(b"RSDT", b"".join(struct.pack("<I", a) for a in tables), revision=1)


def fadt(facs_address: int, dsdt_address: int, pm_base: int = PIIX4_PM_BASE) -> bytes:
    body = bytearray(FADT_LENGTH - HEADER_LENGTH)

    def put(offset: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, body, offset - HEADER_LENGTH, value)

    put(FADT_FIRMWARE_CTRL, "<I", facs_address)
    put(FADT_DSDT, "<I", dsdt_address)
    put(FADT_INT_MODEL, "<B", 1)          # ACPI 1.0 INT_MODEL: multiple APIC
    put(FADT_SCI_INT, "<H", SCI_IRQ)
    put(FADT_SMI_CMD, "<I", 0)            # no SMI command port: ACPI is always enabled
    put(FADT_PM1A_EVT_BLK, "<I", pm_base)
    put(FADT_PM1A_CNT_BLK, "<I", pm_base + 4)
    put(FADT_PM_TMR_BLK, "<I", pm_base + 8)
    put(FADT_GPE0_BLK, "<I", PIIX4_GPE0)
    put(FADT_PM1_EVT_LEN, "<B", 4)
    put(FADT_PM1_CNT_LEN, "<B", 2)
    put(FADT_PM_TMR_LEN, "<B", 4)
    put(FADT_GPE0_BLK_LEN, "<B", 4)
    put(FADT_P_LVL2_LAT, "<H", 0x0FFF)    # > 100: C2 not supported
    put(FADT_P_LVL3_LAT, "<H", 0x0FFF)    # > 1000: C3 not supported
    put(FADT_CENTURY, "<B", RTC_CENTURY)
    put(FADT_FLAGS, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RTC_S4)
    return _header(b"FACP", bytes(body), revision=1)


def facs() -> bytes:
    """Signature, length, hardware signature 0, waking vector 0, global lock 0, flags 0."""
    return struct.pack("<4sIIIII40s", b"FACS", FACS_LENGTH, 0, 0, 0, 0, bytes(40))


def dsdt() -> bytes:
    return _header(b"DSDT", b"", revision=1)


def madt(cpus: int, ioapic_id: int = 0) -> bytes:
    body = struct.pack("<II", APIC_BASE, MADT_PCAT_COMPAT)
    for cpu in range(cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LOCAL_APIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id, 0, IOAPIC_BASE, 0)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, ISA_IRQ0_GSI, 0)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 1)
    return _header(b"APIC", body, revision=1)


def hpet_table() -> bytes:
    gas = struct.pack("<BBBBQ", GAS_SYSTEM_MEMORY, 64, 0, 0, HPET_BASE)
    body = struct.pack("<I", HPET_EVENT_TIMER_BLOCK_ID) + gas + struct.pack("<BHB", 0, 0, 0)
    return _header(b"HPET", body, revision=1)


def dmar(ioapic_id: int = 0) -> bytes:
    scope = struct.pack("<BBHBB", SCOPE_IOAPIC, 8, 0, ioapic_id, IOAPIC_SCOPE_BUS) + \
        bytes(IOAPIC_SCOPE_PATH)
    drhd = struct.pack("<HHBBHQ", DRHD, 16 + len(scope), DRHD_INCLUDE_PCI_ALL, 0, 0,
                       VTD_REGISTERS) + scope
    body = struct.pack("<BB10s", DMAR_HOST_ADDRESS_WIDTH, DMAR_INTR_REMAP, bytes(10)) + drhd
    return _header(b"DMAR", body, revision=1)


def build(*, cpus: int = 1, hpet: bool = True, iommu: bool = False,
          base: int = DEFAULT_BASE) -> AcpiTables:
    """The tables for a machine with `cpus` CPUs (APIC IDs 0..cpus-1), an I/O APIC and,
    if `hpet`, an HPET, and if `iommu`, a VT-d unit, laid out from `base` in the BIOS
    area."""
    if not 1 <= cpus <= 255:
        raise ValueError(f"ACPI: {cpus} CPUs (the xAPIC MADT entries take 1 to 255)")
    if base % 16 or not BIOS_AREA[0] <= base < BIOS_AREA[1]:
        raise ValueError(f"ACPI: base {base:#x} must be 16-byte aligned inside the BIOS area "
                         f"{BIOS_AREA[0]:#x}-{BIOS_AREA[1] - 1:#x}, where the RSDP is searched")

    def align(address: int, to: int) -> int:
        return -(-address // to) * to

    # Fixed-size tables first, so that every address is known before the RSDT is built.
    rsdp_at = base
    rsdt_at = align(rsdp_at + RSDP_LENGTH, 16)
    n_tables = 2 + hpet + iommu
    fadt_at = align(rsdt_at + HEADER_LENGTH + 4 * n_tables, 16)
    madt_bytes = madt(cpus)
    madt_at = align(fadt_at + FADT_LENGTH, 16)
    hpet_at = align(madt_at + len(madt_bytes), 16)
    dmar_at = align(hpet_at + (len(hpet_table()) if hpet else 0), 16)
    dsdt_at = align(dmar_at + (len(dmar()) if iommu else 0), 16)
    facs_at = align(dsdt_at + HEADER_LENGTH, FACS_ALIGN)
    blobs = [AcpiBlob("RSDP", rsdp_at, rsdp(rsdt_at)),
             AcpiBlob("RSDT", rsdt_at, rsdt([fadt_at, madt_at] + ([hpet_at] if hpet else [])
                                            + ([dmar_at] if iommu else []))),
             AcpiBlob("FACP", fadt_at, fadt(facs_at, dsdt_at)),
             AcpiBlob("APIC", madt_at, madt_bytes)]
    if hpet:
        blobs.append(AcpiBlob("HPET", hpet_at, hpet_table()))
    if iommu:
        blobs.append(AcpiBlob("DMAR", dmar_at, dmar()))
    blobs += [AcpiBlob("DSDT", dsdt_at, dsdt()), AcpiBlob("FACS", facs_at, facs())]
    tables = AcpiTables(tuple(blobs), BIOS_AREA)
    if tables.end > BIOS_AREA[1]:
        raise ValueError(f"ACPI: the tables end at {tables.end:#x}, past the BIOS area")
    return tables
