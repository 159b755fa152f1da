"""Mutated images are input errors or runs, never crashes: a valid ELF64 scenario image
and a valid multiboot image, with bytes and header fields overwritten, either load
(and then run to a documented outcome) or fail with one `BadInput` line.

Budget: IDTLAB_FUZZ_EXAMPLES examples per image kind (default 60; thousands for a long
local run)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpu import multiboot as mbt
from cpu.elf import load_elf
from cpu.errors import BadInput
from cpu.machine import Machine
from cpu.outcomes import OUTCOMES
from guest_images.build import build_image, build_mb_image
from idtlab import scenario as scn

EXAMPLES = int(os.environ.get("IDTLAB_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ROOT = Path(__file__).resolve().parents[2]


def _field_offsets(raw: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every ELF header, program-header and section-header field of
    an ELF64 or ELF32 image: where a mutation means the most."""
    is64 = raw[4] == 2
    out: list[tuple[int, int]] = []
    if is64:
        out += [(0x18, 8), (0x20, 8), (0x28, 8), (0x36, 2), (0x38, 2), (0x3A, 2), (0x3C, 2),
                (0x3E, 2)]
        phoff, shoff = struct.unpack_from("<QQ", raw, 0x20)
        phnum, shnum = struct.unpack_from("<H", raw, 0x38)[0], struct.unpack_from("<H", raw, 0x3C)[0]
        for i in range(phnum):
            base = phoff + 56 * i
            out += [(base + o, w) for o, w in ((0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8),
                                               (40, 8))]
        for i in range(shnum):
            base = shoff + 64 * i
            out += [(base + o, w) for o, w in ((4, 4), (8, 8), (16, 8), (24, 8), (32, 8),
                                               (40, 4), (56, 8))]
    else:
        out += [(0x18, 4), (0x1C, 4), (0x20, 4), (0x2C, 2), (0x30, 2), (0x32, 2)]
        phoff, shoff = struct.unpack_from("<II", raw, 0x1C)
        phnum, shnum = struct.unpack_from("<H", raw, 0x2C)[0], struct.unpack_from("<H", raw, 0x30)[0]
        for i in range(phnum):
            out += [(phoff + 32 * i + o, 4) for o in range(0, 32, 4)]
        for i in range(shnum):
            out += [(shoff + 40 * i + o, 4) for o in range(4, 40, 4)]
    return [(o, w) for o, w in out if o + w <= len(raw)]


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    data = bytearray(raw)
    fields = _field_offsets(raw)
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            offset, width = draw(st.sampled_from(fields))
            value = draw(st.sampled_from([0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), 0x1000,
                                          len(raw), len(raw) + 1, 0x7FFFFFFF]) |
                         st.integers(0, 2**(8 * width) - 1))
            data[offset:offset + width] = (value % 2**(8 * width)).to_bytes(width, "little")
        else:
            offset = draw(st.integers(0, len(raw) - 1))
            data[offset] = draw(st.integers(0, 255))
    return bytes(data)


BP_IST = build_image("bp_ist").read_bytes()
MB_ELF = build_mb_image("int_gates").elf.read_bytes()
MB_ELF32 = build_mb_image("int_gates").elf32.read_bytes()


@FUZZ
@given(image=mutated(BP_IST))
def test_a_mutated_elf_scenario_image_loads_and_runs_or_is_bad_input(
        tmp_path_factory: pytest.TempPathFactory, image: bytes) -> None:
    folder = tmp_path_factory.mktemp("elf")
    (folder / "x.elf").write_bytes(image)
    toml = (ROOT / "guest_images" / "bp_ist.toml").read_text().replace("build/bp_ist.elf", "x.elf")
    (folder / "s.toml").write_text(toml)
    try:
        load_elf(folder / "x.elf")
        sc = scn.load(folder / "s.toml")
    except BadInput as exc:
        assert "\n" not in str(exc)
        return
    sc.run_args["max_insns"] = 5000
    assert scn.run(sc).outcome in OUTCOMES


@FUZZ
@given(image=st.sampled_from([MB_ELF, MB_ELF32]).flatmap(mutated))
def test_a_mutated_multiboot_image_boots_or_is_bad_input(image: bytes) -> None:
    try:
        parsed = mbt.parse(image, "x.elf")
        m = Machine(32 << 20, max_insns=20_000, max_events=500)
        mbt.load(m, parsed)
    except BadInput as exc:
        assert "\n" not in str(exc)
        return
    assert m.run().outcome in OUTCOMES


def test_a_segment_with_memsz_below_filesz_is_bad_input(tmp_path: Path) -> None:
    raw = bytearray(BP_IST)
    phoff = struct.unpack_from("<Q", raw, 0x20)[0]
    filesz = struct.unpack_from("<Q", raw, phoff + 32)[0]
    struct.pack_into("<Q", raw, phoff + 40, filesz - 1)
    (tmp_path / "x.elf").write_bytes(raw)
    with pytest.raises(BadInput, match=r"p_memsz .* < p_filesz"):
        load_elf(tmp_path / "x.elf")


def test_a_huge_code_section_is_decoded_only_as_far_as_its_segment(tmp_path: Path) -> None:
    # A corrupt .text size makes the section run far past the loaded segment.
    raw = bytearray(BP_IST)
    shoff = struct.unpack_from("<Q", raw, 0x28)[0]
    shnum = struct.unpack_from("<H", raw, 0x3C)[0]
    for i in range(shnum):
        flags = struct.unpack_from("<Q", raw, shoff + 64 * i + 8)[0]
        if flags & 0x4:  # SHF_EXECINSTR
            struct.pack_into("<Q", raw, shoff + 64 * i + 32, 13 << 20)
    (tmp_path / "x.elf").write_bytes(raw)
    image = load_elf(tmp_path / "x.elf")
    executable = [(s.vaddr, s.vaddr + s.memsz) for s in image.segments if s.executable]
    assert image.code_ranges
    assert all(any(lo <= a < b <= hi for lo, hi in executable) for a, b in image.code_ranges)


def test_a_program_header_offset_beyond_any_file_is_bad_input(tmp_path: Path) -> None:
    # pyelftools seeks there and Python raises OverflowError, not an ELFError.
    raw = bytearray(BP_IST)
    struct.pack_into("<Q", raw, 0x20, 2**63 + 5)
    (tmp_path / "x.elf").write_bytes(raw)
    with pytest.raises(BadInput, match=r"malformed ELF file \(OverflowError"):
        load_elf(tmp_path / "x.elf")


def test_a_segment_outside_guest_memory_is_bad_input(tmp_path: Path) -> None:
    raw = bytearray(BP_IST)
    phoff = struct.unpack_from("<Q", raw, 0x20)[0]
    struct.pack_into("<Q", raw, phoff + 24, 0x7_0000_0000)  # p_paddr
    (tmp_path / "x.elf").write_bytes(raw)
    toml = (ROOT / "guest_images" / "bp_ist.toml").read_text().replace("build/bp_ist.elf", "x.elf")
    (tmp_path / "s.toml").write_text(toml)
    with pytest.raises(BadInput, match="outside guest memory"):
        scn.load(tmp_path / "s.toml")
