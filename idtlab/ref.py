"""Reference runners: run a multiboot image headless in QEMU (TCG) or Bochs 2.7 and
collect what it prints on the serial port.

    idtlab ref qemu IMAGE        idtlab ref bochs IMAGE

IMAGE is a multiboot v1 kernel as an ELF64 or ELF32 file, or the name of one of our
self-logging images (`pf_codes`, built from guest_images/mb/pf_codes.S on demand).

- **QEMU** boots multiboot images with `-kernel`, but only ELF32 ones: an ELF64 image is
  copied with `objcopy -O elf32-i386` first (the build does this for ours), as
  kvm-unit-tests does. The command line is `qemu_command`; the image ends QEMU by
  writing v to the isa-debug-exit port 0xF4, and QEMU exits with status (v << 1) | 1.
- **Bochs** has no multiboot loader: the runner builds a disk whose sector 0 is our boot
  sector (guest_images/boot/bootsect.S: INT 13h AH=42h, protected mode, copy to the load
  address, jump to the entry with EAX = 0x2BADB002, EBX = a minimal multiboot
  information) and whose following sectors hold the image's memory image: the PT_LOAD
  segments laid out flat from the lowest load address, .bss as zeros. The image ends
  Bochs by writing "Shutdown" to port 0x8900; Bochs then exits with status 1 and the
  message "Shutdown port: shutdown requested", which is the normal end.

The guest's own verdict is in its log (docs/idtlog-format.md: the `end` record), not in
the emulator's exit status; `RefResult.verdict()` reads it.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from guest_images import build as gib
from idtlab.errors import BadInput

REFERENCES = ("bochs", "qemu")
DEFAULT_TIMEOUT = 30.0
MEMORY_MIB = 64     # both references; the boot sector's multiboot information says so

QEMU_BINARY = "qemu-system-x86_64"
BOCHS_BINARY = "bochs"
BOCHS_BIOS = Path("/usr/share/bochs/BIOS-bochs-latest")
BOCHS_VGABIOS = Path("/usr/share/vgabios/vgabios.bin")
INSTALL_HINT = {
    "qemu": "apt-get install qemu-system-x86",
    "bochs": "apt-get install bochs bochsbios vgabios",
}
# The Bochs CPU model: the SDM-faithful reference, with VMX, EPT and EPT-violation #VE.
BOCHS_CPU_MODEL = "corei7_skylake_x"

# Where the boot sector reads the image to (real mode, below the EBDA), and how much fits.
_BOOT_BUFFER = 0x10000
_BOOT_BUFFER_END = 0x9F000
_SECTOR = 512
_HEADS, _SPT = 16, 63


class ReferenceMissing(BadInput):
    """The reference emulator (or a file it needs) is not installed."""


@dataclass(frozen=True)
class RefResult:
    """One run of an image on a reference."""

    reference: str
    image: str
    log: str                    # everything the guest printed on COM1
    status: int | None          # the emulator's exit status; None if it was killed
    timed_out: bool
    seconds: float
    note: str = ""              # Bochs' exit message, or why the run was cut short

    def verdict(self) -> tuple[int, int] | None:
        """(pass, fail) from the image's `idtlog1 end` record, None if there is none."""
        for line in reversed(self.log.splitlines()):
            at = line.find("idtlog1 end ")
            if at < 0:
                continue
            fields = dict(f.split("=", 1) for f in line[at:].split()[3:] if "=" in f)
            try:
                return int(fields["pass"], 16), int(fields["fail"], 16)
            except (KeyError, ValueError):
                return None
        return None

    def status_line(self) -> str:
        """One line for humans: how the reference ended and what the image said."""
        took = f"{self.seconds:.2f} s"
        if self.timed_out:
            return (f"{self.reference}: no end after {took} (time limit reached; the image "
                    "may hang or wait for an event that never comes)")
        how = f"{self.reference} exited with status {self.status} after {took}"
        if self.reference == "qemu" and self.status is not None and self.status & 1:
            how += f" (the image wrote {self.status >> 1:#x} to port 0xf4)"
        if self.note:
            how += f"; {self.note}"
        v = self.verdict()
        if v is None:
            return how + "; no 'idtlog1 end' record in the log"
        return how + f"; image verdict: pass={v[0]} fail={v[1]}"


