"""`idtlab` command line: `run SCENARIO`, `demo`.

Exit status: 0 when every expectation holds, 1 when one fails, 2 on bad input (one line
on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from idtlab import scenario as scn
from idtlab.errors import BadInput, Unsupported
from idtlab.trace import Symbolizer, timeline, write_jsonl

SYSTEM_SYMBOLS = ("gdt", "tss", "idt", "pml4", "apic")
# Built-in demos (idtlab/examples/): the default shows the nested-NMI IST race.
DEMOS = {
    "nested-nmi": "nested_nmi_naive.toml",
    "nested-nmi-safe": "nested_nmi_safe.toml",
    "delivery": "demo.toml",
}


def _run_file(path: Path, trace_out: str | None, quiet: bool, display: str,
              cycles: bool = False, mode: str | None = None) -> int:
    sc = scn.load(path, mode=mode)
    result = scn.run(sc)
    failures = scn.check(sc, result)
    if trace_out:
        write_jsonl(result.trace.records, trace_out)
    if not quiet:
        sym = Symbolizer(sc.symbols, hide=SYSTEM_SYMBOLS)
        print(f"idtlab: {display}")
        print(f"{'icount':>10}  " + (f"{'cycle':>12}  " if cycles else "") + "event")
        for line in timeline(result.trace.records, sym, cycles=cycles):
            print(line)
        m = sc.machine
        assert m is not None
        print(f"{result.icount} instructions, {result.cycles} cycles ({m.mode} mode, "
              f"profile {m.profile.name})")
        if result.serial:
            print("serial output:")
            for line in result.serial.splitlines():
                print(f"  | {line}")
    for f in failures:
        print(f"FAIL {f}")
    if sc.expects:
        ok = len(sc.expects) - len(failures)
        print(f"{ok}/{len(sc.expects)} expectations hold"
              + (f"; trace written to {trace_out}" if trace_out else ""))
    elif trace_out:
        print(f"trace written to {trace_out}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="idtlab", description="x86-64 interrupt and exception delivery lab")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a scenario file and check its expectations")
    p_run.add_argument("scenario", type=Path)
    p_run.add_argument("--trace", metavar="OUT.jsonl", help="write the event trace as JSONL")
    p_run.add_argument("-q", "--quiet", action="store_true", help="no timeline")
    p_run.add_argument("--cycles", action="store_true", help="show cycle stamps in the timeline")
    p_run.add_argument("--mode", choices=("fast", "timed"),
                       help="cycle accounting, overriding the scenario's [machine] mode")
    p_demo = sub.add_parser("demo", help="run the built-in example scenario")
    p_demo.add_argument("--trace", metavar="OUT.jsonl", help="write the event trace as JSONL")
    p_demo.add_argument("--show", action="store_true", help="print the demo scenario and exit")
    p_demo.add_argument("--cycles", action="store_true", help="show cycle stamps in the timeline")
    p_demo.add_argument("name", nargs="?", default="nested-nmi", choices=sorted(DEMOS),
                        help="which demo (default: nested-nmi)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            res = resources.files("idtlab") / "examples" / DEMOS[args.name]
            with resources.as_file(res) as demo:
                if args.show:
                    print(demo.read_text(), end="")
                    return 0
                return _run_file(demo, args.trace, False,
                                 f"demo {args.name} (idtlab demo {args.name} --show prints it)",
                                 args.cycles)
        return _run_file(args.scenario, args.trace, args.quiet, str(args.scenario), args.cycles,
                         args.mode)
    except (BadInput, Unsupported) as exc:
        print(f"idtlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idtlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
