"""Build guest images: guest_images/<name>.S -> guest_images/build/<name>.elf.

Images are assembled with GNU as and linked with GNU ld (guest_images/image.ld), not
with Keystone: they are meant to be ordinary ELF files, as a kernel's entry code would
be, so that loading real toolchain output is what gets tested. Only the sources are in
git; the ELF files are build products, cached next to the sources and rebuilt when the
source, the linker script or this file is newer.

    python -m guest_images.build            # build every guest_images/*.S
    python -m guest_images.build bp_ist     # build one
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from idtlab.errors import BadInput

GUEST_DIR = Path(__file__).resolve().parent
BUILD_DIR = GUEST_DIR / "build"
LINKER_SCRIPT = GUEST_DIR / "image.ld"

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
    if _is_fresh(out, (source, LINKER_SCRIPT, Path(__file__))):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build in a private directory and rename into place, so that concurrent builds
    # (parallel test runs) never see a half-written ELF.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
        obj = Path(tmp) / f"{name}.o"
        elf = Path(tmp) / f"{name}.elf"
        # Run from guest_images/ with the bare file name so that messages read
        # "bp_ist.S:12: Error: ...".
        _run(shown, ["as", "--64", "-o", str(obj), source.name], cwd=GUEST_DIR,
             failure=lambda line: f"guest_images/{line}")
        _run(shown, ["ld", "-m", "elf_x86_64", "-T", str(LINKER_SCRIPT), "-z", "noexecstack",
                     "--build-id=none", "-o", str(elf), str(obj)], cwd=GUEST_DIR,
             failure=lambda line: f"{shown}: link failed: {line}")
        os.replace(elf, out)
    return out


def _is_fresh(out: Path, inputs: Sequence[Path]) -> bool:
    try:
        built = out.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(p.stat().st_mtime_ns <= built for p in inputs)


def _run(shown: str, argv: list[str], cwd: Path, failure: Callable[[str], str]) -> None:
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
    try:
        for name in names:
            print(build_image(name))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
