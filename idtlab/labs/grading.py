"""Grading: run a lab's checks against a student's directory, turn what the runs found
into points and sentences, and keep the student's progress in their directory.

A check passes when its scenario's expectations (and invariants) hold: on one run, or
on every schedule the race explorer tries. It is worth all its points or none. A failed
check says what happened in the words of the scenario (`bp_count: expected 0x3, got
0x1`), for an explored check which schedule broke it first (the event and the
instruction boundary, `symbol+offset (#k)`: the k-th arrival there), and points at the
lesson section that explains it.

The checks run on copies: the lab's `checks/` and the student's files in a temporary
directory, laid out as in the student's directory (`checks/X.toml` loads
`../handler.s`), so a student cannot change a check by editing their copy of a visible
one, and hidden checks never sit in the student's directory.

Progress lives in the student's directory, in `.idtlab/`: `state.json` (which lab, the
last and best score, which checks pass: what `idtlab lab list` shows) and
`last-run.json` (every check's message, timeline and the data of its pictures: what
`idtlab lab show` draws).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idtlab.errors import BadInput
from idtlab.labs import folder, runner
from idtlab.labs.folder import Check, Lab
from idtlab.labs.runner import Problem, RunReport

STATE_DIR = ".idtlab"
STATE_FILE = "state.json"
LAST_RUN_FILE = "last-run.json"
EVENT_WORDS = {"nmi": "NMI", "interrupt": "interrupt", "async_pf": "async #PF",
               "ept_revoke": "EPT revoke"}


@dataclass
class CheckResult:
    check: Check
    passed: bool
    lines: list[str]  # what happened (empty when it passed)
    summary: str  # one line: what the check tried and saw
    run: RunReport  # the run to show: the first counterexample, or the check's own run
    schedules: int | None = None
    failing: int | None = None

    @property
    def score(self) -> int:
        return self.check.points if self.passed else 0


@dataclass
class Grade:
    lab: Lab
    results: list[CheckResult] = field(default_factory=list)

    @property
    def score(self) -> int:
        return sum(r.score for r in self.results)

    @property
    def max_score(self) -> int:
        return sum(r.check.points for r in self.results)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


# -- messages -----------------------------------------------------------------------------
def event_words(text: str) -> str:
    """`nmi` -> `NMI`, `interrupt:0x30` -> `interrupt 0x30`, ..."""
    kind, _, arg = text.partition(":")
    word = EVENT_WORDS.get(kind, kind)
    return f"{word} {arg}" if arg else word


def describe(problem: Problem, check: Check, specs: list[Mapping[str, Any]]) -> str:
    """A broken expectation or invariant in the scenario's own words."""
    if problem.invariant is not None:
        return f"{problem.invariant}: {problem.detail}"
    if problem.expect is None:
        return problem.detail
    what, sep, rest = problem.detail.partition(": ")
    spec = specs[problem.expect - 1] if problem.expect <= len(specs) else {}
    if isinstance(spec.get("mem"), str):
        size = spec.get("size", 8)
        what = str(spec["mem"]) + (f" ({size} bytes)" if size != 8 else "")
    text = f"{what}{sep}{rest}" if sep else problem.detail
    why = check.explanation(problem.expect)
    return f"{text}\n  ({why})" if why else text


def _run_lines(run: RunReport, check: Check, specs: list[Mapping[str, Any]]) -> list[str]:
    if run.error:
        return [f"does not build or load: {run.error}"]
    return [line for p in run.problems for line in describe(p, check, specs).splitlines()]


