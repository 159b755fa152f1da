"""A lab is a folder: `lab.toml` (metadata and checks), `lesson.md`, `starter/` (the
files a student starts from) and `checks/` (scenario files around the student's code).

    NN-name/
      lab.toml        [lab] title, concepts, sdm, files; one [[check]] per check
      lesson.md       the lesson (Markdown); checks' hints name its headings
      starter/        copied into the student's directory by `idtlab lab start`
      checks/         scenario files (docs/scenario-format.md) that load the student's
                      files as `[[code]] file = "../handler.s"`, plus optional
                      invariant modules (FILE.py:FUNCTION)

The full format is in docs/labs.md. Everything wrong with a lab folder is a `BadInput`
naming the file and the key: a teacher's typo is bad input (exit status 2), while
anything wrong with the student's code is a failed check.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idtlab.errors import BadInput
from idtlab.labs import runner

BUILTIN = Path(__file__).resolve().parent / "catalog"
LAB_FILE = "lab.toml"
LESSON_FILE = "lesson.md"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
CHECK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_LAB_KEYS = ("title", "concepts", "sdm", "files", "summary")
_CHECK_KEYS = ("name", "title", "scenario", "points", "visible", "hint", "events", "window",
               "invariants", "explain", "budget")


@dataclass(frozen=True)
class Check:
    """One graded check: a scenario run once (`events` empty) or explored."""

    name: str
    title: str
    scenario: str  # file name under checks/
    points: int
    visible: bool
    hint: str  # a heading of lesson.md
    events: tuple[str, ...] = ()
    window: str = ""
    invariants: tuple[str, ...] = ()
    explain: tuple[tuple[int, str], ...] = ()  # ([[expect]] number, sentence)
    budget: int = 200

    @property
    def kind(self) -> str:
        return "explore" if self.events else "run"

    def explanation(self, expect: int | None) -> str:
        return dict(self.explain).get(expect, "") if expect is not None else ""


@dataclass(frozen=True)
class Lab:
    name: str
    path: Path
    title: str
    summary: str
    concepts: tuple[str, ...]
    sdm: tuple[str, ...]
    files: tuple[str, ...]
    checks: tuple[Check, ...]

    @property
    def number(self) -> int | None:
        m = re.match(r"(\d+)-", self.name)
        return int(m.group(1)) if m else None

    @property
    def lesson(self) -> str:
        return (self.path / LESSON_FILE).read_text()

    @property
    def max_score(self) -> int:
        return sum(c.points for c in self.checks)

    def check_path(self, check: Check) -> Path:
        return self.path / "checks" / check.scenario


def headings(markdown: str) -> list[str]:
    """The ATX headings of a Markdown text, without their #s (fenced code skipped)."""
    out: list[str] = []
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                out.append(m.group(1))
    return out


