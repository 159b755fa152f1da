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

Besides single events: every ordered pair of points for two events, random schedules
of several events with shrinking to a minimal failing schedule, ready-made invariants
(`INVARIANTS`), worker processes.

Not in this version (issue "Race explorer"): snapshot/restore of the common prefix
(each schedule re-runs from the start), events other than NMI, windows opened by an
event, Dask, user-supplied Python invariants from the command line.
"""

from __future__ import annotations

import html
import multiprocessing
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpu.machine import EVENT_KINDS, RunResult
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
    """One schedule (events injected at points, in order) and what it broke."""

    events: tuple[str, ...]
    schedule: tuple[Point, ...]
    outcome: str
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def point(self) -> Point:
        return self.schedule[0]

    @property
    def name(self) -> str:
        return " + ".join(f"{e} @ {p.label}" for e, p in zip(self.events, self.schedule,
                                                             strict=True))


# Ready-made invariants, checked after every run besides the scenario's [[expect]]s:
# each takes the run's result and returns a failure message or None.
Invariant = Callable[[RunResult], "str | None"]


def _no_shutdown(r: RunResult) -> str | None:
    return f"the CPU shut down ({r.reason})" if r.outcome == "shutdown" else None


def _no_vmexit(r: RunResult) -> str | None:
    exits = r.trace.of_kind("vmexit")
    if exits or r.outcome == "vmexit":
        return f"a VM exit happened ({exits[0]['why'] if exits else r.reason})"
    return None


def _frames_intact(r: RunResult) -> str | None:
    hit = r.trace.of_kind("frame_overwritten")
    if hit:
        h = hit[0]
        return (f"the {h['victim']} frame at {h['at']:#x} was overwritten by a {h['by']} "
                "delivery before its IRET")
    return None


def _no_runaway(r: RunResult) -> str | None:
    return f"the run did not finish ({r.outcome})" if r.outcome in ("max_insns", "max_events") \
        else None


INVARIANTS: dict[str, Invariant] = {
    "no-shutdown": _no_shutdown,
    "no-vmexit": _no_vmexit,
    "frames-intact": _frames_intact,
    "no-runaway": _no_runaway,
}


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

    last: list[tuple[int, int]] = []

    def arrive(rip: int) -> None:
        """Execution reaches `rip` (the instruction there is about to execute)."""
        here = (m.engine.icount, rip)
        if state["done"] or (last and last[-1] == here):
            return  # the same boundary seen by the delivery callback and the step loop
        last.append(here)
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


@dataclass(frozen=True)
class Budget:
    """Limits for one schedule's run, from the undisturbed run: a schedule that makes the
    guest loop (an IRET through a clobbered frame, say) ends as `max_insns` quickly
    instead of running to the scenario's own, much larger limit."""

    insns: int
    events: int


def baseline_budget(path: Path, mode: str | None = None) -> Budget:
    sc = _load(path, mode)
    r = scn.run(sc)
    return Budget(insns=2 * r.icount + 500, events=4 * len(r.deliveries) + 50)


def _run_schedule(path: Path, events: tuple[str, ...], schedule: tuple[Point, ...],
                  mode: str | None, budget: Budget | None) -> tuple[scn.Scenario, RunResult]:
    """Rebuild the scenario, inject `events[i]` at `schedule[i]`, and run it."""
    sc = _load(path, mode)
    m = sc.machine
    assert m is not None
    if budget is not None:
        sc.run_args["max_insns"] = min(sc.run_args["max_insns"], budget.insns)
        m.max_events = min(m.max_events, budget.events)
    for event, point in zip(events, schedule, strict=True):
        m.inject(event, before=point.rip, hit=point.arrival, label="explore")
    return sc, scn.run(sc)


def check_schedule(path: Path, events: tuple[str, ...], schedule: tuple[Point, ...],
                   mode: str | None = None, invariants: tuple[str, ...] = (),
                   budget: Budget | None = None) -> Finding:
    """Rebuild the scenario, inject `events[i]` at `schedule[i]`, run, and check the
    scenario's expectations and the named invariants."""
    sc, result = _run_schedule(path, events, schedule, mode, budget)
    failures = [str(f) for f in scn.check(sc, result)]
    for name in invariants:
        msg = INVARIANTS[name](result)
        if msg is not None:
            failures.append(f"invariant {name}: {msg}")
    return Finding(events, schedule, result.outcome, tuple(failures))


