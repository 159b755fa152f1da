"""The race explorer's findings, grouped, as text and as JSON.

A window of 40 points gives 40 findings, two events give 800, and most of them say the
same thing as their neighbours: the race is open from the handler's entry to the CR2
read, closed after it. So the report groups *consecutive* schedules that end the same
way — the same status, outcome and failures, the same events, and the same points but
the last — into one line that names the first and the last schedule of the run:

    schedules                              count  outcome   result
    pf_handler (#1) .. pf_read_cr2 (#1)       16  exit      BREAKS
        invariant cr2-consistent: the #PF handler read CR2 = 0x500000 at 0x100026, ...
        [[expect]] #1: mem 0x110000 (8 bytes): expected 0x400000, got 0x500000
    pf_read_cr2+0x3 (#1) .. pf_done (#1)      22  exit      ok

Every failure of a group is listed, invariants first (an invariant names the mechanism
that broke, an expectation only its symptom). A group ends where anything changes, so
the line where a race opens or closes is exactly where one group ends and the next
begins. A group of one point shows its instruction. A schedule the host declined (its
policy refused the host event there, or the event could not apply) is neither ok nor
broken: its line says why, and it is not counted as breaking.

`as_json` gives every finding (points, outcome, status, all failures) and the groups,
with the run's parameters, for machines; the same grouping feeds the HTML report
(idtlab/explore_html.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from idtlab.colour import PLAIN, Palette
from idtlab.explore import Exploration, Finding

STATUS_TEXT = {"breaks": "BREAKS", "ok": "ok", "refused": "refused",
               "not_applicable": "not applicable"}
LABEL_WIDTH = 90  # wider labels (random schedules of several events) push their row out


@dataclass(frozen=True)
class Group:
    """Consecutive findings (`first`..`last`, indices into the exploration's findings)
    that end the same way."""

    first: int
    findings: tuple[Finding, ...]
    bare: bool = False  # every schedule of the exploration is the same single event

    @property
    def last(self) -> int:
        return self.first + len(self.findings) - 1

    @property
    def head(self) -> Finding:
        return self.findings[0]

    @property
    def status(self) -> str:
        return self.head.status

    @property
    def outcome(self) -> str:
        return self.head.outcome

    @property
    def failures(self) -> tuple[str, ...]:
        return self.head.failures

    @property
    def label(self) -> str:
        """`a .. b` over the last point of each schedule (the others are the same), or
        the one schedule with its instruction."""
        a, b = self.findings[0], self.findings[-1]
        if len(self.findings) == 1:
            if self.bare:
                return f"{a.point.label}: {a.point.insn}"
            return a.name
        head = " + ".join(f"{e} @ {p.label}" for e, p in zip(a.events[:-1], a.schedule[:-1],
                                                               strict=True))
        if self.bare:
            return f"{a.schedule[-1].label} .. {b.schedule[-1].label}"
        span = f"{a.events[-1]} @ [{a.schedule[-1].label} .. {b.schedule[-1].label}]"
        return f"{head} + {span}" if head else span

    @property
    def result(self) -> str:
        declined = self.head.declined
        if declined is not None:
            return declined.text
        return STATUS_TEXT[self.status]


def _key(f: Finding) -> tuple[Any, ...]:
    return (f.status, f.outcome, f.failures, f.declined, f.events, f.schedule[:-1])


def groups(findings: tuple[Finding, ...] | list[Finding]) -> list[Group]:
    """Consecutive findings that end the same way (module docstring), in order.

        >>> import idtlab
        >>> from pathlib import Path
        >>> from idtlab.explore import explore
        >>> path = Path(idtlab.__file__).parent / "examples" / "explore" / "cr2_race.toml"
        >>> for g in groups(explore(path, "nmi", "pf_handler", "pf_done")):
        ...     print(g.label, len(g.findings), g.status)
        pf_handler (#1) .. pf_read_cr2 (#1) 16 breaks
        pf_read_cr2+0x3 (#1) .. pf_done (#1) 22 ok
    """
    out: list[Group] = []
    run: list[Finding] = []
    start = 0
    # One event kind at one point per schedule: a schedule is named by its point alone.
    bare = len({f.events for f in findings}) == 1 and all(len(f.events) == 1 for f in findings)
    for i, f in enumerate(findings):
        if run and _key(f) != _key(run[0]):
            out.append(Group(start, tuple(run), bare))
            run, start = [], i
        run.append(f)
    if run:
        out.append(Group(start, tuple(run), bare))
    return out


def summary(findings: tuple[Finding, ...] | list[Finding]) -> str:
    """`N schedules, K break an expectation or invariant` (and how many the host
    declined)."""
    bad = sum(f.status == "breaks" for f in findings)
    line = f"{len(findings)} schedules, {bad} break an expectation or invariant"
    refused = sum(f.status == "refused" for f in findings)
    na = sum(f.status == "not_applicable" for f in findings)
    if refused:
        line += f"; {refused} refused by the host's policy"
    if na:
        line += f"; {na} not applicable (the host event cannot happen there)"
    return line


def headline(e: Exploration) -> str:
    """What was explored, in one line (the first line of the text report)."""
    s = e.settings
    how = (f"{s.random} random schedules (seed {s.seed}, up to {s.max_events} events)"
           if s.random is not None else
           "at every point" if len(s.events) == 1 else "at every ordered pair of points")
    extra = [f"invariants {', '.join(s.invariants)}" if s.invariants else "no invariants"]
    if not s.expectations:
        extra.append("no [[expect]]")
    if s.force:
        extra.append("host events forced")
    return (f"{s.scenario.name}: {' + '.join(s.events)} {how} of {s.window} "
            f"({len(e.plan.window.points)} points); {'; '.join(extra)}")


def parameters(e: Exploration) -> list[str]:
    """What was explored, in words (the first lines of every report)."""
    s = e.settings
    how = (f"{s.random} random schedules of 1..{s.max_events} events, seed {s.seed}"
           if s.random is not None else
           "every point" if len(s.events) == 1 else "every ordered pair of points")
    checks = ", ".join(s.invariants) if s.invariants else "none"
    expects = "the scenario's [[expect]] entries" if s.expectations else \
        "no [[expect]] entries (--invariants-only)"
    host = "forced (--force)" if s.force else "asked of the host's policy"
    lines = [f"scenario {s.scenario}, window {s.window} ({len(e.plan.window.points)} points), "
             f"{s.mode or 'the scenario'}'s mode",
             f"events {', '.join(s.events)}: {how}; host events {host}",
             f"checked: invariants {checks}; {expects}"]
    if s.command:
        lines.append(f"command: {s.command}")
    return lines


def report(e: Exploration | list[Finding], *, failures_only: bool = False,
           palette: Palette = PLAIN) -> list[str]:
    """A headline, a note when the run without the explorer's events is already broken,
    the grouped table (`failures_only`: the breaking groups only), the summary line, and
    the minimal schedule of a random search."""
    findings = e.findings if isinstance(e, Exploration) else tuple(e)
    lines: list[str] = [palette.head(headline(e))] if isinstance(e, Exploration) else []
    if isinstance(e, Exploration) and e.baseline:
        lines.append(palette.warn("note: the run without the explorer's events already breaks "
                                  "(every schedule inherits this):"))
        lines.extend(f"    {f}" for f in e.baseline)
    shown = [g for g in groups(findings) if not failures_only or g.status == "breaks"]
    width = min(LABEL_WIDTH, max([len(g.label) for g in shown] + [len("schedules")]))
    lines.append(palette.head(f"{'schedules':<{width}}  {'count':>5}  {'outcome':<10} result"))
    for g in shown:
        label = g.label
        result = g.result
        if g.status == "breaks":
            result = palette.bad(result)
        elif g.status == "ok":
            result = palette.good(result)
        else:
            result = palette.dim(result)
        pad = " " * max(0, width - len(label))
        lines.append(f"{label}{pad}  {len(g.findings):>5}  {g.outcome:<10} {result}")
        lines.extend(f"    {f}" for f in g.failures)
    if failures_only and not shown:
        lines.append("(no schedule breaks anything)")
    lines.append(summary(findings))
    if isinstance(e, Exploration) and e.minimal is not None:
        m = e.minimal
        lines.append(palette.head(f"minimal failing schedule: {m.name} (outcome {m.outcome})"))
        lines.extend(f"    {f}" for f in m.failures)
    return lines


def finding_json(f: Finding) -> dict[str, Any]:
    out: dict[str, Any] = {"events": list(f.events), "schedule": [asdict(p) for p in f.schedule],
                           "outcome": f.outcome, "status": f.status,
                           "failures": list(f.failures)}
    if f.declined is not None:
        out["declined"] = asdict(f.declined)
    return out


def as_json(e: Exploration) -> dict[str, Any]:
    """The whole exploration for machines: its parameters, every finding (in schedule
    order), the groups (index ranges into `findings`), the baseline's failures and the
    minimal schedule of a random search."""
    s = e.settings
    out: dict[str, Any] = {
        "parameters": {"scenario": str(s.scenario), "window": s.window,
                       "points": len(e.plan.window.points), "events": list(s.events),
                       "invariants": list(s.invariants), "expectations": s.expectations,
                       "force": s.force, "mode": s.mode, "random": s.random,
                       "seed": s.seed if s.random is not None else None,
                       "max_events": s.max_events if s.random is not None else None},
        "baseline": list(e.baseline),
        "findings": [finding_json(f) for f in e.findings],
        "groups": [{"first": g.first, "last": g.last, "count": len(g.findings),
                    "label": g.label, "status": g.status, "outcome": g.outcome,
                    "failures": list(g.failures)} for g in groups(e.findings)],
        "summary": summary(e.findings),
    }
    if e.minimal is not None:
        out["minimal"] = finding_json(e.minimal)
    return out
