"""RDTSC throughput: the delay loop of kvm-unit-tests (`pause; rdtsc` until a TSC goal)
reduced to a fixed count, `l: pause; rdtsc; dec ecx; jnz l; hlt`, in one `Machine.run`,
in fast and in timed mode. Prints RDTSCs per second and the CPU time of the run. Not a
test: it asserts only that every RDTSC ran (the instruction count) and that fast and
timed mode read the TSC the cycle model says.

    python benchmarks/bench_rdtsc.py [--iterations N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpu.machine import Machine  # noqa: E402
from idtlab.assemble import CodeBlock, assemble_blocks  # noqa: E402

CODE, STACK = 0x100000, 0x70000
LOOP = "mov ecx, {n}\nl:\npause\nrdtsc\ndec ecx\njnz l\nhlt\n"


def measure(mode: str, n: int) -> tuple[float, float]:
    """(RDTSCs per second of wall time, CPU seconds) of one run of `n` iterations."""
    blocks, _ = assemble_blocks([CodeBlock(CODE, LOOP.format(n=n), origin="bench",
                                           first_line=1)], known={})
    m = Machine(2 << 20, mode=mode, max_insns=10 * n + 100)
    m.load(CODE, blocks[0].code, code=True)
    wall, cpu = time.perf_counter(), time.process_time()
    r = m.run(entry=CODE, rsp=STACK)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if r.outcome != "hlt" or r.icount != 2 + 4 * n:
        raise SystemExit(f"{mode}: the loop did not run as intended: {r.outcome} {r.icount}")
    return n / wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, dict[str, float]] = {}
    for mode in ("fast", "timed"):
        runs = [measure(mode, args.iterations) for _ in range(args.repeat)]
        best = max(runs)
        out[mode] = {"rdtsc_per_s": round(best[0]), "cpu_s": round(best[1], 3)}
    if args.json:
        print(json.dumps({"iterations": args.iterations, **out}))
        return
    for mode, fig in out.items():
        print(f"{mode:5}: {fig['rdtsc_per_s']:>9,} RDTSC/s   {fig['cpu_s']:.3f} s CPU "
              f"for {args.iterations:,} iterations")


if __name__ == "__main__":
    main()
