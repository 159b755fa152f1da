"""`idtlab suite UNITTESTS.cfg`: run a kvm-unit-tests suite on idtlab, and beside it on
QEMU TCG, one row per config.

Users of a differential tool run suites, not files. kvm-unit-tests describes its x86
suite in `x86/unittests.cfg`; its own runner (`run_tests.sh`, scripts/common.bash
`for_each_unittest` and scripts/runtime.bash `run`) reads it and boots each config's
`.flat` file on QEMU. This module reads the same file the same way and boots each config
twice: on idtlab, exactly as `idtlab run --image DIR/FILE --cmdline "DIR/FILE ARGS"`
would (it runs that command, in a child process, under a time limit), and, with
`--reference qemu`, on QEMU with the command line kvm-unit-tests' x86/run builds.

The configuration file
----------------------
Sections `[name]`, each one config, with `key = value` lines (for_each_unittest):

    file = NAME.flat           the kernel, relative to the directory of the .cfg file
    test_args = ARGS           its arguments (QEMU `-append ARGS`)
    qemu_params = ...          more QEMU options; older files say `extra_params` and
    extra_params = ...           give the arguments inside, as `-append 'ARGS'`; both
                                 may span lines between triple quotes (\"\"\"...\"\"\")
    smp = N                    CPUs (default 1)
    arch = i386|x86_64         the only architecture the config is for
    groups = g1 g2 ...         `nodefault` marks a config run only on request
    accel = kvm|tcg            the only accelerator it is for
    timeout = 90s              time limit (timeout(1) syntax; default 90 s)
    machine, check, disabled_if, kvmtool_params, and keys this module does not know:
                                 read and ignored (they name QEMU machine types,
                                 host-KVM settings and other runners' options)

Values are split as the shell would (kvm-unit-tests `eval`s them), so quotes group
words; command substitutions (backquotes) are not run. A line that is neither blank, a
`#` comment, a section nor `key = value`, a key before the first section, a section
without `file`, or an smp/timeout that is not a number is bad input (one line, exit 2).

What runs where
---------------
Each config boots the same kernel with the same command line on both sides:
"DIR/FILE ARGS", the kernel's path as kvm-unit-tests names it (the .cfg's directory
name, then the file) and the arguments, which is what QEMU's multiboot loader passes
(hw/i386/multiboot.c: kernel file name, a space, -append). Both get the same RAM:
`-m` from the config's QEMU parameters, else QEMU's default for the pc machine,
128 MiB. idtlab has no instruction limit here but the time limit (`--max-insns`), and
a resident-memory limit (`--max-rss`, 4 GiB) so that a runaway run cannot take the
host down. idtlab's RDTSC counts the machine's cycles (deterministic), except for the
`vmexit` group's benchmarks, which spin until the TSC has advanced 2^30 and run with the
host's clock (`--tsc auto`, `tsc_for`). QEMU gets the config's own QEMU parameters (its
CPU model, for one) and exactly one CPU.

Configs are skipped, with the reason printed, when they cannot mean the same thing on
a one-CPU x86-64 machine without VMX: another arch; more than one CPU, unless the
kernel uses only the boot CPU (`ONE_CPU_SUFFICES`, each entry with its reason: such a
config runs on one CPU on both sides); SVM, VMX or Hyper-V (by group, CPU flag or
file); KVM's own paravirtual interfaces (asyncpf, kvmclock_test, vmware_backdoors);
`accel = kvm`; the `nodefault` group (as run_tests.sh does); a QEMU machine type or
`-device` idtlab does not model. A config named with `--only` runs even so (on one
CPU, on idtlab's machine nearest to what it asks), except when its file is missing or
it is for another arch. QEMU is also skipped where TCG cannot run the config at all
(`-cpu host`, `-enable-kvm`, `accel = kvm`).

The machine: a config's `-M q35` and `-device intel-iommu,intremap=on,eim=off` /
`-device edu` become idtlab's `--machine q35 --device intel-iommu --device edu`
(`board_args`, cpu/board.py); without them idtlab runs its pc machine.

Verdicts (kvm-unit-tests lib/report.c, lib/x86/io.c, scripts/runtime.bash)
---------------------------------------------------------------------------
A test kernel prints `PASS:`, `FAIL:`, `XPASS:`, `XFAIL:`, `KFAIL:`, `SKIP:` lines,
then `SUMMARY: N tests[, F unexpected failures][, S skipped]`, and exits by writing
its code to the isa-debug-exit port 0xF4 (QEMU exits with (code << 1) | 1): 1 when a
check failed, 77 >> 1 = 38 when every check was skipped, else 0.

    PASS     exited through the test device with 0, and no FAIL/XPASS/ABORT line
    FAIL     anything else the guest did: another exit code, a FAIL line, or (idtlab)
             a stop before the exit (unsupported, hlt, shutdown, ...), (QEMU) an exit
             without the test device (status 0: a triple fault under -no-reboot)
    SKIP     not run (reason given), or every check skipped (exit code 38)
    TIMEOUT  no end within the time limit
    ERROR    the emulator itself failed: idtlab exited with a Python traceback or a
             bad-input error, or went over --max-rss; QEMU refused to start

Output: the table on stdout (deterministic: no timings), progress on stderr as configs
finish, `--json` machine-readable, `--html OUT` a self-contained page with logs.
Exit status 0 when every config that ran on idtlab passed or skipped, 1 otherwise, 2
on bad input.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import html
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from cpu import board
from cpu.devices.apic import APIC_BASE
from cpu.msrs import TSC_SOURCES
from idtlab import ref
from idtlab.errors import BadInput

ARCH = "x86_64"
DEFAULT_TIMEOUT = 90.0          # scripts/runtime.bash: `timeout` defaults to 90s
QEMU_DEFAULT_MEMORY_MIB = 128   # QEMU's default RAM (hw/core/machine.c default_ram_size)
SKIP_EXIT_CODE = 77 >> 1        # lib/report.c report_summary when every check skipped
DEFAULT_MAX_INSNS = 10 ** 12    # effectively none: the time limit ends long runs
DEFAULT_MAX_RSS_MIB = 4096
FAIL_PREFIXES = ("FAIL: ", "XPASS: ", "ABORT: ")
SHOWN_LINES = 5                 # differing FAIL lines printed per side and config
LOG_KEEP = 256 * 1024           # bytes of a log kept from each end of a huge log

# QEMU as kvm-unit-tests' x86/run starts it (minus the timeout wrapper and the initrd
# that carries its environment, which idtlab has no way to load either).
QEMU_BASE = ("--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
             "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
             "-display", "none", "-serial", "stdio", "-device", "pci-testdev",
             "-machine", "accel=tcg")

VIRTUALIZATION_GROUPS = {"svm": "SVM", "vmx": "VMX", "hyperv": "Hyper-V"}
VIRTUALIZATION_FLAGS = {"+svm": "SVM", "+vmx": "VMX", "hv_": "Hyper-V"}
# Tests of KVM's paravirtual interfaces, not of the x86 architecture.
KVM_PARAVIRT_FILES = {"asyncpf.flat": "KVM asynchronous page faults",
                      "kvmclock_test.flat": "kvmclock",
                      "vmware_backdoors.flat": "KVM's VMware backdoor"}
# Configs that ask for several CPUs and use only the boot CPU: they run on one CPU (on
# both sides) without --only. The reason is what the kernel's source shows.
ONE_CPU_SUFFICES = {
    "intel-iommu.flat": "x86/intel-iommu.c never starts work on another CPU (no on_cpu); "
                        "the APs only wait",
}


class Status(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    TIMEOUT = "TIMEOUT"
    ERROR = "ERROR"


# ------------------------------------------------------------------------------ parsing

@dataclass(frozen=True)
class Config:
    """One `[name]` section of a unittests.cfg."""

    name: str
    line: int                   # where the section starts
    file: str
    test_args: str              # the -append string ("" for none)
    qemu_params: tuple[str, ...]  # QEMU options from qemu_params/extra_params, no -append
    smp: int = 1
    arch: str = ""
    groups: tuple[str, ...] = ()
    accel: str = ""
    timeout: float | None = None  # seconds; None: the default; 0: no limit


_SECTION = re.compile(r"\[(.*)\]")
_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")
_TRIPLE = '"""'


