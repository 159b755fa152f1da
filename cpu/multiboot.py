"""Booting a multiboot v1 kernel unchanged, as QEMU's `-kernel` or GRUB would (The
Multiboot Specification version 0.6.96; section titles below are its own).

Loading ("OS image format", "Boot information format")
-------------------------------------------------------
* The image is an ELF file: ELF32 (`EM_386`, what QEMU's -kernel accepts, e.g. a 64-bit
  kernel converted with `objcopy -O elf32-i386`) or ELF64 (`EM_X86_64`, as GRUB accepts).
  Its multiboot header is the first 4-byte aligned occurrence of 0x1BADB002 in the first
  8 KiB of the file whose checksum holds (magic + flags + checksum = 0 mod 2^32).
* Header flags: bit 0 (page-align modules) is satisfied (there are no modules), bit 1
  (memory information) always is; bit 2 (a video mode) and bit 16 (load addresses in the
  header instead of the ELF program headers) are refused by name, as is any other bit
  of the required low half. Bits 17-31 are optional features and ignored.
* Every PT_LOAD segment is copied to its physical address, the rest of its memory size
  zeroed (BSS); a segment outside RAM is refused. The entry point is e_entry (translated
  to a physical address when it falls in a segment whose virtual and physical addresses
  differ) and must be below 4 GiB.
* The boot area, one 4-KiB page in low memory that overlaps no segment (the first free
  page from 0x9000 up, below 640 KiB, else the first free page above the image), holds:
  the multiboot information structure (116 bytes, flags MEMORY | CMDLINE | MMAP |
  BOOT_LOADER_NAME), the memory map, the entry GDT, the boot loader name "idtlab" and
  the command line (default: the image's file name, as QEMU passes it).
* The memory map says what this machine has, no more: one "available" (type 1) entry for
  all of RAM (idtlab's RAM is contiguous from 0, with no BIOS area or VGA hole), and a
  "reserved" (type 2) entry for the local APIC's page when the machine has one.
  mem_lower = RAM below 640 KiB in KiB (at most 640), mem_upper = RAM above 1 MiB in KiB.
  The guest owns all of RAM: the machine writes none of its own structures (no GDT, IDT,
  TSS or page tables; `Machine.build` is never called), it only zeroes what
  `Machine.__init__` wrote below 0x20000.

The 32-bit entry ("Machine state")
----------------------------------
EAX = 0x2BADB002, EBX = the information structure's address; CS = 0x08, a flat 32-bit
code segment, DS = ES = FS = GS = SS = 0x10, flat data (base 0, limit 4 GiB), from the
boot area's GDT, which GDTR points at (the guest must load its own before reloading a
segment register, as the specification says); CR0 = PE | ET (paging off), CR4 = 0,
EFER = 0, EFLAGS = 0x2 (IF = 0), IDTR = 0 (base 0, limit 0), ESP = 0 and the other
registers 0. A20 is always on (idtlab's memory does not wrap at 1 MiB).

Unicorn cannot start a 64-bit engine in 32-bit mode (with Unicorn 2.1.4, writing CS in a
`UC_MODE_64` engine does not leave 64-bit decoding), so the image starts on a `UC_MODE_32`
engine over the same guest memory and runs its own switch to long mode there (CR4.PAE,
CR3, EFER.LME, CR0.PG, a far jump to a 64-bit code segment). A Python block callback
watches each translation block start: when EFER.LMA = 1 and CS.L = 1 (a far transfer
always ends a block, so the first 64-bit block is caught before it runs), the CPU state
moves to the machine's `UC_MODE_64` engine (`context_save` / `context_restore`) with the
instruction and cycle counts, a `mode_switch` record goes to the trace, and the run
continues there with the whole machine model. Python is on the per-block path only during
the 32-bit phase.

The event model is not active before the switch. Anything that would need it ends the
run with a clear outcome: an exception or INT n (`unsupported`, naming the vector and
EIP), an injected event coming due (`unsupported`), paging enabled without long mode
(`unsupported`), HLT (`hlt`: nothing could wake the CPU), an access outside RAM or to the
APIC page (`outside_memory`). Ports work as in 64-bit mode (the UART, exit ports,
fw_cfg). CPUID answers as in 64-bit mode (the machine's honest leaves). The 32-bit phase
runs on QEMU's own page walk (paging is off for almost all of it) and is costed at the
profile's default cycles per instruction in both modes, counted per instruction by the
native counter (so a stop requested by a port write, e.g. an exit port, lands right after
the OUT in both modes); counts and cycles continue across the switch.

Which code is 32-bit (the decoding convention)
----------------------------------------------
Interception sites (IRET, HLT, STI, MOV SS, OUT, RDMSR, WRMSR, CPUID) are found by
decoding the image's code ranges (from its symbol table, as for any ELF image:
cpu/elf.py) when it is loaded, and they are registered in the 64-bit engine only.
Every code range is decoded as 64-bit code. A range that holds 32-bit boot code decodes
to garbage, and any "site" found in it is inert: such code runs only in the 32-bit
engine, which has no sites (nothing is intercepted before the switch), and never again
after it. This needs one thing from the image: its 64-bit code must start at a symbol
(the far jump's target label, e.g. `start64:`), so that no range mixes 32- and 64-bit
code. (`Engine(bits=32)` decodes as 32-bit wherever an engine decodes, e.g. for block
counting; the 32-bit phase counts per instruction and needs none.)
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from elftools.elf.elffile import ELFFile

from cpu.devices import acpi
from cpu.devices.acpi import BIOS_AREA as ACPI_BIOS_AREA
from cpu.devices.apic import APIC_BASE
from cpu.devices.hpet import HPET_BASE
from cpu.devices.ioapic import IOAPIC_BASE
from cpu.elf import inside_segments, malformed, read_symbols  # as for any ELF image
from cpu.errors import BadInput, read_input
from cpu.layout import RESERVED_END

if TYPE_CHECKING:
    from cpu.machine import Machine

MB_HEADER_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002  # in EAX at the entry
MB_SEARCH = 8192  # the header lies in the first 8 KiB of the file
# Header flags ("Header magic fields").
MB_PAGE_ALIGN = 1 << 0
MB_MEMORY_INFO = 1 << 1
MB_VIDEO_MODE = 1 << 2
MB_AOUT_KLUDGE = 1 << 16
MB_REQUIRED_MASK = 0xFFFF  # bits the loader must understand or refuse
# Information flags ("Boot information format").
MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9
MMAP_AVAILABLE = 1
MMAP_RESERVED = 2

# The information structure: 116 bytes, named offsets.
INFO_SIZE = 116
INFO_FLAGS = 0
INFO_MEM_LOWER = 4
INFO_MEM_UPPER = 8
INFO_CMDLINE = 16
INFO_MMAP_LENGTH = 44
INFO_MMAP_ADDR = 48
INFO_BOOT_LOADER_NAME = 64
MMAP_ENTRY_SIZE = 24  # the `size` field (20) + base, length, type

# The boot area (one page): where each piece lives, as offsets from its start.
AREA_INFO = 0x000
AREA_MMAP = 0x080
AREA_GDT = 0x140
AREA_LOADER_NAME = 0x160
AREA_CMDLINE = 0x180
AREA_SIZE = 0x1000
AREA_FIRST = 0x9000  # the first page tried for the boot area
LOW_MEMORY_END = 0xA0000  # 640 KiB
LOADER_NAME = b"idtlab"
MAX_MMAP_ENTRIES = (AREA_GDT - AREA_MMAP) // MMAP_ENTRY_SIZE

# The entry GDT: null, 0x08 flat 32-bit code (execute/read), 0x10 flat data (read/write).
ENTRY_CS, ENTRY_DS = 0x08, 0x10
ENTRY_GDT = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
ENTRY_CR0 = 0x11  # PE | ET
ENTRY_EFLAGS = 0x2
CR0_PG = 1 << 31
EFER_LMA = 1 << 10
MSR_EFER = 0xC0000080


@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # in the file
    flags: int
    checksum: int


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD: `data` (the file part) at `paddr`, zero-filled up to `memsz`."""

    paddr: int
    vaddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class MultibootImage:
    name: str
    elf_class: int  # 32 or 64
    header: MultibootHeader
    entry: int  # physical, < 4 GiB
    segments: tuple[Segment, ...]
    symbols: dict[str, int]
    code_ranges: tuple[tuple[int, int], ...]  # linear [lo, hi), decoded for sites

    def physical(self, linear: int) -> int | None:
        """The physical address the image loads at linear address `linear`."""
        for s in self.segments:
            if s.vaddr <= linear < s.vaddr + s.memsz:
                return s.paddr + (linear - s.vaddr)
        return None


