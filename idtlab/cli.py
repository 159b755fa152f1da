"""`idtlab` command line: `run`, `compare`, `explore`, `ref`, `diff`, `suite` (kvm-unit-tests
suites, idtlab/suite.py), `demo`, `lab` (the teaching labs, idtlab.labs.cli), `--version`.

Exit status: 0 when every expectation holds, 1 when one fails, 2 on bad input (one line
on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import textwrap
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from cpu import board
from cpu import multiboot as mbt
from cpu.layout import memory_size_problem
from cpu.machine import Machine
from cpu.msrs import TSC_SOURCES
from idtlab import __version__, apf_matrix, explore_html, explore_report, ref, suite
from idtlab import diff as differ
from idtlab import explore as ex
from idtlab import scenario as scn
from idtlab.colour import Palette, wants_colour
from idtlab.errors import BadInput, Unsupported
from idtlab.labs import cli as labs_cli
from idtlab.trace import HINT, LEGEND, Symbolizer, stuck, timeline, write_jsonl

# `run --image`: a test kernel runs to its exit port; the limit only catches a runaway one
# (kvm-unit-tests' sieve retires tens of billions of instructions).
IMAGE_MAX_INSNS = 10**12
# ...and deliveries: access.flat takes millions of page faults on purpose.
IMAGE_MAX_EVENTS = 10**9
# Without --trace or --timeline an image run keeps only the trace's tail (memory stays flat
# however many events a long suite delivers; the summary counts them all).
IMAGE_TRACE_TAIL = 10_000
SYSTEM_SYMBOLS = ("gdt", "tss", "idt", "pml4", "apic")
# Built-in demos (idtlab/examples/): the default shows the nested-NMI IST race.
DEMOS = {
    "nested-nmi": "nested_nmi_naive.toml",
    "nested-nmi-safe": "nested_nmi_safe.toml",
    "delivery": "demo.toml",
    "ve-first": "ve/ve_first.toml",
}
# Demos that run two designs against the same schedule and print them side by side.
SIDE_BY_SIDE = {
    "ve-rearm-race": ("ve/ve_rearm_race_clear_then_iret.toml", "ve/ve_rearm_race_deferred.toml"),
    "nested-nmi-both": ("nested_nmi_naive.toml", "nested_nmi_safe.toml"),
    "apf-error-gfn": ("apf/apf_error_gfn_loop.toml", "apf/apf_error_spte_tag.toml"),
    "nested-injection": ("hyper/nested_injection_sdm.toml",
                         "hyper/nested_injection_kvm_pre61.toml"),
    "fred-vs-idt": ("nested_nmi_naive.toml", "nested_nmi_fred.toml"),
}
# Demos that print a table computed by the race explorer (no single scenario).
TABLES = {
    "apf-matrix": "the async-#PF policy x handler-design matrix (idtlab.apf_matrix)",
}


def _run_file(path: Path, trace_out: str | None, quiet: bool, display: str,
              cycles: bool = False, mode: str | None = None, tail: int | None = None) -> int:
    sc = scn.load(path, mode=mode)
    if tail is not None:
        # Only the last `tail` records are kept (a long run's memory stays flat); the
        # counts of every kind stay whole. Expectations are judged on the whole trace.
        if sc.expects:
            raise BadInput(f"run: --trace-tail keeps only the last {tail} trace records, and "
                           f"{display}'s [[expect]] entries are judged on the whole trace: "
                           "run it without --trace-tail")
        assert sc.machine is not None
        sc.machine.trace.keep = tail
    # A multiboot image's serial output is printed as it comes (it may run long).
    live = sc.machine is not None and sc.machine.multiboot is not None and not quiet
    if live:
        assert sc.machine is not None
        print(f"idtlab: {display}: serial output")
        sc.machine.on_serial_line.append(lambda text: print(f"  | {text}", flush=True))
    result = scn.run(sc)
    failures = scn.check(sc, result)
    records = result.trace.last()
    if trace_out:
        write_jsonl(records, trace_out)
    if not quiet:
        m = sc.machine
        assert m is not None
        sym = Symbolizer(sc.symbols, hide=SYSTEM_SYMBOLS, disasm=m.disassemble)
        print(f"idtlab: {display}")
        if len(records) < result.trace.emitted:
            print(f"({result.trace.emitted - len(records)} earlier records not kept: "
                  "--trace-tail)")
        _print_timeline(records, sym, cycles)
        print(f"{result.icount} instructions, {result.cycles} cycles ({m.mode} mode, "
              f"profile {m.profile.name})")
        if result.serial and not live:
            print("serial output:")
            for line in result.serial.splitlines():
                print(f"  | {line}")
    for f in failures:
        print(f"FAIL {f}")
    if sc.expects:
        print(_held(sc, failures) + (f"; trace written to {trace_out}" if trace_out else ""))
    elif trace_out:
        print(f"trace written to {trace_out}")
    return 1 if failures else 0


def _print_timeline(records: Sequence[Mapping[str, Any]], sym: Symbolizer, cycles: bool) -> None:
    """The timeline with repeats collapsed, coloured on a terminal, then the verdict when
    the guest got stuck in a loop, and the legend's one-line hint."""
    palette = Palette(wants_colour(sys.stdout))
    print(palette.head(f"{'icount':>10}  " + (f"{'cycle':>12}  " if cycles else "") + "event"))
    for line in timeline(records, sym, cycles=cycles, collapse=True, palette=palette):
        print(line)
    verdict = stuck(records, sym)
    if verdict:
        print(palette.bad(f"verdict: {verdict}"))
    print(palette.dim(HINT))


