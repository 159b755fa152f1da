"""ELF64 x86-64 guest images, read with pyelftools.

A scenario can load a linked image instead of (or besides) inline `[[code]]` blocks.
What the machine needs from it is small: the PT_LOAD segments to copy into guest memory,
the entry point, the symbol table (so `[idt]`, `[run]` and `[[expect]]` can name
handlers and data), and the ranges that are code, because IRET/HLT sites are found by
decoding code linearly when it is loaded (cpu/decode.py). Section headers only serve the
last two; a stripped image still loads, it just has no symbols and no code ranges.

Every problem is a one-line `BadInput` naming the file: an ELF that idtlab cannot run is
a user input error, not a crash.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.constants import P_FLAGS, SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from cpu.errors import BadInput, read_input

_ELF_MAGIC = b"\x7fELF"
# Symbol types that mark a place in code. Linker-script symbols and assembler labels
# are NOTYPE; OBJECT symbols in .text still end the range before them.
_CODE_SYMBOL_TYPES = frozenset({"STT_FUNC", "STT_NOTYPE"})
_SKIPPED_SYMBOL_TYPES = frozenset({"STT_SECTION", "STT_FILE"})


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD: `data` is the file image (p_filesz bytes); the rest up to `memsz`
    is zero-filled by the loader."""

    paddr: int
    vaddr: int
    data: bytes
    memsz: int
    executable: bool
    writable: bool


@dataclass(frozen=True)
class ElfImage:
    path: str
    entry: int
    segments: list[ElfSegment]
    symbols: dict[str, int]
    code_ranges: list[tuple[int, int]]


def load_elf(path: str | Path) -> ElfImage:
    """Read an ELF64 x86-64 image; raise `BadInput` for anything idtlab cannot load."""
    name = str(path)
    raw = read_input(path, "an ELF file")
    if not raw.startswith(_ELF_MAGIC):
        raise BadInput(f"{name}: not an ELF file")
    try:
        elf = ELFFile(io.BytesIO(raw))
        _check_header(name, elf)
        segments = _load_segments(name, elf)
        symbols, code_ranges = read_symbols(elf)
    except ELFError as e:
        raise BadInput(f"{name}: malformed ELF file ({e})") from None
    return ElfImage(path=name, entry=int(elf.header["e_entry"]), segments=segments,
                    symbols=symbols, code_ranges=code_ranges)


def _check_header(name: str, elf: Any) -> None:
    machine = elf.header["e_machine"]
    if machine != "EM_X86_64":
        raise BadInput(f"{name}: ELF machine is {machine}, idtlab needs x86-64 (EM_X86_64)")
    if elf.elfclass != 64:
        raise BadInput(f"{name}: ELF class is ELFCLASS{elf.elfclass}, idtlab needs ELF64 "
                       "(an x32 image?)")
    if not elf.little_endian:
        raise BadInput(f"{name}: ELF is big-endian, x86-64 images are little-endian")


def _load_segments(name: str, elf: Any) -> list[ElfSegment]:
    segments: list[ElfSegment] = []
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD":
            continue
        flags = int(seg["p_flags"])
        data = bytes(seg.data())
        if len(data) != seg["p_filesz"]:
            raise BadInput(f"{name}: PT_LOAD at {seg['p_vaddr']:#x} runs past the end of "
                           "the file")
        segments.append(ElfSegment(
            paddr=int(seg["p_paddr"]), vaddr=int(seg["p_vaddr"]), data=data,
            memsz=int(seg["p_memsz"]), executable=bool(flags & P_FLAGS.PF_X),
            writable=bool(flags & P_FLAGS.PF_W)))
    if not segments:
        raise BadInput(f"{name}: no PT_LOAD segments (is it a relocatable object? link it "
                       "first)")
    return segments


def read_symbols(elf: Any) -> tuple[dict[str, int], list[tuple[int, int]]]:
    symbols: dict[str, int] = {}
    global_names: set[str] = set()
    # Per executable section: every symbol address (range ends) and code symbol
    # addresses (range starts).
    boundaries: dict[int, set[int]] = {}
    starts: dict[int, set[int]] = {}
    for table in elf.iter_sections():
        if not isinstance(table, SymbolTableSection):
            continue
        for sym in table.iter_symbols():
            kind = sym["st_info"]["type"]
            shndx = sym["st_shndx"]
            if not sym.name or kind in _SKIPPED_SYMBOL_TYPES or shndx == "SHN_UNDEF":
                continue
            value = int(sym["st_value"])
            is_global = sym["st_info"]["bind"] != "STB_LOCAL"
            # A global wins over a local of the same name (static helpers in different
            # files may share names); among locals, the first one stays.
            if sym.name not in symbols or (is_global and sym.name not in global_names):
                symbols[sym.name] = value
            if is_global:
                global_names.add(sym.name)
            if isinstance(shndx, int):
                boundaries.setdefault(shndx, set()).add(value)
                if kind in _CODE_SYMBOL_TYPES:
                    starts.setdefault(shndx, set()).add(value)

    ranges: list[tuple[int, int]] = []
    for shndx, section_starts in starts.items():
        section = elf.get_section(shndx)
        if not section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR:
            continue
        section_end = int(section["sh_addr"]) + int(section["sh_size"])
        ends = sorted(boundaries[shndx] | {section_end})
        for start in section_starts:
            i = bisect.bisect_right(ends, start)
            if i < len(ends) and ends[i] <= section_end:
                ranges.append((start, ends[i]))
    ranges.sort()
    return symbols, ranges