def parse_config(path: Path) -> list[Config]:
    """The configs of a unittests.cfg, in file order; `BadInput` naming file and line."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: is a directory, not a unittests.cfg") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    sections: list[tuple[str, int, dict[str, tuple[int, str]]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        section = _SECTION.fullmatch(line)
        if section:
            name = section.group(1).strip()
            if not name:
                raise BadInput(f"{path}:{number}: empty section name []")
            if any(s[0] == name for s in sections):
                raise BadInput(f"{path}:{number}: [{name}] appears twice")
            sections.append((name, number, {}))
            continue
        key = _KEY.fullmatch(line)
        if not key:
            raise BadInput(f"{path}:{number}: not a section, a `key = value` line or a comment: "
                           f"{line[:60]!r}")
        if not sections:
            raise BadInput(f"{path}:{number}: `{key.group(1)} =` before the first [section]")
        value = key.group(2)
        if key.group(1) in ("qemu_params", "extra_params", "kvmtool_params") and \
                value.startswith(_TRIPLE):
            # A value spanning lines: up to the closing triple quote (for_each_unittest).
            parts, value = [], value[len(_TRIPLE):]
            while _TRIPLE not in value:
                parts.append(value.rstrip("\\"))
                if i >= len(lines):
                    raise BadInput(f"{path}:{number}: {key.group(1)} opens {_TRIPLE} and never "
                                   "closes it")
                value, i = lines[i], i + 1
            parts.append(value[:value.index(_TRIPLE)])
            value = " ".join(p.strip() for p in parts)
        sections[-1][2][key.group(1)] = (number, value.strip())
    if not sections:
        raise BadInput(f"{path}: no [config] sections: not a kvm-unit-tests unittests.cfg")
    return [_config(path, name, number, keys) for name, number, keys in sections]


def _config(path: Path, name: str, number: int, keys: dict[str, tuple[int, str]]) -> Config:
    def where(key: str) -> str:
        return f"{path}:{keys[key][0]}" if key in keys else f"{path}:{number}"

    def words(key: str) -> list[str]:
        if key not in keys:
            return []
        try:
            return shlex.split(keys[key][1])
        except ValueError as e:
            raise BadInput(f"{where(key)}: [{name}] {key}: {e}") from None

    if "file" not in keys or not keys["file"][1]:
        raise BadInput(f"{path}:{number}: [{name}] has no `file =`")
    params: list[str] = []
    append: str | None = None
    found = words("qemu_params") + words("extra_params")
    it = iter(found)
    for word in it:
        if word == "-append":
            append = next(it, None)
            if append is None:
                raise BadInput(f"{path}:{number}: [{name}] -append without its arguments")
        else:
            params.append(word)
    test_args = " ".join(words("test_args"))
    if append is not None:  # QEMU takes the last -append: the parameters' (get_cmdline)
        test_args = append
    smp_text = keys.get("smp", (0, "1"))[1]
    if not smp_text.isdigit() or int(smp_text) < 1:
        raise BadInput(f"{where('smp')}: [{name}] smp = {smp_text!r}: expected a CPU count")
    timeout = None
    if "timeout" in keys:
        timeout = parse_duration(keys["timeout"][1], f"{where('timeout')}: [{name}] timeout")
    return Config(name=name, line=number, file=keys["file"][1], test_args=test_args,
                  qemu_params=tuple(params), smp=int(smp_text),
                  arch=keys.get("arch", (0, ""))[1], groups=tuple(words("groups")),
                  accel=keys.get("accel", (0, ""))[1], timeout=timeout)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str) -> float:
    """timeout(1)'s syntax: a number with an optional s/m/h/d suffix; 0 = no limit."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise BadInput(f"{what} = {text!r}: expected seconds, e.g. 90, 90s or 2m")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