def grade_check(lab: Lab, check: Check, workdir: Path) -> CheckResult:
    path = workdir / "checks" / check.scenario
    specs = runner.expectation_specs(path)
    if check.kind == "run":
        run = runner.run_scenario(path, check.invariants)
        if run.ok:
            return CheckResult(check, True, [], f"ran to '{run.outcome}', every expectation "
                               "holds", run)
        return CheckResult(check, False, _run_lines(run, check, specs),
                           f"one run: {run.outcome}", run)
    rep = runner.explore_scenario(path, check.events, check.window, check.invariants,
                                  check.budget)
    what = " and ".join(event_words(e) for e in check.events)
    pairs = "every ordered pair of boundaries" if len(check.events) == 2 else "every boundary"
    if rep.error:
        lines = [f"the explorer could not run: {rep.error}"]
        lines += _run_lines(rep.run, check, specs)
        return CheckResult(check, False, lines, f"{what} at {pairs} of {check.window}",
                           rep.run)
    if rep.ok:
        return CheckResult(check, True, [], f"survives {what} at {pairs} of {check.window} "
                           f"({rep.schedules} schedules)", rep.run, rep.schedules, 0)
    assert rep.first is not None
    first = rep.first
    names = {v: k for k, v in sorted(rep.run.symbols.items(), reverse=True)
             if k not in runner.HIDDEN_SYMBOLS}

    def insn(text: str) -> str:  # `call 0x100071` -> `call kernel_recurse`
        return re.sub(r"\b0x[0-9a-f]+\b", lambda m: names.get(int(m.group(0), 16), m.group(0)),
                      text)

    at = ", then ".join(f"{event_words(e)} at {b}, before `{insn(i)}`" for e, b, i in
                        zip(first.events, first.boundaries, first.instructions, strict=True))
    lines = [f"breaks in {rep.failing} of {rep.schedules} schedules; the first: {at}"]
    if all(e.partition(":")[0] in ("nmi", "interrupt") for e in first.events):
        for e, rip, taken in zip(first.events, first.rips, runner.taken_at(rep.run, first.events),
                                 strict=False):
            if taken is None:
                lines.append(f"   (the {event_words(e)} was never delivered)")
            elif taken != rip:
                lines.append(f"   (the {event_words(e)} waited while blocked: delivered at "
                             f"{rep.run.symbol(taken)})")
    lines += [f"{'-> ' if i == 0 else '   '}{line}" for p in rep.first_problems
              for i, line in enumerate(describe(p, check, specs).splitlines())]
    others = [" + ".join(s.boundaries) for s in rep.breaking[1:]]
    if others:
        lines.append("also breaks at: " + "; ".join(others)
                     + (" ..." if rep.failing > len(rep.breaking) else ""))
    return CheckResult(check, False, lines, f"{what} at {pairs} of {check.window}", rep.run,
                       rep.schedules, rep.failing)


def _workdir(lab: Lab, student: Path, tmp: Path) -> Path:
    shutil.copytree(lab.path / "checks", tmp / "checks")
    for name in lab.files:
        src = student / name
        if not src.is_file():
            raise BadInput(f"{src}: no such file (lab {lab.name} grades: "
                           f"{', '.join(lab.files)})")
        shutil.copyfile(src, tmp / name)
    return tmp


def grade(lab: Lab, student: Path, only: str | None = None) -> Grade:
    """Run every check (or the one named `only`) on the student's files."""
    if not student.is_dir():
        raise BadInput(f"{student}: no such directory")
    checks = lab.checks
    if only is not None:
        checks = tuple(c for c in checks if c.name == only)
        if not checks:
            raise BadInput(f"lab {lab.name}: no check named {only!r} (checks: "
                           f"{', '.join(c.name for c in lab.checks)})")
    g = Grade(lab)
    with tempfile.TemporaryDirectory(prefix="idtlab-lab-") as tmp:
        work = _workdir(lab, student, Path(tmp))
        for check in checks:
            r = grade_check(lab, check, work)
            r.lines = [line.replace(str(work) + "/", "") for line in r.lines]
            g.results.append(r)
    return g


# -- output -----------------------------------------------------------------------------------
def result_lines(r: CheckResult, width: int) -> list[str]:
    """One check: the verdict line, what it tried, and on failure what happened and the
    lesson section that explains it."""
    verdict = "PASS" if r.passed else "FAIL"
    vis = "visible" if r.check.visible else "hidden "
    out = [f"  {verdict}  {r.score:>3}/{r.check.points:<3} {vis}  "
           f"{r.check.name:<{width}}  {r.check.title}", f"{'':>24}{r.summary}"]
    if not r.passed:
        out.extend(f"{'':>24}{line}" for line in r.lines)
        out.append(f"{'':>24}hint: lesson.md, section \"{r.check.hint}\"")
    return out


def total_line(g: Grade) -> str:
    verdict = "all checks pass" if g.passed else \
        f"{sum(not r.passed for r in g.results)} of {len(g.results)} checks fail"
    return f"score: {g.score}/{g.max_score} ({verdict})"


def report_lines(g: Grade) -> list[str]:
    """`make grade`-style: one line per check, what broke and a hint, then the total."""
    width = max(len(r.check.name) for r in g.results)
    out = [f"lab {g.lab.name}: {g.lab.title}"]
    for r in g.results:
        out.extend(result_lines(r, width))
    out.append(total_line(g))
    return out


