"""The build of the multiboot images and of the Bochs boot disk: the boot sector, the
parameter block, the disk layout, what the runners accept as an image. No emulator."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from guest_images import build as gib
from idtlab import ref
from idtlab.errors import BadInput

SECTOR = 512


def test_the_boot_sector_is_one_sector_ending_in_the_boot_signature_with_a_zero_parameter_block() -> None:
    sector = gib.boot_sector()
    assert len(sector) == SECTOR
    assert sector[510:] == b"\x55\xaa"
    assert struct.unpack_from(gib.BOOT_PARAM_FORMAT, sector, gib.BOOT_PARAM_OFFSET) == (
        0x100000, 0x100000, 0)
    assert sector[0] == 0xFA            # cli: the first instruction


def test_every_multiboot_image_is_an_elf64_with_an_elf32_copy_and_a_header_at_1_mib(
        built_images: dict[str, gib.MultibootImage]) -> None:
    assert sorted(built_images) == ["ac_lock_rmw", "bp_stacks", "canon_branch", "db_breakpoint",
                                    "debug_regs", "int_gates", "io_perm", "iret_rules",
                                    "nmi_apic", "np_df", "pf_codes", "rf_frames", "shadow_chain",
                                    "ss_gp_segment", "step_emulated", "store_fault"]
    for name, im in built_images.items():
        with im.elf.open("rb") as f:
            elf = ELFFile(f)
            assert (elf.elfclass, elf.header["e_machine"]) == (64, "EM_X86_64"), name
            entry = elf.header["e_entry"]
            loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            assert loads[0]["p_paddr"] == 0x100000, name
        with im.elf32.open("rb") as f:
            elf32 = ELFFile(f)
            assert (elf32.elfclass, elf32.header["e_machine"]) == (32, "EM_386"), name
            assert elf32.header["e_entry"] == entry, name
        raw = im.elf.read_bytes()
        off = gib.multiboot_header_offset(raw)
        assert off is not None and off < gib.MULTIBOOT_SEARCH, name
        assert struct.unpack_from("<III", raw, off) == (0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)


def test_the_memory_image_starts_with_the_multiboot_header_and_ends_with_zeroed_bss(
        built_images: dict[str, gib.MultibootImage]) -> None:
    im = built_images["pf_codes"]
    layout = ref.read_multiboot(im.elf)
    with im.elf.open("rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        end = max(s["p_paddr"] + s["p_memsz"] for s in loads)
        data_seg = loads[-1]
        bss_from = data_seg["p_paddr"] + data_seg["p_filesz"] - 0x100000
        assert (layout.entry, layout.load_addr, layout.elf_class) == (elf.header["e_entry"], 0x100000, 64)
    assert len(layout.memory) == end - 0x100000
    assert layout.memory[:4] == struct.pack("<I", 0x1BADB002)
    assert layout.memory[bss_from:] == bytes(len(layout.memory) - bss_from)
    # The ELF32 copy lays out the same bytes.
    assert ref.read_multiboot(im.elf32).memory == layout.memory


def test_the_bochs_disk_is_the_patched_boot_sector_then_the_image_padded_to_whole_cylinders(
        built_images: dict[str, gib.MultibootImage]) -> None:
    layout = ref.read_multiboot(built_images["np_df"].elf)
    disk, cylinders = ref.bochs_disk(layout)
    sectors = -(-len(layout.memory) // SECTOR)
    assert cylinders == 1 and len(disk) == 16 * 63 * SECTOR
    assert struct.unpack_from(gib.BOOT_PARAM_FORMAT, disk, gib.BOOT_PARAM_OFFSET) == (
        0x100000, layout.entry, sectors)
    boot = bytearray(disk[:SECTOR])
    struct.pack_into(gib.BOOT_PARAM_FORMAT, boot, gib.BOOT_PARAM_OFFSET, 0x100000, 0x100000, 0)
    assert bytes(boot) == gib.boot_sector()
    assert disk[SECTOR:SECTOR + len(layout.memory)] == layout.memory
    assert disk[SECTOR + len(layout.memory):] == bytes(len(disk) - SECTOR - len(layout.memory))


def test_the_bochs_configuration_uses_the_skylake_x_model_and_the_disk_geometry() -> None:
    rc = ref.bochsrc("disk.img", 3, "serial.log", "bochs.out").splitlines()
    assert "cpu: model=corei7_skylake_x, count=1, ips=50000000, reset_on_triple_fault=0, ignore_bad_msrs=1" in rc
    assert "ata0-master: type=disk, mode=flat, path=disk.img, cylinders=3, heads=16, spt=63" in rc
    assert "com1: enabled=1, mode=file, dev=serial.log" in rc
    assert "megs: 64" in rc and "boot: disk" in rc


def test_an_image_too_large_for_the_boot_buffer_or_below_1_mib_is_bad_input() -> None:
    big = ref.MultibootLayout(entry=0x100000, load_addr=0x100000, memory=bytes(0x90000), elf_class=64)
    with pytest.raises(BadInput, match=r"^image is 576 KiB .* reads at most 572 KiB$"):
        ref.bochs_disk(big)
    low = ref.MultibootLayout(entry=0x8000, load_addr=0x8000, memory=bytes(16), elf_class=32)
    with pytest.raises(BadInput, match=r"^image loads at 0x8000; the Bochs boot sector places"):
        ref.bochs_disk(low)


def test_the_runners_reject_a_non_elf_and_an_elf_without_a_multiboot_header(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BadInput, match=r"notes.txt: not an ELF file"):
        ref.read_multiboot(text)
    plain = gib.build_image("bp_ist")         # a scenario image: 64-bit entry, no header
    with pytest.raises(BadInput, match=r"bp_ist.elf: no multiboot v1 header"):
        ref.read_multiboot(plain)
    with pytest.raises(BadInput, match=r"^no_such_image: no such file, and not one of the images"):
        ref.resolve_image("no_such_image")


def test_an_assembler_error_is_one_line_naming_the_image_file_and_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mb = tmp_path / "mb"
    shutil.copytree(gib.MB_LIB_DIR, mb / "lib")
    (mb / "broken.S").write_text('    .include "idtlog.inc"\n    IMAGE_NAME "broken"\n'
                                 "image_main:\n    movx rax, 1\n    ret\n")
    monkeypatch.setattr(gib, "MB_DIR", mb)
    monkeypatch.setattr(gib, "MB_LIB_DIR", mb / "lib")
    monkeypatch.setattr(gib, "MB_LINKER_SCRIPT", mb / "lib" / "mb.ld")
    with pytest.raises(BadInput) as exc:
        gib.build_mb_image("broken", out_dir=tmp_path / "out")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("guest_images/mb/broken.S:4: Error: ")