@dataclass(frozen=True)
class MultibootLayout:
    """What a multiboot loader needs from an ELF image."""

    entry: int
    load_addr: int
    memory: bytes               # [load_addr, end of the last segment's memsz), .bss zeroed
    elf_class: int              # 32 or 64


def available(reference: str) -> str | None:
    """None if `reference` can run here, else a one-line reason with the install hint."""
    if reference not in REFERENCES:
        raise BadInput(f"unknown reference {reference!r} (expected one of {', '.join(REFERENCES)})")
    hint = INSTALL_HINT[reference]
    if reference == "qemu":
        if shutil.which(QEMU_BINARY) is None:
            return f"{QEMU_BINARY} not found: install QEMU with `{hint}`"
        return None
    if shutil.which(BOCHS_BINARY) is None:
        return f"{BOCHS_BINARY} not found: install Bochs with `{hint}`"
    for f in (BOCHS_BIOS, BOCHS_VGABIOS):
        if not f.is_file():
            return f"{f} not found (Bochs needs its BIOS images): install them with `{hint}`"
    return None


def resolve_image(image: str | Path) -> Path:
    """A file path as given, or one of our self-logging images by name (built on demand)."""
    path = Path(image)
    if path.exists():
        return path
    name = str(image)
    name = name[3:] if name.startswith("mb/") else name
    if name in gib.mb_image_names():
        return gib.build_mb_image(name).elf
    known = ", ".join(gib.mb_image_names())
    raise BadInput(f"{image}: no such file, and not one of the images in guest_images/mb/ "
                   f"({known})")


def run_reference(reference: str, image: str | Path,
                  timeout: float = DEFAULT_TIMEOUT) -> RefResult:
    """Run `image` on `reference` ("bochs" or "qemu") and collect its serial log."""
    missing = available(reference)
    if missing is not None:
        raise ReferenceMissing(missing)
    path = resolve_image(image)
    if reference == "qemu":
        return run_qemu(path, timeout)
    return run_bochs(path, timeout)


