"""Build the #VE image: guest_images/vmx_ve/*.S -> build/vmx_ve.elf.

The image is a multiboot v1 kernel (ELF64) with a tiny hypervisor (boot32.S, hyp.S) and
a guest part (guest.S); log.S prints idtlog1 records. It is assembled with GNU as and
linked with GNU ld (vmx_ve.ld). On Bochs the whole image runs (idtlab.ref boots it); on
idtlab only the guest part does (guest.toml loads the same ELF and starts at
`guest_entry`). See docs/ve.md, "The #VE image: a tiny hypervisor for Bochs".

    python -m guest_images.vmx_ve.build          # prints the ELF's path

Build products are cached under build/ and rebuilt when a source, the linker script or
this file is newer; each build happens in a private directory and is renamed into place,
so parallel test runs never see a half-written file. Assembler and linker errors are one
`BadInput` line naming the file and line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cpu.errors import BadInput
from guest_images.build import is_fresh, run_tool

IMAGE_DIR = Path(__file__).resolve().parent
BUILD_DIR = IMAGE_DIR / "build"
NAME = "vmx_ve"
SOURCES = ("boot32.S", "hyp.S", "guest.S", "log.S")
INCLUDES = ("vmx_ve.inc",)
LINKER_SCRIPT = IMAGE_DIR / "vmx_ve.ld"
SHOWN = "guest_images/vmx_ve"


def image_name(eptp_index: int = 0, nmi_ist: int = 0) -> str:
    """`vmx_ve`, or e.g. `vmx_ve-eptp2` / `vmx_ve-nmiist3` for a variant (vmx_ve.inc)."""
    return NAME + (f"-eptp{eptp_index}" if eptp_index else "") + (f"-nmiist{nmi_ist}"
                                                                  if nmi_ist else "")


def build(out_dir: Path | None = None, *, eptp_index: int = 0, nmi_ist: int = 0) -> Path:
    """Return the path of `vmx_ve.elf`, (re)building it if it is stale. A variant's
    hypervisor writes `eptp_index` into the VMCS EPTP-index field, or puts the guest's
    NMI gate on IST `nmi_ist` (vmx_ve.inc says why both default to 0)."""
    if not 0 <= eptp_index <= 0xFFFF:
        raise BadInput(f"{SHOWN}: EPTP index {eptp_index} outside 0..0xffff")
    if nmi_ist not in (0, 3):
        raise BadInput(f"{SHOWN}: NMI IST {nmi_ist} not supported (0, or 3: the guest TSS's "
                       "IST3 is the NMI stack)")
    out_dir = BUILD_DIR if out_dir is None else Path(out_dir)
    name = image_name(eptp_index, nmi_ist)
    out = out_dir / f"{name}.elf"
    inputs = [IMAGE_DIR / s for s in (*SOURCES, *INCLUDES)] + [LINKER_SCRIPT, Path(__file__)]
    if is_fresh(out, inputs):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
        objs: list[str] = []
        for src in SOURCES:
            obj = Path(tmp) / src.replace(".S", ".o")
            # Run from the image directory with bare file names, so that messages read
            # "hyp.S:12: Error: ..." and `.include "vmx_ve.inc"` resolves.
            run_tool(SHOWN, ["as", "--64", "--defsym", f"EPTP_INDEX={eptp_index}", "--defsym",
                  f"NMI_IST={nmi_ist}", "-o", str(obj), src],
                     IMAGE_DIR, failure=lambda line: f"{SHOWN}/{line}")
            objs.append(str(obj))
        elf = Path(tmp) / f"{name}.elf"
        run_tool(SHOWN, ["ld", "-m", "elf_x86_64", "-T", str(LINKER_SCRIPT), "-z", "noexecstack",
                         "-z", "max-page-size=0x1000", "--build-id=none", "-o", str(elf), *objs],
                 IMAGE_DIR, failure=lambda line: f"{SHOWN}: link failed: {line}")
        os.replace(elf, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    try:
        print(build())
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
