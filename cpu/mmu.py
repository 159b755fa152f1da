"""Guest 4-level paging, walked in Python from guest memory (SDM Vol. 3A "4-Level
Paging", "Access Rights", "Protection Keys", "Page-Fault Exceptions", "Accessed and
Dirty Flags").

The walk is used twice: by the engine's TLB-fill hook for the guest's own accesses
(Unicorn's `UC_TLB_VIRTUAL` mode with a `UC_HOOK_TLB_FILL` callback), and by the delivery
model for implicit supervisor accesses (IDT/GDT/TSS reads, frame pushes). Rights combine
over all levels: writes need R/W=1 everywhere (supervisor writes only when CR0.WP=1), user
accesses need U/S=1 everywhere, fetches are refused if any level has XD=1 (EFER.NXE=1). The
walk sets Accessed in every entry it uses and Dirty in the leaf on a write, only when the
access succeeds.

An address is a *user-mode address* when U/S = 1 at every level, else a supervisor-mode
address. On top of the rights above ("Determination of Access Rights"):

* SMEP (CR4.SMEP = 1): a supervisor-mode fetch from a user-mode address faults.
* SMAP (CR4.SMAP = 1): a supervisor-mode data access to a user-mode address faults,
  unless it is an *explicit* access made with EFLAGS.AC = 1 (`smap_exempt`). Implicit
  supervisor-mode accesses (the IDT, GDT, TSS and the frames delivery pushes, whatever
  the CPL) never are. The engine keeps separate TLB entries for supervisor accesses
  with AC = 0 and AC = 1 (QEMU's two kernel MMU indexes), so the fill hook, which reads
  AC, answers each kind exactly and STAC/CLAC/POPF need no flush.
* Protection keys (CR4.PKE = 1 for user-mode addresses, CR4.PKS = 1 for supervisor-mode
  addresses): bits 62:59 of the leaf entry select key i; AD_i (bit 2i of PKRU/PKRS)
  forbids every data access, WD_i (bit 2i+1) forbids writes by user-mode accesses, and
  by supervisor-mode accesses when CR0.WP = 1. Fetches are never checked. A refusal
  sets the PK bit (5) of the error code; it is checked after the rights above, so a
  fault those already raise has PK = 0 (as QEMU's walk orders them).
"""

from __future__ import annotations

import operator
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from cpu.memory import PhysicalMemory
from idt.error_codes import PFErr
from idt.state import ArchFault
from idt.vectors import Vector