_SIZE = re.compile(r"(?:size=)?(\d+(?:\.\d+)?)([kKmMgGtT]?)[bB]?(?:,.*)?")
_SIZE_SHIFT = {"k": -10, "m": 0, "g": 10, "t": 20, "": 0}


def memory_mib(params: tuple[str, ...]) -> int:
    """RAM in MiB from QEMU's `-m` (a bare number is MiB; k/M/G/T suffixes; `size=`),
    the last one winning as in QEMU; QEMU's default without one."""
    mib = QEMU_DEFAULT_MEMORY_MIB
    for opt, value in itertools.pairwise(params):
        if opt in ("-m", "--m"):
            m = _SIZE.fullmatch(value)
            if not m:
                raise BadInput(f"-m {value}: not a memory size QEMU would take")
            shift = _SIZE_SHIFT[m.group(2).lower()]
            mib = int(float(m.group(1)) * 2 ** shift) if shift >= 0 else \
                int(float(m.group(1))) >> -shift
    return mib


# ------------------------------------------------------------------------------ planning

@dataclass(frozen=True)
class Plan:
    """What runs for one config, on each side."""

    config: Config
    image: Path                 # the kernel file
    cwd: Path                   # where both sides run: the .cfg's directory's parent
    kernel: str                 # its name as kvm-unit-tests gives it: DIR/FILE
    cmdline: str                # the multiboot command line both sides pass
    memory_mib: int
    timeout: float | None       # seconds; None = no limit
    idtlab_skip: str | None
    reference_skip: str | None

    def idtlab_argv(self, max_insns: int, tsc: str = "cycles") -> list[str]:
        argv = ["idtlab", "run", "--image", str(self.image), "--cmdline", self.cmdline,
                "--memory", f"{self.memory_mib}M", "--max-insns", str(max_insns)]
        return argv + (["--tsc", tsc] if tsc != "cycles" else []) + \
            board_args(self.config.qemu_params)[0]

    def qemu_argv(self) -> list[str]:
        argv = [ref.QEMU_BINARY, *QEMU_BASE, "-smp", "1", *self.config.qemu_params,
                "-kernel", self.kernel]
        return argv + (["-append", self.config.test_args] if self.config.test_args else [])


def _skip_reason(c: Config, image: Path, shown: Path, forced: bool) -> str | None:
    """Why a config does not run at all (either side), or None. The first rule wins."""
    if c.arch and c.arch != ARCH:
        return f"{c.arch} only"
    if not image.is_file():
        return f"no file {shown}; build kvm-unit-tests first (docs/kvm-unit-tests.md)"
    if forced:
        return None
    if "nodefault" in c.groups:
        return "group nodefault: run only on request; --only runs it"
    if c.smp > 1 and Path(c.file).name not in ONE_CPU_SUFFICES:
        return f"needs {c.smp} CPUs; idtlab models one; --only runs it on one"
    for group, what in VIRTUALIZATION_GROUPS.items():
        if group in c.groups:
            return f"needs {what} (group {group}), which idtlab does not model"
    for flag, what in VIRTUALIZATION_FLAGS.items():
        if any(flag in p for p in c.qemu_params):
            return f"needs {what} (-cpu ...{flag}), which idtlab does not model"
    if c.file.startswith("hyperv"):
        return "needs Hyper-V, which idtlab does not model"
    if Path(c.file).name in KVM_PARAVIRT_FILES:
        return f"tests {KVM_PARAVIRT_FILES[Path(c.file).name]}, a KVM paravirtual interface"
    if c.accel and c.accel != "tcg":
        return f"accel = {c.accel}: {c.accel.upper()} only"
    return board_args(c.qemu_params)[1]


def board_args(params: tuple[str, ...]) -> tuple[list[str], str | None]:
    """idtlab's `--machine`/`--device` options for a config's QEMU machine type and
    devices (cpu/board.py), and why idtlab cannot run it as asked (or None). `-M`/
    `-machine` names the type in its first item without `=` (or `type=`); its other
    properties (kernel-irqchip, pit, vmport, ...) are KVM's or devices' settings that
    idtlab leaves out, as before. `pc` and `pc-i440fx-*` are idtlab's pc, `q35` and
    `pc-q35-*` its q35; `-device NAME[,...]` maps the devices idtlab models."""
    machine = "pc"
    devices: list[str] = []
    for opt, value in itertools.pairwise(params):
        if opt in ("-M", "-machine", "--machine"):
            for item in value.split(","):
                name = item.removeprefix("type=")
                if "=" in name or not name:
                    continue
                if name == "pc" or name.startswith("pc-i440fx"):
                    machine = "pc"
                elif name == "q35" or name.startswith("pc-q35"):
                    machine = "q35"
                else:
                    return [], f"needs QEMU's {name} machine, which idtlab does not model"
        elif opt in ("-device", "--device"):
            name, *options = value.split(",")
            if name == "intel-iommu" and set(options) == board.IOMMU_OPTIONS:
                devices.append(name)
            elif name == "intel-iommu":
                return [], (f"needs -device {value}; idtlab models intel-iommu,"
                            f"{','.join(sorted(board.IOMMU_OPTIONS))} only")
            elif name == "edu" and not options:
                devices.append(name)
            else:
                return [], f"needs -device {value}, which idtlab does not model"
    try:
        board.parse(machine, devices)
    except ValueError as exc:
        return [], f"needs {' '.join(params)}: {exc}"
    argv = ["--machine", machine] if machine != "pc" else []
    for d in devices:
        argv += ["--device", d]
    return argv, None


