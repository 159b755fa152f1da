"""The race explorer: run a scenario once per injection schedule and check its
invariants at each.

A *point* is an instruction boundary of the actual execution: execution about to run
the instruction at an address for the k-th time, so loops and nested handlers are
covered and each arrival is a point of its own (a handler's first instruction right
after a delivery included). The window is dynamic: it opens at the first boundary where
execution reaches `start` and closes at the next boundary where it reaches `end` (both
included), whatever runs in between. The scenario's own `[[inject]]` events are part of
every run, so a window can lie inside a handler that only runs because of one of them
(a window *opened by an event*).

Schedules: one event at every point; two events at every ordered pair of points; random
schedules of several events, shrunk to a minimal failing one. Events: `nmi`,
`interrupt:VECTOR`, `async_pf:gpa=ADDR` or `async_pf:token=N`, `ept_revoke:GPA` (the host
takes a page's EPT access away: the guest's next access is a #VE or a VM exit).

Speed: the scenario is loaded once per worker. The undisturbed run goes forward from
checkpoint to checkpoint (`cpu.snapshot`: a checkpoint at the first point of each group
of schedules); each schedule is injected there, run to its end, checked, and rolled
back. Arrival counts of later points are translated from "since the start" to "since
the checkpoint", and the trace reports them from the start, so a schedule's trace is
the one a fresh run would give (`check_schedule` is that fresh run; the tests compare
the two).

Invariants: the scenario's `[[expect]]` entries, the ready-made ones in `INVARIANTS`,
and the user's own: `module:function` or `path/to/file.py:function`, a function
`(result, machine) -> str | None` (a message when the invariant is broken); an optional
`setup(machine)` attribute runs before each run.

Parallel: `jobs` worker processes, or a Dask cluster (`dask="tcp://host:8786"`, extra
`idtlab[dask]`); schedules are cut into chunks of consecutive checkpoints, and results
come back in schedule order, so the report is the same whatever runs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import multiprocessing
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpu.devices.apf import HOST_POLICIES
from cpu.events import HOST, AsyncEvent, AsyncPf, Before, EptRevoke, Interrupt, parse_event
from cpu.machine import Machine
from cpu.outcomes import Outcome, RunResult
from cpu.snapshot import Checkpoint
from idtlab import scenario as scn
from idtlab.assemble import resolve_address
from idtlab.errors import BadInput
from idtlab.trace import Symbolizer

MAX_WINDOW_STEPS = 200_000
HIDDEN_SYMBOLS = ("gdt", "tss", "idt", "pml4", "apic")


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
class Window:
    """The points of a window, and how often each address was reached before it."""

    points: tuple[Point, ...]
    before: tuple[tuple[int, int], ...]  # (address, arrivals before the first point)

    def arrivals_through(self, rip: int, index: int) -> int:
        """Arrivals at `rip` from the start of the run up to and including point
        `index` (-1: none, the run has not started)."""
        if index < 0:
            return 0
        for p in reversed(self.points[: index + 1]):
            if p.rip == rip:
                return p.arrival
        return dict(self.before).get(rip, 0)


@dataclass(frozen=True)
class Declined:
    """The host did not do an explorer's host event where the schedule put it: its
    policy `refused` (`reason`: the policy's first failing condition), or the event was
    `not_applicable` there (the page is not swapped out at that point, its page-in is in
    flight, the page has no access to revoke). Such a schedule is not a run of the race
    it names, so it is not checked."""

    status: str  # "refused" or "not_applicable"
    event: str  # the event as the trace spells it
    reason: str
    policy: str = ""  # the policy asked (status "refused")

    @property
    def text(self) -> str:
        if self.status == "refused":
            return f"refused by policy {self.policy}: {self.reason}"
        return f"not applicable: {self.reason}"


@dataclass(frozen=True)
class Finding:
    """One schedule (events injected at points, in order) and what it broke: the
    events as the user spelled them, the points, the run's outcome, and the broken
    invariants and failed expectations, invariants first (none: `ok`). A schedule the
    host declined (`declined`) is not checked: no failures, status "refused" or
    "not_applicable".

        >>> import idtlab
        >>> from pathlib import Path
        >>> path = Path(idtlab.__file__).parent / "examples" / "explore" / "cr2_race.toml"
        >>> first = explore(path, "nmi", "pf_handler", "pf_done")[0]
        >>> first.name, first.outcome, first.status
        ('nmi @ pf_handler (#1)', 'exit', 'breaks')
        >>> first.failures[0]
        '[[expect]] #1: mem 0x110000 (8 bytes): expected 0x400000, got 0x500000'
    """

    events: tuple[str, ...]
    schedule: tuple[Point, ...]
    outcome: str
    failures: tuple[str, ...]
    declined: Declined | None = None

    @property
    def ok(self) -> bool:
        """Nothing broke (a declined schedule breaks nothing)."""
        return not self.failures

    @property
    def status(self) -> str:
        """"breaks", "ok", "refused" or "not_applicable"."""
        if self.declined is not None:
            return self.declined.status
        return "breaks" if self.failures else "ok"

    @property
    def point(self) -> Point:
        return self.schedule[0]

    @property
    def name(self) -> str:
        return " + ".join(f"{e} @ {p.label}" for e, p in zip(self.events, self.schedule,
                                                             strict=True))


# -- invariants ------------------------------------------------------------------------
# Each takes the run's result and the machine (in its state at the end of the run) and
# returns a failure message or None. An optional `setup(machine)` attribute prepares the
# machine before the run (e.g. turns on an observation).
Invariant = Callable[[RunResult, Machine], "str | None"]


def _no_shutdown(r: RunResult, m: Machine) -> str | None:
    return f"the CPU shut down ({r.reason})" if r.outcome == "shutdown" else None


def _no_vmexit(r: RunResult, m: Machine) -> str | None:
    exits = r.trace.of_kind("vmexit")
    if exits or r.outcome == "vmexit":
        return f"a VM exit happened ({exits[0]['why'] if exits else r.reason})"
    return None


def _frames_intact(r: RunResult, m: Machine) -> str | None:
    hit = r.trace.of_kind("frame_overwritten")
    if hit:
        h = hit[0]
        return (f"the {h['victim']} frame at {h['at']:#x} was overwritten by a {h['by']} "
                "delivery before its IRET")
    return None


def _no_runaway(r: RunResult, m: Machine) -> str | None:
    return f"the run did not finish ({r.outcome})" if r.outcome in ("max_insns", "max_events") \
        else None


def _cr2_consistent(r: RunResult, m: Machine) -> str | None:
    for rec in r.trace.of_kind("cr2_read"):
        pf = rec.get("pf_cr2")
        if pf is not None and rec["value"] != pf:
            return (f"the #PF handler read CR2 = {rec['value']:#x} at {rec['rip']:#x}, but its "
                    f"#PF was for {pf:#x}")
    return None


_cr2_consistent.setup = Machine.observe_cr2_reads  # type: ignore[attr-defined]

INVARIANTS: dict[str, Invariant] = {
    "no-shutdown": _no_shutdown,
    "no-vmexit": _no_vmexit,
    "frames-intact": _frames_intact,
    "no-runaway": _no_runaway,
    "cr2-consistent": _cr2_consistent,
}


def _load_function(name: str, what: str, noun: str, known: Sequence[str]) -> Callable[..., Any]:
    """The function `name` names: `module:function` or `path/to/file.py:function`."""
    where, sep, func = name.rpartition(":")
    if not sep or not where or not func:
        raise BadInput(f"{what} {name!r}: not a ready-made {noun} ({', '.join(known)}) nor "
                       "MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise BadInput(f"{what} {name!r}: no such file {where}")
            spec = importlib.util.spec_from_file_location(f"idtlab_user_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except BadInput:
        raise
    except Exception as exc:  # the user's module failed to import: say where
        raise BadInput(f"{what} {name!r}: cannot load {where}: "
                       f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise BadInput(f"{what} {name!r}: {where} has no function {func!r}")
    return fn  # type: ignore[no-any-return]


def resolve_invariant(name: str) -> Invariant:
    """A ready-made invariant by name, or a user's: `module:function` or
    `path/to/file.py:function`."""
    if name in INVARIANTS:
        return INVARIANTS[name]
    return _load_function(name, "--invariant", "invariant", tuple(INVARIANTS))


def host_event(text: str, *, force: bool = False,
               policies: dict[str, Any] | None = None) -> AsyncEvent:
    """The event `text` (`cpu.events.parse_event`) as the explorer injects it. A host
    event (async_pf, ept_revoke) asks the host's policy ("host") unless it names one
    (`policy=NAME`; a `FILE.py:FUNCTION` or `module:function` one is loaded, once per
    `policies` cache) or `force` is set (the host does it wherever the schedule puts it,
    as a scenario's `[[inject]]` does).

        >>> host_event("async_pf:gpa=0x400000")
        AsyncPf(gpa=4194304, token=None, policy='host')
        >>> host_event("async_pf:gpa=0x400000", force=True).policy is None
        True
    """
    ev = parse_event(text)
    if not isinstance(ev, (AsyncPf, EptRevoke)):
        return ev
    if force:
        if ev.policy is not None:
            raise BadInput(f"--event {text!r}: names a policy, but --force injects whatever "
                           "the policy says: give one or the other")
        return ev
    if ev.policy is None:
        return dataclasses.replace(ev, policy=HOST)
    if isinstance(ev.policy, str) and ":" in ev.policy:
        cache = policies if policies is not None else {}
        if ev.policy not in cache:
            cache[ev.policy] = _load_function(ev.policy, f"--event {text!r}: policy",
                                              "policy", ("host", *HOST_POLICIES))
        return dataclasses.replace(ev, policy=cache[ev.policy])
    return ev


def _check_invariants(invariants: Sequence[tuple[str, Invariant]], result: RunResult,
                      m: Machine) -> list[str]:
    out = []
    for name, inv in invariants:
        try:
            msg = inv(result, m)
        except Exception as exc:  # a broken user invariant is a failure, not a crash
            msg = f"the invariant raised {type(exc).__name__}: {exc}"
        if msg is not None:
            out.append(f"invariant {name}: {msg}")
    return out


def _prepare_invariants(names: Sequence[str], m: Machine) -> list[tuple[str, Invariant]]:
    """The invariants by name, each one's `setup(machine)` done on `m`."""
    invs = [(name, resolve_invariant(name)) for name in names]
    for _, inv in invs:
        setup = getattr(inv, "setup", None)
        if setup is not None:
            setup(m)
    return invs


def _failures(sc: scn.Scenario, result: RunResult, invariants: Sequence[tuple[str, Invariant]],
              *, explored: int = 0, expectations: bool = True) -> tuple[str, ...]:
    """The broken invariants, then the scenario's failed expectations that describe a
    run with `explored` explorer events (none with `expectations` False)."""
    assert sc.machine is not None
    expects = [str(f) for f in scn.check(sc, result, explored=explored)] if expectations \
        else []
    return tuple(_check_invariants(invariants, result, sc.machine) + expects)


def _declined(result: RunResult, look: bool) -> Declined | None:
    """The first of the explorer's host events the host declined in this run, if any
    (`look` False: the schedule has none that the host may decline)."""
    if not look:
        return None
    for r in result.trace.of_kind("host_declines"):
        if r.get("label") == "explore":
            return Declined(str(r["status"]), str(r["event"]), str(r["reason"]),
                            str(r.get("policy", "")))
    return None


# -- loading and the window --------------------------------------------------------------
def _load(path: Path, mode: str | None) -> scn.Scenario:
    sc = scn.load(path, mode=mode)
    assert sc.machine is not None
    return sc


def _address(text: str) -> int | str:
    try:
        return int(text, 0)
    except ValueError:
        return text


def _start(sc: scn.Scenario) -> Machine:
    m = sc.machine
    assert m is not None
    a = sc.run_args
    if "entry" in a:  # a multiboot image starts at its own entry, in 32-bit mode
        m.start_state(entry=a["entry"], rsp=a["rsp"], cpl=a["cpl"], rflags=a["rflags"],
                      regs=a["regs"])
    return m


def window(path: Path, start: str, end: str | None, *, mode: str | None = None,
           progress: bool = False) -> Window:
    """The boundaries of the window [start, end] in one run without the explorer's events
    (with the scenario's own). `end` None (or ""): up to the end of the run.

    The run goes at full speed to the first arrival at `start` (a pause point) and is
    stepped from there, one instruction at a time, until `end`. Arrival numbers count from
    the start of the run: a second run, also at full speed, counts the arrivals at the
    window's addresses before the window."""
    sc = _load(path, mode)
    lo = resolve_address(_address(start), sc.symbols, f"{path.name}: --window start")
    hi = resolve_address(_address(end), sc.symbols, f"{path.name}: --window end") if end \
        else None
    sym = Symbolizer(sc.symbols, hide=HIDDEN_SYMBOLS)
    limit = sc.run_args["max_insns"]
    m = _start(sc)
    if m.run(max_insns=limit, pause_at=(lo, 1)).outcome != Outcome.PAUSE:
        raise BadInput(f"{path.name}: execution never reaches the window start {start!r}")
    steps: list[tuple[int, int, int]] = []  # (icount, rip, arrival in the window)
    arrivals: dict[int, int] = {}
    state = {"done": False}

    def arrive(rip: int) -> None:
        """Execution reaches `rip` (the instruction there is about to execute)."""
        icount = m.engine.icount
        if state["done"] or (steps and steps[-1][:2] == (icount, rip)) or icount >= limit:
            # The same boundary seen by the delivery callback and the step loop; or the
            # run's instruction limit, where it ends before any event could arrive.
            return
        arrivals[rip] = arrivals.get(rip, 0) + 1
        steps.append((icount, rip, arrivals[rip]))
        if rip == hi:
            state["done"] = True

    # A run stepped one retired instruction at a time still crosses a delivery in one
    # step (the handler's first instruction runs before the next stop): the delivery
    # callback records that boundary.
    m.on_deliver.append(lambda rec: arrive(int(rec["handler"])))
    # A boundary where an event is delivered before its instruction runs (after an
    # emulated WRMSR or IRET, say) is one too: the machine reports the boundaries it holds.
    m.on_boundary.append(arrive)
    arrive(m.engine.read_reg("rip"))
    for n in range(MAX_WINDOW_STEPS):
        if state["done"] or m.engine.icount >= limit:
            break
        result = m.run(max_insns=m.engine.icount + 1)
        if result.outcome != "max_insns":
            break
        arrive(m.engine.read_reg("rip"))
        if progress and n % 500 == 499:
            print(f"\rexplore: finding the window's points: {len(steps)}", end="",
                  file=sys.stderr, flush=True)
    if progress and len(steps) >= 500:
        print(file=sys.stderr)
    if not (state["done"] or hi is None):
        raise BadInput(f"{path.name}: execution never reaches the window end {end!r} after "
                       f"{start!r} (within {MAX_WINDOW_STEPS} instructions)")
    before = _arrivals_before(path, mode, lo, {rip for _, rip, _ in steps})
    points = []
    for icount, rip, k in steps:
        n = before.get(rip, 0) + k
        points.append(Point(icount, rip, n, f"{sym(rip)} (#{n})", m.disassemble(rip)))
    return Window(tuple(points), tuple(sorted(before.items())))


def _arrivals_before(path: Path, mode: str | None, start: int,
                     addresses: set[int]) -> dict[int, int]:
    """How often execution reached each of `addresses` before its first arrival at
    `start`, counted by the machine itself (`Machine.watch`) in a run at full speed."""
    sc = _load(path, mode)
    m = _start(sc)
    for address in addresses:
        m.watch(address)
    m.run(max_insns=int(sc.run_args["max_insns"]), pause_at=(start, 1))
    counts = {a: m.arrivals(a) for a in addresses}
    counts[start] -= 1  # the window's first boundary
    return {a: n for a, n in counts.items() if n}


def enumerate_points(path: Path, start: str, end: str | None, *, mode: str | None = None) -> list[Point]:
    """The boundaries of the window [start, end] in one undisturbed run."""
    return list(window(path, start, end, mode=mode).points)


@dataclass(frozen=True)
class Budget:
    """Limits for one schedule's run, from the undisturbed run: a schedule that makes the
    guest loop (an IRET through a clobbered frame, say) ends as `max_insns` soon instead
    of running to the scenario's own, much larger limit. A schedule of n events may run
    `insns + n * per_event` instructions and `events` deliveries."""

    insns: int
    events: int
    per_event: int = 200

    def limit(self, n_events: int) -> int:
        return self.insns + n_events * self.per_event


def baseline_budget(path: Path, mode: str | None = None, per_event: int = 200) -> Budget:
    return baseline(path, mode, per_event)[0]


def baseline(path: Path, mode: str | None = None, per_event: int = 200,
             invariants: tuple[str, ...] = ()) -> tuple[Budget, tuple[str, ...]]:
    """The budget from the run without the explorer's events, and what that run already
    breaks (its invariants, and the expectations that describe it: scope "always" and
    "undisturbed"). A window explored over a run that is broken without any added event
    reports that breakage at every point: the report says so first."""
    sc = _load(path, mode)
    assert sc.machine is not None
    invs = _prepare_invariants(invariants, sc.machine)
    r = scn.run(sc)
    budget = Budget(insns=2 * r.icount + 100, events=4 * len(r.deliveries) + 50,
                    per_event=per_event)
    return budget, _failures(sc, r, invs)


# -- running schedules -------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What every worker needs to run schedules: picklable, so it travels to worker
    processes and Dask workers. `force`: host events are injected wherever the schedule
    puts them (without it the host's policy is asked); `expectations`: check the
    scenario's `[[expect]]` entries (False: the invariants only)."""

    path: Path
    mode: str | None
    window: Window
    budget: Budget | None
    invariants: tuple[str, ...] = ()
    force: bool = False
    expectations: bool = True


def _limits(sc: scn.Scenario, budget: Budget | None, n_events: int) -> None:
    m = sc.machine
    assert m is not None
    if budget is not None:
        sc.run_args["max_insns"] = min(sc.run_args["max_insns"], budget.limit(n_events))
        m.max_events = min(m.max_events, budget.events)


def _may_decline(events: tuple[AsyncEvent, ...]) -> bool:
    """Whether the host may decline one of `events` (a host event that asks a policy, or
    one that needs a swapped-out page): only then is the trace searched for it."""
    return any((isinstance(e, (AsyncPf, EptRevoke)) and e.policy is not None)
               or (isinstance(e, AsyncPf) and e.gpa is not None) for e in events)


def _run_fresh(plan: Plan, events: tuple[AsyncEvent, ...], schedule: tuple[Point, ...],
               budget: Budget | None) -> tuple[scn.Scenario, RunResult,
                                                list[tuple[str, Invariant]]]:
    """Load the scenario afresh, inject `events[i]` at `schedule[i]` (arrivals counted
    from the start), and run it."""
    sc = _load(plan.path, plan.mode)
    m = sc.machine
    assert m is not None
    _limits(sc, budget, len(events))
    invs = _prepare_invariants(plan.invariants, m)
    for ev, point in zip(events, schedule, strict=True):
        m.inject(ev, Before(point.rip, point.arrival), label="explore")
    return sc, scn.run(sc), invs


def _finding(plan: Plan, sc: scn.Scenario, events: tuple[str, ...],
             specs: tuple[AsyncEvent, ...], schedule: tuple[Point, ...], result: RunResult,
             invariants: Sequence[tuple[str, Invariant]]) -> Finding:
    declined = _declined(result, _may_decline(specs))
    if declined is not None:
        return Finding(events, schedule, result.outcome, (), declined)
    return Finding(events, schedule, result.outcome,
                   _failures(sc, result, invariants, explored=len(events),
                             expectations=plan.expectations))


def replay(plan: Plan, events: tuple[str, ...], schedule: tuple[Point, ...], *,
           observe: Callable[[Machine], Any] | None = None) -> tuple[scn.Scenario, RunResult]:
    """One schedule run again from the start, for its trace (a report's timeline);
    `observe(machine)` is called before the run (to capture what the trace lacks)."""
    specs = tuple(host_event(e, force=plan.force) for e in events)
    sc = _load(plan.path, plan.mode)
    m = sc.machine
    assert m is not None
    _limits(sc, plan.budget, len(events))
    _prepare_invariants(plan.invariants, m)
    if observe is not None:
        observe(m)
    for ev, point in zip(specs, schedule, strict=True):
        m.inject(ev, Before(point.rip, point.arrival), label="explore")
    return sc, scn.run(sc)


def check_schedule(plan: Plan, events: tuple[str, ...], schedule: tuple[Point, ...]) -> Finding:
    """The reference path: a fresh load and run from the start for one schedule (what the
    checkpointed `Session` must agree with)."""
    specs = tuple(host_event(e, force=plan.force) for e in events)
    sc, result, invs = _run_fresh(plan, specs, schedule, plan.budget)
    return _finding(plan, sc, events, specs, schedule, result, invs)


# A checkpoint serves the schedules whose first point lies at most this many points and
# this many instructions (of the undisturbed run) after it. Moving it costs a page-wise
# snapshot and a pickle of the machine's state (about 0.5 ms); serving a later point costs
# re-running the instructions from the checkpoint to it (native speed) and one engine stop
# there (tens of microseconds), so it is moved only when the span grows long.
CHECKPOINT_EVERY = 32
CHECKPOINT_SPAN = 2_000


class Session:
    """One loaded scenario that runs many schedules, going forward along the undisturbed
    run from checkpoint to checkpoint (schedules must come in order of their first
    point)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.sc = _load(plan.path, plan.mode)
        self.scenario_limit = int(self.sc.run_args["max_insns"])
        _limits(self.sc, plan.budget, 0)
        self.limit = int(self.sc.run_args["max_insns"])  # the undisturbed run's
        self.m = _start(self.sc)
        self.invariants = _prepare_invariants(plan.invariants, self.m)
        self.index = {p: i for i, p in enumerate(plan.window.points)}
        self.cp: Checkpoint | None = None
        self.at = -1  # the point the checkpoint stands at (-1: the start of the run)
        self.policies: dict[str, Any] = {}  # user policies loaded, by their spelling
        self.specs: dict[str, AsyncEvent] = {}  # events by their spelling

    def _hit(self, p: Point) -> int:
        """The arrival number at `p.rip` the machine will count when it reaches `p`,
        from the checkpoint (it counts arrivals at an address from when it started
        watching it)."""
        counted = self.m.arrivals(p.rip)
        return p.arrival - self.plan.window.arrivals_through(p.rip, self.at) + counted

    def _advance(self, index: int) -> None:
        """Move the checkpoint forward to point `index` of the undisturbed run."""
        if index < self.at:
            raise ValueError("a session runs schedules in order of their first point")
        target = self.plan.window.points[index]
        m = self.m
        r = m.run(max_insns=self.limit, pause_at=(target.rip, self._hit(target)))
        if r.outcome != Outcome.PAUSE or m.engine.icount != target.icount:
            raise RuntimeError(f"the undisturbed run did not come back to {target.label} "
                               f"(it ended: {r.outcome} at icount {m.engine.icount}); is "
                               "the scenario deterministic?")
        self.cp = m.checkpoint()
        self.at = index

    def run(self, events: tuple[AsyncEvent, ...], schedule: tuple[Point, ...]) -> RunResult:
        """Run one schedule from the checkpoint at or shortly before its first point (a
        checkpoint serves the next `CHECKPOINT_EVERY` points within `CHECKPOINT_SPAN`
        instructions: moving it costs more than re-running a few instructions); the
        machine stays in the run's final state until `rollback`."""
        first = self.index[schedule[0]]
        points = self.plan.window.points
        if (self.cp is None or not self.at <= first < self.at + CHECKPOINT_EVERY
                or points[first].icount - points[self.at].icount > CHECKPOINT_SPAN):
            self._advance(first)
        m = self.m
        here = points[self.at]
        for ev, p in zip(events, schedule, strict=True):
            shown = (p.rip, p.arrival)
            if p == here:
                m.arrive_now(ev, label="explore", shown=shown)
            else:
                m.inject(ev, Before(p.rip, self._hit(p)), label="explore", shown=shown)
        limit = self.scenario_limit
        if self.plan.budget is not None:
            limit = min(limit, self.plan.budget.limit(len(events)))
        return m.run(max_insns=limit)

    def rollback(self) -> None:
        assert self.cp is not None
        self.m.rollback(self.cp)

    def event(self, text: str) -> AsyncEvent:
        spec = self.specs.get(text)
        if spec is None:
            spec = self.specs[text] = host_event(text, force=self.plan.force,
                                                 policies=self.policies)
        return spec

    def check(self, events: tuple[str, ...], schedule: tuple[Point, ...]) -> Finding:
        specs = tuple(self.event(e) for e in events)
        result = self.run(specs, schedule)
        finding = _finding(self.plan, self.sc, events, specs, schedule, result,
                           self.invariants)
        self.rollback()
        return finding


Schedule = tuple[tuple[str, ...], tuple[Point, ...]]


def run_chunk(plan: Plan, schedules: Sequence[Schedule]) -> list[Finding]:
    """Run schedules (sorted by first point) in one session: the unit of parallel work."""
    session = Session(plan)
    return [session.check(events, sch) for events, sch in schedules]


# A worker's session, kept from one chunk to the next (per thread: a Dask worker may run
# several tasks at once). Chunks are handed out in order of their first point, so the
# chunks one worker gets come in that order too, and its session only goes forward: the
# scenario is loaded and run up to the window once per worker, not once per chunk.
_worker = threading.local()


def _worker_session(plan: Plan, first: Point) -> Session:
    session: Session | None = getattr(_worker, "session", None)
    if session is None or session.plan != plan or session.index[first] < session.at:
        session = Session(plan)
        _worker.session = session
    return session


def _worker_init(plan: Plan) -> None:
    """A worker process starts: load the scenario once (before its first chunk)."""
    _worker.plan = plan
    _worker.session = Session(plan)


def _run_worker_chunk(schedules: Sequence[Schedule]) -> list[Finding]:
    """A chunk of schedules for the worker process's own plan (shipped once, at start)."""
    plan: Plan = _worker.plan
    session = _worker_session(plan, schedules[0][1][0])
    return [session.check(events, sch) for events, sch in schedules]


def _run_chunk_job(job: tuple[Plan, Sequence[Schedule]]) -> list[Finding]:
    plan, schedules = job
    session = _worker_session(plan, schedules[0][1][0])
    return [session.check(events, sch) for events, sch in schedules]


# A worker process runs this many chunks, then a fresh one takes its place: Unicorn's
# translation cache and the machine's caches grow with every schedule (about 1 GB per
# process over a long exploration), and a new process gives that memory back.
CHUNKS_PER_WORKER = 4
# A chunk whose worker died (the OOM killer, a kill) is run once more in a new pool.
CHUNK_RETRIES = 1


def _worker_context(jobs: int, workers: int) -> multiprocessing.context.BaseContext:
    """How worker processes start. A spawned worker re-imports idtlab, Unicorn, Capstone
    and Keystone (about 0.4 s), which on a run of a few hundred schedules is most of what
    `--jobs 2` could save; a forked one starts in milliseconds with all of it imported.
    Forked workers cannot be replaced after CHUNKS_PER_WORKER chunks (the pool refuses
    `max_tasks_per_child` with fork), so they are used only when no worker would be: at
    most that many chunks each, where `fork` exists and this process runs no other
    thread (a fork copies threads in whatever state they are). Otherwise `spawn`. Each
    worker builds its own machine either way: the findings do not depend on how it
    started."""
    if (jobs <= workers * CHUNKS_PER_WORKER and threading.active_count() == 1
            and "fork" in multiprocessing.get_all_start_methods()):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _in_workers(jobs_list: list[Any], workers: int,
                run: Callable[[Any], list[Any]] = _run_chunk_job,
                initializer: Callable[..., None] | None = None,
                initargs: tuple[Any, ...] = ()) -> Iterator[list[Any]]:
    """Each job's findings, in order, from `workers` processes, as they come. A worker
    that dies breaks its pool: the chunks that did not come back are run again in a fresh
    pool, and if one loses its worker again the exploration stops with a one-line error;
    it never waits for a dead worker, and leaves no process behind."""
    results: dict[int, list[Any]] = {}
    next_out = 0
    pending = list(range(len(jobs_list)))
    context = _worker_context(len(jobs_list), workers)
    replace = {} if context.get_start_method() == "fork" else {
        "max_tasks_per_child": CHUNKS_PER_WORKER}
    for attempt in range(CHUNK_RETRIES + 1):
        lost: list[int] = []
        executor = ProcessPoolExecutor(workers, mp_context=context, initializer=initializer,
                                       initargs=initargs, **replace)
        try:
            futures = [(i, executor.submit(run, jobs_list[i])) for i in pending]
            for i, future in futures:
                try:
                    results[i] = future.result()
                except BrokenProcessPool:
                    lost.append(i)
                while next_out in results:
                    yield results.pop(next_out)
                    next_out += 1
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        if not lost:
            return
        if attempt == CHUNK_RETRIES:
            raise BadInput(f"explore: a worker process died twice running the same schedules "
                           f"(killed, or out of memory?): {len(lost)} of {len(jobs_list)} "
                           "chunks lost; --jobs 1 runs them in this process")
        pending = lost


def _chunks(plan: Plan, schedules: list[Schedule], parts: int) -> list[list[int]]:
    """Indices of `schedules` cut into about `parts` chunks of consecutive checkpoints,
    each sorted by first point (a session only goes forward)."""
    index = {p: i for i, p in enumerate(plan.window.points)}
    order = sorted(range(len(schedules)), key=lambda i: index[schedules[i][1][0]])
    if parts <= 1 or len(order) <= 1:
        return [order]
    size = -(-len(order) // parts)
    return [order[i:i + size] for i in range(0, len(order), size)]


def _progress(done: int, total: int, started: float, enabled: bool) -> None:
    if not enabled:
        return
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.perf_counter() - started, 1e-9)
    print(f"\rexplore [{'#' * filled}{'.' * (width - filled)}] {done}/{total} schedules "
          f"({rate:.0f}/s)", end="", file=sys.stderr, flush=True)


def run_schedules(plan: Plan, schedules: list[Schedule], *, jobs: int = 1,
                  dask: str | Any | None = None, progress: bool = False) -> list[Finding]:
    """Every schedule's finding, in the order of `schedules`, whatever runs them: this
    process (`jobs` = 1), `jobs` worker processes, or a Dask cluster (`dask`: the
    scheduler's address, or a `distributed.Client`)."""
    if not schedules:
        return []
    started = time.perf_counter()
    results: dict[int, Finding] = {}
    workers = jobs if dask is None else 0
    # Several chunks per worker keep them busy; one chunk per process otherwise.
    parts = 1 if workers == 1 and dask is None else max(2, 4 * max(workers, 2))
    chunks = _chunks(plan, schedules, parts)
    jobs_list = [(plan, [schedules[i] for i in c]) for c in chunks]

    def collect(chunk: list[int], found: list[Finding]) -> None:
        for i, f in zip(chunk, found, strict=True):
            results[i] = f
        _progress(len(results), len(schedules), started, progress)

    try:
        if dask is not None:
            for chunk, found in zip(chunks, _dask_map(dask, jobs_list), strict=True):
                collect(chunk, found)
        elif workers <= 1:
            session = Session(plan)
            for i in chunks[0]:
                events, sch = schedules[i]
                results[i] = session.check(events, sch)
                if progress and (len(results) % 16 == 0 or len(results) == len(schedules)):
                    _progress(len(results), len(schedules), started, progress)
        else:
            # Long-lived workers: each loads the scenario once (its initializer) and keeps
            # its session; only the schedules travel. A dead worker's chunks run again
            # (`_in_workers`).
            for chunk, found in zip(chunks, _in_workers(
                    [j[1] for j in jobs_list], workers, run=_run_worker_chunk,
                    initializer=_worker_init, initargs=(plan,)), strict=True):
                collect(chunk, found)
    finally:
        if progress:
            print(file=sys.stderr)
    return [results[i] for i in range(len(schedules))]


def dask_client(address: str, timeout: float = 10.0) -> Any:
    """A `distributed.Client` for the scheduler at `address`, or a clear error."""
    try:
        from distributed import Client
    except ImportError:
        raise BadInput("--dask needs Dask distributed: pip install 'idtlab[dask]'") from None
    try:
        return Client(address, timeout=timeout)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as exc:
        raise BadInput(f"--dask: cannot reach the Dask scheduler at {address} within "
                       f"{timeout:g} s ({type(exc).__name__})") from None
    except (ValueError, TypeError) as exc:
        raise BadInput(f"--dask {address!r}: not a scheduler address ({exc})") from None


def _dask_map(dask: str | Any, jobs_list: list[tuple[Plan, list[Schedule]]]) -> Iterator[
        list[Finding]]:
    client = dask_client(dask) if isinstance(dask, str) else dask
    try:
        futures = client.map(_run_chunk_job, jobs_list, pure=False)
        yield from client.gather(futures)
    finally:
        if isinstance(dask, str):
            client.close()


# -- the explorations ----------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What was asked: the scenario, the window, the events and how they are checked;
    `command` is the command line as typed (reports show it, so a run can be repeated)."""

    scenario: Path
    events: tuple[str, ...]
    start: str
    end: str | None
    invariants: tuple[str, ...] = ()
    mode: str | None = None
    random: int | None = None  # N random schedules instead of every point (pair)
    seed: int = 0
    max_events: int = 3
    force: bool = False
    expectations: bool = True
    budget: int | None = 200
    command: str = ""

    @property
    def window(self) -> str:
        return f"{self.start}..{self.end or ''}"


@dataclass(frozen=True)
class Exploration:
    """The result: every schedule's finding (in schedule order), the minimal failing
    schedule of a random search, and what the run without the explorer's events already
    breaks (`baseline`: nothing, for a scenario whose own run is correct)."""

    settings: Settings
    plan: Plan
    findings: tuple[Finding, ...]
    minimal: Finding | None = None
    baseline: tuple[str, ...] = ()

    @property
    def breaking(self) -> int:
        return sum(f.status == "breaks" for f in self.findings)


def _validate(path: Path, mode: str | None, events: Iterable[str], invariants: tuple[str, ...],
              force: bool) -> None:
    """Every event and invariant, and what the events need of the scenario: bad input
    (one line, exit status 2) before anything runs."""
    specs = [host_event(e, force=force) for e in events]
    for name in invariants:
        resolve_invariant(name)
    m = _load(path, mode).machine
    assert m is not None
    for text, spec in zip(events, specs, strict=True):
        if isinstance(spec, AsyncPf) and m.apf is None:
            raise BadInput(f"--event {text!r}: {path.name} has no async page faults ([apf] or "
                           "[[swapped]])")
        if isinstance(spec, EptRevoke) and m.ept is None:
            raise BadInput(f"--event {text!r}: {path.name} is not a VMX guest with EPT ([vmx] "
                           "or [[ept]])")
        if isinstance(spec, Interrupt) and m.apic is None:
            raise BadInput(f"--event {text!r}: {path.name}'s machine has no local APIC")


def plan_for(path: Path, start: str, end: str | None, *, mode: str | None = None,
             invariants: tuple[str, ...] = (), budget: int | None = 200,
             progress: bool = False, force: bool = False, expectations: bool = True) -> Plan:
    """The window and the budget (`budget` instructions per injected event on top of
    twice the undisturbed run's; None: only the scenario's own limits)."""
    w = window(path, start, end, mode=mode, progress=progress)
    b = baseline_budget(path, mode, budget) if budget is not None else None
    return Plan(path, mode, w, b, invariants, force, expectations)


def run_exploration(s: Settings, *, jobs: int = 1, dask: str | Any | None = None,
                    progress: bool = False) -> Exploration:
    """Run the exploration `s` asks for: one event at every point of the window, two at
    every ordered pair of points, or `s.random` random schedules (the first failing one
    shrunk to a minimal one)."""
    if s.random is None and not 1 <= len(s.events) <= 2:
        raise BadInput("give one --event (every point) or two (every ordered pair of points); "
                       "for more, use --random")
    if s.random is not None and s.random < 1:
        raise BadInput(f"--random {s.random}: give the number of random schedules (1 or more)")
    if s.max_events < 1:
        raise BadInput(f"--max-events {s.max_events}: a schedule has at least one event")
    _validate(s.scenario, s.mode, s.events, s.invariants, s.force)
    plan = plan_for(s.scenario, s.start, s.end, mode=s.mode, invariants=s.invariants,
                    budget=s.budget, progress=progress, force=s.force,
                    expectations=s.expectations)
    _, broken = baseline(s.scenario, s.mode, s.budget or 200, s.invariants)
    if not s.expectations:
        broken = tuple(f for f in broken if f.startswith("invariant "))
    points = plan.window.points
    schedules: list[Schedule]
    if s.random is not None:
        rng = random.Random(s.seed)
        schedules = []
        for _ in range(s.random):
            k = rng.randint(1, s.max_events)
            idx = sorted(rng.randrange(len(points)) for _ in range(k))
            evs = tuple(rng.choice(s.events) for _ in range(k))
            schedules.append((evs, tuple(points[i] for i in idx)))
    elif len(s.events) == 1:
        schedules = [(s.events, (p,)) for p in points]
    else:
        schedules = [(s.events, (a, b)) for i, a in enumerate(points) for b in points[i:]]
    findings = run_schedules(plan, schedules, jobs=jobs, dask=dask, progress=progress)
    minimal = None
    if s.random is not None:
        first = next((f for f in findings if f.status == "breaks"), None)
        minimal = shrink(plan, first) if first is not None else None
    return Exploration(s, plan, tuple(findings), minimal, broken)


def explore(path: Path, event: str | tuple[str, ...], start: str, end: str | None, *, jobs: int = 1,
            mode: str | None = None, progress: bool = False, invariants: tuple[str, ...] = (),
            dask: str | Any | None = None, budget: int | None = 200, force: bool = False,
            expectations: bool = True) -> list[Finding]:
    """One event: every point of the window. Two events: every ordered pair of points
    (the second at or after the first in the undisturbed run). Results in schedule
    order, whatever runs them (`run_exploration` gives the whole result).

    An NMI at every boundary of the #PF handler of the CR2 race (the NMI handler takes
    a #PF of its own): it breaks the expectation at every point up to the CR2 read.

        >>> import idtlab
        >>> from pathlib import Path
        >>> path = Path(idtlab.__file__).parent / "examples" / "explore" / "cr2_race.toml"
        >>> findings = explore(path, "nmi", "pf_handler", "pf_done",
        ...                    invariants=("cr2-consistent",))
        >>> len(findings), sum(not f.ok for f in findings)
        (38, 16)
        >>> [f.point.insn for f in findings if not f.ok][-1]
        'mov rsi, cr2'
    """
    events = (event,) if isinstance(event, str) else tuple(event)
    s = Settings(path, events, start, end, invariants, mode, budget=budget, force=force,
                 expectations=expectations)
    return list(run_exploration(s, jobs=jobs, dask=dask, progress=progress).findings)


def random_search(path: Path, events: tuple[str, ...], start: str, end: str | None, *, count: int,
                  seed: int, max_events: int = 3, jobs: int = 1, mode: str | None = None,
                  progress: bool = False, invariants: tuple[str, ...] = (),
                  dask: str | Any | None = None, budget: int | None = 200,
                  force: bool = False, expectations: bool = True) -> tuple[
                      list[Finding], Finding | None]:
    """`count` random schedules of 1..`max_events` events (drawn from `events`) at points
    of the window, in increasing point order; the first failing one is shrunk to a
    minimal failing schedule (events removed one at a time, then each point moved as
    early as it still fails). Deterministic for a given seed."""
    s = Settings(path, tuple(events), start, end, invariants, mode, random=count, seed=seed,
                 max_events=max_events, budget=budget, force=force, expectations=expectations)
    e = run_exploration(s, jobs=jobs, dask=dask, progress=progress)
    return list(e.findings), e.minimal


def shrink(plan: Plan, failing: Finding) -> Finding:
    """A smaller schedule that still fails: drop events while it fails, then move each
    remaining event to the earliest point where it still fails."""
    points = plan.window.points
    best = failing
    index = {p: i for i, p in enumerate(points)}

    def attempt(events: tuple[str, ...], sch: tuple[Point, ...]) -> Finding:
        return Session(plan).check(events, sch)

    changed = True
    while changed:
        changed = False
        for i in range(len(best.schedule) if len(best.schedule) > 1 else 0):
            f = attempt(best.events[:i] + best.events[i + 1:],
                        best.schedule[:i] + best.schedule[i + 1:])
            if not f.ok:
                best, changed = f, True
                break
        if changed:
            continue
        for i in range(len(best.schedule)):
            lo = index[best.schedule[i - 1]] if i else 0
            for j in range(lo, index[best.schedule[i]]):
                f = attempt(best.events, (*best.schedule[:i], points[j], *best.schedule[i + 1:]))
                if not f.ok:
                    best, changed = f, True
                    break
            if changed:
                break
    return best
