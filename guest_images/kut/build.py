"""Build the kvm-unit-tests-style test kernel: guest_images/kut/mini.S ->
guest_images/build/kut/mini.flat, with guest_images/kut/unittests.cfg copied beside it,
so that the directory looks like a built kvm-unit-tests `x86/` directory to `idtlab suite`.

    python -m guest_images.kut.build         # prints the path of the unittests.cfg
    idtlab suite "$(python -m guest_images.kut.build)" --reference qemu

mini.flat is an ELF32 multiboot kernel, as kvm-unit-tests' .flat files are (they are
linked as ELF64 and converted with `objcopy -O elf32-i386`; mini.S is 32-bit code
throughout, so it is assembled and linked as i386 directly). Build products are rebuilt
when a source, the linker script or this file is newer, built in a private directory and
renamed into place; assembler and linker errors are one `BadInput` line.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cpu.errors import BadInput
from guest_images.build import BUILD_DIR as GUEST_BUILD_DIR
from guest_images.build import is_fresh, run_tool

IMAGE_DIR = Path(__file__).resolve().parent
BUILD_DIR = GUEST_BUILD_DIR / "kut"
SOURCE = IMAGE_DIR / "mini.S"
LINKER_SCRIPT = IMAGE_DIR / "mini.ld"
CONFIG = IMAGE_DIR / "unittests.cfg"
SHOWN = "guest_images/kut"


def build(out_dir: Path | None = None) -> Path:
    """Build mini.flat into `out_dir` (default guest_images/build/kut/), copy
    unittests.cfg beside it, and return the path of that copy."""
    out_dir = BUILD_DIR if out_dir is None else Path(out_dir)
    flat = out_dir / "mini.flat"
    cfg = out_dir / CONFIG.name
    inputs = [SOURCE, LINKER_SCRIPT, Path(__file__)]
    if not is_fresh(flat, inputs):
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".mini-") as tmp:
            obj = Path(tmp) / "mini.o"
            elf = Path(tmp) / "mini.flat"
            run_tool(SHOWN, ["as", "--32", "-o", str(obj), SOURCE.name], IMAGE_DIR,
                     failure=lambda line: f"{SHOWN}/{line}")
            run_tool(SHOWN, ["ld", "-m", "elf_i386", "-T", str(LINKER_SCRIPT), "-z",
                             "noexecstack", "--build-id=none", "-o", str(elf), str(obj)],
                     IMAGE_DIR, failure=lambda line: f"{SHOWN}: link failed: {line}")
            os.replace(elf, flat)
    if not is_fresh(cfg, [CONFIG]):
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / f".{CONFIG.name}.{os.getpid()}"
        shutil.copyfile(CONFIG, partial)
        os.replace(partial, cfg)
    return cfg


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
