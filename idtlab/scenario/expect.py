"""`[[expect]]`: what must hold after the run, and checking it.

Each entry states one fact about the finished run: a register's value, a guest memory
word (read through the guest's paging), the outcome, the delivered vectors in order, the
exit device's value, the serial output, or the order of the trace's records of some
kinds. `parse_expectations` validates the entries when the scenario is loaded (a typo is
bad input, exit status 2, before anything runs); `check` compares them with a run and
returns the failures (a failure is exit status 1, not an error).

    >>> str(Failure("[[expect]] #1", "outcome", "hlt", "shutdown (triple fault)"))
    '[[expect]] #1: outcome: expected hlt, got shutdown (triple fault)'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpu.machine import Machine
from cpu.outcomes import OUTCOMES, RunResult
from idt.vectors import parse_vector_name, vector_name
from idtlab.scenario.checker import did_you_mean
from idtlab.scenario.context import Build
from idtlab.scenario.start import REGS

EXPECT_KEYS = ("reg", "mem", "size", "equals", "outcome", "deliveries", "exit_code", "serial",
               "kinds")
# The facts an entry can state: exactly one of these keys.
FACTS = ("reg", "mem", "outcome", "deliveries", "exit_code", "serial", "kinds")


@dataclass
class Expectation:
    """One `[[expect]]` entry: `where` names it ("[[expect]] #2"), `spec` holds its
    keys with addresses resolved and vector names turned into numbers."""

    where: str
    spec: dict[str, Any]


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
        spec = dict(e)
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
            spec["equals"] = b.addr(e["equals"], f"{where} equals")
        if "outcome" in e and e["outcome"] not in OUTCOMES:
            raise chk.fail(f"{where} outcome", f"'{e['outcome']}' is not one of "
                           f"{', '.join(OUTCOMES)}")
        if "deliveries" in e:
            names = e["deliveries"]
            if not isinstance(names, list):
                raise chk.fail(f"{where} deliveries", "expected a list of vector names or numbers")
            vecs = []
            for n in names:
                v = n if isinstance(n, int) else parse_vector_name(str(n))
                if v is None:
                    raise chk.fail(f"{where} deliveries", f"unknown vector name {n!r}")
                vecs.append(v)
            spec["deliveries"] = vecs
        out.append(Expectation(where, spec))
    return out


def check_expectations(expects: list[Expectation], m: Machine,
                       result: RunResult) -> list[Failure]:
    """Compare every expectation with the run (`m` in its state at the end of the run);
    return the failures (empty: all hold)."""
    out: list[Failure] = []
    for exp in expects:
        s = exp.spec
        if "outcome" in s:
            if result.outcome != s["outcome"]:
                out.append(Failure(exp.where, "outcome", s["outcome"],
                                   f"{result.outcome} ({result.reason})"))
        elif "exit_code" in s:
            if result.exit_code != s["exit_code"]:
                out.append(Failure(exp.where, "exit code", str(s["exit_code"]),
                                   str(result.exit_code)))
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
            actual = m.engine.read_reg(s["reg"])
            if actual != s["equals"]:
                out.append(Failure(exp.where, s["reg"], f"{s['equals']:#x}", f"{actual:#x}"))
        elif "mem" in s:
            try:
                actual = int.from_bytes(m.read_linear(s["mem"], s["size"]), "little")
            except Exception as exc:  # an unmapped address is a failed expectation
                out.append(Failure(exp.where, f"mem {s['mem']:#x}", f"{s['equals']:#x}",
                                   f"unreadable ({exc})"))
                continue
            if actual != s["equals"]:
                out.append(Failure(exp.where, f"mem {s['mem']:#x} ({s['size']} bytes)",
                                   f"{s['equals']:#x}", f"{actual:#x}"))
    return out