def as_json(g: Grade) -> dict[str, Any]:
    """The common autograder shape (Gradescope's results.json): a list of tests with
    name, score, max_score, output; hidden checks are `after_due_date`."""
    tests = []
    for r in g.results:
        output = r.summary if r.passed else "\n".join(
            [r.summary, *r.lines, f"hint: lesson.md, section \"{r.check.hint}\""])
        tests.append({"name": r.check.name, "score": r.score, "max_score": r.check.points,
                      "output": output, "visibility": "visible" if r.check.visible
                      else "after_due_date", "status": "passed" if r.passed else "failed",
                      "title": r.check.title})
    return {"score": g.score, "max_score": g.max_score, "lab": g.lab.name, "tests": tests}


# -- progress in the student's directory ------------------------------------------------------
def read_state(student: Path) -> dict[str, Any] | None:
    path = student / STATE_DIR / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: unreadable lab progress ({exc}); delete it and run idtlab lab "
                       "start again") from None
    if not isinstance(data, dict) or not isinstance(data.get("lab"), str):
        raise BadInput(f"{path}: not an idtlab lab progress file")
    return data


def write_state(student: Path, state: Mapping[str, Any]) -> None:
    d = student / STATE_DIR
    d.mkdir(exist_ok=True)
    (d / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")


def record(student: Path, g: Grade, labs_dir: Path | None) -> None:
    """Store the run's score in state.json and its details in last-run.json."""
    state = read_state(student) or {"lab": g.lab.name,
                                    "labs_dir": str(labs_dir) if labs_dir else None}
    state["lab"] = g.lab.name
    state["score"] = g.score
    state["max_score"] = g.max_score
    state["best_score"] = max(int(state.get("best_score") or 0), g.score)
    state["passing"] = [r.check.name for r in g.results if r.passed]
    state["failing"] = [r.check.name for r in g.results if not r.passed]
    write_state(student, state)
    (student / STATE_DIR / LAST_RUN_FILE).write_text(json.dumps(last_run(g)) + "\n")


def run_to_json(run: RunReport) -> dict[str, Any]:
    return {"outcome": run.outcome, "reason": run.reason, "error": run.error,
            "problems": [[p.text, p.expect, p.invariant, p.detail] for p in run.problems],
            "records": run.records, "timeline": run.timeline, "symbols": run.symbols,
            "gates": {str(k): v.hex() for k, v in run.gates.items()},
            "tss": {str(k): v.hex() for k, v in run.tss.items()}}


def run_from_json(d: Mapping[str, Any]) -> RunReport:
    return RunReport(outcome=d["outcome"], reason=d["reason"],
                     problems=[Problem(t, e, i, det) for t, e, i, det in d["problems"]],
                     records=list(d["records"]), timeline=list(d["timeline"]),
                     symbols=dict(d["symbols"]),
                     gates={int(k): bytes.fromhex(v) for k, v in d["gates"].items()},
                     tss={int(k): bytes.fromhex(v) for k, v in d["tss"].items()},
                     error=d.get("error", ""))


def last_run(g: Grade) -> dict[str, Any]:
    return {"lab": g.lab.name, "score": g.score, "max_score": g.max_score,
            "checks": [{"name": r.check.name, "title": r.check.title,
                        "visible": r.check.visible, "points": r.check.points,
                        "score": r.score, "passed": r.passed, "summary": r.summary,
                        "lines": r.lines, "hint": r.check.hint, "kind": r.check.kind,
                        "run": run_to_json(r.run)} for r in g.results]}


def read_last_run(student: Path) -> dict[str, Any] | None:
    path = student / STATE_DIR / LAST_RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: unreadable last run ({exc}); run idtlab lab check again") \
            from None
    return data if isinstance(data, dict) else None


def lab_of(student: Path, name: str | None, labs_dir: Path | None) -> tuple[Lab, Path | None]:
    """The lab a student's directory is for (from its state, or `name`), and the labs
    folder it came from."""
    if not student.is_dir():
        raise BadInput(f"{student}: no such directory")
    state = read_state(student)
    if name is None:
        if state is None:
            raise BadInput(f"{student}: not a lab directory (no {STATE_DIR}/{STATE_FILE}); "
                           "start one with: idtlab lab start NAME, or name the lab with --lab")
        name = str(state["lab"])
        if labs_dir is None and state.get("labs_dir"):
            labs_dir = Path(str(state["labs_dir"]))
    return folder.find_lab(name, labs_dir), labs_dir