@dataclass(frozen=True)
class MmapEntry:
    base: int
    length: int
    type: int

    def pack(self) -> bytes:
        # `size` counts the bytes after itself ("Boot information format", mmap_*).
        return struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, self.base, self.length, self.type)


@dataclass(frozen=True)
class BootInfo:
    """Where the loader put things and what it told the guest."""

    area: int  # the boot area's page
    flags: int
    mem_lower: int  # KiB
    mem_upper: int  # KiB
    mmap: tuple[MmapEntry, ...]
    cmdline: bytes
    entry: int

    @property
    def address(self) -> int:
        """The information structure (EBX at the entry)."""
        return self.area + AREA_INFO

    @property
    def mmap_addr(self) -> int:
        return self.area + AREA_MMAP

    @property
    def gdt(self) -> int:
        return self.area + AREA_GDT

    @property
    def cmdline_addr(self) -> int:
        return self.area + AREA_CMDLINE

    @property
    def loader_name_addr(self) -> int:
        return self.area + AREA_LOADER_NAME

    def info_bytes(self) -> bytes:
        info = bytearray(INFO_SIZE)
        struct.pack_into("<III", info, INFO_FLAGS, self.flags, self.mem_lower, self.mem_upper)
        struct.pack_into("<I", info, INFO_CMDLINE, self.cmdline_addr)
        struct.pack_into("<II", info, INFO_MMAP_LENGTH, MMAP_ENTRY_SIZE * len(self.mmap),
                         self.mmap_addr)
        struct.pack_into("<I", info, INFO_BOOT_LOADER_NAME, self.loader_name_addr)
        return bytes(info)

    def area_bytes(self) -> bytes:
        """The whole boot area page as the loader writes it."""
        page = bytearray(AREA_SIZE)
        page[AREA_INFO:AREA_INFO + INFO_SIZE] = self.info_bytes()
        mmap = b"".join(e.pack() for e in self.mmap)
        page[AREA_MMAP:AREA_MMAP + len(mmap)] = mmap
        gdt = struct.pack(f"<{len(ENTRY_GDT)}Q", *ENTRY_GDT)
        page[AREA_GDT:AREA_GDT + len(gdt)] = gdt
        page[AREA_LOADER_NAME:AREA_LOADER_NAME + len(LOADER_NAME) + 1] = LOADER_NAME + b"\0"
        page[AREA_CMDLINE:AREA_CMDLINE + len(self.cmdline) + 1] = self.cmdline + b"\0"
        return bytes(page)