def _held(sc: scn.Scenario, failures: list[scn.Failure]) -> str:
    """`N/M expectations hold`, counting those that describe the scenario's own run
    (an entry with scope "explored" describes the race explorer's runs only)."""
    own = [e for e in sc.expects if e.applies(0)]
    line = f"{len(own) - len(failures)}/{len(own)} expectations hold"
    if len(own) < len(sc.expects):
        line += (f" ({len(sc.expects) - len(own)} more describe the explorer's runs only: "
                 "scope \"explored\")")
    return line


def _run_image(args: argparse.Namespace) -> int:
    """`idtlab run --image X.elf`: boot a multiboot image, print its serial output line by
    line as it comes, then a summary. Exit status 0 when the image ended through an exit
    port with code 0 (isa-debug-exit 0xF4 value 0, or Bochs' "Shutdown"), 1 otherwise."""
    memory = scn.parse_size(args.memory, "--memory", scn.Checker("run"))
    problem = memory_size_problem(memory) if memory >= 1 << 20 else "must be at least 1M"
    if problem is not None:
        raise BadInput(f"run: --memory {args.memory}: {problem}")
    try:
        chosen = board.parse(args.machine or "pc", args.device or [])
    except ValueError as exc:
        raise BadInput(f"run: {exc}") from None
    args.image = ref.resolve_image(args.image)  # a file, or one of guest_images/mb/ by name
    image = mbt.read_image(args.image)
    m = Machine(memory, mode=args.mode or "fast", max_insns=args.max_insns,
                max_events=IMAGE_MAX_EVENTS, board=chosen)
    if not (args.trace or args.timeline):
        m.trace.keep = IMAGE_TRACE_TAIL
    if args.trace_tail is not None:
        m.trace.keep = args.trace_tail
    m.model.state.msrs.tsc_source = args.tsc
    mbt.load(m, image, cmdline=args.cmdline)
    if not args.quiet:
        m.on_serial_line.append(lambda text: print(text, flush=True))
    result = m.run()
    tail = result.serial[result.serial.rfind("\n") + 1:]
    if tail and not args.quiet:
        print(tail, flush=True)  # a last line without its newline
    if args.trace:
        write_jsonl(result.trace.last(), args.trace)
    sym = Symbolizer(m.symbols, hide=SYSTEM_SYMBOLS, disasm=m.disassemble)
    if args.timeline:
        _print_timeline(result.trace.last(), sym, args.cycles)
    detail = f" ({result.reason})" if result.reason else ""
    print(f"idtlab: {args.image.name}: {result.outcome}{detail} at {sym(result.rip)}; "
          f"{result.icount} instructions, {result.cycles} cycles ({m.mode} mode), "
          f"{result.trace.counts['deliver']} events delivered"
          + (f"; trace written to {args.trace}" if args.trace else ""))
    return 0 if result.outcome == "exit" and result.exit_code in (0, None) else 1


