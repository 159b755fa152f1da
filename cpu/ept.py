"""The host's extended page tables: a real 4-level EPT structure translating guest-physical
to host-physical addresses (SDM Vol. 3C "EPT Translation Mechanism", "EPT Violations",
"EPT Misconfigurations"; Bochs paging.cc `translate_guest_physical`; Linux
arch/x86/include/asm/vmx.h `VMX_EPT_SUPPRESS_VE_BIT`).

The tables live in a host-side `PhysicalMemory` of their own, which the guest cannot
address. Each entry is 8 bytes:

    bit  0      read access
    bit  1      write access
    bit  2      execute access              (bits 2:0 = 0: the entry is not present)
    bits 5:3    EPT memory type (leaves; idtlab writes WB = 6)
    bit  7      leaf ("page") in a PDPTE (1 GiB) or PDE (2 MiB); reserved in a PML4E
    bits 51:12  address of the next table, or of the page
    bit  63     suppress #VE (leaves and not-present entries only; see below)

A guest-physical address indexes the PML4 with bits 47:39, the PDPT with 38:30, the PD
with 29:21 and the page table with 20:12. An access is allowed when the AND of the
rights of all entries used permits it: a read needs R, a write W, a fetch X (an
execute-only page, X without R, is allowed: idtlab's CPU advertises it). Otherwise it is
an `EptViolation`, which reports the AND (all False when the walk stopped at a
not-present entry) and the suppress-#VE bit of exactly the entry that counts: the
not-present entry that stopped the walk, or the leaf; never a present non-leaf (SDM 3C
"Convertible EPT Violations"). A present entry with W but not R, bit 7 in a PML4E, a
reserved memory type (2, 3, 7) or address bits below a large page's alignment is an
`EptMisconfig` instead.

Layout choices: `Ept(size)` identity-maps [0, size rounded up to 2 MiB) with 2-MiB RWX
leaves (suppress-#VE = 0), so GPA == HPA there. Every new table is filled with entries
that are not present and have bit 63 = 1, as KVM does (SHADOW_NONPRESENT_VALUE): with
zeroed tables every not-present violation would be convertible. A table created under a
not-present entry inherits that entry's bit 63 instead, and a table created by splitting
a leaf copies the leaf's rights, memory type and bit 63 into all 512 entries, so neither
changes what any other address translates to. Table addresses are offsets in the EPT's
own buffer; leaf addresses are host-physical addresses of guest RAM (`cpu.memory`).

`generation` changes on every modification; callers key caches on it. Change the tables
only through the methods (writing `mem` directly bypasses `generation`).
"""

from __future__ import annotations

import struct

from cpu.memory import PAGE, PhysicalMemory
from cpu.mmu import Access

EPT_R = 1 << 0
EPT_W = 1 << 1
EPT_X = 1 << 2
EPT_RWX = EPT_R | EPT_W | EPT_X
EPT_MT_SHIFT = 3
EPT_MT_MASK = 7 << EPT_MT_SHIFT
EPT_MT_WB = 6 << EPT_MT_SHIFT
EPT_MT_RESERVED = (2, 3, 7)
EPT_IGNORE_PAT = 1 << 6
EPT_LARGE = 1 << 7
EPT_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
EPT_SUPPRESS_VE = 1 << 63
# What a new table is filled with unless the caller chooses otherwise (KVM's
# SHADOW_NONPRESENT_VALUE): not present, suppress #VE.
EPT_NONPRESENT_SUPPRESSED = EPT_SUPPRESS_VE
# Bits a split leaf passes on to the 512 entries that replace it.
_INHERITED = EPT_RWX | EPT_MT_MASK | EPT_IGNORE_PAT | EPT_SUPPRESS_VE

EXIT_REASON_EPT_MISCONFIG = 49
GPA_BITS = 48  # a 4-level EPT translates 48-bit guest-physical addresses
ENTRIES = 512
TABLE_SIZE = ENTRIES * 8
LEVEL_NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}
LARGE_PAGE = {3: 1 << 30, 2: 1 << 21}
TWO_MB = 1 << 21

TABLE_MEMORY_INITIAL = 2 << 20
TABLE_MEMORY_MAX = 256 << 20

_NEEDED = {Access.READ: EPT_R, Access.WRITE: EPT_W, Access.FETCH: EPT_X}


