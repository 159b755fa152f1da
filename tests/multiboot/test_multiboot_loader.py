"""The multiboot v1 loader (cpu/multiboot.py): header search, refusals, segments, and the
information structure byte for byte (The Multiboot Specification 0.6.96, "Boot
information format")."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from cpu import multiboot as mb
from cpu.layout import GDT_BASE
from cpu.machine import Machine
from idtlab.errors import BadInput
from tests.multiboot.mbkit import MEMORY, build


def raw_header(flags: int, checksum: int | None = None, at: int = 0x40) -> bytes:
    if checksum is None:
        checksum = -(0x1BADB002 + flags) & 0xFFFFFFFF
    return bytes(at) + struct.pack("<III", 0x1BADB002, flags, checksum) + bytes(64)


def elf_with_header_flags(flags: int) -> bytes:
    """The boot64 image with its header's flags (and checksum) rewritten."""
    raw = bytearray(build("boot64.S").read_bytes())
    off = mb.find_header(bytes(raw), "x").offset
    struct.pack_into("<II", raw, off + 4, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF)
    return bytes(raw)


def test_the_header_is_found_at_the_multiboot_section_with_its_flags() -> None:
    path = build("boot64.S")
    with path.open("rb") as f:
        section_offset = ELFFile(f).get_section_by_name(".text")["sh_offset"]
    header = mb.find_header(path.read_bytes(), "x")
    assert (header.offset, header.flags, header.checksum) == (
        section_offset, 3, (-(0x1BADB002 + 3)) & 0xFFFFFFFF)


def test_a_header_with_a_bad_checksum_is_refused_naming_the_offset_and_the_right_checksum() -> None:
    with pytest.raises(BadInput) as exc:
        mb.find_header(raw_header(0, checksum=0x1234), "k.bin")
    assert str(exc.value) == ("k.bin: multiboot header at file offset 0x40 has a bad checksum "
                              "0x1234 (flags 0x0: expected 0xe4524ffe)")


def test_a_magic_that_is_not_4_byte_aligned_is_not_a_header() -> None:
    with pytest.raises(BadInput, match=r"k.bin: no multiboot header \(magic 0x1badb002, 4-byte "
                                        r"aligned\) in the first 8 KiB"):
        mb.find_header(raw_header(0, at=0x41), "k.bin")


def test_a_header_after_the_first_8_kib_is_not_found() -> None:
    with pytest.raises(BadInput, match="no multiboot header"):
        mb.find_header(raw_header(0, at=8192), "k.bin")
    assert mb.find_header(raw_header(0, at=8192 - 12), "k.bin").offset == 8192 - 12


@pytest.mark.parametrize(("flags", "message"), [
    (1 << 2, "x.mb: the multiboot header requests a video mode (flag 2): idtlab has no display; "
             "clear the flag"),
    (1 << 16, "x.mb: the multiboot header has load addresses (flag 16, the a.out kludge): idtlab "
              "loads the ELF program headers; clear the flag"),
    ((1 << 3) | 1, "x.mb: the multiboot header requires features idtlab does not know (flags 0x8)"),
])
def test_header_flags_idtlab_does_not_support_are_refused_by_name(flags: int, message: str) -> None:
    with pytest.raises(BadInput) as exc:
        mb.parse(elf_with_header_flags(flags), "x.mb")
    assert str(exc.value) == message


def test_optional_header_flags_above_bit_16_are_ignored() -> None:
    assert mb.parse(elf_with_header_flags(3 | (1 << 20)), "x.mb").header.flags == 3 | (1 << 20)


def test_a_file_with_a_header_that_is_not_elf_is_refused() -> None:
    with pytest.raises(BadInput) as exc:
        mb.parse(raw_header(0), "k.bin")
    assert str(exc.value) == ("k.bin: not an ELF file (idtlab boots multiboot ELF32 or ELF64 "
                              "images)")