def read_multiboot(path: Path) -> MultibootLayout:
    """Check that `path` is a multiboot v1 ELF (x86-64 or i386) a loader can place below
    4 GiB, and lay out its memory image."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise BadInput(f"{name}: is a directory, not an image") from None
    except OSError as e:
        raise BadInput(f"{name}: cannot read ({e.strerror})") from None
    if not raw.startswith(b"\x7fELF"):
        raise BadInput(f"{name}: not an ELF file (the references boot multiboot ELF images)")
    if gib.multiboot_header_offset(raw) is None:
        raise BadInput(f"{name}: no multiboot v1 header (magic 0x1badb002, valid checksum) in "
                       f"the first {gib.MULTIBOOT_SEARCH} bytes")
    try:
        elf = ELFFile(io.BytesIO(raw))
        machine = elf.header["e_machine"]
        if machine not in ("EM_X86_64", "EM_386"):
            raise BadInput(f"{name}: not an x86 image (e_machine {machine})")
        segs = [(int(s["p_paddr"]), s.data(), int(s["p_memsz"]))
                for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_memsz"]]
        entry = int(elf.header["e_entry"])
        elf_class = int(elf.elfclass)
    except ELFError as e:
        raise BadInput(f"{name}: malformed ELF file ({e})") from None
    if not segs:
        raise BadInput(f"{name}: no loadable segment")
    lo = min(p for p, _, _ in segs)
    hi = max(p + m for p, _, m in segs)
    if hi > 1 << 32 or entry >= 1 << 32:
        raise BadInput(f"{name}: loads or starts above 4 GiB (entry {entry:#x}); a multiboot "
                       "loader enters in 32-bit mode")
    if not lo <= entry < hi:
        raise BadInput(f"{name}: entry {entry:#x} is outside the loaded range "
                       f"{lo:#x}..{hi:#x}")
    memory = bytearray(hi - lo)
    for paddr, data, _ in segs:
        memory[paddr - lo:paddr - lo + len(data)] = data
    return MultibootLayout(entry=entry, load_addr=lo, memory=bytes(memory), elf_class=elf_class)


# ------------------------------------------------------------------------------ QEMU

def qemu_command(kernel: Path) -> list[str]:
    """The QEMU command line: TCG (never KVM), a plain PC with the `qemu64` CPU, 64 MiB,
    no default devices, the serial port on stdout and isa-debug-exit at 0xF4."""
    return [QEMU_BINARY, "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64",
            "-m", str(MEMORY_MIB), "-nodefaults", "-no-reboot", "-display", "none",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
            "-kernel", str(kernel)]


def run_qemu(image: Path, timeout: float = DEFAULT_TIMEOUT) -> RefResult:
    layout = read_multiboot(image)
    with tempfile.TemporaryDirectory(prefix="idtlab-qemu-") as tmp:
        kernel = image
        if layout.elf_class == 64:
            # QEMU's multiboot loader refuses ELF64 ("give a 32bit one").
            kernel = Path(tmp) / "image.elf32"
            try:
                proc = subprocess.run(["objcopy", "-O", "elf32-i386", str(image), str(kernel)],
                                      capture_output=True, text=True, check=False)
            except FileNotFoundError:
                raise BadInput(f"{image}: converting the ELF64 image for QEMU needs objcopy "
                               "(GNU binutils)") from None
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["failed"])[0]
                raise BadInput(f"{image}: objcopy -O elf32-i386: {first}")
        log, status, timed_out, took = _run(qemu_command(kernel), timeout, Path(tmp))
    return RefResult("qemu", str(image), log, status, timed_out, took)


# ------------------------------------------------------------------------------ Bochs

def bochs_disk(layout: MultibootLayout) -> tuple[bytes, int]:
    """The boot disk for `layout` and its cylinder count: sector 0 our boot sector with its
    parameter block filled in, then the memory image, padded to whole cylinders of
    16 heads x 63 sectors."""
    if layout.load_addr < 0x100000:
        raise BadInput(f"image loads at {layout.load_addr:#x}; the Bochs boot sector places "
                       "images at 1 MiB or above")
    sectors = -(-len(layout.memory) // _SECTOR)
    if sectors * _SECTOR > _BOOT_BUFFER_END - _BOOT_BUFFER:
        raise BadInput(f"image is {len(layout.memory) // 1024} KiB from its first to its last "
                       f"loaded byte; the Bochs boot sector reads at most "
                       f"{(_BOOT_BUFFER_END - _BOOT_BUFFER) // 1024} KiB")
    sector0 = bytearray(gib.boot_sector())
    struct.pack_into(gib.BOOT_PARAM_FORMAT, sector0, gib.BOOT_PARAM_OFFSET,
                     layout.load_addr, layout.entry, sectors)
    disk = bytes(sector0) + layout.memory + bytes(sectors * _SECTOR - len(layout.memory))
    per_cylinder = _HEADS * _SPT * _SECTOR
    cylinders = -(-len(disk) // per_cylinder)
    return disk + bytes(cylinders * per_cylinder - len(disk)), cylinders


def bochsrc(disk: str, cylinders: int, serial: str, log: str) -> str:
    """The Bochs configuration: a CPU model with VMX, EPT and EPT-violation #VE, no reset
    on triple fault, the boot disk, COM1 into a file, and a headless display (the Debian
    build has no "nogui" library: `rfb` with `timeout=0`)."""
    return "\n".join([
        f"megs: {MEMORY_MIB}",
        f"cpu: model={BOCHS_CPU_MODEL}, count=1, ips=50000000, reset_on_triple_fault=0, "
        "ignore_bad_msrs=1",
        f"romimage: file={BOCHS_BIOS}, options=fastboot",
        f"vgaromimage: file={BOCHS_VGABIOS}",
        'display_library: rfb, options="timeout=0"',
        f"ata0-master: type=disk, mode=flat, path={disk}, cylinders={cylinders}, "
        f"heads={_HEADS}, spt={_SPT}",
        "boot: disk",
        f"com1: enabled=1, mode=file, dev={serial}",
        f"log: {log}",
        "panic: action=fatal",
        "clock: sync=none, time0=local",
        "",
    ])


def run_bochs(image: Path, timeout: float = DEFAULT_TIMEOUT) -> RefResult:
    layout = read_multiboot(image)
    disk, cylinders = bochs_disk(layout)
    with tempfile.TemporaryDirectory(prefix="idtlab-bochs-") as tmp:
        d = Path(tmp)
        (d / "disk.img").write_bytes(disk)
        (d / "bochsrc").write_text(bochsrc("disk.img", cylinders, "serial.log", "bochs.out"))
        # The Debian build includes the debugger, which stops before the first
        # instruction: continue, then quit when the simulation ends.
        (d / "dbg.rc").write_text("c\nquit\n")
        out, status, timed_out, took = _run(
            [BOCHS_BINARY, "-f", "bochsrc", "-q", "-rc", "dbg.rc"], timeout, d, stderr=True)
        serial = d / "serial.log"
        log = serial.read_bytes().decode("latin-1") if serial.exists() else ""
    return RefResult("bochs", str(image), log, status, timed_out, took, _bochs_exit_message(out))


def _bochs_exit_message(stdout: str) -> str:
    """Bochs prints "Bochs is exiting with the following message:" and the message."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if "Bochs is exiting with the following message" in line and i + 1 < len(lines):
            return "bochs: " + lines[i + 1].strip()
    return ""