# -- parsing ------------------------------------------------------------------------------
def find_header(raw: bytes, name: str) -> MultibootHeader:
    """The multiboot header ("The layout of Multiboot header"), or a `BadInput`."""
    bad_checksum: int | None = None
    for off in range(0, min(len(raw), MB_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", raw, off)
        if magic != MB_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return MultibootHeader(off, flags, checksum)
        if bad_checksum is None:
            bad_checksum = off
    if bad_checksum is not None:
        magic, flags, checksum = struct.unpack_from("<III", raw, bad_checksum)
        raise BadInput(f"{name}: multiboot header at file offset {bad_checksum:#x} has a bad "
                       f"checksum {checksum:#x} (flags {flags:#x}: expected "
                       f"{-(magic + flags) & 0xFFFFFFFF:#x})")
    raise BadInput(f"{name}: no multiboot header (magic {MB_HEADER_MAGIC:#x}, 4-byte aligned) "
                   f"in the first {MB_SEARCH // 1024} KiB")


def has_header(raw: bytes) -> bool:
    try:
        find_header(raw, "")
    except BadInput:
        return False
    return True


def _check_flags(flags: int, name: str) -> None:
    if flags & MB_VIDEO_MODE:
        raise BadInput(f"{name}: the multiboot header requests a video mode (flag 2): idtlab has "
                       "no display; clear the flag")
    if flags & MB_AOUT_KLUDGE:
        raise BadInput(f"{name}: the multiboot header has load addresses (flag 16, the a.out "
                       "kludge): idtlab loads the ELF program headers; clear the flag")
    unknown = flags & MB_REQUIRED_MASK & ~(MB_PAGE_ALIGN | MB_MEMORY_INFO)
    if unknown:
        raise BadInput(f"{name}: the multiboot header requires features idtlab does not know "
                       f"(flags {unknown:#x})")


def parse(raw: bytes, name: str) -> MultibootImage:
    """Parse a multiboot v1 ELF image; every problem is a one-line `BadInput`."""
    header = find_header(raw, name)
    _check_flags(header.flags, name)
    if not raw.startswith(b"\x7fELF"):
        raise BadInput(f"{name}: not an ELF file (idtlab boots multiboot ELF32 or ELF64 images)")
    try:
        elf = ELFFile(io.BytesIO(raw))
        machine = elf.header["e_machine"]
        want = {32: "EM_386", 64: "EM_X86_64"}[elf.elfclass]
        if machine != want or not elf.little_endian:
            raise BadInput(f"{name}: ELF{elf.elfclass} machine is {machine}, a multiboot image "
                           f"for x86 needs {want}")
        segments: list[Segment] = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            if seg["p_memsz"] < seg["p_filesz"]:
                raise BadInput(f"{name}: PT_LOAD at {seg['p_paddr']:#x} has p_memsz "
                               f"{seg['p_memsz']:#x} < p_filesz {seg['p_filesz']:#x}")
            if seg["p_filesz"] > len(raw):
                raise BadInput(f"{name}: PT_LOAD at {seg['p_paddr']:#x} runs past the end of "
                               "the file")
            data = bytes(seg.data())
            if len(data) != seg["p_filesz"]:
                raise BadInput(f"{name}: PT_LOAD at {seg['p_paddr']:#x} runs past the end of "
                               "the file")
            segments.append(Segment(int(seg["p_paddr"]), int(seg["p_vaddr"]), data,
                                    int(seg["p_memsz"])))
        symbols, ranges = read_symbols(elf)
        entry = int(elf.header["e_entry"])
    except BadInput:
        raise
    except Exception as exc:  # pyelftools raises whatever a corrupt field leads it to
        raise malformed(name, exc) from None
    ranges = inside_segments(ranges, [(s.vaddr, s.vaddr + s.memsz) for s in segments])
    if not segments:
        raise BadInput(f"{name}: no PT_LOAD segments")
    for s in segments:
        if s.vaddr <= entry < s.vaddr + s.memsz and s.vaddr != s.paddr:
            entry = s.paddr + (entry - s.vaddr)
            break
    if entry > 0xFFFFFFFF:
        raise BadInput(f"{name}: entry point {entry:#x} is above 4 GiB: a multiboot entry is "
                       "32-bit")
    return MultibootImage(name, elf.elfclass, header, entry, tuple(segments), symbols,
                          tuple(ranges))


def read_image(path: str | Path) -> MultibootImage:
    name = str(path)
    raw = read_input(path, "a multiboot image")
    return parse(raw, name)


# -- the information structure --------------------------------------------------------------
def memory_map(memsize: int, *, apic: bool) -> tuple[MmapEntry, ...]:
    """RAM, with the BIOS area (where the ACPI tables are) reserved as a PC firmware
    reports it, and the device pages of the interrupt controllers and the HPET."""
    bios_lo, bios_hi = ACPI_BIOS_AREA
    if memsize <= bios_lo:
        entries = [MmapEntry(0, memsize, MMAP_AVAILABLE)]
    else:
        entries = [MmapEntry(0, bios_lo, MMAP_AVAILABLE),
                   MmapEntry(bios_lo, bios_hi - bios_lo, MMAP_RESERVED)]
        if memsize > bios_hi:
            entries.append(MmapEntry(bios_hi, memsize - bios_hi, MMAP_AVAILABLE))
    if apic:
        entries += [MmapEntry(IOAPIC_BASE, 0x1000, MMAP_RESERVED),
                    MmapEntry(HPET_BASE, 0x1000, MMAP_RESERVED),
                    MmapEntry(APIC_BASE, 0x1000, MMAP_RESERVED)]
    return tuple(entries)


def plan(image: MultibootImage, memsize: int, *, apic: bool,
         cmdline: str | None = None) -> BootInfo:
    """Choose the boot area and fill in what the guest will be told."""
    text = Path(image.name).name if cmdline is None else cmdline
    raw_cmdline = text.encode()
    if b"\0" in raw_cmdline or len(raw_cmdline) >= AREA_SIZE - AREA_CMDLINE:
        raise BadInput(f"{image.name}: command line must be shorter than "
                       f"{AREA_SIZE - AREA_CMDLINE} bytes and hold no NUL")
    for s in image.segments:
        if s.paddr < 0 or s.paddr + s.memsz > memsize:
            raise BadInput(f"{image.name}: segment at {s.paddr:#x}..{s.paddr + s.memsz:#x} is "
                           f"outside guest memory (0..{memsize:#x})")
    busy = [(s.paddr, s.paddr + s.memsz) for s in image.segments]

    def free(page: int) -> bool:
        return page + AREA_SIZE <= memsize and all(
            not (page < hi and lo < page + AREA_SIZE) for lo, hi in busy)

    top = max(hi for _, hi in busy)
    candidates = [*range(AREA_FIRST, LOW_MEMORY_END, AREA_SIZE),
                  *range((top + AREA_SIZE - 1) & ~(AREA_SIZE - 1), memsize, AREA_SIZE)]
    area = next((p for p in candidates if free(p)), None)
    if area is None:
        raise BadInput(f"{image.name}: no free page in guest memory for the multiboot "
                       "information")
    mmap = memory_map(memsize, apic=apic)
    assert len(mmap) <= MAX_MMAP_ENTRIES
    return BootInfo(area=area, flags=MBI_MEMORY | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME,
                    mem_lower=min(memsize, LOW_MEMORY_END) // 1024,
                    mem_upper=max(0, memsize - (1 << 20)) // 1024, mmap=mmap,
                    cmdline=raw_cmdline, entry=image.entry)


def load(m: Machine, image: MultibootImage, *, cmdline: str | None = None) -> BootInfo:
    """Load `image` into a fresh machine and arrange for `m.run()` to start at its 32-bit
    entry. Symbols go to `m.symbols`; code ranges are decoded for sites (64-bit)."""
    if m.multiboot is not None:
        raise BadInput(f"{image.name}: the machine already has a multiboot image "
                       f"({m.multiboot.image.name})")
    info = plan(image, m.phys.size, apic=m.apic is not None, cmdline=cmdline)
    m.phys.write(0, bytes(RESERVED_END))  # what Machine.__init__ put there is not the guest's
    for s in image.segments:
        m.phys.write(s.paddr, s.data + bytes(s.memsz - len(s.data)))
    m.phys.write(info.area, info.area_bytes())
    if m.apic is not None and m.phys.size >= ACPI_BIOS_AREA[1]:
        # The ACPI tables a PC firmware leaves in the BIOS area (RSDP, RSDT, FADT, FACS,
        # DSDT, MADT, HPET; DMAR on q35 with an IOMMU), where kvm-unit-tests' lib/acpi.c
        # searches for "RSD PTR ".
        acpi.build(cpus=1, hpet=True, iommu=m.q35.board.iommu).install(m.phys.write)
    for lo, hi in image.code_ranges:
        p = image.physical(lo)
        if p is not None and image.physical(hi - 1) == p + (hi - 1 - lo):
            m.add_code(lo, m.phys.read(p, hi - lo))
    for name in ("gdt", "tss", "idt", "pml4"):  # the machine's structures: not built here
        m.symbols.pop(name, None)
    m.symbols.update(image.symbols)
    m.state.boot = Boot(image, info)
    return info


@dataclass
class Boot:
    """A multiboot image loaded into a machine, waiting for (or past) its 32-bit phase."""

    image: MultibootImage
    info: BootInfo
    done: bool = False