def check_point(path: Path, event: str, point: Point, mode: str | None = None) -> Finding:
    return check_schedule(path, (event,), (point,), mode)


Job = tuple[Path, tuple[str, ...], tuple[Point, ...], "str | None", tuple[str, ...],
            "Budget | None"]


def _check(job: Job) -> Finding:
    return check_schedule(*job)


def _run_all(jobs_list: list[Job], jobs: int, progress: bool) -> list[Finding]:
    findings: list[Finding] = []
    pool: Any = None
    if jobs <= 1:
        results: Iterable[Finding] = map(_check, jobs_list)
    else:
        pool = multiprocessing.get_context("spawn").Pool(jobs)
        results = pool.imap(_check, jobs_list, chunksize=4)  # imap keeps the order
    try:
        for i, f in enumerate(results, 1):
            findings.append(f)
            if progress:
                print(f"\rexplore: {i}/{len(jobs_list)} schedules", end="", file=sys.stderr,
                      flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if progress:
            print(file=sys.stderr)
    return findings


def _validate(events: tuple[str, ...], invariants: tuple[str, ...]) -> None:
    for event in events:
        if event != "nmi":
            raise BadInput(f"--event {event!r}: this version injects 'nmi' (interrupts need a "
                           "vector, async_pf a token)" + ("" if event in EVENT_KINDS else
                                                         f"; known events: {', '.join(EVENT_KINDS)}"))
    for name in invariants:
        if name not in INVARIANTS:
            raise BadInput(f"--invariant {name!r}: known invariants: {', '.join(INVARIANTS)}")


def explore(path: Path, event: str | tuple[str, ...], start: str, end: str, *, jobs: int = 1,
            mode: str | None = None, progress: bool = False,
            invariants: tuple[str, ...] = ()) -> list[Finding]:
    """One event: every point of the window. Two events: every ordered pair of points
    (the second at or after the first in the undisturbed run). Results in schedule
    order, whatever `jobs` is."""
    events = (event,) if isinstance(event, str) else tuple(event)
    if not 1 <= len(events) <= 2:
        raise BadInput("give one --event (every point) or two (every ordered pair of points); "
                       "for more, use --random")
    _validate(events, invariants)
    points = enumerate_points(path, start, end, mode=mode)
    budget = baseline_budget(path, mode)
    schedules: list[tuple[Point, ...]]
    if len(events) == 1:
        schedules = [(p,) for p in points]
    else:
        schedules = [(a, b) for i, a in enumerate(points) for b in points[i:]]
    work: list[Job] = [(path, events, sch, mode, invariants, budget) for sch in schedules]
    return _run_all(work, jobs, progress)


def random_search(path: Path, events: tuple[str, ...], start: str, end: str, *, count: int,
                  seed: int, max_events: int = 3, jobs: int = 1, mode: str | None = None,
                  progress: bool = False, invariants: tuple[str, ...] = ()) -> tuple[
                      list[Finding], Finding | None]:
    """`count` random schedules of 1..`max_events` events (drawn from `events`) at points
    of the window, in increasing point order; the first failing one is shrunk to a
    minimal failing schedule (events removed one at a time, then each point moved as
    early as it still fails). Deterministic for a given seed."""
    _validate(events, invariants)
    points = enumerate_points(path, start, end, mode=mode)
    budget = baseline_budget(path, mode)
    rng = random.Random(seed)
    work: list[Job] = []
    for _ in range(count):
        k = rng.randint(1, max_events)
        idx = sorted(rng.randrange(len(points)) for _ in range(k))
        evs = tuple(rng.choice(events) for _ in range(k))
        work.append((path, evs, tuple(points[i] for i in idx), mode, invariants, budget))
    findings = _run_all(work, jobs, progress)
    first = next((f for f in findings if not f.ok), None)
    if first is None:
        return findings, None
    return findings, shrink(path, first, points, mode, invariants, budget)


def shrink(path: Path, failing: Finding, points: list[Point], mode: str | None,
           invariants: tuple[str, ...], budget: Budget | None = None) -> Finding:
    """A smaller schedule that still fails: drop events while it fails, then move each
    remaining event to the earliest point where it still fails."""
    best = failing
    index = {p: i for i, p in enumerate(points)}
    changed = True
    while changed:
        changed = False
        for i in range(len(best.schedule) if len(best.schedule) > 1 else 0):
            evs = best.events[:i] + best.events[i + 1:]
            sch = best.schedule[:i] + best.schedule[i + 1:]
            f = check_schedule(path, evs, sch, mode, invariants, budget)
            if not f.ok:
                best, changed = f, True
                break
        if changed:
            continue
        for i in range(len(best.schedule)):
            lo = index[best.schedule[i - 1]] if i else 0
            for j in range(lo, index[best.schedule[i]]):
                sch = (*best.schedule[:i], points[j], *best.schedule[i + 1:])
                f = check_schedule(path, best.events, sch, mode, invariants, budget)
                if not f.ok:
                    best, changed = f, True
                    break
            if changed:
                break
    return best


def report(findings: list[Finding]) -> list[str]:
    if findings and len(findings[0].schedule) == 1:
        lines = [f"{'point':<34} {'instruction':<34} result"]
        for f in findings:
            res = "ok" if f.ok else f"BREAKS: {f.failures[0]}"
            lines.append(f"{f.point.label:<34} {f.point.insn:<34} {res}")
    else:
        lines = [f"{'schedule':<70} result"]
        for f in findings:
            res = "ok" if f.ok else f"BREAKS: {f.failures[0]}"
            lines.append(f"{f.name:<70} {res}")
    bad = sum(not f.ok for f in findings)
    lines.append(f"{len(findings)} schedules, {bad} break an expectation or invariant")
    return lines


def as_json(findings: list[Finding]) -> list[dict[str, Any]]:
    return [{"events": list(f.events), "schedule": [asdict(p) for p in f.schedule],
             "outcome": f.outcome, "failures": list(f.failures)} for f in findings]


def html_report(path: Path, findings: list[Finding], mode: str | None = None) -> str:
    """A self-contained HTML page: the points (or schedules) coloured by outcome, each
    beside its instruction, and the timeline of the first counterexample."""
    from idtlab.trace import timeline

    rows = []
    for f in findings:
        colour = "#d7f5d7" if f.ok else "#f8d0d0"
        insn = html.escape(" / ".join(p.insn for p in f.schedule))
        result = "ok" if f.ok else html.escape(f.failures[0])
        rows.append(f'<tr style="background:{colour}"><td>{html.escape(f.name)}</td>'
                    f"<td><code>{insn}</code></td><td>{html.escape(f.outcome)}</td>"
                    f"<td>{result}</td></tr>")
    first = next((f for f in findings if not f.ok), None)
    detail = "<p>No schedule breaks an expectation.</p>"
    if first is not None:
        sc, run = _run_schedule(path, first.events, first.schedule, mode, None)
        sym = Symbolizer(sc.symbols, hide=("gdt", "tss", "idt", "pml4", "apic"))
        lines = "\n".join(timeline(run.trace.records, sym, cycles=True))
        detail = (f"<h2>First counterexample: {html.escape(first.name)}</h2>"
                  f"<p>{html.escape('; '.join(first.failures))}</p><pre>{html.escape(lines)}</pre>")
    bad = sum(not f.ok for f in findings)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>idtlab explore: "
            f"{html.escape(path.name)}</title></head><body style='font-family:sans-serif'>"
            f"<h1>{html.escape(path.name)}: {len(findings)} schedules, {bad} failing</h1>"
            "<table border='1' cellspacing='0' cellpadding='3'><tr><th>schedule</th>"
            "<th>instruction</th><th>outcome</th><th>result</th></tr>"
            + "".join(rows) + f"</table>{detail}</body></html>\n")
