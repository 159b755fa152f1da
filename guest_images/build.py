"""Build guest images: guest_images/<name>.S -> guest_images/build/<name>.elf, and the
self-logging multiboot images guest_images/mb/<name>.S -> guest_images/build/mb/<name>.elf
(ELF64) plus <name>.elf32 (the `objcopy -O elf32-i386` copy QEMU's -kernel needs).

Images are assembled with GNU as and linked with GNU ld (guest_images/image.ld), not
with Keystone: they are meant to be ordinary ELF files, as a kernel's entry code would
be, so that loading real toolchain output is what gets tested. Only the sources are in
git; the ELF files are build products, cached next to the sources and rebuilt when the
source, the linker script or this file is newer.

    python -m guest_images.build            # build every guest_images/*.S
    python -m guest_images.build bp_ist     # build one
    python -m guest_images.build mb         # build every guest_images/mb/*.S
    python -m guest_images.build mb/pf_codes

A multiboot image is its own source linked with guest_images/mb/lib/runtime.S (boot,
long mode, IDT, UART, exit) by guest_images/mb/lib/mb.ld; see docs/differential.md.
The Bochs boot sector guest_images/boot/bootsect.S is built here too (boot_sector()).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cpu.errors import BadInput

GUEST_DIR = Path(__file__).resolve().parent
BUILD_DIR = GUEST_DIR / "build"
LINKER_SCRIPT = GUEST_DIR / "image.ld"

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

MB_DIR = GUEST_DIR / "mb"
MB_LIB_DIR = MB_DIR / "lib"
MB_LINKER_SCRIPT = MB_LIB_DIR / "mb.ld"
MB_BUILD_DIR = BUILD_DIR / "mb"
BOOT_SECTOR_SOURCE = GUEST_DIR / "boot" / "bootsect.S"

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192     # the header must be in the first 8 KiB, 4-byte aligned


@dataclass(frozen=True)
class MultibootImage:
    """A built self-logging image: the ELF64 (idtlab, the Bochs disk) and its ELF32 copy
    (QEMU -kernel)."""

    name: str
    elf: Path
    elf32: Path


def image_names() -> list[str]:
    """Every image that has a source in guest_images/."""
    return sorted(p.stem for p in GUEST_DIR.glob("*.S"))


def build_image(name: str, out_dir: Path | None = None) -> Path:
    """Return the path of the built `<name>.elf`, (re)building it if it is stale."""
    shown = f"guest_images/{name}.S"
    if not _NAME_RE.fullmatch(name):
        raise BadInput(f"{shown}: not a guest image name (expected a file stem like 'bp_ist')")
    source = GUEST_DIR / f"{name}.S"
    if not source.is_file():
        known = ", ".join(image_names()) or "none"
        raise BadInput(f"{shown}: no such guest image source (available: {known})")
    out_dir = BUILD_DIR if out_dir is None else Path(out_dir)
    out = out_dir / f"{name}.elf"
    if is_fresh(out, (source, LINKER_SCRIPT, Path(__file__))):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build in a private directory and rename into place, so that concurrent builds
    # (parallel test runs) never see a half-written ELF.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
        obj = Path(tmp) / f"{name}.o"
        elf = Path(tmp) / f"{name}.elf"
        # Run from guest_images/ with the bare file name so that messages read
        # "bp_ist.S:12: Error: ...".
        run_tool(shown, ["as", "--64", "-o", str(obj), source.name], cwd=GUEST_DIR,
             failure=lambda line: f"guest_images/{line}")
        run_tool(shown, ["ld", "-m", "elf_x86_64", "-T", str(LINKER_SCRIPT), "-z", "noexecstack",
                     "--build-id=none", "-o", str(elf), str(obj)], cwd=GUEST_DIR,
             failure=lambda line: f"{shown}: link failed: {line}")
        os.replace(elf, out)
    return out


def mb_image_names() -> list[str]:
    """Every self-logging multiboot image that has a source in guest_images/mb/."""
    return sorted(p.stem for p in MB_DIR.glob("*.S"))


def _mb_inputs() -> list[Path]:
    return [*sorted(MB_LIB_DIR.glob("*.S")), *sorted(MB_LIB_DIR.glob("*.inc")),
            MB_LINKER_SCRIPT, Path(__file__)]


def build_mb_image(name: str, out_dir: Path | None = None) -> MultibootImage:
    """Build guest_images/mb/<name>.S with the runtime into <name>.elf and <name>.elf32
    (rebuilt when stale); assembler and linker errors are one-line `BadInput`s naming
    the file and line."""
    shown = f"guest_images/mb/{name}.S"
    if not _NAME_RE.fullmatch(name):
        raise BadInput(f"{shown}: not a guest image name (expected a file stem like 'pf_codes')")
    source = MB_DIR / f"{name}.S"
    if not source.is_file():
        known = ", ".join(mb_image_names()) or "none"
        raise BadInput(f"{shown}: no such multiboot image source (available: {known})")
    out_dir = MB_BUILD_DIR if out_dir is None else Path(out_dir)
    out = MultibootImage(name, out_dir / f"{name}.elf", out_dir / f"{name}.elf32")
    inputs = [source, *_mb_inputs()]
    if is_fresh(out.elf, inputs) and is_fresh(out.elf32, inputs):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "guest_images/mb/"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
        objs: list[str] = []
        for src in [source, *sorted(MB_LIB_DIR.glob("*.S"))]:
            rel = src.relative_to(MB_DIR).as_posix()
            obj = Path(tmp) / (rel.replace("/", "_") + ".o")
            # Run from guest_images/mb/ so that messages read "pf_codes.S:12: Error: ..."
            # or "lib/runtime.S:40: Error: ...".
            run_tool(f"{prefix}{rel}", ["as", "--64", "-I", "lib", "-o", str(obj), rel], cwd=MB_DIR,
                 failure=lambda line: f"{prefix}{line}")
            objs.append(str(obj))
        elf = Path(tmp) / f"{name}.elf"
        elf32 = Path(tmp) / f"{name}.elf32"
        run_tool(shown, ["ld", "-m", "elf_x86_64", "-T", str(MB_LINKER_SCRIPT), "-z", "noexecstack",
                     "-z", "max-page-size=0x1000", "--build-id=none", "-o", str(elf), *objs],
             cwd=MB_DIR, failure=lambda line: f"{shown}: link failed: {line}")
        run_tool(shown, ["objcopy", "-O", "elf32-i386", str(elf), str(elf32)], cwd=MB_DIR,
             failure=lambda line: f"{shown}: objcopy -O elf32-i386 failed: {line}")
        offset = multiboot_header_offset(elf.read_bytes())
        if offset is None:
            raise BadInput(f"{shown}: no multiboot header in the first {MULTIBOOT_SEARCH} bytes "
                           "of the linked image")
        os.replace(elf, out.elf)
        os.replace(elf32, out.elf32)
    return out


def multiboot_header_offset(data: bytes) -> int | None:
    """File offset of a valid multiboot v1 header (magic, flags, checksum summing to 0,
    4-byte aligned, within the first 8 KiB), or None."""
    end = min(len(data), MULTIBOOT_SEARCH) - 12
    for off in range(0, end + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    return None


BOOT_SECTOR_SIZE = 512
# The boot sector's parameter block (guest_images/boot/bootsect.S, `.org 0x1f0`).
BOOT_PARAM_OFFSET = 0x1F0
BOOT_PARAM_FORMAT = "<IIH"      # load address, entry, image sectors


def boot_sector(out_dir: Path | None = None) -> bytes:
    """The Bochs boot sector (512 bytes, parameter block zero), built from
    guest_images/boot/bootsect.S when stale."""
    out_dir = BUILD_DIR if out_dir is None else Path(out_dir)
    out = out_dir / "bootsect.bin"
    shown = "guest_images/boot/bootsect.S"
    if not is_fresh(out, (BOOT_SECTOR_SOURCE, Path(__file__))):
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".bootsect-") as tmp:
            obj, elf, binary = (Path(tmp) / n for n in ("bootsect.o", "bootsect.elf",
                                                         "bootsect.bin"))
            run_tool(shown, ["as", "--32", "-o", str(obj), BOOT_SECTOR_SOURCE.name],
                 cwd=BOOT_SECTOR_SOURCE.parent, failure=lambda line: f"guest_images/boot/{line}")
            run_tool(shown, ["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "-e", "start", "-z",
                         "noexecstack", "--build-id=none", "-o", str(elf), str(obj)],
                 cwd=BOOT_SECTOR_SOURCE.parent, failure=lambda line: f"{shown}: link failed: {line}")
            run_tool(shown, ["objcopy", "-O", "binary", "-j", ".text", str(elf), str(binary)],
                 cwd=BOOT_SECTOR_SOURCE.parent,
                 failure=lambda line: f"{shown}: objcopy -O binary failed: {line}")
            data = binary.read_bytes()
            if len(data) != BOOT_SECTOR_SIZE or data[510:] != b"\x55\xaa":
                raise BadInput(f"{shown}: the boot sector is {len(data)} bytes (must be "
                               f"{BOOT_SECTOR_SIZE}, ending in 55 aa)")
            os.replace(binary, out)
    return out.read_bytes()


def is_fresh(out: Path, inputs: Sequence[Path]) -> bool:
    """`out` exists and is newer than every input."""
    try:
        built = out.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(p.stat().st_mtime_ns <= built for p in inputs)


def run_tool(shown: str, argv: list[str], cwd: Path, failure: Callable[[str], str]) -> None:
    """Run a binutils tool; its first error becomes one `BadInput` line (`failure`)."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BadInput(f"{shown}: cannot build: '{argv[0]}' not found (building guest "
                       "images needs GNU binutils)") from None
    if proc.returncode != 0:
        raise BadInput(failure(_first_error(proc.stderr) or f"{argv[0]} exited with "
                                                           f"status {proc.returncode}"))


def _first_error(stderr: str) -> str:
    """The first line that says what went wrong. GNU as prints an "Assembler messages:"
    header, then "file:line: Error: message" lines; ld prints "in function `f':" context
    before "(.text+0x1): undefined reference to `x'". Warnings are skipped."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in lines:
        if ": Error:" in line or ": error:" in line:
            return line
    for line in lines:
        if (line.endswith("Assembler messages:") or "warning:" in line.lower()
                or "in function" in line):
            continue
        return line
    return lines[0] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or image_names()
    if "mb" in names:
        names.remove("mb")
        names.extend(f"mb/{n}" for n in mb_image_names())
    try:
        for name in names:
            if name.startswith("mb/"):
                built = build_mb_image(name[3:])
                print(built.elf)
                print(built.elf32)
            else:
                print(build_image(name))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