def rights_str(rights: int) -> str:
    """"RW-" style, for traces."""
    return "".join(c if rights & bit else "-" for c, bit in (("R", EPT_R), ("W", EPT_W), ("X", EPT_X)))


class EptViolation(Exception):
    """An access the EPT refuses (SDM 3C "EPT Violations").

    `readable/writable/executable`: the AND of bits 0-2 over the entries used (all False
    when the walk stopped at a not-present entry); `suppress_ve` and `level`: bit 63 and
    level (4 = PML4E ... 1 = PTE) of the entry that counts. `gla` and `final` start as
    "unknown" and are filled in by the caller that knows the linear access (qualification
    bits 7 and 8)."""

    def __init__(self, *, gpa: int, access: Access, readable: bool, writable: bool,
                 executable: bool, suppress_ve: bool, level: int, why: str) -> None:
        self.gpa = gpa
        self.access = access
        self.readable = readable
        self.writable = writable
        self.executable = executable
        self.suppress_ve = suppress_ve
        self.level = level
        self.why = why
        self.gla: int | None = None
        self.final: bool = True
        super().__init__(why)


class EptMisconfig(Exception):
    """A present EPT entry with an illegal combination (SDM 3C "EPT Misconfigurations"):
    a VM exit with reason 49, never a #VE."""

    def __init__(self, *, gpa: int, level: int, entry: int, why: str) -> None:
        self.gpa = gpa
        self.level = level
        self.entry = entry
        self.why = why
        super().__init__(f"EPT misconfiguration at GPA {gpa:#x}: {LEVEL_NAMES[level]} {entry:#018x} {why}")


class EptTablesExhausted(MemoryError):
    """The host buffer for EPT tables reached `TABLE_MEMORY_MAX`."""


def _index(gpa: int, level: int) -> int:
    return (gpa >> _SHIFT[level]) & 0x1FF


def _is_leaf(entry: int, level: int) -> bool:
    return level == 1 or (level in LARGE_PAGE and bool(entry & EPT_LARGE))


