"""The labs' one door into the scenario loader, the race explorer and the trace.

Everything `idtlab.labs` needs from `idtlab.scenario`, `idtlab.explore`, `idtlab.trace`
and the machine is here, behind three functions that return plain data:

* `run_scenario(path)`: load a check scenario, run it once, check its `[[expect]]`
  entries (and, optionally, explorer invariants on that one run);
* `explore_scenario(path, events, window, invariants)`: the race explorer over a
  window, and the first counterexample run again from the start to record its trace;
* `replay(...)`: one explorer schedule run afresh.

Each run records the trace and, at every delivery, what the pictures need that the trace
does not carry: the 16 bytes of the IDT gate the CPU used and the TSS's RSPn/ISTn slots,
both read from guest memory at the moment of the delivery (a guest may rewrite its own
IDT or TSS; the picture shows what the CPU saw). The rest of `idtlab.labs` sees
`RunReport` and `ExploreReport` only, so a change of the scenario, explorer or trace
vocabulary is absorbed in this file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpu.events import Before, Interrupt, Nmi, parse_event
from idtlab import explore as ex
from idtlab import scenario as scn
from idtlab.errors import BadInput, Unsupported
from idtlab.stack_pictures import capture
from idtlab.trace import Symbolizer, timeline

HIDDEN_SYMBOLS = ("gdt", "tss", "idt", "pml4", "apic")

__all__ = ["ExploreReport", "Problem", "RunReport", "Schedule", "check_event", "check_invariant",
           "explore_scenario", "records_of", "replay", "run_scenario", "symbolize", "taken_at"]


@dataclass(frozen=True)
class Problem:
    """One broken expectation or invariant. `expect` is the 1-based `[[expect]]` number
    (None for an invariant or a run that could not start); `text` the loader's or
    explorer's own message."""

    text: str
    expect: int | None = None
    invariant: str | None = None
    detail: str = ""  # the message without its "[[expect]] #n: " / "invariant x: " prefix


@dataclass
class RunReport:
    """One run of a check scenario: its outcome, what broke, and what to draw."""

    outcome: str
    reason: str
    problems: list[Problem]
    records: list[dict[str, Any]]
    timeline: list[str]
    symbols: dict[str, int]
    # Per `deliver` record (by its seq): the gate's 16 bytes and the TSS's 0x68 bytes as
    # the CPU read them at that delivery (None when unreadable).
    gates: dict[int, bytes] = field(default_factory=dict)
    tss: dict[int, bytes] = field(default_factory=dict)
    error: str = ""  # the scenario could not be loaded (an assembly error, say)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.error

    def symbol(self, addr: int) -> str:
        return Symbolizer(self.symbols, hide=HIDDEN_SYMBOLS)(addr)


@dataclass(frozen=True)
class Schedule:
    """A schedule of the explorer in words: each event and the boundary it was put at."""

    events: tuple[str, ...]
    boundaries: tuple[str, ...]  # "symbol+off (#k)": the k-th arrival there
    instructions: tuple[str, ...]  # the instruction at each boundary
    rips: tuple[int, ...] = ()  # the address of each boundary


@dataclass
class ExploreReport:
    """The explorer's verdict on a window, and the first failing schedule replayed."""

    schedules: int
    failing: int
    first: Schedule | None
    first_problems: list[Problem]
    run: RunReport  # the first counterexample's run, or the run without explorer events
    breaking: list[Schedule] = field(default_factory=list)  # up to a few, for the message
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.failing == 0 and not self.error


_EXPECT_RE = re.compile(r"\[\[expect\]\] #(\d+): (.*)", re.DOTALL)
_INVARIANT_RE = re.compile(r"invariant (\S+): (.*)", re.DOTALL)


def _problem(text: str) -> Problem:
    m = _EXPECT_RE.match(text)
    if m:
        return Problem(text, expect=int(m.group(1)), detail=m.group(2))
    m = _INVARIANT_RE.match(text)
    if m:
        return Problem(text, invariant=m.group(1), detail=m.group(2))
    return Problem(text, detail=text)


def taken_at(run: RunReport, events: Sequence[str]) -> list[int | None]:
    """Where each explorer event of a replayed schedule was delivered (the interrupted
    RIP), in order; None for one never delivered (an NMI dropped, an interrupt still
    pending at the end). An event injected where it is blocked (IF = 0, NMIs blocked, a
    shadow) is delivered later than its boundary: this says where."""
    out: list[int | None] = []
    used: set[int] = set()
    arrivals = [r for r in run.records if r.get("label") == "explore"
                and str(r.get("kind", "")).endswith(("_pending", "_latched"))]
    for text, arrival in zip(events, arrivals, strict=False):
        spec = parse_event(text)
        found = None
        for r in run.records:
            if r.get("kind") != "deliver" or r["seq"] <= arrival["seq"] or r["seq"] in used:
                continue
            if (isinstance(spec, Nmi) and r["source"] == "nmi") or (
                    isinstance(spec, Interrupt) and r["source"] == "interrupt"
                    and r["vector"] == spec.vector):
                found = r
                break
        if found is not None:
            used.add(int(found["seq"]))
        out.append(int(found["rip"]) if found is not None else None)
    return out


def symbolize(machine: Any, addr: int) -> str:
    """`symbol+off` for an address of a machine's run (for invariants' messages)."""
    return Symbolizer(machine.symbols, hide=HIDDEN_SYMBOLS)(addr)


