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
        entry = int(elf.header["e_entry"])
    except BadInput:
        raise
    except Exception as exc:  # pyelftools raises whatever a corrupt field leads it to
        raise malformed(name, exc) from None
    return ElfImage(path=name, entry=entry, segments=segments, symbols=symbols,
                    code_ranges=inside_segments(code_ranges,
                                                [(s.vaddr, s.vaddr + s.memsz) for s in segments
                                                 if s.executable]))


def malformed(name: str, exc: Exception) -> BadInput:
    """The one-line error for an ELF file pyelftools could not read: a corrupt offset or
    size makes it raise ELFError, but also OverflowError, ValueError, struct.error and
    others; none of them is a crash of idtlab."""
    detail = str(exc) if isinstance(exc, ELFError) else f"{type(exc).__name__}: {exc}"
    return BadInput(f"{name}: malformed ELF file ({detail.splitlines()[0] if detail else ''})")


# Code is decoded for sites up front only this far per range: sites are found where
# execution goes anyway (cpu/sites.py), and a corrupt section size must not make the
# loader decode megabytes.
MAX_CODE_RANGE = 1 << 20


def inside_segments(ranges: list[tuple[int, int]],
                    segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The code ranges (from symbols and section headers, which a corrupt or odd image
    may put anywhere) clipped to the loaded segments' [lo, hi) and to MAX_CODE_RANGE."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        for slo, shi in segments:
            a, b = max(lo, slo), min(hi, shi, max(lo, slo) + MAX_CODE_RANGE)
            if a < b:
                out.append((a, b))
    return sorted(set(out))


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
        if seg["p_memsz"] < seg["p_filesz"]:
            raise BadInput(f"{name}: PT_LOAD at {seg['p_vaddr']:#x} has p_memsz "
                           f"{seg['p_memsz']:#x} < p_filesz {seg['p_filesz']:#x}")
        if seg["p_filesz"] > len(elf.stream.getbuffer()):
            raise BadInput(f"{name}: PT_LOAD at {seg['p_vaddr']:#x} runs past the end of "
                           "the file")
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