def test_an_elf32_image_for_another_machine_is_refused() -> None:
    raw = bytearray(build("boot64.S").read_bytes())
    struct.pack_into("<H", raw, 18, 40)  # e_machine = EM_ARM
    with pytest.raises(BadInput) as exc:
        mb.parse(bytes(raw), "arm.mb")
    assert str(exc.value) == "arm.mb: ELF32 machine is EM_ARM, a multiboot image for x86 needs EM_386"


def test_the_elf32_and_elf64_forms_load_the_same_segments_and_entry() -> None:
    a = mb.read_image(build("boot64.S", elf32=True))
    b = mb.read_image(build("boot64.S", elf32=False))
    assert (a.elf_class, b.elf_class) == (32, 64)
    assert a.entry == b.entry == a.symbols["start"]
    assert [(s.paddr, s.data, s.memsz) for s in a.segments] == [
        (s.paddr, s.data, s.memsz) for s in b.segments]
    assert a.symbols["start64"] == b.symbols["start64"]


def test_segments_go_to_their_physical_addresses_and_bss_is_zeroed() -> None:
    m = Machine(MEMORY)
    image = mb.read_image(build("boot64.S"))
    text, data = image.segments
    m.phys.write(data.paddr, b"\xaa" * data.memsz)  # garbage where the BSS will be
    mb.load(m, image)
    assert m.phys.read(text.paddr, len(text.data)) == text.data
    assert m.phys.read(data.paddr, len(data.data)) == data.data
    assert len(data.data) < data.memsz
    assert m.phys.read(data.paddr + len(data.data), data.memsz - len(data.data)) == bytes(
        data.memsz - len(data.data))


def test_a_segment_outside_guest_memory_is_refused() -> None:
    image = mb.read_image(build("boot64.S"))
    end = max(s.paddr + s.memsz for s in image.segments)
    with pytest.raises(BadInput) as exc:
        mb.plan(image, 0x100000 + 0x4000, apic=True)
    assert str(exc.value).endswith(f"segment at 0x101000..{end:#x} is outside guest memory "
                                   "(0..0x104000)")


def test_the_information_structure_bytes() -> None:
    image = mb.read_image(build("boot64.S"))
    info = mb.plan(image, MEMORY, apic=True)
    assert info.address == 0x9000
    expected = bytearray(116)
    struct.pack_into("<III", expected, 0, 0x245, 640, (MEMORY >> 10) - 1024)  # flags, lower, upper
    struct.pack_into("<I", expected, 16, 0x9180)  # cmdline
    struct.pack_into("<II", expected, 44, 6 * 24, 0x9080)  # mmap_length, mmap_addr
    struct.pack_into("<I", expected, 64, 0x9160)  # boot_loader_name
    assert info.info_bytes() == bytes(expected)
    page = info.area_bytes()
    assert page[0x160:0x167] == b"idtlab\0"
    assert page[0x180:0x180 + len(b"boot64.mb") + 1] == b"boot64.mb\0"
    # The entry GDT: null, flat 32-bit code at 0x08, flat data at 0x10.
    assert struct.unpack_from("<3Q", page, 0x140) == (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)


def test_the_memory_map_describes_ram_the_bios_area_and_the_device_pages_exactly() -> None:
    """RAM with the BIOS area 0xE0000-0xFFFFF reserved (the ACPI tables are there, as a
    PC firmware's e820 map says), and the I/O APIC, HPET and local APIC pages."""
    image = mb.read_image(build("boot64.S"))
    page = mb.plan(image, MEMORY, apic=True).area_bytes()
    entries = [struct.unpack_from("<IQQI", page, 0x80 + 24 * i) for i in range(6)]
    assert entries == [(20, 0, 0xE0000, 1), (20, 0xE0000, 0x20000, 2),
                       (20, 0x100000, MEMORY - 0x100000, 1), (20, 0xFEC00000, 0x1000, 2),
                       (20, 0xFED00000, 0x1000, 2), (20, 0xFEE00000, 0x1000, 2)]
    assert page[0x80 + 6 * 24:0x80 + 7 * 24] == bytes(24)
    alone = mb.plan(image, MEMORY, apic=False)
    assert alone.info_bytes()[44:48] == struct.pack("<I", 3 * 24)
    assert alone.mmap == (mb.MmapEntry(0, 0xE0000, 1), mb.MmapEntry(0xE0000, 0x20000, 2),
                          mb.MmapEntry(0x100000, MEMORY - 0x100000, 1))