MAXPHYADDR = 40
PTE_P = 1 << 0
PTE_W = 1 << 1
PTE_U = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_XD = 1 << 63
ADDR_MASK = ((1 << MAXPHYADDR) - 1) & ~0xFFF
# Bits MAXPHYADDR..51 are reserved in every entry (XD is checked separately).
RSVD_HIGH = ((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1)

CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_PKS = 1 << 24
PTE_PKEY_SHIFT = 59
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11


class Access(IntEnum):
    READ = 0
    WRITE = 1
    FETCH = 2


@dataclass(frozen=True)
class PagingControl:
    cr3: int
    cr0: int
    cr4: int
    efer: int
    pkru: int = 0  # PKRU (read only when CR4.PKE = 1)
    pkrs: int = 0  # IA32_PKRS (read only when CR4.PKS = 1)

    @property
    def nxe(self) -> bool:
        return bool(self.efer & EFER_NXE)


@dataclass(frozen=True)
class Translation:
    paddr: int  # physical address of the 4-KiB page holding the linear address
    writable: bool  # the rights allow a write by this privilege
    executable: bool
    dirty: bool  # the leaf's D bit (after this walk)
    readable: bool = True  # a data read is allowed (SMAP and protection keys may refuse)


LEVEL_NAMES = ("PML4E", "PDPTE", "PDE", "PTE")


def walk(mem: PhysicalMemory, ctl: PagingControl, linear: int, access: Access, *, user: bool,
         set_ad: bool = True, smap_exempt: bool = False, keys: bool = True) -> Translation:
    """Translate `linear` for `access`; raise `ArchFault(#PF, code, cr2=linear)` if refused.

    `smap_exempt`: a supervisor-mode access SMAP lets through (explicit, EFLAGS.AC = 1);
    `keys`: False for an inspection by the emulator, which protection keys do not limit.
    A paging-structure entry outside guest memory reads as not present (idtlab has no
    memory there), which is what a zeroed table would give.
    """
    return walk_entries(mem, ctl, linear, access, user=user, set_ad=set_ad,
                        smap_exempt=smap_exempt, keys=keys)[0]


class WalkCache:
    """Walks, memoised and *validated on every use*: a hit re-reads the paging-structure
    entries the walk read and is taken only if all of them still hold the values the
    walk left there (A/D included). So a hit returns exactly what a fresh walk would
    (the same translation, or the same #PF), and sets no bit a fresh walk would set; it
    only saves the walk. This is not a model of the hardware TLB (which may keep stale
    translations until INVLPG or a CR3 write): it never changes a result, whatever the
    guest does to its tables."""

    LIMIT = 1 << 16  # walks kept; a guest sweeping more pages than this re-walks

    def __init__(self, mem: PhysicalMemory) -> None:
        self.mem = mem
        # The (address, value) pairs of the entries the last successful walk read, and
        # its check: `last_check[0](words) == last_check[1]` while they all still hold.
        self.last_used: tuple[tuple[int, int], ...] = ()
        self.last_check: tuple[Callable[[Any], Any] | None, Any] = (None, None)
        # Guest memory as 64-bit words: paging-structure entries are 8-byte aligned, so a
        # hit re-reads all of its entries with one `itemgetter` call (`_check`).
        self._words = (mem.view.cast("Q") if mem.size % 8 == 0 and sys.byteorder == "little"
                       else None)
        self._entries: dict[tuple[int, int, int, int, int, int, int, int, bool, bool, bool,
                                  int],
                            tuple[Callable[[Any], Any] | None, Any,
                                  tuple[tuple[int, int], ...], Translation | ArchFault]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def _check(self, used: tuple[tuple[int, int], ...]) -> tuple[Callable[[Any], Any] | None, Any]:
        """(getter, expected): `getter(words) == expected` while every entry of `used`
        still holds its value (getter None: nothing to re-read)."""
        if not used:
            return None, None
        if self._words is None or any(a & 7 for a, _v in used):
            view = self.mem.view
            addrs = tuple(a for a, _v in used)
            return (lambda _w: tuple(struct.unpack_from("<Q", view, a)[0] for a in addrs),
                    tuple(v for _a, v in used))
        get = operator.itemgetter(*(a >> 3 for a, _v in used))
        return get, (used[0][1] if len(used) == 1 else tuple(v for _a, v in used))

    def walk(self, ctl: PagingControl, linear: int, access: Access, *, user: bool,
             stage2: Stage2 | None = None, stage2_generation: int = 0,
             smap_exempt: bool = False, keys: bool = True) -> Translation:
        """A validated walk. With `stage2`, `stage2_generation` must change whenever the
        second stage's rights change (a hit re-validates the guest entries only)."""
        key = (linear >> 12, ctl.cr3, ctl.cr0, ctl.cr4, ctl.efer, ctl.pkru, ctl.pkrs,
               int(access), user, smap_exempt, keys,
               -1 if stage2 is None else stage2_generation)
        hit = self._entries.get(key)
        if hit is not None:
            get, expected, used, result = hit
            if get is None or get(self._words) == expected:
                if isinstance(result, ArchFault):
                    raise ArchFault(result.vector, result.error_code, cr2=linear, why=result.why)
                self.last_used = used
                self.last_check = (get, expected)
                return result
        if len(self._entries) >= self.LIMIT:
            self._entries.clear()
        read: list[tuple[int, int]] = []
        try:
            t, used = walk_entries(self.mem, ctl, linear, access, user=user, read=read,
                                   stage2=stage2, smap_exempt=smap_exempt, keys=keys)
        except ArchFault as fault:
            got = tuple(read)
            self._entries[key] = (*self._check(got), got, fault)
            raise
        check = self._check(used)
        self._entries[key] = (*check, used, t)
        self.last_used = used
        self.last_check = check
        return t

    def holds(self, check: tuple[Callable[[Any], Any] | None, Any]) -> bool:
        """Whether the entries behind `check` (a `last_check`) all still hold."""
        get, expected = check
        return get is None or get(self._words) == expected


# A second translation stage (EPT): (guest-physical address, access, linear address,
# final) -> host-physical address, or raises (an EPT violation). `final` is False for the
# accesses to guest paging-structure entries, True for the translated address itself.
Stage2 = Callable[[int, Access, int, bool], int]


def walk_entries(mem: PhysicalMemory, ctl: PagingControl, linear: int, access: Access, *,
                 user: bool, set_ad: bool = True, read: list[tuple[int, int]] | None = None,
                 stage2: Stage2 | None = None, smap_exempt: bool = False, keys: bool = True,
                 ) -> tuple[Translation, tuple[tuple[int, int], ...]]:
    """`walk`, also returning the (address, value after the walk) of each entry used.
    `read`, if given, receives every (address, value) read, also when the walk faults
    (an entry outside guest memory is not recorded: it cannot change).

    With `stage2`, the guest's paging-structure entries are guest-physical: each read of
    one is translated first (a read), each A/D update too (a write, SDM "EPT and Accessed
    and Dirty Flags" treats them as writes), and so is the final page (the access
    itself). The returned address and the recorded entry addresses are host-physical."""
    if not ctl.cr0 & CR0_PG:
        # Paging off (a multiboot image's 32-bit entry code, before it enables long
        # mode): linear addresses are physical, every access is allowed (SDM Vol. 3A
        # "Paging Modes and Control Bits"). No entries are read.
        return Translation(linear & 0xFFFFF000, True, True, True), ()
    ec_base = (PFErr.W if access is Access.WRITE else 0) | (PFErr.U if user else 0)
    if access is Access.FETCH and (ctl.nxe or ctl.cr4 & CR4_SMEP):
        ec_base |= PFErr.ID

    def fault(extra: int, why: str) -> ArchFault:
        return ArchFault(Vector.PF, int(ec_base | extra), cr2=linear, why=why)

    table = ctl.cr3 & ADDR_MASK
    entries: list[tuple[int, int]] = []
    writable = user_ok = True
    nx = False
    page_paddr = 0
    for level in range(4):
        shift = 39 - 9 * level
        entry_addr = table + ((linear >> shift) & 0x1FF) * 8
        if stage2 is not None:
            entry_addr = stage2(entry_addr, Access.READ, linear, False)
        entry = mem.read_u64(entry_addr) if mem.contains(entry_addr, 8) else 0
        if read is not None and mem.contains(entry_addr, 8):
            read.append((entry_addr, entry))
        if not entry & PTE_P:
            raise fault(0, f"{LEVEL_NAMES[level]} not present")
        rsvd = bool(entry & RSVD_HIGH) or (bool(entry & PTE_XD) and not ctl.nxe)
        is_leaf = level == 3 or (level in (1, 2) and bool(entry & PTE_PS))
        if level == 0 and entry & PTE_PS:
            rsvd = True  # PS is reserved in a PML4E
        if is_leaf and level in (1, 2):
            # Large page: bits 12..(shift-1) of the address field are reserved, except PAT (bit 12).
            low = entry & ((1 << shift) - 1) & ~0xFFF & ~(1 << 12)
            rsvd = rsvd or bool(low)
        if rsvd:
            raise fault(PFErr.P | PFErr.RSVD, f"reserved bit set in {LEVEL_NAMES[level]}")
        entries.append((entry_addr, entry))
        writable = writable and bool(entry & PTE_W)
        user_ok = user_ok and bool(entry & PTE_U)
        nx = nx or (ctl.nxe and bool(entry & PTE_XD))
        if is_leaf:
            size_mask = (1 << shift) - 1
            page_paddr = ((entry & ADDR_MASK & ~size_mask) | (linear & size_mask)) & ~0xFFF
            break
        table = entry & ADDR_MASK

    # Rights (SDM "Access Rights"), for the access made and for the two other kinds the
    # engine's TLB entry will also serve (`Translation`).
    if user and not user_ok:
        raise fault(PFErr.P, "user access to a supervisor page")
    if access is Access.WRITE and not writable and (user or ctl.cr0 & CR0_WP):
        raise fault(PFErr.P, "write to a read-only page")
    smep = not user and user_ok and bool(ctl.cr4 & CR4_SMEP)
    if access is Access.FETCH and nx:
        raise fault(PFErr.P, "fetch from an XD page")
    if access is Access.FETCH and smep:
        raise fault(PFErr.P, "SMEP: supervisor fetch from a user page")
    smap = not user and user_ok and bool(ctl.cr4 & CR4_SMAP) and not smap_exempt
    if access is not Access.FETCH and smap:
        raise fault(PFErr.P, "SMAP: supervisor data access to a user page")
    key_ad = key_wd = False
    if keys:
        pkr = (ctl.pkru if ctl.cr4 & CR4_PKE else 0) if user_ok else \
            (ctl.pkrs if ctl.cr4 & CR4_PKS else 0)
        key = (entries[-1][1] >> PTE_PKEY_SHIFT) & 0xF
        key_ad = bool(pkr >> (2 * key) & 1)
        key_wd = bool(pkr >> (2 * key) & 2) and bool(user or ctl.cr0 & CR0_WP)
        if access is not Access.FETCH and (key_ad or (key_wd and access is Access.WRITE)):
            name = "PKRU" if user_ok else "PKRS"
            what = "access-disabled" if key_ad else "write-disabled"
            raise fault(PFErr.P | PFErr.PK, f"{name}: key {key} {what}")

    leaf_addr, leaf = entries[-1]
    after: list[tuple[int, int]] = []
    for addr, entry in entries:
        new = entry
        if set_ad:
            new |= PTE_A
            if addr == leaf_addr and access is Access.WRITE:
                new |= PTE_D
            if new != entry:
                if stage2 is not None:
                    # idtlab's EPT maps guest-physical to the same host-physical
                    # address (it varies rights, never addresses), so `addr` serves as
                    # the guest-physical address of the entry.
                    stage2(addr, Access.WRITE, linear, False)
                mem.write_u64(addr, new)
        after.append((addr, new))
    if set_ad and access is Access.WRITE:
        leaf |= PTE_D
    readable = not smap and not key_ad
    may_write = (writable or (not user and not ctl.cr0 & CR0_WP)) and readable and not key_wd
    if stage2 is not None:
        # With the offset of the access: an EPT violation reports the full GPA.
        page_paddr = stage2(page_paddr | (linear & 0xFFF), access, linear, True) & ~0xFFF
    return Translation(page_paddr, may_write, not nx and not smep, bool(leaf & PTE_D),
                       readable), tuple(after)


def identity_map_size(memsize: int, override_pages: Iterable[int]) -> int:
    """Bytes of tables `build_identity_map` writes for these overrides (known before
    writing any: a caller can refuse a configuration that does not fit)."""
    two_mb = 1 << 21
    split = {page & ~(two_mb - 1) for page in override_pages}
    regions = set(range(0, memsize, two_mb)) | split
    pds = {r >> 30 for r in regions}
    pdpts = {r >> 39 for r in regions}
    return 4096 * (1 + len(pdpts) + len(pds) + len(split))


def build_identity_map(mem: PhysicalMemory, base: int, memsize: int,
                       overrides: dict[int, int]) -> tuple[int, int]:
    """Write 4-level tables at `base` identity-mapping [0, memsize) with 2-MiB pages
    (present, writable, user), split into 4-KiB tables where `overrides` (linear page ->
    full PTE value) needs it. Returns (cr3, end of the tables).
    """
    two_mb = 1 << 21
    nxt = base

    def alloc() -> int:
        nonlocal nxt
        page = nxt
        nxt += 4096
        mem.write(page, bytes(4096))
        return page

    pml4 = alloc()
    pdpts: dict[int, int] = {}
    pds: dict[tuple[int, int], int] = {}
    default = PTE_P | PTE_W | PTE_U

    def pd_for(linear: int) -> int:
        i4, i3 = (linear >> 39) & 0x1FF, (linear >> 30) & 0x1FF
        if i4 not in pdpts:
            pdpts[i4] = alloc()
            mem.write_u64(pml4 + 8 * i4, pdpts[i4] | default)
        if (i4, i3) not in pds:
            pds[(i4, i3)] = alloc()
            mem.write_u64(pdpts[i4] + 8 * i3, pds[(i4, i3)] | default)
        return pds[(i4, i3)]

    split = {page & ~(two_mb - 1) for page in overrides}
    regions = sorted({r for r in range(0, memsize, two_mb)} | split)
    for region in regions:
        pd = pd_for(region)
        slot = pd + 8 * ((region >> 21) & 0x1FF)
        if region not in split:
            mem.write_u64(slot, region | default | PTE_PS)
            continue
        pt = alloc()
        mem.write_u64(slot, pt | default)
        ptes = []
        for page in range(region, region + two_mb, 4096):
            pte = overrides.get(page)
            if pte is None:
                pte = (page | default) if page < memsize else 0
            ptes.append(pte & (2**64 - 1))
        mem.write(pt, struct.pack("<512Q", *ptes))  # the whole table in one write
    return pml4, nxt