def _compare(paths: list[Path], width: int, cycles: bool, mode: str | None) -> int:
    """Run scenarios and print their timelines side by side (one column each), then
    each one's outcome and expectations. Exit 1 if any expectation fails."""
    columns: list[list[str]] = []
    footers: list[str] = []
    failed = False
    for path in paths:
        sc = scn.load(path, mode=mode)
        result = scn.run(sc)
        failures = scn.check(sc, result)
        failed = failed or bool(failures)
        assert sc.machine is not None
        sym = Symbolizer(sc.symbols, hide=SYSTEM_SYMBOLS, disasm=sc.machine.disassemble)
        lines = [path.name, "-" * min(width, len(path.name))]
        for line in timeline(result.trace.records, sym, cycles=cycles, collapse=True):
            lines.extend(textwrap.wrap(line, width, subsequent_indent=" " * 14,
                                       drop_whitespace=False) or [""])
        columns.append(lines)
        footers.append(f"{path.name}: {result.outcome}; {_held(sc, failures)}")
        footers.extend(f"  FAIL {f}" for f in failures)
    for row in itertools.zip_longest(*columns, fillvalue=""):
        print("  |  ".join(cell.ljust(width) for cell in row).rstrip())
    print()
    for line in footers:
        print(line)
    return 1 if failed else 0


def _explore(args: argparse.Namespace, command: str) -> int:
    start, sep, end = str(args.window).partition("..")
    if not sep or not start:
        raise BadInput(f"--window {args.window!r}: expected START..END or START.. (symbols or "
                       "addresses; START.. runs to the end of the run)")
    events = tuple(args.event or ["nmi"])
    invariants = tuple(args.invariant or ())
    if args.invariants_only and not invariants:
        raise BadInput("--invariants-only: give the invariants to check (--invariant NAME)")
    progress = sys.stderr.isatty() and not args.json
    settings = ex.Settings(args.scenario, events, start, end or None, invariants, args.mode,
                           random=args.random, seed=args.seed, max_events=args.max_events,
                           force=args.force, expectations=not args.invariants_only,
                           budget=args.budget, command=command)
    if args.dask:
        args.dask = ex.dask_client(args.dask, args.dask_timeout)
    try:
        result = ex.run_exploration(settings, jobs=args.jobs, dask=args.dask,
                                    progress=progress)
    finally:
        if args.dask:
            args.dask.close()
    if args.html:
        Path(args.html).write_text(explore_html.render(result))
    if args.json:
        print(json.dumps(explore_report.as_json(result), indent=1))
    else:
        palette = Palette(wants_colour(sys.stdout))
        for line in explore_report.report(result, failures_only=args.failures_only,
                                          palette=palette):
            print(line)
        if args.html:
            print(f"report written to {args.html}")
    return 1 if result.breaking else 0


# The numeric options and the least value each takes (checked in one place, before any
# work: a CI gate must not pass on an argument that silently did nothing).
NUMERIC_LIMITS: dict[str, tuple[int | float, str]] = {
    "jobs": (1, "worker processes"),
    "max_insns": (1, "instructions"),
    "budget": (0, "instructions"),
    "random": (1, "random schedules"),
    "max_events": (1, "events per schedule"),
    "width": (8, "columns"),
    "dask_timeout": (0.001, "seconds"),
}


def check_numbers(args: argparse.Namespace) -> None:
    """`BadInput` for a numeric option below its least value (NUMERIC_LIMITS)."""
    for dest, (least, unit) in NUMERIC_LIMITS.items():
        value = getattr(args, dest, None)
        if value is not None and value < least:
            raise BadInput(f"--{dest.replace('_', '-')} {value}: give at least {least:g} {unit}")