class _Where:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, msg: str) -> BadInput:
        return BadInput(f"{self.path}: {where}: {msg}")

    def string(self, table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
        if key not in table:
            if default is None:
                raise self.fail(where, f"missing key '{key}'")
            return default
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{where} {key}", f"expected a non-empty string, got {value!r}")
        return value

    def strings(self, table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = table.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(f"{where} {key}", "expected a list of strings")
        return tuple(value)


def load_lab(path: Path) -> Lab:
    """Read and validate a lab folder."""
    path = Path(path)
    meta = path / LAB_FILE
    w = _Where(meta)
    if not path.is_dir():
        raise BadInput(f"{path}: no such lab folder")
    try:
        data = tomllib.loads(meta.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: not a lab folder (no {LAB_FILE})") from None
    except OSError as exc:
        raise BadInput(f"{meta}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{meta}: TOML syntax error: {exc}") from None
    if not NAME_RE.fullmatch(path.name):
        raise BadInput(f"{path}: a lab folder's name is lower-case letters, digits and '-' "
                       "(e.g. 08-fred)")
    for key in data:
        if key not in ("lab", "check"):
            raise w.fail("top level", f"unknown table '{key}' (expected [lab] and [[check]])")
    lab_t = data.get("lab")
    if not isinstance(lab_t, dict):
        raise w.fail("[lab]", "missing table")
    for key in lab_t:
        if key not in _LAB_KEYS:
            raise w.fail("[lab]", f"unknown key '{key}' (known: {', '.join(_LAB_KEYS)})")
    title = w.string(lab_t, "title", "[lab]")
    files = w.strings(lab_t, "files", "[lab]")
    if not files:
        raise w.fail("[lab] files", "name at least one student file (from starter/)")
    for f in files:
        if "/" in f or f.startswith(".") or not (path / "starter" / f).is_file():
            raise w.fail("[lab] files", f"{f!r} is not a file in starter/")
    lesson = path / LESSON_FILE
    if not lesson.is_file():
        raise BadInput(f"{path}: missing {LESSON_FILE}")
    sections = headings(lesson.read_text())
    checks_t = data.get("check", [])
    if not isinstance(checks_t, list) or not checks_t or not all(isinstance(c, dict)
                                                                 for c in checks_t):
        raise w.fail("[[check]]", "give at least one [[check]] table")
    checks: list[Check] = []
    for i, c in enumerate(checks_t, 1):
        checks.append(_check(w, path, c, f"[[check]] #{i}", sections))
    names = [c.name for c in checks]
    for n in names:
        if names.count(n) > 1:
            raise w.fail("[[check]]", f"two checks are named {n!r}")
    return Lab(name=path.name, path=path, title=title,
               summary=lab_t.get("summary", "") if isinstance(lab_t.get("summary"), str) else "",
               concepts=w.strings(lab_t, "concepts", "[lab]"),
               sdm=w.strings(lab_t, "sdm", "[lab]"), files=files, checks=tuple(checks))


def _check(w: _Where, path: Path, c: dict[str, Any], where: str, sections: list[str]) -> Check:
    for key in c:
        if key not in _CHECK_KEYS:
            raise w.fail(where, f"unknown key '{key}' (known: {', '.join(_CHECK_KEYS)})")
    name = w.string(c, "name", where)
    if not CHECK_NAME_RE.fullmatch(name):
        raise w.fail(f"{where} name", f"{name!r}: use lower-case letters, digits and '-'")
    scenario = w.string(c, "scenario", where)
    if not (path / "checks" / scenario).is_file():
        raise w.fail(f"{where} scenario", f"no file checks/{scenario}")
    points = c.get("points", 1)
    if isinstance(points, bool) or not isinstance(points, int) or points < 0:
        raise w.fail(f"{where} points", f"expected a non-negative integer, got {points!r}")
    visible = c.get("visible", False)
    if not isinstance(visible, bool):
        raise w.fail(f"{where} visible", "expected true or false")
    hint = w.string(c, "hint", where)
    if hint not in sections:
        raise w.fail(f"{where} hint", f"{hint!r} is not a heading of {LESSON_FILE}")
    events = w.strings(c, "events", where)
    window = c.get("window", "")
    if events:
        if not 1 <= len(events) <= 2:
            raise w.fail(f"{where} events", "one event (every boundary) or two (every ordered "
                         "pair of boundaries)")
        for e in events:
            try:
                runner.check_event(e)
            except BadInput as exc:
                raise w.fail(f"{where} events", str(exc)) from None
        if not isinstance(window, str) or not re.fullmatch(r"[^.\s]+\.\.[^.\s]*", window):
            raise w.fail(f"{where} window", "an explored check needs window = \"START..END\" "
                         "(symbols; END may be empty: to the end of the run)")
    elif window:
        raise w.fail(f"{where} window", "a window belongs to a check with events")
    invariants = []
    for inv in w.strings(c, "invariants", where):
        file_part, sep, func = inv.rpartition(":")
        if sep and file_part.endswith(".py") and not Path(file_part).is_absolute():
            inv = f"{path / 'checks' / file_part}:{func}"
        try:
            runner.check_invariant(inv)
        except BadInput as exc:
            raise w.fail(f"{where} invariants", str(exc)) from None
        invariants.append(inv)
    explain_t = c.get("explain", {})
    if not isinstance(explain_t, dict):
        raise w.fail(f"{where} explain", "expected a table { 1 = \"...\" } keyed by [[expect]] "
                     "number")
    explain: list[tuple[int, str]] = []
    for k, v in explain_t.items():
        if not k.isdigit() or not isinstance(v, str):
            raise w.fail(f"{where} explain", f"{k!r}: keys are [[expect]] numbers, values "
                         "sentences")
        explain.append((int(k), v))
    budget = c.get("budget", 200)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise w.fail(f"{where} budget", "expected a positive integer")
    return Check(name=name, title=w.string(c, "title", where), scenario=scenario,
                 points=points, visible=visible, hint=hint, events=events, window=str(window),
                 invariants=tuple(invariants), explain=tuple(sorted(explain)), budget=budget)


def labs_root(labs_dir: Path | None) -> Path:
    """The folder holding the labs: a course's own (`--labs-dir`) or the built-in ones."""
    if labs_dir is None:
        return BUILTIN
    if not labs_dir.is_dir():
        raise BadInput(f"--labs-dir {labs_dir}: no such directory")
    return labs_dir


def all_labs(labs_dir: Path | None) -> list[Lab]:
    root = labs_root(labs_dir)
    return [load_lab(p) for p in sorted(root.iterdir())
            if p.is_dir() and (p / LAB_FILE).is_file()]


def find_lab(name: str, labs_dir: Path | None) -> Lab:
    """A lab by its folder name (`05-nmi-ist`), its number (`5`, `05`) or the name
    without the number (`nmi-ist`)."""
    root = labs_root(labs_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / LAB_FILE).is_file())
    for p in folders:
        m = re.match(r"(\d+)-(.*)", p.name)
        if name == p.name or (m and ((name.isdigit() and int(name) == int(m.group(1)))
                                     or name == m.group(2))):
            return load_lab(p)
    known = ", ".join(p.name for p in folders) or "none"
    raise BadInput(f"lab {name!r}: no such lab in {root} (known: {known})")
