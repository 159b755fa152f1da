"""Shared helpers of the multiboot tests: build fixture images from GNU as sources (the
committed tests/multiboot/*.S, or a source string) with as, ld and objcopy, and boot
them on a fresh machine."""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cpu import multiboot as mb
from cpu.machine import Machine
from cpu.outcomes import RunResult

HERE = Path(__file__).resolve().parent
LINKER_SCRIPT = HERE / "mb.ld"
MEMORY = 64 << 20
# The 32-bit entry the boot64 fixture and the inline sources share: a multiboot header
# (flags 0), then `start`.
HEADER = """
    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002, 0, -0x1BADB002
    .text
    .code32
    .globl start
start:
"""

if shutil.which("as") is None or shutil.which("ld") is None or shutil.which("objcopy") is None:
    pytest.skip("the multiboot fixtures need GNU binutils (as, ld, objcopy)",
                allow_module_level=True)


@functools.cache
def _build_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="idtlab-mb-"))


@functools.cache
def build(source: str, *, elf32: bool = True) -> Path:
    """Assemble and link `source` (a file name in tests/multiboot/, or GNU as text) into a
    multiboot image: ELF64, converted with `objcopy -O elf32-i386` when `elf32`."""
    out = _build_dir()
    if source.endswith(".S"):
        src = HERE / source
        stem = src.stem
    else:
        stem = "inline-" + hashlib.sha1(source.encode()).hexdigest()[:12]
        src = out / f"{stem}.S"
        src.write_text(source)
    obj, elf, mb32 = out / f"{stem}.o", out / f"{stem}.elf", out / f"{stem}.mb"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(LINKER_SCRIPT), "-z", "noexecstack",
                    "--build-id=none", "-o", str(elf), str(obj)], check=True, capture_output=True)
    if not elf32:
        return elf
    subprocess.run(["objcopy", "-O", "elf32-i386", str(elf), str(mb32)], check=True,
                   capture_output=True)
    return mb32


def boot(source: str, *, elf32: bool = True, mode: str = "fast", memory: int = MEMORY,
         apic: bool = True, max_insns: int = 1_000_000, cmdline: str | None = None,
         ) -> tuple[Machine, mb.MultibootImage, mb.BootInfo, RunResult]:
    m = Machine(memory, mode=mode, apic=apic)
    image = mb.read_image(build(source, elf32=elf32))
    info = mb.load(m, image, cmdline=cmdline)
    return m, image, info, m.run(max_insns=max_insns)


def inline(body32: str, tail: str = "") -> str:
    """A multiboot source: `body32` runs at the 32-bit entry; `tail` follows (data...)."""
    return HEADER + body32 + "\n" + tail + "\n"
