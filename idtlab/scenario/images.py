"""`[[image]]`: ELF files in guest memory, or a multiboot kernel that boots itself.

An ordinary image is an x86-64 ELF whose PT_LOAD segments are copied to their physical
addresses (each claims its region of guest memory), whose executable ranges are code
(IRET and HLT sites found by decoding them) and whose symbols join the scenario's.

A multiboot image (`multiboot = true`, the only `[[image]]`) boots itself, as GRUB or
QEMU's `-kernel` would start it (Multiboot Specification 0.6.96, "Machine state"): it
brings its own GDT, IDT, TSS and page tables and starts at its own 32-bit entry, so the
tables that would build those structures or give a start state are refused
(`check_multiboot`). `build/<name>.elf` under `guest_images/` (and the #VE image under
`guest_images/vmx_ve/`) is built from its committed sources when a scenario names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpu import multiboot as mbt
from cpu.elf import load_elf
from guest_images import build as gib
from guest_images.vmx_ve import build as vmx_build
from idtlab.errors import BadInput
from idtlab.scenario.checker import Checker
from idtlab.scenario.context import Build

IMAGE_KEYS = ("elf", "multiboot", "cmdline")
# Tables a multiboot image builds or decides itself.
NOT_WITH_MULTIBOOT = ("code", "data", "idt", "tss", "pages")
RUN_NOT_WITH_MULTIBOOT = ("entry", "rsp", "cpl", "rflags", "regs")


def check_multiboot(data: dict[str, Any], chk: Checker) -> bool:
    """Validate the `[[image]]` tables; True when the scenario boots a multiboot image
    (then nothing else may build system structures or set the start state)."""
    images = chk.array_of_tables(data.get("image", []), "[[image]]")
    for i, im in enumerate(images, 1):
        chk.keys(im, IMAGE_KEYS, f"[[image]] #{i}")
    multiboot = any(chk.bool_(im.get("multiboot", False), f"[[image]] #{i} multiboot")
                    for i, im in enumerate(images, 1))
    if multiboot:
        if len(images) != 1:
            raise chk.fail("[[image]]", "a multiboot image must be the only [[image]]")
        for table in NOT_WITH_MULTIBOOT:
            if table in data:
                raise chk.fail(f"[{table}]" if table in ("idt", "tss") else f"[[{table}]]",
                               "not with a multiboot image (the image builds its own "
                               "structures and loads its own code)")
        for key in RUN_NOT_WITH_MULTIBOOT:
            if key in chk.table(data.get("run", {}), "[run]"):
                raise chk.fail(f"[run] {key}", "not with a multiboot image (it starts at its own "
                               "32-bit entry, in the state the multiboot specification defines)")
    elif any("cmdline" in im for im in images):
        raise chk.fail("[[image]] cmdline", "only for a multiboot image (multiboot = true)")
    return multiboot


def build_images(b: Build) -> None:
    """Load every `[[image]]` (after `check_multiboot`)."""
    chk, m = b.chk, b.machine
    for i, im in enumerate(b.data.get("image", []), 1):
        where = f"[[image]] #{i}"
        if b.multiboot:
            _load_multiboot(b, im, where)
            b.symbols.clear()  # the machine's own structures (gdt, idt...) are not there
            b.symbols.update(m.symbols)
            continue
        if not isinstance(im.get("elf"), str):
            raise chk.fail(where, "missing key 'elf' (path to an x86-64 ELF file)")
        elf_path = (b.path.parent / im["elf"]).resolve()
        build_guest_image_if_needed(elf_path)
        image = load_elf(elf_path)
        for seg in image.segments:
            if seg.memsz == 0:
                continue
            b.region(seg.paddr, seg.memsz, f"{where} segment at {seg.paddr:#x}")
            m.load(seg.paddr, seg.data + bytes(seg.memsz - len(seg.data)))
        for lo, hi in image.code_ranges:
            if m.phys.contains(lo, hi - lo):  # a segment linked where it is not loaded: found
                m.add_code(lo, m.phys.read(lo, hi - lo))  # when it runs (cpu/sites.py)
        for name, value in image.symbols.items():
            if name in b.symbols and b.symbols[name] != value:
                raise chk.fail(where, f"symbol '{name}' from {im['elf']} is already defined")
            b.symbols[name] = value


def _load_multiboot(b: Build, im: dict[str, Any], where: str) -> None:
    chk = b.chk
    if not isinstance(im.get("elf"), str):
        raise chk.fail(where, "missing key 'elf' (path to a multiboot ELF32 or ELF64 image)")
    cmdline = im.get("cmdline")
    if cmdline is not None and not isinstance(cmdline, str):
        raise chk.fail(f"{where} cmdline", "expected a string")
    elf_path = (b.path.parent / im["elf"]).resolve()
    build_guest_image_if_needed(elf_path)
    try:
        mbt.load(b.machine, mbt.read_image(elf_path), cmdline=cmdline)
    except BadInput as exc:
        raise chk.fail(f"{where} elf", str(exc)) from None


def build_guest_image_if_needed(elf_path: Path) -> None:
    """Build guest_images/build/<name>.elf, or the #VE image
    guest_images/vmx_ve/build/vmx_ve.elf, from its committed sources if needed."""
    build_dir = Path(gib.__file__).resolve().parent / "build"
    if elf_path.parent == build_dir and elf_path.suffix == ".elf":
        gib.build_image(elf_path.stem)
    elif elf_path == vmx_build.BUILD_DIR / f"{vmx_build.NAME}.elf":
        vmx_build.build()
