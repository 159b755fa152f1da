"""Race-explorer throughput on the CR2-race example, against its targets.

Workload: `idtlab/examples/explore/cr2_race.toml`, one NMI at every boundary of the
window `pf_handler..pf_done` (38 boundaries), checked against the scenario's
expectations and the `cr2-consistent` invariant; and every ordered pair of those
boundaries (two NMIs, 741 schedules). Figures, each the best of `--repeat` runs:

  (a) checkpointed, one process: schedules per second of `run_schedules(jobs=1)` (one
      load, the undisturbed run going forward from checkpoint to checkpoint, each
      schedule rolled back), including the session's own start;
  (b) the same with `jobs=2` (worker processes, each with its own session; process
      start-up included);
  (c) re-running every schedule from the start (`check_schedule`: load and run afresh);
  (d) the ratio (a) / (c).

The window and the budget (one undisturbed run each) are computed once, outside the
timings. Both paths are checked to give the same findings. Targets: (a) >= 500
schedules/s per core for a window of about 50 boundaries; (d) >= 5. Usage:

    python benchmarks/bench_explore.py [--quick] [--json] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from idtlab import explore as ex  # noqa: E402

EXAMPLE = ROOT / "idtlab" / "examples" / "explore" / "cr2_race.toml"


def best(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="singles only, best of 1")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    plan = ex.plan_for(EXAMPLE, "pf_handler", "pf_done", invariants=("cr2-consistent",))
    points = plan.window.points
    workloads = {"singles": [(("nmi",), (p,)) for p in points]}
    if not args.quick:
        workloads["pairs"] = [(("nmi", "nmi"), (a, b)) for i, a in enumerate(points)
                              for b in points[i:]]
    figures: dict[str, dict[str, float]] = {}
    for name, schedules in workloads.items():
        n = len(schedules)
        t1, f1 = best(repeat, lambda s=schedules: ex.run_schedules(plan, s, jobs=1))
        t2, f2 = best(repeat, lambda s=schedules: ex.run_schedules(plan, s, jobs=2))
        fresh = schedules if name == "singles" else schedules[:: max(1, n // 80)]
        tf, ff = best(1 if name == "pairs" else repeat,
                      lambda s=fresh: [ex.check_schedule(plan, e, sch) for e, sch in s])
        index = {id(s): i for i, s in enumerate(schedules)}
        same = f1 == f2 and all(ff[k] == f1[index[id(s)]] for k, s in enumerate(fresh))
        if not same:
            print(f"{name}: the checkpointed and fresh paths disagree", file=sys.stderr)
            return 1
        figures[name] = {"schedules": n, "failing": sum(not f.ok for f in f1),
                         "checkpointed_per_s": n / t1, "jobs2_per_s": n / t2,
                         "fresh_per_s": len(fresh) / tf, "speedup": (n / t1) / (len(fresh) / tf)}
    host = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count() or 0}
    if args.json:
        print(json.dumps({"example": str(EXAMPLE.relative_to(ROOT)), "window_points": len(points),
                          "host": host, "figures": figures}, indent=1))
        return 0
    print(f"race explorer, {EXAMPLE.relative_to(ROOT)}: window pf_handler..pf_done, "
          f"{len(points)} boundaries; best of {repeat}; {host['cpus']} CPUs")
    for name, f in figures.items():
        met_a = "met" if f["checkpointed_per_s"] >= 500 else "MISSED"
        met_d = "met" if f["speedup"] >= 5 else "MISSED"
        print(f"  {name}: {int(f['schedules'])} schedules, {int(f['failing'])} failing")
        print(f"    (a) checkpointed, 1 process : {f['checkpointed_per_s']:8.0f} schedules/s  "
              f"(target >= 500: {met_a})")
        print(f"    (b) checkpointed, --jobs 2  : {f['jobs2_per_s']:8.0f} schedules/s")
        print(f"    (c) fresh run per schedule  : {f['fresh_per_s']:8.0f} schedules/s")
        print(f"    (d) (a) / (c)               : {f['speedup']:8.1f}x  (target >= 5: {met_d})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