def _run(argv: list[str], timeout: float, cwd: Path,
         stderr: bool = False) -> tuple[str, int | None, bool, float]:
    """Run argv with stdin closed; (stdout, plus stderr if asked, status, timed_out,
    seconds)."""
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False, env={**os.environ, "LANG": "C"})
    except subprocess.TimeoutExpired as e:
        out = e.stdout if isinstance(e.stdout, bytes) else b""
        return out.decode("latin-1"), None, True, time.monotonic() - start
    out = proc.stdout + (proc.stderr if stderr else b"")
    return out.decode("latin-1"), proc.returncode, False, time.monotonic() - start


# ------------------------------------------------------------------------------ CLI

def add_parser(sub: Any) -> None:
    """`idtlab ref bochs|qemu IMAGE` (registered by idtlab/cli.py)."""
    p = sub.add_parser("ref", help="run a multiboot image on a reference emulator (Bochs or "
                       "QEMU) and print its serial log")
    p.add_argument("reference", choices=REFERENCES)
    p.add_argument("image", help="a multiboot ELF (ELF64 or ELF32), or the name of an image "
                   "in guest_images/mb/ (e.g. pf_codes)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds before the run is stopped ({DEFAULT_TIMEOUT:g})")
    p.add_argument("--log", metavar="OUT.log", help="also write the serial log to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the status line")


def run_cli(args: Any) -> int:
    """Print the serial log and a status line (stderr); exit 0 when the image's `end`
    record says fail=0, 1 when it reports failures, hung or ended without an `end`
    record. The reference's own exit status is in the status line."""
    if args.timeout <= 0:
        raise BadInput(f"ref: --timeout {args.timeout:g}: must be positive")
    result = run_reference(args.reference, args.image, timeout=args.timeout)
    if not args.quiet:
        print(result.log, end="" if result.log.endswith("\n") or not result.log else "\n")
    if args.log:
        Path(args.log).write_text(result.log)
    print(f"idtlab: {result.status_line()}", file=sys.stderr)
    verdict = result.verdict()
    return 0 if verdict is not None and verdict[1] == 0 and not result.timed_out else 1