def check_writable(path: str | None, option: str) -> None:
    """`BadInput` unless `path` (an output file the run will write at its end) can be
    written: checked before the run, not after it."""
    if path is None:
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise BadInput(f"{option} {path}: is a directory")
    if not parent.is_dir():
        raise BadInput(f"{option} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise BadInput(f"{option} {path}: not writable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="idtlab", description="x86-64 interrupt and exception delivery lab")
    parser.add_argument("--version", action="version", version=f"idtlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a scenario file and check its expectations, or boot "
                           "a multiboot image (--image)")
    p_run.add_argument("scenario", type=Path, nargs="?")
    p_run.add_argument("--image", type=Path, metavar="X.elf",
                       help="boot a multiboot v1 image (ELF32 or ELF64, or the name of one of "
                            "guest_images/mb/, built on demand) instead of a scenario; its "
                            "serial output is printed as it comes")
    p_run.add_argument("--cmdline", help="--image: the multiboot command line (default: the "
                       "image's file name)")
    p_run.add_argument("--memory", default="256M",
                       help="--image: guest RAM (256M, what kvm-unit-tests' runner gives)")
    p_run.add_argument("--max-insns", type=int, default=IMAGE_MAX_INSNS,
                       help=f"--image: instruction limit ({IMAGE_MAX_INSNS:.0e}: a safety net "
                            "for runaway kernels, far above what a test kernel needs)")
    p_run.add_argument("--trace-tail", type=int, metavar="N",
                       help="keep only the trace's last N records (memory stays flat on long "
                            "runs; the timeline and --trace show those; counts stay whole). A "
                            "scenario's [[expect]] entries need the whole trace: not with them. "
                            f"--image keeps the last {IMAGE_TRACE_TAIL} unless --trace or "
                            "--timeline asks for all")
    p_run.add_argument("--timeline", action="store_true",
                       help="--image: also print the timeline after the run")
    p_run.add_argument("--tsc", choices=TSC_SOURCES, default="cycles",
                       help="--image: what RDTSC counts: the machine's cycles (deterministic, "
                            "the default) or the host's clock (for benchmarks that spin until "
                            "a TSC goal, e.g. kvm-unit-tests' vmexit; runs then differ)")
    p_run.add_argument("--machine", metavar="TYPE",
                       help="--image: the machine around the CPU: pc (the default: no PCI) or "
                            "q35 (PCI configuration mechanism #1, q35's host bridge), as "
                            "QEMU's -M")
    p_run.add_argument("--device", action="append", metavar="NAME",
                       help="--image, with --machine q35: add a device, as QEMU's -device: "
                            "intel-iommu (VT-d at 0xfed90000, QEMU's intel-iommu,intremap=on,"
                            "eim=off) or edu (QEMU's educational PCI device at 00:02.0); "
                            "repeatable")
    p_run.add_argument("--trace", metavar="OUT.jsonl", help="write the event trace as JSONL")
    p_run.add_argument("-q", "--quiet", action="store_true", help="no timeline")
    p_run.add_argument("--cycles", action="store_true", help="show cycle stamps in the timeline")
    p_run.add_argument("--mode", choices=("fast", "timed"),
                       help="cycle accounting, overriding the scenario's [machine] mode")
    p_run.add_argument("--legend", action="store_true",
                       help="explain the timeline's columns, words and symbols, and exit")
    p_cmp = sub.add_parser("compare", help="run scenarios and show their timelines side by side")
    p_cmp.add_argument("scenarios", type=Path, nargs="+")
    p_cmp.add_argument("--width", type=int, default=72, help="column width (72)")
    p_cmp.add_argument("--cycles", action="store_true", help="show cycle stamps")
    p_cmp.add_argument("--mode", choices=("fast", "timed"))
    p_exp = sub.add_parser("explore", help="inject an event at every boundary of a window and "
                           "check the scenario's expectations at each")
    p_exp.add_argument("scenario", type=Path)
    p_exp.add_argument("--event", action="append",
                       help="the event to inject: nmi (default), interrupt:VECTOR, "
                            "async_pf:gpa=ADDR, async_pf:token=N, ept_revoke:GPA; a host event "
                            "may name the policy to ask: async_pf:gpa=ADDR,policy=NAME (kvm, "
                            "kvm-send-always, never-while-nmi-blocked, always, "
                            "nmi-blocked-only, or FILE.py:FUNCTION); twice: every ordered pair "
                            "of points; with --random: the events to draw from")
    p_exp.add_argument("--window", required=True, metavar="START..END",
                       help="addresses or symbols: from the first arrival at START to the next "
                            "arrival at END, both boundaries included (START..: to the end "
                            "of the run)")
    p_exp.add_argument("--jobs", type=int, default=1, help="worker processes (1)")
    p_exp.add_argument("--mode", choices=("fast", "timed"))
    p_exp.add_argument("--json", action="store_true", help="machine-readable findings")
    p_exp.add_argument("--html", metavar="REPORT.html", help="write an HTML report")
    p_exp.add_argument("--invariant", action="append",
                       help="also check an invariant (repeatable): a ready-made one "
                            "(no-shutdown, no-vmexit, frames-intact, no-runaway, "
                            "cr2-consistent) or your own, MODULE:FUNCTION or FILE.py:FUNCTION "
                            "taking (result, machine) and returning a message or None")
    p_exp.add_argument("--dask-timeout", type=float, default=10.0, metavar="S",
                       help="seconds to wait for the Dask scheduler (10)")
    p_exp.add_argument("--budget", type=int, default=200, metavar="N",
                       help="instructions each injected event may add to twice the undisturbed "
                            "run's before a schedule counts as a runaway (200)")
    p_exp.add_argument("--dask", metavar="tcp://HOST:8786",
                       help="run the schedules on this Dask distributed scheduler (needs "
                            "idtlab[dask]) instead of local processes")
    p_exp.add_argument("--random", type=int, metavar="N",
                       help="N random schedules of several events instead of every point; the "
                            "first failing one is shrunk")
    p_exp.add_argument("--seed", type=int, default=0, help="seed for --random (0)")
    p_exp.add_argument("--max-events", type=int, default=3, help="events per random schedule (3)")
    p_exp.add_argument("--failures-only", action="store_true",
                       help="print only the schedules that break something")
    p_exp.add_argument("--invariants-only", action="store_true",
                       help="check only the --invariant checks, not the scenario's [[expect]] "
                            "entries")
    p_exp.add_argument("--force", action="store_true",
                       help="host events (async_pf, ept_revoke) happen wherever the schedule "
                            "puts them; without it the host's policy is asked at each point "
                            "and a point where it refuses is reported as refused")
    ref.add_parser(sub)
    differ.add_parser(sub)
    labs_cli.add_parser(sub)
    suite.add_parser(sub)
    p_demo = sub.add_parser("demo", help="run the built-in example scenario")
    p_demo.add_argument("--trace", metavar="OUT.jsonl", help="write the event trace as JSONL")
    p_demo.add_argument("--show", action="store_true", help="print the demo scenario and exit")
    p_demo.add_argument("--cycles", action="store_true", help="show cycle stamps in the timeline")
    p_demo.add_argument("name", nargs="?", default="nested-nmi",
                        choices=sorted([*DEMOS, *SIDE_BY_SIDE, *TABLES]),
                        help="which demo (default: nested-nmi)")
    args = parser.parse_args(argv)
    try:
        if args.command in ("run", "compare", "explore", "demo"):  # the others check their own
            check_numbers(args)
            check_writable(getattr(args, "trace", None), "--trace")
            check_writable(getattr(args, "html", None), "--html")
        if args.command == "ref":
            return ref.run_cli(args)
        if args.command == "diff":
            return differ.run_cli(args)
        if args.command == "lab":
            return labs_cli.run_cli(args)
        if args.command == "suite":
            return suite.run_cli(args)
        if args.command == "explore":
            return _explore(args, "idtlab " + shlex.join(sys.argv[1:] if argv is None
                                                         else argv))
        if args.command == "compare":
            return _compare(args.scenarios, args.width, args.cycles, args.mode)
        if args.command == "demo" and args.name in TABLES:
            if args.show:
                print(apf_matrix.__doc__, end="")
                return 0
            apf_matrix.print_matrix(apf_matrix.policy_matrix())
            return 0
        if args.command == "demo" and args.name in SIDE_BY_SIDE:
            files = [resources.files("idtlab") / "examples" / f for f in SIDE_BY_SIDE[args.name]]
            with resources.as_file(files[0]) as a, resources.as_file(files[1]) as b:
                if args.show:
                    for f in (a, b):
                        print(f"# ===== {f.name} =====")
                        print(f.read_text(), end="")
                    return 0
                return _compare([a, b], 72, args.cycles, None)
        if args.command == "demo":
            res = resources.files("idtlab") / "examples" / DEMOS[args.name]
            with resources.as_file(res) as demo:
                if args.show:
                    print(demo.read_text(), end="")
                    return 0
                return _run_file(demo, args.trace, False,
                                 f"demo {args.name} (idtlab demo {args.name} --show prints it)",
                                 args.cycles)
        if args.legend:
            print("How to read a timeline (idtlab run, compare, demo, lab):")
            for line in LEGEND:
                print(f"  {line}")
            return 0
        if args.trace_tail is not None and args.trace_tail < 1:
            raise BadInput(f"run: --trace-tail {args.trace_tail}: keep at least 1 record")
        if args.image is not None:
            if args.scenario is not None:
                raise BadInput("run: give a scenario file or --image, not both")
            return _run_image(args)
        if args.machine is not None or args.device:
            raise BadInput("run: --machine and --device choose the machine of an --image run "
                           "(a scenario describes its own)")
        if args.scenario is None:
            raise BadInput("run: give a scenario file (or --image X.elf)")
        return _run_file(args.scenario, args.trace, args.quiet, str(args.scenario), args.cycles,
                         args.mode, args.trace_tail)
    except (BadInput, Unsupported) as exc:
        print(f"idtlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idtlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `idtlab ... | head`: the reader left; say nothing more (not even at exit).
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0


if __name__ == "__main__":
    sys.exit(main())
