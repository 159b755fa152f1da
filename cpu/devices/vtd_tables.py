"""Intel VT-d's in-memory tables: DMA remapping through root, context and second-level
page tables, and interrupt remapping through the interrupt remapping table (Intel
Virtualization Technology for Directed I/O Architecture Specification, revision 3.x;
section titles below are its own). Pure functions over a reader of guest-physical
memory; cpu/devices/vtd.py is the remapping unit that owns the registers pointing at
these tables, and records the faults raised here.

DMA remapping in legacy mode ("Root Entry", "Context Entry", "Second-Level Paging
Entries", "DMA Remapping Fault Conditions")
-----------------------------------------------------------------------------------
A request carries its source-id (bus 15:8, device/function 7:0), an address (the
IOVA) and whether it reads or writes. The root table (4 KiB at the latched RTADDR) has
one 128-bit entry per bus: bit 0 Present, bits 63:12 the context table. The context
table has one 128-bit entry per device/function: bit 0 Present, bit 1 Fault Processing
Disable, bits 3:2 Translation Type, bits 63:12 the second-level page-table pointer;
in the upper half bits 2:0 Address Width and bits 23:8 the domain. The modelled unit
(cpu/devices/vtd.py CAP/ECAP, QEMU's intel-iommu) supports:

* Translation Type 00b (untranslated requests through second-level tables) and 10b
  (pass-through: the IOVA is the address; ECAP.PT = 1). 01b (device-TLB, ECAP.DT = 0)
  and 11b are invalid programming (fault 3h).
* Address Width 001b only (39 bits, 3-level tables: SAGAW = 00010b); others fault 3h.
* Second-level entries: bit 0 Read, bit 1 Write, bit 7 Page Size at levels 3 (1 GiB)
  and 2 (2 MiB) (SLLPS = 0011b), bits 38:12 the address (host address width 39 =
  MGAW + 1). An entry with R = W = 0 is not present. The access rights of a
  translation are the AND of R and W along the walk: a read needs R, a write W, at
  every level, else fault 6h (read) or 5h (write).
* Reserved bits: bits 11:1 and 63:39 of a root entry's lower half and all of its upper
  half; bits 11:4 and 63:39 of a context entry's lower half, bit 7 and bits 63:24 of
  its upper half; bit 11 (SNP: no snoop control), bit 62 (TM: no device-TLB) and bits
  51:39 of a second-level entry, and of a large page also the address bits below its
  size. A set reserved bit in a present entry faults Ah (root), Bh (context) or Ch
  (second level). Ignored bits (second-level 10:8 and 61:52, 63, the context entry's
  AVAIL) are ignored.
* An IOVA at or above 2^39 faults 4h. A table entry the unit cannot read (outside
  RAM) faults 8h (root), 9h (context) or 7h (paging entry).

Fault Processing Disable (the context entry's bit 1) suppresses the recording of the
faults found from that context entry on (2h ... 7h are qualified faults; the root
entry's are not). The request is blocked either way.

Interrupt remapping ("Interrupt Remapping Table Entry (IRTE) for Remapped Interrupts",
"Interrupt Requests in Remappable Format", "Interrupt Remapping Fault Conditions")
-------------------------------------------------------------------------------------
A remappable-format request (address bit 4 = 1) names a handle: address bits 19:5 and
bit 2 (handle[15]); with SHV (address bit 3) the data's bits 15:0 are a subhandle
added to it. Data bits 31:16 are reserved (fault 20h). The index must be below the
table's 2^(S+1) entries (21h); the 128-bit entry at IRTA + 16 * index must be readable
(23h) and present (22h). In xAPIC mode (EIME = 0, as ECAP.EIM = 0) the entry is bit 0
Present, 1 FPD, 2 Destination Mode, 3 Redirection Hint, 4 Trigger Mode, 7:5 Delivery
Mode, 15 IRTE Mode (0: remapped), 23:16 Vector, 47:40 the APIC ID (DST bits 15:8),
79:64 SID, 81:80 SQ, 83:82 SVT; reserved: bits 14:12, 31:24, 39:32, 63:48 and 127:84,
IRTE Mode 1 (posted interrupts: ECAP.PI = 0), the reserved delivery modes 011b and
110b, and SVT 11b (24h). Source validation (26h): SVT 01b compares the requester's
source-id with SID, ignoring function bits as SQ says (00b none, 01b bit 2, 10b bits
2:1, 11b bits 2:0); SVT 10b requires the requester's bus within SID[15:8]..SID[7:0].
A request without a source-id (the I/O APIC's, cpu/q35.py) is not validated. FPD
suppresses recording of the faults found in the entry itself (22h, 24h, 26h).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

Reader = Callable[[int, int], bytes | None]  # guest-physical bytes, or None outside RAM

HAW = 39                                # host address width (MGAW + 1)
AGAW_39 = 1                             # context entry AW encoding of 39 bits
ADDRESS_MASK = ((1 << HAW) - 1) & ~0xFFF
U64 = (1 << 64) - 1

# Fault reasons ("Non-Recoverable Fault Reason Encodings").
ROOT_NOT_PRESENT = 0x1
CONTEXT_NOT_PRESENT = 0x2
CONTEXT_INVALID = 0x3
ADDRESS_BEYOND_MGAW = 0x4
WRITE_DENIED = 0x5
READ_DENIED = 0x6
PAGING_ENTRY_UNREADABLE = 0x7
ROOT_UNREADABLE = 0x8
CONTEXT_UNREADABLE = 0x9
ROOT_RESERVED = 0xA
CONTEXT_RESERVED = 0xB
PAGING_ENTRY_RESERVED = 0xC
IR_REQUEST_RESERVED = 0x20
IR_INDEX_BEYOND_SIZE = 0x21
IR_ENTRY_NOT_PRESENT = 0x22
IR_TABLE_UNREADABLE = 0x23
IR_ENTRY_RESERVED = 0x24
IR_COMPAT_BLOCKED = 0x25
IR_SOURCE_INVALID = 0x26

ROOT_RESERVED_LO = 0xFFE | (U64 & ~((1 << HAW) - 1))
CONTEXT_RESERVED_LO = 0xFF0 | (U64 & ~((1 << HAW) - 1))
CONTEXT_RESERVED_HI = (1 << 7) | (U64 & ~((1 << 24) - 1))
SL_READ = 1 << 0
SL_WRITE = 1 << 1
SL_PAGE_SIZE = 1 << 7
SL_RESERVED = (1 << 11) | (1 << 62) | (((1 << 52) - 1) & ~((1 << HAW) - 1))
TT_MULTI_LEVEL = 0b00
TT_PASS_THROUGH = 0b10

IRTE_RESERVED_LO = (0x7 << 12) | (0xFF << 24) | (0xFF << 32) | (0xFFFF << 48)
IRTE_RESERVED_HI = U64 & ~((1 << 20) - 1)
IRTE_POSTED = 1 << 15
RESERVED_DELIVERY_MODES = (0b011, 0b110)


class RemapFault(Exception):
    """A request the tables block: the fault reason, whether recording it is
    suppressed (FPD), and what was found."""

    def __init__(self, reason: int, detail: str, *, suppressed: bool = False) -> None:
        super().__init__(f"fault {reason:#x}: {detail}")
        self.reason = reason
        self.detail = detail
        self.suppressed = suppressed


def _entry(read: Reader, address: int, size: int, unreadable: int, what: str) -> tuple[int, ...]:
    raw = read(address, size)
    if raw is None:
        raise RemapFault(unreadable, f"{what} at {address:#x} is outside memory")
    return struct.unpack(f"<{size // 8}Q", raw)


@dataclass(frozen=True)
class DmaTranslation:
    """Where a DMA request lands, and how it got there."""

    address: int      # the translated address of the request's first byte
    page_size: int    # the page it is in (pass-through: 4 KiB)
    domain: int


def translate(read: Reader, root_table: int, source_id: int, iova: int, *,
              write: bool) -> DmaTranslation:
    """Translate one DMA request (see the module docstring); `RemapFault` if blocked."""
    bus, dfn = source_id >> 8 & 0xFF, source_id & 0xFF
    lo, hi = _entry(read, root_table + 16 * bus, 16, ROOT_UNREADABLE, f"root entry {bus}")
    if not lo & 1:
        raise RemapFault(ROOT_NOT_PRESENT, f"root entry for bus {bus} not present")
    if lo & ROOT_RESERVED_LO or hi:
        raise RemapFault(ROOT_RESERVED, f"root entry for bus {bus} has reserved bits set "
                         f"({hi:#x}:{lo:#x})")
    where = f"context entry {bus:02x}:{dfn >> 3:02x}.{dfn & 7}"
    lo, hi = _entry(read, (lo & ADDRESS_MASK) + 16 * dfn, 16, CONTEXT_UNREADABLE, where)
    if not lo & 1:
        raise RemapFault(CONTEXT_NOT_PRESENT, f"{where} not present")
    if lo & CONTEXT_RESERVED_LO or hi & CONTEXT_RESERVED_HI:
        raise RemapFault(CONTEXT_RESERVED, f"{where} has reserved bits set ({hi:#x}:{lo:#x})")
    fpd = bool(lo & 2)
    domain = hi >> 8 & 0xFFFF
    tt = lo >> 2 & 3
    if tt == TT_PASS_THROUGH:
        if iova >> HAW:
            raise RemapFault(ADDRESS_BEYOND_MGAW, f"address {iova:#x} at or above 2^{HAW}",
                             suppressed=fpd)
        return DmaTranslation(iova, 1 << 12, domain)
    if tt != TT_MULTI_LEVEL:
        raise RemapFault(CONTEXT_INVALID, f"{where}: translation type {tt:02b}b is not "
                         "supported (device-TLB: ECAP.DT = 0; 11b reserved)", suppressed=fpd)
    if hi & 7 != AGAW_39:
        raise RemapFault(CONTEXT_INVALID, f"{where}: address width {hi & 7:03b}b is not in "
                         "SAGAW (only 001b, 39 bits)", suppressed=fpd)
    if iova >> HAW:
        raise RemapFault(ADDRESS_BEYOND_MGAW, f"IOVA {iova:#x} at or above 2^{HAW}",
                         suppressed=fpd)
    need, denied, kind = (SL_WRITE, WRITE_DENIED, "write") if write else \
        (SL_READ, READ_DENIED, "read")
    table = lo & ADDRESS_MASK
    for level in (3, 2, 1):
        shift = 12 + 9 * (level - 1)
        index = iova >> shift & 0x1FF
        (e,) = _entry(read, table + 8 * index, 8, PAGING_ENTRY_UNREADABLE,
                      f"level-{level} entry for IOVA {iova:#x}")
        if not e & (SL_READ | SL_WRITE):
            raise RemapFault(denied, f"{kind} of IOVA {iova:#x}: level-{level} entry {e:#x} "
                             "not present", suppressed=fpd)
        leaf = level == 1 or bool(e & SL_PAGE_SIZE)
        reserved = SL_RESERVED | (((1 << shift) - 1) & ~0xFFF if leaf else 0)
        if e & reserved:
            raise RemapFault(PAGING_ENTRY_RESERVED, f"level-{level} entry {e:#x} for IOVA "
                             f"{iova:#x} has reserved bits set", suppressed=fpd)
        if not e & need:
            raise RemapFault(denied, f"{kind} of IOVA {iova:#x}: level-{level} entry {e:#x} "
                             f"denies it", suppressed=fpd)
        if leaf:
            size = 1 << shift
            return DmaTranslation((e & ADDRESS_MASK) | (iova & (size - 1)), size, domain)
        table = e & ADDRESS_MASK
    raise AssertionError("unreachable: level 1 is always a leaf")


@dataclass(frozen=True)
class RemappedInterrupt:
    """What an IRTE turns a request into."""

    index: int
    vector: int
    delivery_mode: int
    logical: bool
    redirection_hint: bool
    level: bool
    destination: int   # the xAPIC ID


def remappable_index(address: int, data: int) -> int:
    """The interrupt index of a remappable-format request (address bit 4 set)."""
    if data >> 16:
        raise RemapFault(IR_REQUEST_RESERVED, f"interrupt request data {data:#x} has reserved "
                         "bits 31:16 set")
    handle = (address >> 5 & 0x7FFF) | (address >> 2 & 1) << 15
    if address & 1 << 3:  # SHV: the data carries a subhandle
        handle = (handle + (data & 0xFFFF)) & 0xFFFF
    return handle


def remap_interrupt(read: Reader, table: int, size_field: int, index: int,
                    source_id: int | None) -> RemappedInterrupt:
    """Look up interrupt `index` in the table at `table` with IRTA.S = `size_field`
    (see the module docstring); `RemapFault` if blocked."""
    entries = 1 << (size_field + 1)
    if index >= entries:
        raise RemapFault(IR_INDEX_BEYOND_SIZE, f"interrupt index {index} beyond the table's "
                         f"{entries} entries")
    lo, hi = _entry(read, table + 16 * index, 16, IR_TABLE_UNREADABLE, f"IRTE {index}")
    fpd = bool(lo & 2)
    if not lo & 1:
        raise RemapFault(IR_ENTRY_NOT_PRESENT, f"IRTE {index} not present", suppressed=fpd)
    mode = lo >> 5 & 7
    svt = hi >> 18 & 3
    if lo & (IRTE_RESERVED_LO | IRTE_POSTED) or hi & IRTE_RESERVED_HI or \
            mode in RESERVED_DELIVERY_MODES or svt == 0b11:
        raise RemapFault(IR_ENTRY_RESERVED, f"IRTE {index} ({hi:#x}:{lo:#x}) has reserved "
                         "bits or values set", suppressed=fpd)
    if source_id is not None and svt:
        sid = hi & 0xFFFF
        if svt == 0b01:
            ignore = (0, 0b100, 0b110, 0b111)[hi >> 16 & 3]
            valid = (sid & ~ignore) == (source_id & ~ignore)
        else:
            valid = sid >> 8 <= source_id >> 8 <= sid & 0xFF
        if not valid:
            raise RemapFault(IR_SOURCE_INVALID, f"IRTE {index}: requester {source_id:#06x} fails "
                             f"source validation (SID {sid:#06x}, SVT {svt:02b}b, SQ "
                             f"{hi >> 16 & 3:02b}b)", suppressed=fpd)
    return RemappedInterrupt(index=index, vector=lo >> 16 & 0xFF, delivery_mode=mode,
                             logical=bool(lo & 4), redirection_hint=bool(lo & 8),
                             level=bool(lo & 16), destination=lo >> 40 & 0xFF)
