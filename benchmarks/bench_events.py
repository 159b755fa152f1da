"""Instruction throughput and event round trips of idtlab, against the performance targets.

Six figures, measured in one process run, each the best of `--repeat` runs:

  (a) raw Unicorn: the tight loop (`mov rcx, N; l: dec rcx;
      jnz l; hlt`, 2N + 1 instructions before the HLT) on a plain `mem_map`, UC_MODE_64,
      no hooks, stopped just before the HLT;
  (b) the same loop under `cpu.machine.Machine(mode="fast")`;
  (c) the same loop under `Machine(mode="timed")` (per-instruction costs from the
      "default" profile);
  (d) the ratio (b) / (a);
  (e) INT3 round trips: `l: int3; dec rcx; jnz l` whose #BP handler is a bare `iretq`,
      so each iteration is one delivery and one IRET through the pure model in `idt/`,
      inside a single `Machine.run` (fast mode);
  (f) NMI round trips: a `jmp` spin loop whose NMI handler is a bare `iretq`; each round
      trip is `Machine.nmi()` then `Machine.run(max_insns=icount + 2)`, continuing the
      same machine: the NMI is delivered, the handler's IRETQ runs, one loop instruction
      runs, and the instruction limit hands control back (fast mode).

Why (f) drives NMIs with `Machine.nmi()` between short runs and not with `inject(before=
label, hit=i)`: a schedule of K `before=` injections stays in `Machine.injections` after
they fire, and every boundary scans that list (firing due injections, computing the next
stop), so K round trips cost O(K^2) Python work and the figure would measure the length
of the schedule. `nmi()` + `run()` costs a constant per round trip; what it adds on top
of the delivery and the IRET is the machine's own per-`run` entry and exit (the `end`
record, the RunResult), which is part of using the machine this way.

Targets: fast mode >= 50% of raw Unicorn, timed mode >= 4
MIPS, >= 50,000 round trips/s for (e) and (f). A round trip is one delivery plus its
IRET. Only the runs are timed (engine creation and assembly are not). The work done is
the same on every invocation; the timings of course vary. Usage:

    python benchmarks/bench_events.py [--quick] [--json] [--iterations N] [--events K]
                                      [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from unicorn import (  # type: ignore[attr-defined]  # noqa: E402  # Uc is not re-exported
    UC_ARCH_X86,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
)
from unicorn import x86_const as X  # noqa: E402

from cpu.machine import Machine  # noqa: E402
from cpu.vmx import VmxConfig  # noqa: E402
from idtlab.assemble import CodeBlock, assemble_blocks  # noqa: E402

CODE = 0x10_0000
HANDLER = 0x10_1000
STACK_TOP = 0x7_0000
MEMORY = 2 << 20
NMI_VECTOR = 2
BP_VECTOR = 3

# Targets (the benchmark prints each figure against its target).
TARGET_FAST_RATIO = 0.5
TARGET_TIMED_MIPS = 4.0
TARGET_ROUND_TRIPS = 50_000.0
TARGET_EPT_RATIO = 0.8

DEFAULTS = {"iterations": 10_000_000, "events": 10_000, "repeat": 3}
QUICK = {"iterations": 1_000_000, "events": 2_000, "repeat": 1}


# -- workloads -----------------------------------------------------------------------------

def assemble(source: str, at: int) -> bytes:
    blocks, _ = assemble_blocks([CodeBlock(at, source, origin="bench", first_line=1)], known={})
    return blocks[0].code


def loop_source(iterations: int, body: str = "") -> str:
    """The benchmark loop: 2N + 1 instructions (plus `body` N times) + HLT."""
    return f"mov rcx, {iterations}\nl:\n{body}dec rcx\njnz l\nhlt\n"


@dataclass(frozen=True)
class Run:
    count: int  # instructions, or round trips
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")


def best_of(repeat: int, once: Callable[[], Run]) -> Run:
    return min((once() for _ in range(repeat)), key=lambda r: r.seconds)


def raw_unicorn(iterations: int) -> Run:
    code = assemble(loop_source(iterations), CODE)
    hlt_at = CODE + len(code) - 1
    uc: Any = Uc(UC_ARCH_X86, UC_MODE_64)  # type: ignore[no-untyped-call]
    uc.mem_map(0, MEMORY, UC_PROT_ALL)
    uc.mem_write(CODE, code)
    uc.reg_write(X.UC_X86_REG_RSP, STACK_TOP)
    start = time.perf_counter()
    uc.emu_start(CODE, hlt_at)  # stop *before* the HLT (Unicorn stops silently after it, #1082)
    seconds = time.perf_counter() - start
    if int(uc.reg_read(X.UC_X86_REG_RCX)) != 0:
        raise RuntimeError("raw Unicorn loop did not finish")
    return Run(2 * iterations + 1, seconds)


def machine_loop(iterations: int, mode: str, *, ept: bool = False) -> Run:
    m = Machine(MEMORY, max_insns=2 * iterations + 16, mode=mode,
                vmx=VmxConfig() if ept else None)
    m.load(CODE, assemble(loop_source(iterations), CODE), code=True)
    m.start_state(entry=CODE, rsp=STACK_TOP)
    start = time.perf_counter()
    result = m.run()
    seconds = time.perf_counter() - start
    if result.outcome != "hlt" or result.icount != 2 * iterations + 2:
        raise RuntimeError(f"{mode} loop ended with {result.outcome} after {result.icount}")
    return Run(2 * iterations + 1, seconds)


# A loop that walks 256 pages (one 8-byte load per page per iteration), so translation
# (one TLB fill per page, two stages with EPT) is part of what is measured.
PAGE_WALK_BODY = "mov rax, qword ptr [rsi + rdx]\nadd edx, 4096\nand edx, 0xff000\n"


def machine_page_loop(iterations: int, *, ept: bool) -> Run:
    """Fast mode on a loop touching 256 pages, with or without the EPT stage."""
    m = Machine(8 << 20, max_insns=5 * iterations + 16, mode="fast",
                vmx=VmxConfig() if ept else None)
    m.load(CODE, assemble("mov rsi, 0x400000\nxor edx, edx\n"
                          + loop_source(iterations, PAGE_WALK_BODY), CODE), code=True)
    m.start_state(entry=CODE, rsp=STACK_TOP)
    start = time.perf_counter()
    result = m.run()
    seconds = time.perf_counter() - start
    if result.outcome != "hlt":
        raise RuntimeError(f"page loop (ept={ept}) ended with {result.outcome}: {result.reason}")
    return Run(result.icount, seconds)


def int3_round_trips(events: int) -> Run:
    m = Machine(MEMORY, max_insns=8 * events + 16, max_events=events + 16)
    m.load(CODE, assemble(loop_source(events, body="int3\n"), CODE), code=True)
    m.load(HANDLER, assemble("iretq\n", HANDLER), code=True)
    m.set_gate(BP_VECTOR, HANDLER)
    m.start_state(entry=CODE, rsp=STACK_TOP)
    start = time.perf_counter()
    result = m.run()
    seconds = time.perf_counter() - start
    delivered = len(result.deliveries)
    irets = len(result.trace.of_kind("iret"))
    if result.outcome != "hlt" or delivered != events or irets != events:
        raise RuntimeError(f"INT3 loop: {result.outcome}, {delivered} deliveries, {irets} IRETs")
    return Run(events, seconds)


def nmi_round_trips(events: int) -> Run:
    m = Machine(MEMORY, max_events=events + 16)
    m.load(CODE, assemble("l:\njmp l\n", CODE), code=True)
    m.load(HANDLER, assemble("iretq\n", HANDLER), code=True)
    m.set_gate(NMI_VECTOR, HANDLER)
    m.start_state(entry=CODE, rsp=STACK_TOP)
    m.run(max_insns=1)
    nmi, run, engine = m.nmi, m.run, m.engine
    start = time.perf_counter()
    for _ in range(events):
        nmi()
        run(max_insns=engine.icount + 2)  # the handler's IRETQ and one `jmp l`
    seconds = time.perf_counter() - start
    delivered = [r for r in m.trace.of_kind("deliver") if r["vector"] == NMI_VECTOR]
    irets = m.trace.of_kind("iret")
    if len(delivered) != events or len(irets) != events or m.trace.of_kind(
            "nmi_latched", "nmi_dropped"):
        raise RuntimeError(f"NMI loop: {len(delivered)} deliveries, {len(irets)} IRETs")
    return Run(events, seconds)


# -- report ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    value: float
    unit: str
    target: float | None = None  # the value must be >= target

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value >= self.target

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "unit": self.unit,
                "target": self.target, "met": self.met}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(iterations: int, events: int, repeat: int) -> dict[str, Any]:
    return {
        "workload": {
            "loop": f"mov rcx, N; l: dec rcx; jnz l; hlt  (N = {iterations:,}: "
                    f"{2 * iterations + 1:,} instructions timed)",
            "int3": f"l: int3; dec rcx; jnz l  with #BP handler `iretq` ({events:,} round trips, "
                    "one Machine.run)",
            "nmi": f"Machine.nmi(); Machine.run(max_insns=icount + 2), NMI handler `iretq` "
                   f"({events:,} round trips)",
            "repeat": repeat,
            "iterations": iterations,
            "events": events,
        },
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "unicorn": version("unicorn"),
        },
    }


def measure(iterations: int, events: int, repeat: int) -> list[Figure]:
    raw = best_of(repeat, lambda: raw_unicorn(iterations))
    fast = best_of(repeat, lambda: machine_loop(iterations, "fast"))
    timed = best_of(repeat, lambda: machine_loop(iterations, "timed"))
    int3 = best_of(repeat, lambda: int3_round_trips(events))
    nmi = best_of(repeat, lambda: nmi_round_trips(events))
    no_ept = best_of(repeat, lambda: machine_page_loop(iterations // 2, ept=False))
    with_ept = best_of(repeat, lambda: machine_page_loop(iterations // 2, ept=True))
    ept_tight = best_of(repeat, lambda: machine_loop(iterations, "fast", ept=True))
    return [
        Figure("raw_mips", "(a) raw Unicorn", raw.rate / 1e6, "MIPS"),
        Figure("fast_mips", "(b) Machine, fast mode", fast.rate / 1e6, "MIPS"),
        Figure("timed_mips", "(c) Machine, timed mode", timed.rate / 1e6, "MIPS",
               TARGET_TIMED_MIPS),
        Figure("fast_over_raw", "(d) fast / raw", fast.rate / raw.rate, "ratio",
               TARGET_FAST_RATIO),
        Figure("int3_round_trips", "(e) INT3 -> IRETQ round trips", int3.rate, "per s",
               TARGET_ROUND_TRIPS),
        Figure("nmi_round_trips", "(f) NMI -> IRETQ round trips", nmi.rate, "per s",
               TARGET_ROUND_TRIPS),
        Figure("ept_tight_ratio", "(g) EPT / no EPT, loop (a)", ept_tight.rate / fast.rate, "ratio",
               TARGET_EPT_RATIO),
        Figure("ept_pages_ratio", "(h) EPT / no EPT, 256-page loop", with_ept.rate / no_ept.rate,
               "ratio", TARGET_EPT_RATIO),
    ]


def fmt(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value:.3f}"
    if unit == "MIPS":
        return f"{value:.1f} MIPS"
    return f"{value:,.0f}/s"


def print_report(info: dict[str, Any], figures: list[Figure]) -> None:
    w, mach = info["workload"], info["machine"]
    print(f"machine:  {mach['cpu']} ({mach['cpus']} CPUs), {mach['platform']}")
    print(f"          {mach['python']}, unicorn {mach['unicorn']}")
    print(f"workload: (a)-(d) {w['loop']}")
    print(f"          (e) {w['int3']}")
    print(f"          (f) {w['nmi']}")
    print(f"          best of {w['repeat']} runs each; (e) and (f) in fast mode")
    print()
    print(f"{'figure':<34}{'value':>16}{'target':>16}  status")
    for f in figures:
        target = "" if f.target is None else ">= " + fmt(f.target, f.unit)
        status = "" if f.met is None else ("met" if f.met else "MISSED")
        print(f"{f.label:<34}{fmt(f.value, f.unit):>16}{target:>16}  {status}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"short run: {QUICK['iterations']:,} iterations, {QUICK['events']:,} "
                         f"events, best of {QUICK['repeat']}")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--iterations", type=int, default=None,
                    help=f"loop iterations for (a)-(c) (default {DEFAULTS['iterations']:,})")
    ap.add_argument("--events", type=int, default=None,
                    help=f"round trips for (e) and (f) (default {DEFAULTS['events']:,})")
    ap.add_argument("--repeat", type=int, default=None,
                    help=f"report the best of R runs (default {DEFAULTS['repeat']})")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    iterations = args.iterations if args.iterations is not None else base["iterations"]
    events = args.events if args.events is not None else base["events"]
    repeat = args.repeat if args.repeat is not None else base["repeat"]
    if iterations < 1 or events < 1 or repeat < 1:
        ap.error("--iterations, --events and --repeat must be positive")

    info = describe(iterations, events, repeat)
    figures = measure(iterations, events, repeat)
    if args.json:
        print(json.dumps({**info, "figures": {f.key: f.as_json() for f in figures}}, indent=2))
    else:
        print_report(info, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
