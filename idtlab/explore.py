"""The race explorer, first version: run a scenario once per injection point in a window
and check its expectations at each.

A *point* is an instruction boundary of the actual execution: execution about to run
the instruction at an address for the k-th time, so loops and nested handlers are
covered and each arrival is a point of its own (a handler's first instruction right
after a delivery included). The window is dynamic: it opens at the first
boundary where execution reaches `start` and closes at the next boundary where it
reaches `end` (both included), whatever runs in between (handlers of events delivered
in the window included).

For each point the scenario is rebuilt from its file, the event is injected with
`before = address, hit = k` (exact in both counting modes), and the scenario's
`[[expect]]` entries are checked. Results come back in point order, so the report is the same whatever the
number of worker processes.

Not in this version (issue "Race explorer"): snapshot/restore of the common prefix
(each point re-runs from the start), pairs and random multi-event schedules with
shrinking, named Python invariants, Dask, the HTML report.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpu.machine import EVENT_KINDS
from idtlab import scenario as scn
from idtlab.assemble import resolve_address
from idtlab.errors import BadInput
from idtlab.trace import Symbolizer

MAX_WINDOW_STEPS = 200_000


@dataclass(frozen=True)
class Point:
    """A boundary: execution about to run the instruction at `rip` for the `arrival`-th
    time (`icount` instructions retired so far)."""

    icount: int
    rip: int
    arrival: int
    label: str  # symbol+offset (#k): the k-th arrival at that address in the run
    insn: str


@dataclass(frozen=True)
class Finding:
    point: Point
    outcome: str
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def _load(path: Path, mode: str | None) -> scn.Scenario:
    sc = scn.load(path, mode=mode)
    assert sc.machine is not None
    if sc.machine.injections:
        raise BadInput(f"{path.name}: the explorer injects its own events; remove the "
                       "scenario's [[inject]] tables")
    return sc


def _address(text: str) -> int | str:
    try:
        return int(text, 0)
    except ValueError:
        return text


def enumerate_points(path: Path, start: str, end: str, *, mode: str | None = None) -> list[Point]:
    """The boundaries of the window [start, end] in one uninterrupted run."""
    sc = _load(path, mode)
    m = sc.machine
    assert m is not None
    lo = resolve_address(_address(start), sc.symbols, f"{path.name}: --window start")
    hi = resolve_address(_address(end), sc.symbols, f"{path.name}: --window end")
    sym = Symbolizer(sc.symbols, hide=("gdt", "tss", "idt", "pml4", "apic"))
    args = dict(sc.run_args)
    limit = args.pop("max_insns")
    m.start_state(entry=args["entry"], rsp=args["rsp"], cpl=args["cpl"], rflags=args["rflags"],
                  regs=args["regs"])
    points: list[Point] = []
    arrivals: dict[int, int] = {}
    state = {"inside": False, "done": False}

    def arrive(rip: int) -> None:
        """Execution reaches `rip` (the instruction there is about to execute)."""
        if state["done"]:
            return
        arrivals[rip] = arrivals.get(rip, 0) + 1
        if rip == lo:
            state["inside"] = True
        if state["inside"]:
            points.append(Point(m.engine.icount, rip, arrivals[rip],
                                f"{sym(rip)} (#{arrivals[rip]})", m.disassemble(rip)))
            if rip == hi:
                state["done"] = True

    # A run stepped one retired instruction at a time still crosses a delivery in one
    # step (the handler's first instruction runs before the next stop): the delivery
    # callback records that boundary.
    m.on_deliver.append(lambda rec: arrive(int(rec["handler"])))
    arrive(m.engine.read_reg("rip"))
    for _ in range(MAX_WINDOW_STEPS):
        if state["done"]:
            return points
        if m.engine.icount >= limit:
            break
        result = m.run(max_insns=m.engine.icount + 1)
        if result.outcome != "max_insns":
            break
        arrive(m.engine.read_reg("rip"))
    if state["done"]:
        return points
    inside = state["inside"]
    if not inside:
        raise BadInput(f"{path.name}: execution never reaches the window start {start!r}")
    raise BadInput(f"{path.name}: execution never reaches the window end {end!r} after "
                   f"{start!r} (within {MAX_WINDOW_STEPS} instructions)")


def check_point(path: Path, event: str, point: Point, mode: str | None = None) -> Finding:
    sc = _load(path, mode)
    assert sc.machine is not None
    sc.machine.inject(event, before=point.rip, hit=point.arrival, label="explore")
    result = scn.run(sc)
    failures = tuple(str(f) for f in scn.check(sc, result))
    return Finding(point, result.outcome, failures)


def _check(args: tuple[Path, str, Point, str | None]) -> Finding:
    return check_point(*args)


def explore(path: Path, event: str, start: str, end: str, *, jobs: int = 1,
            mode: str | None = None, progress: bool = False) -> list[Finding]:
    """Every point of the window, checked; in point order."""
    if event not in EVENT_KINDS or event == "interrupt":
        raise BadInput(f"--event {event!r}: the explorer injects 'nmi' (interrupts need a "
                       "vector; async_pf a token: not in this version)")
    points = enumerate_points(path, start, end, mode=mode)
    work = [(path, event, p, mode) for p in points]
    findings: list[Finding] = []
    if jobs <= 1:
        results: Iterable[Finding] = map(_check, work)
    else:
        pool = multiprocessing.get_context("spawn").Pool(jobs)
        results = pool.imap(_check, work)  # imap keeps the order
    try:
        for i, f in enumerate(results, 1):
            findings.append(f)
            if progress:
                print(f"\rexplore: {i}/{len(work)} points", end="", file=sys.stderr, flush=True)
    finally:
        if jobs > 1:
            pool.close()
            pool.join()
        if progress:
            print(file=sys.stderr)
    return findings


def report(findings: list[Finding], event: str) -> list[str]:
    lines = [f"{'point':<34} {'instruction':<34} result"]
    for f in findings:
        res = "ok" if f.ok else f"BREAKS: {f.failures[0]}"
        lines.append(f"{f.point.label:<34} {f.point.insn:<34} {res}")
    bad = sum(not f.ok for f in findings)
    lines.append(f"{len(findings)} points, {bad} where an injected {event} breaks an expectation")
    return lines


def as_json(findings: list[Finding]) -> list[dict[str, Any]]:
    return [{**asdict(f.point), "outcome": f.outcome, "failures": list(f.failures)}
            for f in findings]