def _tcg_skip_reason(c: Config) -> str | None:
    """Why QEMU TCG cannot run a config that idtlab runs, or None."""
    if c.accel and c.accel != "tcg":
        return f"accel = {c.accel}: QEMU runs TCG here"
    for opt, value in itertools.pairwise(c.qemu_params):
        if opt == "-cpu" and value.split(",")[0] == "host":
            return "-cpu host needs KVM; QEMU runs TCG here"
    if "-enable-kvm" in c.qemu_params:
        return "-enable-kvm; QEMU runs TCG here"
    return None


def plan(cfg_path: Path, configs: list[Config], only: list[str] | None,
         timeout: float | None, reference: str | None) -> list[Plan]:
    """The configs to show, each with what runs where. `only` (patterns, fnmatch) keeps
    the configs they match and runs them even where the default policy would skip;
    `timeout` overrides every config's own limit."""
    directory = cfg_path.resolve().parent
    if only:
        names = [c.name for c in configs]
        for pattern in only:
            if not fnmatch.filter(names, pattern):
                raise BadInput(f"--only {pattern}: no config of {cfg_path} matches "
                               f"(there are {len(names)}: {', '.join(names[:8])}"
                               + (", ..." if len(names) > 8 else "") + ")")
        configs = [c for c in configs if any(fnmatch.fnmatchcase(c.name, p) for p in only)]
    plans = []
    for c in configs:
        image = directory / c.file
        kernel = f"{directory.name}/{c.file}"
        skip = _skip_reason(c, image, cfg_path.parent / c.file, forced=bool(only))
        mib = memory_mib(c.qemu_params)
        idtlab_skip = skip
        if skip is None and (mib << 20) > APIC_BASE:
            idtlab_skip = (f"needs {mib} MiB of RAM; idtlab's RAM must end below the local "
                           f"APIC at {APIC_BASE:#x}")
        ref_skip = None
        if reference is not None:
            ref_skip = skip or _tcg_skip_reason(c)
        limit = timeout if timeout is not None else c.timeout
        if limit is None:
            limit = DEFAULT_TIMEOUT
        plans.append(Plan(c, image, directory.parent, kernel, f"{kernel} {c.test_args}", mib,
                          limit or None, idtlab_skip, ref_skip))
    return plans


# ------------------------------------------------------------------------------ running

@dataclass(frozen=True)
class Spawned:
    """How a child process ended."""

    out: str
    err: str
    status: int | None          # None when we killed it
    timed_out: bool
    over_rss: bool
    seconds: float


@dataclass(frozen=True)
class SideResult:
    """One config on one side."""

    status: Status
    how: str                    # short: "exit 0", "unsupported", "after 90 s", "skipped"
    stop: str                   # the first stop, in full
    exit_code: int | None = None  # what the guest wrote to the test device
    summary: str = ""           # the SUMMARY line, without "SUMMARY: "
    fail_lines: tuple[str, ...] = ()
    log: str = ""
    seconds: float = 0.0
    command: str = ""

    @classmethod
    def skipped(cls, reason: str) -> SideResult:
        return cls(Status.SKIP, "skipped", reason)


@dataclass
class _Children:
    """The child processes running now, so that an interrupt can end them."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    live: set[subprocess.Popen[bytes]] = field(default_factory=set)
    cancelled: bool = False

    def kill_all(self) -> None:
        with self.lock:
            self.cancelled = True
            for proc in self.live:
                proc.kill()


def _rss_mib(pid: int) -> int:
    """Resident memory of `pid` in MiB (Linux /proc), 0 where that cannot be read."""
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident * os.sysconf("SC_PAGE_SIZE") >> 20


def _read_capped(path: Path) -> str:
    """A log file, with the middle of a huge one left out."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= 2 * LOG_KEEP:
            data = f.read()
        else:
            head = f.read(LOG_KEEP)
            f.seek(size - LOG_KEEP)
            data = head + f"\n[... {size - 2 * LOG_KEEP} bytes left out ...]\n".encode() + f.read()
    return data.decode("latin-1").replace("\r\n", "\n")