class Ept:
    """A 4-level EPT over guest memory of `guest_memory_size` bytes (see the module
    docstring). `nonpresent_suppress_ve` is bit 63 of the entries new tables are filled
    with (True: KVM's behaviour; False: zeroed tables)."""

    def __init__(self, guest_memory_size: int, *, nonpresent_suppress_ve: bool = True) -> None:
        if not 0 < guest_memory_size <= 1 << GPA_BITS:
            raise ValueError(f"guest memory size {guest_memory_size:#x} outside (0, 2^{GPA_BITS}]")
        self.guest_memory_size = guest_memory_size
        self.fill = EPT_NONPRESENT_SUPPRESSED if nonpresent_suppress_ve else 0
        self.mem = PhysicalMemory(TABLE_MEMORY_INITIAL)
        self._next = 0
        self._free: list[int] = []
        self.generation = 0
        self._memo: dict[tuple[int, Access], int] = {}
        self._memo_generation = 0
        self._pml4 = self._alloc(self.fill)
        top = -(-guest_memory_size // TWO_MB) * TWO_MB
        for region in range(0, top, TWO_MB):
            slot = self._slot(region, 2, create=True)
            self.mem.write_u64(slot, region | EPT_RWX | EPT_MT_WB | EPT_LARGE)

    @property
    def eptp(self) -> int:
        """Address of the PML4 table in the EPT's host memory."""
        return self._pml4

    # -- translation ---------------------------------------------------------------------
    def translate(self, gpa: int, access: Access) -> int:
        """The host-physical address of `gpa` for `access`; raises `EptViolation` or
        `EptMisconfig` (SDM 3C "EPT Translation Mechanism").

        Successful translations are memoised per 4-KiB page and access until the tables
        change (`generation`): the machine translates each guest paging-structure entry
        through EPT on every guest walk."""
        if self._memo_generation != self.generation:
            self._memo.clear()
            self._memo_generation = self.generation
        key = (gpa >> 12, access)
        page = self._memo.get(key)
        if page is not None:
            return page | (gpa & 0xFFF)
        hpa = self._translate(gpa, access)
        self._memo[key] = hpa & ~0xFFF
        return hpa

    def _translate(self, gpa: int, access: Access) -> int:
        self._check_gpa(gpa)
        read_u64 = self.mem.read_u64
        table = self._pml4
        rights = EPT_RWX
        verb = access.name.lower()
        for level in (4, 3, 2, 1):
            entry = read_u64(table + 8 * _index(gpa, level))
            name = LEVEL_NAMES[level]
            suppress = bool(entry & EPT_SUPPRESS_VE)
            if not entry & EPT_RWX:
                raise EptViolation(
                    gpa=gpa, access=access, readable=False, writable=False, executable=False,
                    suppress_ve=suppress, level=level,
                    why=f"{verb} of GPA {gpa:#x}: EPT {name} not present (suppress-#VE={int(suppress)})")
            if entry & EPT_W and not entry & EPT_R:
                raise EptMisconfig(gpa=gpa, level=level, entry=entry,
                                   why="has write permission without read permission")
            if level == 4 and entry & EPT_LARGE:
                raise EptMisconfig(gpa=gpa, level=level, entry=entry, why="has bit 7 (reserved) set")
            rights &= entry
            if not _is_leaf(entry, level):
                table = entry & EPT_ADDR_MASK
                continue
            if (entry & EPT_MT_MASK) >> EPT_MT_SHIFT in EPT_MT_RESERVED:
                raise EptMisconfig(gpa=gpa, level=level, entry=entry, why="has a reserved memory type")
            size = 1 << _SHIFT[level]
            if entry & EPT_ADDR_MASK & (size - 1):
                raise EptMisconfig(gpa=gpa, level=level, entry=entry,
                                   why="has address bits set below its page alignment (reserved)")
            if not rights & _NEEDED[access]:
                raise EptViolation(
                    gpa=gpa, access=access, readable=bool(rights & EPT_R),
                    writable=bool(rights & EPT_W), executable=bool(rights & EPT_X),
                    suppress_ve=suppress, level=level,
                    why=f"{verb} of GPA {gpa:#x}: EPT rights {rights_str(rights)} (leaf {name}, "
                        f"suppress-#VE={int(suppress)})")
            return (entry & EPT_ADDR_MASK & ~(size - 1)) | (gpa & (size - 1))
        raise AssertionError("unreachable: level 1 is always a leaf")

    # -- inspection ----------------------------------------------------------------------
    def entry(self, gpa: int, level: int) -> int:
        """The entry at `level` (4 = PML4E ... 1 = PTE) used for `gpa`. ValueError if the
        walk does not reach that level (an entry above is not present or a leaf)."""
        return self.mem.read_u64(self._slot(gpa, level, create=False))

    def set_entry(self, gpa: int, level: int, value: int) -> None:
        """Write the entry at `level` for `gpa` verbatim (tests, hand-made corner cases).
        The level must already be reachable (see `entry`); nothing below is freed."""
        if not 0 <= value < 1 << 64:
            raise ValueError(f"EPT entry {value:#x} does not fit in 64 bits")
        self.mem.write_u64(self._slot(gpa, level, create=False), value)
        self.generation += 1

    # -- changes -------------------------------------------------------------------------
    def set_range(self, gpa: int, size: int, *, read: bool, write: bool, execute: bool,
                  suppress_ve: bool = False) -> None:
        """Give every 4-KiB page of [gpa, gpa+size) these rights in its own PTE (GPA ==
        HPA), splitting larger leaves and creating tables as needed. All three False
        makes the PTEs not present, with bit 63 = `suppress_ve`. W without R is written
        as asked (translation then reports an `EptMisconfig`)."""
        if gpa % PAGE or size % PAGE or size <= 0:
            raise ValueError(f"range {gpa:#x}+{size:#x} is not a nonempty run of 4-KiB pages")
        self._check_gpa(gpa + size - 1)
        rights = (EPT_R if read else 0) | (EPT_W if write else 0) | (EPT_X if execute else 0)
        sve = EPT_SUPPRESS_VE if suppress_ve else 0
        for page in range(gpa, gpa + size, PAGE):
            slot = self._slot(page, 1, create=True)
            self.mem.write_u64(slot, (page | rights | EPT_MT_WB | sve) if rights else sve)
        self.generation += 1

    def set_not_present(self, gpa: int, level: int, *, suppress_ve: bool) -> None:
        """Make the entry at `level` (4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE) covering
        `gpa` not present, with bit 63 = `suppress_ve`, dropping the tables below it.
        Tables above it are created (or leaves above it split) when needed."""
        self._check_gpa(gpa)
        slot = self._slot(gpa, level, create=True)
        old = self.mem.read_u64(slot)
        if old & EPT_RWX and not _is_leaf(old, level):
            self._release(old & EPT_ADDR_MASK, level - 1)
        self.mem.write_u64(slot, EPT_SUPPRESS_VE if suppress_ve else 0)
        self.generation += 1

    def fix(self, gpa: int) -> None:
        """Make the 4-KiB page holding `gpa` present and RWX (suppress-#VE = 0): what a
        host does about a violation before it resumes the guest."""
        self.set_range(gpa & ~(PAGE - 1), PAGE, read=True, write=True, execute=True)

    # -- tables --------------------------------------------------------------------------
    def _check_gpa(self, gpa: int) -> None:
        if not 0 <= gpa < 1 << GPA_BITS:
            raise ValueError(f"guest-physical address {gpa:#x} outside the {GPA_BITS}-bit EPT space")

    def _slot(self, gpa: int, level: int, *, create: bool) -> int:
        """Host address of the level-`level` entry for `gpa`. With `create`, a not-present
        entry above it gets a new table (inheriting its bit 63) and a leaf above it is
        split; without, either is a ValueError."""
        if level not in LEVEL_NAMES:
            raise ValueError(f"EPT level {level} does not exist (4 = PML4E ... 1 = PTE)")
        table = self._pml4
        for above in range(4, level, -1):
            addr = table + 8 * _index(gpa, above)
            entry = self.mem.read_u64(addr)
            present = bool(entry & EPT_RWX)
            if present and not _is_leaf(entry, above):
                table = entry & EPT_ADDR_MASK
                continue
            if not create:
                state = "a leaf" if present else "not present"
                raise ValueError(f"no EPT {LEVEL_NAMES[level]} for GPA {gpa:#x}: the "
                                 f"{LEVEL_NAMES[above]} is {state}")
            # Splitting copies the leaf; a new table inherits the not-present entry's bit 63.
            table = self._split(entry, above) if present else self._alloc(entry & EPT_SUPPRESS_VE)
            self.mem.write_u64(addr, table | EPT_RWX)
        return table + 8 * _index(gpa, level)

    def _split(self, leaf: int, level: int) -> int:
        """A new table of `level - 1` entries mapping what `leaf` mapped, same rights."""
        child = level - 1
        base = leaf & EPT_ADDR_MASK & ~(LARGE_PAGE[level] - 1)
        step = 1 << _SHIFT[child]
        keep = (leaf & _INHERITED) | (EPT_LARGE if child in LARGE_PAGE else 0)
        table = self._alloc(0)
        raw = struct.pack(f"<{ENTRIES}Q", *((base + i * step) | keep for i in range(ENTRIES)))
        self.mem.write(table, raw)
        return table

    def _alloc(self, fill: int) -> int:
        """A 4-KiB table with every entry = `fill`."""
        if self._free:
            table = self._free.pop()
        else:
            if self._next + TABLE_SIZE > self.mem.size:
                self._grow()
            table = self._next
            self._next += TABLE_SIZE
        self.mem.write(table, struct.pack("<Q", fill) * ENTRIES)
        return table

    def _grow(self) -> None:
        size = self.mem.size * 2
        if size > TABLE_MEMORY_MAX:
            raise EptTablesExhausted(f"EPT tables need more than {TABLE_MEMORY_MAX >> 20} MiB of host memory")
        bigger = PhysicalMemory(size)
        bigger.write(0, self.mem.read(0, self.mem.size))
        self.mem = bigger

    def _release(self, table: int, level: int) -> None:
        """Return `table` (of `level` entries) and every table below it to the allocator."""
        if level > 1:
            for i in range(ENTRIES):
                entry = self.mem.read_u64(table + 8 * i)
                if entry & EPT_RWX and not _is_leaf(entry, level):
                    self._release(entry & EPT_ADDR_MASK, level - 1)
        self._free.append(table)

    @property
    def tables_in_use(self) -> int:
        return self._next // TABLE_SIZE - len(self._free)