def records_of(result: Any) -> list[dict[str, Any]]:
    """The trace records of a machine's `RunResult` as plain dicts (for invariants)."""
    return [dict(r) for r in result.trace.records]


def check_event(text: str) -> None:
    """Raise `BadInput` when `text` is not an event the explorer knows."""
    parse_event(text)


def check_invariant(name: str) -> None:
    """Raise `BadInput` when `name` is not an invariant the explorer can load."""
    ex.resolve_invariant(name)


def _prepare(sc: scn.Scenario, invariants: Sequence[str]) -> list[tuple[str, Any]]:
    m = sc.machine
    assert m is not None
    invs = [(name, ex.resolve_invariant(name)) for name in invariants]
    for _, inv in invs:
        setup = getattr(inv, "setup", None)
        if setup is not None:
            setup(m)
    return invs


def _load(path: Path) -> scn.Scenario:
    return scn.load(path)


def _finish(sc: scn.Scenario, result: Any, invs: Sequence[tuple[str, Any]],
            gates: dict[int, bytes], tss: dict[int, bytes]) -> RunReport:
    m = sc.machine
    assert m is not None
    texts = [str(f) for f in scn.check(sc, result)]
    for name, inv in invs:
        try:
            msg = inv(result, m)
        except Exception as exc:  # a broken invariant is a failure, not a crash
            msg = f"the invariant raised {type(exc).__name__}: {exc}"
        if msg is not None:
            texts.append(f"invariant {name}: {msg}")
    records = records_of(result)
    sym = Symbolizer(sc.symbols, hide=HIDDEN_SYMBOLS)
    return RunReport(outcome=result.outcome, reason=result.reason,
                     problems=[_problem(t) for t in texts], records=records,
                     timeline=timeline(records, sym), symbols=dict(sc.symbols),
                     gates=gates, tss=tss)


def _failed_load(exc: Exception) -> RunReport:
    return RunReport(outcome="not run", reason=str(exc), problems=[], records=[], timeline=[],
                     symbols={}, error=str(exc))


def run_scenario(path: Path, invariants: Sequence[str] = ()) -> RunReport:
    """Load `path`, run it, check its expectations and `invariants`. A scenario that
    cannot be loaded (the student's assembly does not assemble, a symbol the check needs
    is missing) is a report with `error` set, not an exception."""
    try:
        sc = _load(path)
        invs = _prepare(sc, invariants)
    except (BadInput, Unsupported) as exc:
        return _failed_load(exc)
    assert sc.machine is not None
    gates, tss = capture(sc.machine)  # the gate and TSS at each delivery
    return _finish(sc, scn.run(sc), invs, gates, tss)


def replay(path: Path, events: Sequence[str], rips: Sequence[int], arrivals: Sequence[int],
           invariants: Sequence[str] = (), budget: int | None = 200) -> RunReport:
    """One explorer schedule from the start: `events[i]` pending when execution reaches
    `rips[i]` for the `arrivals[i]`-th time, with the explorer's instruction budget."""
    try:
        sc = _load(path)
        invs = _prepare(sc, invariants)
        m = sc.machine
        assert m is not None
        if budget is not None:
            b = ex.baseline_budget(path, None, budget)
            sc.run_args["max_insns"] = min(sc.run_args["max_insns"], b.limit(len(events)))
            m.max_events = min(m.max_events, b.events)
        for text, rip, hit in zip(events, rips, arrivals, strict=True):
            m.inject(parse_event(text), Before(rip, hit), label="explore")
    except (BadInput, Unsupported) as exc:
        return _failed_load(exc)
    assert sc.machine is not None
    gates, tss = capture(sc.machine)  # the gate and TSS at each delivery
    return _finish(sc, scn.run(sc), invs, gates, tss)


def _schedule(f: ex.Finding) -> Schedule:
    return Schedule(tuple(f.events), tuple(p.label for p in f.schedule),
                    tuple(p.insn for p in f.schedule), tuple(p.rip for p in f.schedule))


def explore_scenario(path: Path, events: Sequence[str], window: str,
                     invariants: Sequence[str] = (), budget: int | None = 200,
                     keep: int = 3) -> ExploreReport:
    """Every schedule of `events` (one: every boundary of the window; two: every ordered
    pair) with the scenario's expectations and `invariants`; the first failing schedule
    is replayed with its trace and pictures (without one: the run without the explorer's
    events, so a passing check still has a timeline to show)."""
    start, _, end = window.partition("..")
    try:
        findings = ex.explore(path, tuple(events), start, end or None,
                              invariants=tuple(invariants), budget=budget)
    except (BadInput, Unsupported) as exc:
        run = run_scenario(path, invariants)
        return ExploreReport(0, 0, None, [], run, error=str(exc))
    bad = [f for f in findings if not f.ok]
    if not bad:
        return ExploreReport(len(findings), 0, None, [], run_scenario(path, invariants))
    first = bad[0]
    run = replay(path, first.events, [p.rip for p in first.schedule],
                 [p.arrival for p in first.schedule], invariants, budget)
    return ExploreReport(len(findings), len(bad), _schedule(first),
                         [_problem(t) for t in first.failures], run,
                         breaking=[_schedule(f) for f in bad[:keep]])


def expectation_specs(path: Path) -> list[Mapping[str, Any]]:
    """The raw `[[expect]]` tables of a scenario file (to name what a failure is about
    in the words of the file: `mem = "bp_count"` rather than its address)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return []
    exp = data.get("expect", [])
    return [e for e in exp if isinstance(e, dict)] if isinstance(exp, list) else []