def spawn(argv: list[str], cwd: Path, timeout: float | None, max_rss_mib: int | None,
          children: _Children) -> Spawned:
    """Run argv with stdin closed, stdout and stderr to files; kill it at the time limit
    or when its resident memory passes `max_rss_mib`."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="idtlab-suite-") as tmp:
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            with children.lock:
                if children.cancelled:
                    raise KeyboardInterrupt
                proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, env={**os.environ, "LANG": "C"})
                children.live.add(proc)
            timed_out = over_rss = False
            try:
                while True:
                    try:
                        proc.wait(timeout=0.25)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if timeout is not None and time.monotonic() - start > timeout:
                        timed_out = True
                    elif max_rss_mib is not None and _rss_mib(proc.pid) > max_rss_mib:
                        over_rss = True
                    if timed_out or over_rss:
                        proc.kill()
                        proc.wait()
                        break
            finally:
                with children.lock:
                    children.live.discard(proc)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        seconds = time.monotonic() - start
        status = None if timed_out or over_rss else proc.returncode
        return Spawned(_read_capped(out_path), _read_capped(err_path), status, timed_out,
                       over_rss, seconds)


def _log_facts(log: str) -> tuple[str, tuple[str, ...]]:
    """The SUMMARY (without its prefix) and the FAIL/XPASS/ABORT lines of a log."""
    summary = ""
    fails = []
    for line in log.splitlines():
        if line.startswith("SUMMARY: "):
            summary = line[len("SUMMARY: "):]
        elif line.startswith(FAIL_PREFIXES):
            fails.append(line)
    return summary, tuple(fails)


def verdict(exit_code: int, fail_lines: tuple[str, ...]) -> Status:
    """A kernel that exited through the test device: PASS with code 0 and no FAIL line,
    SKIP when every check skipped (code 38), FAIL otherwise."""
    if exit_code == 0 and not fail_lines:
        return Status.PASS
    if exit_code == SKIP_EXIT_CODE and not fail_lines:
        return Status.SKIP
    return Status.FAIL


# What lib/x86/desc.c unhandled_exception and lib/libcflat.h assert print before exiting.
_FATAL = re.compile(r"Unhandled exception \d+|.*: assert failed: ")


def _complaints(how: str, log: str, fails: tuple[str, ...]) -> str:
    """`how` the kernel ended, then what it last said went fatally wrong (an unhandled
    exception, a failed assertion) and its first FAIL line, where there are any."""
    fatal = [ln.strip() for ln in log.splitlines() if _FATAL.match(ln.strip())]
    parts = [how] + fatal[-1:] + ([f"first of {len(fails)} FAIL lines: {fails[0]}"] if fails else [])
    return "; ".join(parts)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _limit_text(p: Plan) -> str:
    return f"{p.timeout:g} s" if p.timeout is not None else "no limit"


# `idtlab run --image`'s last line (idtlab/cli.py _run_image).
_IDTLAB_END = re.compile(r"idtlab: (?P<image>.+?): (?P<outcome>[a-z_]+)(?: \((?P<reason>.*)\))? "
                         r"at (?P<where>\S+); \d+ instructions, .*")
_EXIT_DEVICE = re.compile(r"exit device: (0x[0-9a-f]+)")


def interpret_idtlab(run: Spawned, max_rss_mib: int | None, p: Plan) -> SideResult:
    """The status of an `idtlab run --image` child from its output."""
    lines = run.out.splitlines()
    end = None
    for k in range(len(lines) - 1, -1, -1):
        end = _IDTLAB_END.fullmatch(lines[k])
        if end:
            lines = lines[:k] + lines[k + 1:]
            break
    log = "\n".join(lines) + ("\n" if lines else "")
    summary, fails = _log_facts(log)
    base = SideResult(Status.ERROR, "error", "", summary=summary, fail_lines=fails, log=log,
                      seconds=run.seconds)
    if run.over_rss:
        return replace(base, how="over --max-rss",
                       stop=f"resident memory above {max_rss_mib} MiB after {run.seconds:.0f} s "
                            "(--max-rss); stopped")
    if run.timed_out:
        last = _last_line(log)
        return replace(base, status=Status.TIMEOUT, how=f"after {_limit_text(p)}",
                       stop=f"no end within {_limit_text(p)}"
                            + (f"; last line: {last}" if last else ""))
    if end is None:
        err = run.err.strip()
        if "Traceback (most recent call last)" in err:
            return replace(base, how="crash", stop=f"Python traceback: {_last_line(err)}")
        detail = _last_line(err).removeprefix("idtlab: error: ") or \
            f"idtlab exited with status {run.status} and no summary line"
        return replace(base, stop=detail)
    outcome, reason, where = end.group("outcome"), end.group("reason") or "", end.group("where")
    if outcome == "exit":
        code = _EXIT_DEVICE.fullmatch(reason)
        if code is None:
            return replace(base, status=Status.FAIL, how="exit",
                           stop=f"exit: {reason} at {where} (no exit code)")
        value = int(code.group(1), 16)
        return replace(base, status=verdict(value, fails), how=f"exit {value}",
                       stop=_complaints(f"exit {value}", log, fails), exit_code=value)
    return replace(base, status=Status.FAIL, how=outcome,
                   stop=f"{outcome}" + (f" ({reason})" if reason else "") + f" at {where}")


def interpret_qemu(run: Spawned, p: Plan) -> SideResult:
    """The status of a QEMU child: its exit status is (code << 1) | 1 when the kernel
    wrote `code` to port 0xF4; 0 when it ended otherwise (scripts/vmm.bash
    qemu_fixup_return_code); 1 with errors on stderr when QEMU itself failed."""
    log = run.out.replace("\r", "")
    summary, fails = _log_facts(log)
    base = SideResult(Status.ERROR, "error", "", summary=summary, fail_lines=fails, log=log,
                      seconds=run.seconds)
    errors = [ln for ln in run.err.splitlines() if ln.strip() and "warning" not in ln.lower()]
    if run.timed_out:
        last = _last_line(log)
        return replace(base, status=Status.TIMEOUT, how=f"after {_limit_text(p)}",
                       stop=f"no end within {_limit_text(p)}"
                            + (f"; last line: {last}" if last else ""))
    status = run.status
    assert status is not None
    if status < 0:
        return replace(base, stop=f"QEMU killed by signal {-status}")
    if status == 1 and errors:
        return replace(base, stop=f"QEMU failed: {errors[0].strip()}")
    if status & 1:
        code = status >> 1
        return replace(base, status=verdict(code, fails), how=f"exit {code}",
                       stop=_complaints(f"exit {code}", log, fails), exit_code=code)
    if status == 0:
        return replace(base, status=Status.FAIL, how="no exit", stop=_complaints(
            "QEMU exited with status 0: the kernel did not exit through the test device (a "
            "triple fault or a reset, under -no-reboot)", log, fails))
    return replace(base, stop=f"QEMU exited with status {status}"
                              + (f": {errors[0].strip()}" if errors else ""))


# ------------------------------------------------------------------------------ the suite

@dataclass(frozen=True)
class Row:
    plan: Plan
    idtlab: SideResult
    reference: SideResult | None

    @property
    def differing(self) -> tuple[list[str], list[str]]:
        """FAIL lines idtlab printed and the reference did not, and the other way round
        (as multisets, in log order)."""
        if self.reference is None:
            return list(self.idtlab.fail_lines), []
        return (_minus(self.idtlab.fail_lines, self.reference.fail_lines),
                _minus(self.reference.fail_lines, self.idtlab.fail_lines))


def _minus(a: tuple[str, ...], b: tuple[str, ...]) -> list[str]:
    left = Counter(b)
    out = []
    for line in a:
        if left[line]:
            left[line] -= 1
        else:
            out.append(line)
    return out


@dataclass(frozen=True)
class Options:
    reference: str | None = None
    jobs: int = 1
    max_insns: int = DEFAULT_MAX_INSNS
    max_rss_mib: int | None = DEFAULT_MAX_RSS_MIB
    tsc: str = "auto"  # what idtlab's RDTSC counts: `tsc_for`


# Benchmarks that spin until the TSC has advanced by a goal (kvm-unit-tests x86/vmexit.c:
# 2^30 cycles per measurement). With the deterministic TSC (the machine's cycles) each
# loop iteration that exits to Python (CPUID, MOV CR8, IN) makes that hours; with the
# host's clock it is a second. `--tsc auto` runs these groups with the host's clock.
TSC_GOAL_GROUPS = frozenset({"vmexit"})


def tsc_for(config: Config, choice: str) -> str:
    """The `idtlab run --tsc` of a config: `choice`, or for "auto" the host's clock for
    the TSC-goal benchmarks and the deterministic cycle count for everything else."""
    if choice != "auto":
        return choice
    return "host" if TSC_GOAL_GROUPS & set(config.groups) else "cycles"


def _shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def run_suite(plans: list[Plan], options: Options,
              progress: Callable[[int, Row], None] | None = None) -> list[Row]:
    """Run every plan (each side a child process, `options.jobs` at a time) and return
    the rows in plan order. `progress(done, row)` is called as each config finishes."""
    children = _Children()

    def on_idtlab(p: Plan) -> SideResult:
        argv = p.idtlab_argv(options.max_insns, tsc_for(p.config, options.tsc))
        run = spawn([sys.executable, "-m", "idtlab.cli", *argv[1:]], p.cwd, p.timeout,
                    options.max_rss_mib, children)
        return replace(interpret_idtlab(run, options.max_rss_mib, p), command=_shell(argv))

    def on_reference(p: Plan) -> SideResult:
        argv = p.qemu_argv()
        run = spawn(argv, p.cwd, p.timeout, None, children)
        return replace(interpret_qemu(run, p), command=_shell(argv))

    results: dict[tuple[int, str], SideResult] = {}
    rows: dict[int, Row] = {}
    lock = threading.Lock()
    done = 0

    def finish(index: int, side: str, result: SideResult) -> None:
        nonlocal done
        with lock:
            results[index, side] = result
            p = plans[index]
            if (index, "idtlab") not in results or (
                    options.reference is not None and (index, "ref") not in results):
                return
            row = Row(p, results[index, "idtlab"],
                      results[index, "ref"] if options.reference is not None else None)
            rows[index] = row
            done += 1
            if progress is not None:
                progress(done, row)

    def task(index: int, side: str, fn: Callable[[Plan], SideResult]) -> None:
        finish(index, side, fn(plans[index]))

    with concurrent.futures.ThreadPoolExecutor(max_workers=options.jobs) as pool:
        futures = []
        for index, p in enumerate(plans):
            sides: list[tuple[str, Callable[[Plan], SideResult], str | None]] = [
                ("idtlab", on_idtlab, p.idtlab_skip)]
            if options.reference is not None:
                sides.append(("ref", on_reference, p.reference_skip))
            for side, fn, skip in sides:
                if skip is not None:
                    finish(index, side, SideResult.skipped(skip))
                else:
                    futures.append(pool.submit(task, index, side, fn))
        try:
            for future in futures:
                future.result()
        except BaseException:
            children.kill_all()
            for future in futures:
                future.cancel()
            raise
    return [rows[i] for i in range(len(plans))]


# ------------------------------------------------------------------------------ reports

def _colour(text: str, status: Status, enabled: bool) -> str:
    if not enabled:
        return text
    code = {Status.PASS: "32", Status.FAIL: "31", Status.ERROR: "31;1",
            Status.TIMEOUT: "33", Status.SKIP: "2"}[status]
    return f"\x1b[{code}m{text}\x1b[0m"


def table(rows: list[Row], reference: str | None, colour: bool = False) -> Iterator[str]:
    """One row per config (status and how it ended on each side), then indented: the
    full first stop where it says more, and the FAIL lines that differ."""
    ref_label = f"{reference} (TCG)" if reference == "qemu" else (reference or "")
    width = max([len("config"), *(len(r.plan.config.name) for r in rows)])
    how_width = max([6, *(len(r.idtlab.how) for r in rows)])
    head = f"{'config':<{width}}  {'idtlab':<{8 + how_width}}"
    yield (head + f"  {ref_label}").rstrip() if reference else head.rstrip()
    for r in rows:
        cell = (_colour(f"{r.idtlab.status:<7}", r.idtlab.status, colour)
                + f" {r.idtlab.how:<{how_width}}")
        line = f"{r.plan.config.name:<{width}}  {cell}"
        if r.reference is not None:
            line += "  " + _colour(f"{r.reference.status:<7}", r.reference.status, colour) + \
                f" {r.reference.how}"
        yield line.rstrip()
        yield from _details(r, reference)


def _details(r: Row, reference: str | None) -> Iterator[str]:
    sides = [("idtlab", r.idtlab)] + ([(reference or "reference", r.reference)]
                                      if r.reference is not None else [])
    if r.reference is not None and r.idtlab.how == r.reference.how == "skipped" and \
            r.idtlab.stop == r.reference.stop:
        yield f"    skipped: {r.idtlab.stop}"
        return
    if r.reference is not None and r.idtlab.stop == r.reference.stop and \
            r.idtlab.stop != r.idtlab.how:
        yield f"    both: {r.idtlab.stop}"
        sides = []
    for name, side in sides:
        if side.status == Status.SKIP and side.how == "skipped":
            yield f"    {name} skipped: {side.stop}"
        elif side.stop != side.how:
            yield f"    {name}: {side.stop}"
    ours, theirs = r.differing
    for name, lines in (("idtlab" + (" only" if r.reference is not None else ""), ours),
                        (f"{reference} only", theirs)):
        for line in lines[:SHOWN_LINES]:
            yield f"    {name}: {line}"
        if len(lines) > SHOWN_LINES:
            yield f"    {name}: ... and {len(lines) - SHOWN_LINES} more"


def totals(rows: list[Row], reference: str | None) -> Iterator[str]:
    """The closing lines: counts per status on each side, and where they disagree."""
    sides: list[tuple[str, list[SideResult]]] = [("idtlab", [r.idtlab for r in rows])]
    if reference is not None:
        sides.append((reference, [r.reference for r in rows if r.reference is not None]))
    for name, results in sides:
        count = Counter(s.status for s in results)
        yield f"{name}: " + ", ".join(f"{count[s]} {s}" for s in Status)
    if reference is not None:
        both = [r for r in rows if r.reference is not None
                and r.idtlab.how != "skipped" and r.reference.how != "skipped"]
        only_ref = [r.plan.config.name for r in both if r.reference is not None
                    and r.reference.status == Status.PASS and r.idtlab.status != Status.PASS]
        only_us = [r.plan.config.name for r in both if r.reference is not None
                   and r.idtlab.status == Status.PASS and r.reference.status != Status.PASS]
        same = sum(r.reference is not None and r.idtlab.status == r.reference.status
                   for r in both)
        yield f"same status on both: {same} of the {len(both)} configs run on both"
        yield f"{reference} passes, idtlab does not: " + (", ".join(only_ref) or "none")
        yield f"idtlab passes, {reference} does not: " + (", ".join(only_us) or "none")
    yield ("PASS = exited through the test device (port 0xf4) with 0 and printed no "
           "FAIL/XPASS/ABORT line; SKIP = not run (reason shown) or every check skipped "
           f"(exit {SKIP_EXIT_CODE})")


def as_json(cfg: Path, rows: list[Row], reference: str | None) -> dict[str, Any]:
    def side(s: SideResult | None) -> dict[str, Any] | None:
        if s is None:
            return None
        d = asdict(s)
        d["status"] = str(s.status)
        d["fail_lines"] = list(s.fail_lines)
        return d

    configs = []
    for r in rows:
        c = r.plan.config
        ours, theirs = r.differing
        configs.append({
            "name": c.name, "file": c.file, "test_args": c.test_args, "smp": c.smp,
            "groups": list(c.groups), "cmdline": r.plan.cmdline, "cwd": str(r.plan.cwd),
            "memory_mib": r.plan.memory_mib, "timeout": r.plan.timeout,
            "idtlab": side(r.idtlab), "reference": side(r.reference),
            "differing_fail_lines": {"idtlab": ours, "reference": theirs}})
    def count(results: list[SideResult]) -> dict[str, int]:
        tally = Counter(s.status for s in results)
        return {str(s): tally[s] for s in Status}

    references = [r.reference for r in rows if r.reference is not None]
    return {"suite": str(cfg), "reference": reference, "configs": configs,
            "totals": {"idtlab": count([r.idtlab for r in rows]),
                       "reference": count(references) if reference is not None else None}}


_HTML_COLOURS = {Status.PASS: "#d7f5d7", Status.FAIL: "#f8d0d0", Status.ERROR: "#f0a0a0",
                 Status.TIMEOUT: "#f8ecc0", Status.SKIP: "#eeeeee"}


def html_report(cfg: Path, rows: list[Row], reference: str | None) -> str:
    """A self-contained page: the table, coloured by status; each config's stops, the
    FAIL lines that differ, the commands and the logs under a disclosure triangle."""
    e = html.escape

    def cell(s: SideResult | None) -> str:
        if s is None:
            return ""
        return (f'<td style="background:{_HTML_COLOURS[s.status]}"><b>{s.status}</b> '
                f"{e(s.how)}<br><small>{e(s.stop) if s.stop != s.how else ''}</small></td>")

    def detail(name: str, s: SideResult) -> str:
        if s.how == "skipped":
            return ""
        return (f"<h4>{e(name)}: {s.status} ({s.seconds:.1f} s)</h4>"
                f"<pre style='white-space:pre-wrap'>{e(s.command)}</pre>"
                f"<pre style='background:#f6f6f6;max-height:30em;overflow:auto;white-space:pre-wrap'>"
                f"{e(s.log)}</pre>")

    body = []
    for r in rows:
        ours, theirs = r.differing
        diff = "".join(f"<div><code>idtlab: {e(x)}</code></div>" for x in ours) + "".join(
            f"<div><code>{e(reference or '')}: {e(x)}</code></div>" for x in theirs)
        logs = detail("idtlab", r.idtlab) + (detail(reference or "", r.reference)
                                             if r.reference is not None else "")
        more = f"<details><summary>commands and logs</summary>{logs}</details>" if logs else ""
        body.append(f"<tr><td><b>{e(r.plan.config.name)}</b><br><small>"
                    f"{e(r.plan.cmdline)}</small></td>{cell(r.idtlab)}{cell(r.reference)}"
                    f"<td>{diff}{more}</td></tr>")
    head = "<th>config</th><th>idtlab</th>" + (f"<th>{e(reference or '')}</th>"
                                               if reference else "")
    summary = "<br>".join(e(line) for line in totals(rows, reference))
    widths = (16, 30, 30, 24) if reference else (20, 45, 35)
    cols = "<colgroup>" + "".join(f"<col style='width:{w}%'>" for w in widths) + "</colgroup>"
    return ("<!doctype html><html><head><meta charset='utf-8'><title>idtlab suite: "
            f"{e(str(cfg))}</title></head><body style='font-family:sans-serif'>"
            f"<h1>idtlab suite: {e(str(cfg))}</h1><p>{summary}</p>"
            "<table border='1' cellspacing='0' cellpadding='4' style='border-collapse:collapse;"
            f"table-layout:fixed;width:100%'>{cols}"
            f"<tr>{head}<th>FAIL lines that differ</th></tr>" + "".join(body)
            + "</table></body></html>\n")


# ------------------------------------------------------------------------------ CLI

def add_parser(sub: Any) -> None:
    """`idtlab suite UNITTESTS.cfg` (registered by idtlab/cli.py)."""
    p = sub.add_parser("suite", help="run a kvm-unit-tests suite (x86/unittests.cfg) on idtlab, "
                       "and with --reference beside it on QEMU TCG")
    p.add_argument("config", type=Path, metavar="UNITTESTS.cfg",
                   help="kvm-unit-tests' x86/unittests.cfg (the .flat files beside it)")
    p.add_argument("--reference", choices=("qemu",),
                   help="also run every config on QEMU TCG as kvm-unit-tests' x86/run does")
    p.add_argument("--jobs", type=int, default=1, help="configs run at the same time (1)")
    p.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    p.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML report")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="only these configs (names or fnmatch patterns); they run even where "
                        "the default policy skips them (more CPUs run on one)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds per config and side, instead of each config's own "
                        f"`timeout` (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--max-insns", type=int, default=DEFAULT_MAX_INSNS, metavar="N",
                   help="idtlab's instruction limit per config (default: none to speak of; "
                        "the time limit ends long runs)")
    p.add_argument("--tsc", choices=("auto", *TSC_SOURCES), default="auto",
                   help="what idtlab's RDTSC counts (`idtlab run --tsc`): auto (the "
                        "default: the host's clock for the vmexit benchmarks, which spin until "
                        "a TSC goal, the deterministic cycle count for the rest), cycles or "
                        "host for every config")
    p.add_argument("--max-rss", type=int, default=DEFAULT_MAX_RSS_MIB, metavar="MIB",
                   help=f"stop an idtlab run whose resident memory passes this "
                        f"({DEFAULT_MAX_RSS_MIB}; 0: no limit)")


def run_cli(args: Any) -> int:
    if args.jobs < 1:
        raise BadInput(f"suite: --jobs {args.jobs}: must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        raise BadInput(f"suite: --timeout {args.timeout:g}: must be positive")
    if args.max_insns < 1:
        raise BadInput(f"suite: --max-insns {args.max_insns}: must be positive")
    if args.max_rss < 0:
        raise BadInput(f"suite: --max-rss {args.max_rss}: must be 0 (no limit) or more")
    if args.reference is not None:
        missing = ref.available(args.reference)
        if missing is not None:
            raise BadInput(f"suite: --reference {args.reference}: {missing}")
    if args.html:
        html_path = Path(args.html)
        if not html_path.parent.is_dir():
            raise BadInput(f"suite: --html {args.html}: no directory {html_path.parent}")
    configs = parse_config(args.config)
    plans = plan(args.config, configs, args.only, args.timeout, args.reference)
    options = Options(args.reference, args.jobs, args.max_insns, args.max_rss or None, args.tsc)
    to_run = sum(p.idtlab_skip is None for p in plans)
    ref_runs = sum(p.reference_skip is None for p in plans) if args.reference else 0
    print(f"idtlab suite: {args.config}: {len(plans)} configs, {to_run} to run on idtlab"
          + (f", {ref_runs} on {args.reference}" if args.reference else "")
          + f"; {args.jobs} at a time", file=sys.stderr, flush=True)
    width = len(str(len(plans)))

    def progress(done: int, row: Row) -> None:
        def say(name: str, s: SideResult) -> str:
            if s.how == "skipped":
                return f"{name} skipped"
            return f"{name} {s.status} {s.how} ({s.seconds:.1f} s)"

        parts = [say("idtlab", row.idtlab)]
        if row.reference is not None:
            parts.append(say(args.reference, row.reference))
        if row.idtlab.how == "skipped" and (row.reference is None or
                                            row.reference.stop == row.idtlab.stop):
            parts = [f"skipped ({row.idtlab.stop})"]
        print(f"[{done:>{width}}/{len(plans)}] {row.plan.config.name}: " + ", ".join(parts),
              file=sys.stderr, flush=True)

    rows = run_suite(plans, options, progress)
    if args.html:
        try:
            Path(args.html).write_text(html_report(args.config, rows, args.reference))
        except OSError as e:
            raise BadInput(f"suite: --html {args.html}: cannot write ({e.strerror})") from None
    if args.json:
        print(json.dumps(as_json(args.config, rows, args.reference), indent=1))
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        for line in table(rows, args.reference, colour):
            print(line)
        print()
        for line in totals(rows, args.reference):
            print(line)
        if args.html:
            print(f"report written to {args.html}")
    ran = [r.idtlab for r in rows if r.idtlab.how != "skipped"]
    return 0 if all(s.status in (Status.PASS, Status.SKIP) for s in ran) else 1
