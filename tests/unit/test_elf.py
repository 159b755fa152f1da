"""cpu.elf: what a linked guest image yields, and how bad files are refused."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cpu.elf import ElfImage, load_elf
from guest_images.build import build_image
from idtlab.errors import BadInput

pytestmark = pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                                reason="needs GNU binutils")


@pytest.fixture(scope="module")
def bp_ist(tmp_path_factory: pytest.TempPathFactory) -> ElfImage:
    return load_elf(build_image("bp_ist", tmp_path_factory.mktemp("images")))


def link(tmp_path: Path, source: str, *, bits: int = 64, name: str = "t",
         ld_args: tuple[str, ...] = ("-Ttext=0x200000",)) -> Path:
    """Assemble and link `source` with GNU binutils; returns the ELF path."""
    src = tmp_path / f"{name}.s"
    obj = tmp_path / f"{name}.o"
    out = tmp_path / f"{name}.elf"
    src.write_text(source)
    subprocess.run(["as", f"--{bits}", "-o", str(obj), str(src)], check=True)
    emulation = "elf_x86_64" if bits == 64 else "elf_i386"
    subprocess.run(["ld", "-m", emulation, "-e", "0", "-z", "noexecstack", *ld_args,
                    "-o", str(out), str(obj)], check=True, capture_output=True)
    return out


def test_a_built_image_has_its_entry_segments_and_symbols(bp_ist: ElfImage) -> None:
    assert bp_ist.entry == bp_ist.symbols["main"] == 0x200000
    text, data = bp_ist.segments
    assert (text.vaddr, text.paddr, text.executable, text.writable) == \
        (0x200000, 0x200000, True, False)
    assert (data.executable, data.writable) == (False, True)
    assert data.vaddr >= text.vaddr + text.memsz
    assert text.data[0] == 0xCC, "main starts with int3"
    assert set(bp_ist.symbols) == {"main", "after_int3", "bp_handler", "bp_seen_rsp",
                                   "bp_frame", "bp_count"}
    assert bp_ist.symbols["after_int3"] == 0x200001
    assert data.vaddr <= bp_ist.symbols["bp_count"] < data.vaddr + data.memsz


def test_code_ranges_run_from_each_code_symbol_to_the_next_symbol(bp_ist: ElfImage) -> None:
    s = bp_ist.symbols
    text = bp_ist.segments[0]
    assert bp_ist.code_ranges == [
        (s["main"], s["after_int3"]),
        (s["after_int3"], s["bp_handler"]),
        (s["bp_handler"], text.vaddr + len(text.data)),
    ]


def test_data_objects_inside_text_end_the_code_range_before_them(tmp_path: Path) -> None:
    elf = load_elf(link(tmp_path, """
        .intel_syntax noprefix
        .text
        .globl start, table, tail
        .type start, @function
    start:
        nop
        ret
        .type table, @object
    table:
        .quad 1, 2
    tail:
        hlt
    """))
    s = elf.symbols
    assert elf.code_ranges == [(s["start"], s["table"]), (s["tail"], s["tail"] + 1)]


def test_a_bss_section_shows_as_memsz_beyond_the_file_data(tmp_path: Path) -> None:
    elf = load_elf(link(tmp_path, """
        .text
        .globl start
    start:
        hlt
        .data
        .quad 7
        .bss
        .zero 4096
    """, ld_args=("-Ttext=0x200000", "-Tdata=0x300000")))
    data = next(seg for seg in elf.segments if seg.writable)
    assert data.data == (7).to_bytes(8, "little")
    assert data.memsz == 8 + 4096


def test_section_and_file_symbols_are_skipped(tmp_path: Path) -> None:
    elf = load_elf(link(tmp_path, """
        .file "t.s"
        .text
    start:
        hlt
    """))
    assert elf.symbols["start"] == 0x200000
    assert "" not in elf.symbols and "t.s" not in elf.symbols
    assert ".text" not in elf.symbols


def test_a_missing_file_is_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"^.*nope\.elf: no such file$"):
        load_elf(tmp_path / "nope.elf")


def test_a_file_that_is_not_an_elf_says_so(tmp_path: Path) -> None:
    path = tmp_path / "x.elf"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(BadInput) as info:
        load_elf(str(path))
    assert str(info.value) == f"{path}: not an ELF file"


def test_a_32_bit_elf_is_rejected_naming_its_machine(tmp_path: Path) -> None:
    path = link(tmp_path, ".text\nstart:\n  hlt\n", bits=32)
    with pytest.raises(BadInput) as info:
        load_elf(path)
    assert str(info.value) == \
        f"{path}: ELF machine is EM_386, idtlab needs x86-64 (EM_X86_64)"


def test_an_object_file_without_load_segments_is_rejected(tmp_path: Path) -> None:
    obj = tmp_path / "t.o"
    (tmp_path / "t.s").write_text(".text\nstart: hlt\n")
    subprocess.run(["as", "--64", "-o", str(obj), str(tmp_path / "t.s")], check=True)
    with pytest.raises(BadInput, match=r"t\.o: no PT_LOAD segments"):
        load_elf(obj)


def test_a_truncated_elf_is_a_bad_input_not_a_traceback(tmp_path: Path,
                                                        bp_ist: ElfImage) -> None:
    truncated = tmp_path / "cut.elf"
    truncated.write_bytes(Path(bp_ist.path).read_bytes()[:200])
    with pytest.raises(BadInput) as info:
        load_elf(truncated)
    assert str(info.value).startswith(f"{truncated}: ")
    assert "\n" not in str(info.value)
