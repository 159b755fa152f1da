"""`[[expect]]`: what must hold after the run, and checking it.

Each entry states one fact about the finished run: a register's value, a guest memory
word (read through the guest's paging), the outcome, the delivered vectors in order, the
exit device's value, the serial output, or the order of the trace's records of some
kinds. `parse_expectations` validates the entries when the scenario is loaded (a typo is
bad input, exit status 2, before anything runs); `check` compares them with a run and
returns the failures (a failure is exit status 1, not an error).

Scope. A scenario is run alone (`idtlab run`) and under the race explorer, which adds
events of its own. Some facts describe the handler whatever happens (an invariant: the
loop finishes, no NMI is lost); others describe one particular run (the exit code is 1
because one NMI came). `scope` says which, so the explorer checks each where it belongs:

* `"always"` (the default): every run, the explorer's schedules included;
* `"undisturbed"`: only the scenario's own run, without explorer events (`idtlab run`,
  and the explorer's baseline run);
* `"explored"`: only the explorer's schedules; `events = N` (or a list) narrows it to
  schedules of exactly that many explorer events.

A value may also be counted from the run instead of written down: `{ deliveries = "NMI" }`
(for `exit_code`, or as a register's or memory word's `equals`) is the number of
deliveries of that vector in the run, so "the body ran once per NMI delivered" holds
however many NMIs a schedule brought and however many of them were merged by the latch.

    >>> str(Failure("[[expect]] #1", "outcome", "hlt", "shutdown (triple fault)"))
    '[[expect]] #1: outcome: expected hlt, got shutdown (triple fault)'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpu.machine import Machine
from cpu.outcomes import OUTCOMES, RunResult
from idt.vectors import parse_vector_name, vector_name
from idtlab.scenario.checker import Checker, did_you_mean
from idtlab.scenario.context import Build
from idtlab.scenario.start import REGS

EXPECT_KEYS = ("reg", "mem", "size", "equals", "outcome", "deliveries", "exit_code", "serial",
               "kinds", "scope", "events")
SCOPES = ("always", "undisturbed", "explored")
# The facts an entry can state: exactly one of these keys.
FACTS = ("reg", "mem", "outcome", "deliveries", "exit_code", "serial", "kinds")


@dataclass(frozen=True)
class Count:
    """A value counted from the run: the number of deliveries of `vector`.

        >>> Count(2).describe()
        'the number of NMI deliveries'
    """

    vector: int

    def of(self, result: RunResult) -> int:
        return sum(1 for r in result.deliveries if r["vector"] == self.vector)

    def describe(self) -> str:
        return f"the number of {vector_name(self.vector)} deliveries"


@dataclass
class Expectation:
    """One `[[expect]]` entry: `where` names it ("[[expect]] #2"), `spec` holds its
    keys with addresses resolved and vector names turned into numbers; `scope` and
    `events` say which runs it describes (module docstring).

        >>> e = Expectation("[[expect]] #1", {"outcome": "exit"}, "explored", (1,))
        >>> e.applies(0), e.applies(1), e.applies(2)
        (False, True, False)
    """

    where: str
    spec: dict[str, Any]
    scope: str = "always"
    events: tuple[int, ...] | None = None  # with scope "explored": these counts only

    def applies(self, explored: int) -> bool:
        """Whether it describes a run with `explored` events added by the explorer."""
        if self.scope == "always":
            return True
        if self.scope == "undisturbed":
            return explored == 0
        return explored > 0 and (self.events is None or explored in self.events)

    @property
    def scope_text(self) -> str:
        if self.scope != "explored" or self.events is None:
            return self.scope
        return f"explored, {'/'.join(map(str, self.events))} event(s)"


@dataclass
class Failure:
    """An expectation the run did not meet: what was expected and what happened.

        >>> str(Failure("[[expect]] #2", "rax", "0x1", "0x2"))
        '[[expect]] #2: rax: expected 0x1, got 0x2'
    """

    where: str
    what: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: expected {self.expected}, got {self.actual}"


def parse_expectations(b: Build) -> list[Expectation]:
    """Every `[[expect]]` entry, validated."""
    chk = b.chk
    out: list[Expectation] = []
    for i, e in enumerate(chk.array_of_tables(b.data.get("expect", []), "[[expect]]"), 1):
        where = f"[[expect]] #{i}"
        chk.keys(e, EXPECT_KEYS, where)
        facts = [k for k in FACTS if k in e]
        if len(facts) != 1:
            raise chk.fail(where, "give exactly one of reg, mem, outcome, deliveries, exit_code, "
                           "serial, kinds")
        if "kinds" in e and (not isinstance(e["kinds"], list)
                             or not all(isinstance(k, str) for k in e["kinds"])):
            raise chk.fail(f"{where} kinds", "expected a list of trace kinds (strings)")
        spec = {k: v for k, v in e.items() if k not in ("scope", "events")}
        scope, events = _scope(chk, e, where)
        if "reg" in e and e["reg"] not in REGS:
            raise chk.fail(f"{where} reg", f"unknown register '{e['reg']}'"
                           f"{did_you_mean(str(e['reg']), REGS)}")
        if "mem" in e:
            spec["mem"] = b.addr(e["mem"], f"{where} mem")
            spec["size"] = e.get("size", 8)
            if spec["size"] not in (1, 2, 4, 8):
                raise chk.fail(f"{where} size", "must be 1, 2, 4 or 8")
        if "reg" in e or "mem" in e:
            if "equals" not in e:
                raise chk.fail(where, "missing key 'equals'")
            spec["equals"] = _count(chk, e["equals"], f"{where} equals") \
                if isinstance(e["equals"], dict) else b.addr(e["equals"], f"{where} equals")
        if "exit_code" in e:
            if isinstance(e["exit_code"], dict):
                spec["exit_code"] = _count(chk, e["exit_code"], f"{where} exit_code")
            else:
                spec["exit_code"] = chk.int_(e["exit_code"], f"{where} exit_code", 0, 0xFFFFFFFF)
        if "outcome" in e and e["outcome"] not in OUTCOMES:
            raise chk.fail(f"{where} outcome", f"'{e['outcome']}' is not one of "
                           f"{', '.join(OUTCOMES)}")
        if "deliveries" in e:
            names = e["deliveries"]
            if not isinstance(names, list):
                raise chk.fail(f"{where} deliveries", "expected a list of vector names or numbers")
            vecs = []
            for n in names:
                v = n if isinstance(n, int) and not isinstance(n, bool) else \
                    parse_vector_name(str(n))
                if v is None:
                    raise chk.fail(f"{where} deliveries", f"unknown vector name {n!r}")
                if not 0 <= v <= 255:
                    raise chk.fail(f"{where} deliveries", f"vector {v} outside 0..255")
                vecs.append(v)
            spec["deliveries"] = vecs
        out.append(Expectation(where, spec, scope, events))
    return out


def _scope(chk: Checker, e: dict[str, Any], where: str) -> tuple[str, tuple[int, ...] | None]:
    """`scope` (default "always") and `events` (only with scope "explored")."""
    scope = e.get("scope", "explored" if "events" in e else "always")
    if scope not in SCOPES:
        raise chk.fail(f"{where} scope", f"{scope!r} is not one of {', '.join(SCOPES)}"
                       + did_you_mean(str(scope), SCOPES))
    if "events" not in e:
        return scope, None
    if scope != "explored":
        raise chk.fail(f"{where} events", "counts the explorer's events: it goes with "
                       "scope = \"explored\"")
    raw = e["events"]
    counts = raw if isinstance(raw, list) else [raw]
    if not counts:
        raise chk.fail(f"{where} events", "expected a number of events or a list of them")
    return scope, tuple(chk.int_(n, f"{where} events", 1, 64) for n in counts)


def _count(chk: Checker, value: dict[str, Any], where: str) -> Count:
    """A counted value: `{ deliveries = "NMI" }` (a vector name or number)."""
    chk.keys(value, ("deliveries",), where)
    if "deliveries" not in value:
        raise chk.fail(where, "a counted value is { deliveries = VECTOR }")
    raw = value["deliveries"]
    vector = raw if isinstance(raw, int) and not isinstance(raw, bool) else \
        parse_vector_name(str(raw))
    if vector is None or not 0 <= vector <= 255:
        raise chk.fail(f"{where} deliveries", f"unknown vector name {raw!r}")
    return Count(vector)


def _expected(value: int | Count, result: RunResult) -> tuple[int, str]:
    """The expected number, and how to show it."""
    if isinstance(value, Count):
        n = value.of(result)
        return n, f"{n} ({value.describe()})"
    return value, str(value)


def check_expectations(expects: list[Expectation], m: Machine, result: RunResult, *,
                       explored: int = 0) -> list[Failure]:
    """Compare every expectation that describes this run (`explored`: how many events the
    explorer added; 0 for the scenario's own run) with it (`m` in its state at the end
    of the run); return the failures (empty: all hold)."""
    out: list[Failure] = []
    for exp in expects:
        if not exp.applies(explored):
            continue
        s = exp.spec
        if "outcome" in s:
            if result.outcome != s["outcome"]:
                out.append(Failure(exp.where, "outcome", s["outcome"],
                                   f"{result.outcome} ({result.reason})"))
        elif "exit_code" in s:
            want, shown = _expected(s["exit_code"], result)
            if result.exit_code != want:
                out.append(Failure(exp.where, "exit code", shown, str(result.exit_code)))
        elif "serial" in s:
            if result.serial != s["serial"]:
                out.append(Failure(exp.where, "serial output", repr(s["serial"]),
                                   repr(result.serial)))
        elif "deliveries" in s:
            got = [r["vector"] for r in result.deliveries]
            if got != s["deliveries"]:
                out.append(Failure(exp.where, "deliveries",
                                   "[" + ", ".join(vector_name(v) for v in s["deliveries"]) + "]",
                                   "[" + ", ".join(vector_name(v) for v in got) + "]"))
        elif "kinds" in s:
            wanted = set(s["kinds"])
            got_kinds = [r["kind"] for r in result.trace.records if r["kind"] in wanted]
            if got_kinds != s["kinds"]:
                out.append(Failure(exp.where, "trace kinds", str(s["kinds"]), str(got_kinds)))
        elif "reg" in s:
            want, shown = _expected_hex(s["equals"], result)
            if not m.engine.has_register(s["reg"]):
                out.append(Failure(exp.where, s["reg"], shown, "no such register in the mode the "
                                   "run ended in (a multiboot image's 32-bit phase)"))
                continue
            actual = m.engine.read_reg(s["reg"])
            if actual != want:
                out.append(Failure(exp.where, s["reg"], shown, f"{actual:#x}"))
        elif "mem" in s:
            want, shown = _expected_hex(s["equals"], result)
            try:
                actual = int.from_bytes(m.read_linear(s["mem"], s["size"]), "little")
            except Exception as exc:  # an unmapped address is a failed expectation
                out.append(Failure(exp.where, f"mem {s['mem']:#x}", shown,
                                   f"unreadable ({exc})"))
                continue
            if actual != want:
                out.append(Failure(exp.where, f"mem {s['mem']:#x} ({s['size']} bytes)",
                                   shown, f"{actual:#x}"))
    return out


def _expected_hex(value: int | Count, result: RunResult) -> tuple[int, str]:
    """The expected number, and how to show it (in hex, as registers and memory are)."""
    if isinstance(value, Count):
        n = value.of(result)
        return n, f"{n:#x} ({value.describe()})"
    return value, f"{value:#x}"