def test_mem_lower_and_mem_upper_follow_the_ram_size() -> None:
    image = mb.read_image(build("boot64.S"))
    info = mb.plan(image, 0x200000, apic=False)
    assert (info.mem_lower, info.mem_upper) == (640, 1024)


def test_the_boot_area_moves_off_a_segment_that_covers_0x9000() -> None:
    seg = mb.Segment(paddr=0x8000, vaddr=0x8000, data=b"\x90", memsz=0x3800)
    image = mb.MultibootImage("low.elf", 32, mb.MultibootHeader(0, 0, 0), 0x8000, (seg,), {}, ())
    assert mb.plan(image, MEMORY, apic=True).area == 0xC000


def test_the_command_line_is_the_file_name_unless_given() -> None:
    image = mb.read_image(build("boot64.S"))
    assert mb.plan(image, MEMORY, apic=True).cmdline == b"boot64.mb"
    assert mb.plan(image, MEMORY, apic=True, cmdline="test=nmi v").cmdline == b"test=nmi v"


def test_loading_zeroes_the_machines_own_structures_and_builds_none() -> None:
    m = Machine(MEMORY)
    assert m.phys.read(GDT_BASE + 8, 8) != bytes(8)  # Machine() wrote its GDT
    mb.load(m, mb.read_image(build("boot64.S")))
    assert m.phys.read(0, 0x9000) == bytes(0x9000)
    assert "gdt" in m.symbols and m.symbols["gdt"] == mb.read_image(build("boot64.S")).symbols["gdt"]
    assert "pml4" in m.symbols  # the image's own


def test_a_missing_image_is_one_line_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput) as exc:
        mb.read_image(tmp_path / "nope.elf")
    assert str(exc.value) == f"{tmp_path / 'nope.elf'}: no such file"


def test_a_multiboot_machine_finds_the_acpi_tables_where_a_firmware_leaves_them() -> None:
    """kvm-unit-tests' lib/acpi.c: "RSD PTR " on a 16-byte boundary in 0xE0000-0xFFFFF,
    checksum 0; the RSDT lists the FADT (whose FACS and DSDT pointers are set), the MADT
    and the HPET table, each with a valid checksum."""
    m = Machine(MEMORY)
    mb.load(m, mb.read_image(build("boot64.S")))
    bios = m.phys.read(0xE0000, 0x20000)
    at = next(i for i in range(0, len(bios), 16) if bios[i:i + 8] == b"RSD PTR ")
    rsdp = bios[at:at + 20]
    assert sum(rsdp) & 0xFF == 0
    rsdt = struct.unpack_from("<I", rsdp, 16)[0]
    length = struct.unpack_from("<I", m.phys.read(rsdt + 4, 4))[0]
    table = m.phys.read(rsdt, length)
    assert table[:4] == b"RSDT" and sum(table) & 0xFF == 0
    pointers = struct.unpack_from(f"<{(length - 36) // 4}I", table, 36)
    signatures = [m.phys.read(p, 4) for p in pointers]
    assert signatures == [b"FACP", b"APIC", b"HPET"]
    for p in pointers:
        n = struct.unpack_from("<I", m.phys.read(p + 4, 4))[0]
        assert sum(m.phys.read(p, n)) & 0xFF == 0
    fadt = pointers[0]
    facs, dsdt = struct.unpack_from("<II", m.phys.read(fadt + 36, 8))
    assert m.phys.read(facs, 4) == b"FACS" and m.phys.read(dsdt, 4) == b"DSDT"
