"""The async-#PF policy x handler-design matrix, by exhaustive exploration.

For each handler design among the async-#PF examples (`idtlab/examples/apf/`) and each
host injection policy (`cpu.devices.apf.POLICIES`: `kvm`, `kvm-send-always`,
`never-while-nmi-blocked`, `always`), the race explorer (`idtlab.explore`) injects an NMI
at every instruction boundary of the design's window and checks the design's race
invariant there. A cell says whether the race is reachable under that policy (some point
breaks the invariant) and at which point first: computed, not argued (`idtlab demo
apf-matrix` prints it).

A design is an example file turned into an exploration: its `[apf] policy` set to the
column's policy, the `[[inject]]` that the explorer now takes over removed (the ones that
open the window stay: the forced async #PF, a first NMI), its `[[expect]]`s (which
describe one fixed schedule's failure) dropped, and, for a variant, its guest code edited
(each edit must match the example exactly once). Variants are written to a scratch
directory, one file per cell.

The races (what "breaking" means):

* `flags-token`: the CR2/flags race (Andy Lutomirski in the LKML thread "[PATCH v2]
  x86/kvm: Disable KVM_ASYNC_PF_SEND_ALWAYS", March 2020). The Linux-like #PF handler of
  these examples logs {flags, CR2} per entry (`pf_n`, `pf_log`); the invariant
  `async_pf_reached_its_handler` holds when the #PF entries that saw flags != 0 are
  exactly one per token the host issued, each with CR2 = that token. An NMI whose
  ordinary #PF lands before the outer entry has read flags (and, without an NMI-side CR2
  save, CR2) breaks it.
* `frames-intact`: the nested-NMI clobber (the comment above `nmi` in Linux
  arch/x86/entry/entry_64.S; KVM's injection checks in arch/x86/kvm/x86.c never look at
  NMI blocking): an IRET inside the
  NMI handler (of a #PF injected into it, of the page-ready interrupt, of a #DB) unblocks
  NMIs and a second NMI overwrites the live NMI frame on IST1.

Designs (rows), from the examples' top comments:

* `cr2-flags-race` (apf_cr2_flags_race.toml): async #PF forced at the load; NMI at every
  point of the #PF entry up to `pf_reads_done`, the first instruction after its reads of
  flags and CR2; the NMI handler takes an ordinary #PF.
* `nmi-saves-cr2` (apf_cr2_race_nmi_saves_cr2.toml): the same, the NMI restores CR2.
* `nmi-touches-swapped` (apf_nmi_blocked_kvm_injects.toml; apf_never_while_nmi_blocked.toml
  is the same file with another policy): a first NMI (IST1) enables interrupts and reads
  a swapped page; the second NMI at every point of the NMI handler, up to its IRETQ
  (the #PF handler and the page-ready interrupt it may wait for included).
* `nmi-touches-swapped-no-send-always`: the same guest without SEND_ALWAYS in
  MSR_KVM_ASYNC_PF_EN (as current Linux guests enable it).
* `nmi-touches-swapped-if0`: the same guest, the NMI handler keeps IF = 0 (no STI).
* `pf-nmi-db-pf` (apf_pf_nmi_db_pf.toml): async #PF forced at the load, a first NMI at
  the #PF entry executes INT1; the #DB handler (IST2) takes an ordinary #PF; the second
  NMI at every point of the NMI handler (the #DB handler and its #PF included).

The forced injections (`[[inject]] event = "async_pf"`) and the ordinary #PFs do not
consult the policy, and a retried access to a page whose page-in is in flight is a halt
under every policy, so rows 1, 2 and 6 are the same in all columns. The other examples
(apf_protocol, apf_wake_all_and_halt, apf_legacy_layout) have no NMI race to explore.
"""

from __future__ import annotations

import json
import re
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cpu.devices.apf import POLICIES
from cpu.machine import Machine
from cpu.outcomes import RunResult
from idtlab.explore import explore

# The invariant for the CR2/flags race, by the name the explorer resolves.
FLAGS_TOKEN = "idtlab.apf_matrix:async_pf_reached_its_handler"


@dataclass(frozen=True)
class Design:
    """One row: an example file, how to turn it into an exploration, and its race."""

    name: str
    example: str  # file name in idtlab/examples/apf/
    what: str  # one line for the printed matrix
    window: tuple[str, str]
    takeover: tuple[str, ...]  # `before` of the example's [[inject]]s the explorer replaces
    invariants: tuple[str, ...]
    edits: tuple[tuple[str, str], ...] = ()  # (old, new) in the guest code, once each
    event: str = "nmi"


# The NMI handlers' last IRETQ gets a label, so that the window can end there.
_NMI_IRET_4 = ("nmi_out:\n    pop rcx\n    pop rax\n    iretq",
               "nmi_out:\n    pop rcx\n    pop rax\nnmi_iret:\n    iretq")
_NMI_IRET_DB = ("nmi_out:\n    pop rax\n    iretq", "nmi_out:\n    pop rax\nnmi_iret:\n    iretq")
_NO_SEND_ALWAYS = ("mov eax, 0x14000b", "mov eax, 0x140009")
# The #PF entry's reads are done here (the window ends there: the examples' pf_log is not
# reentrant, an NMI between reading pf_n and incrementing it makes two entries share a
# slot, which is a bug of the log, not the race).
_READS_DONE = ("    mov rbx, cr2\n    mov rcx, qword ptr [pf_n]\n",
               "    mov rbx, cr2\npf_reads_done:\n    mov rcx, qword ptr [pf_n]\n")
_NO_STI = ("    sti                             # this NMI handler runs with interrupts on\n",
           "")

DESIGNS: tuple[Design, ...] = (
    Design("cr2-flags-race", "apf_cr2_flags_race.toml",
           "#PF entry; NMI takes an ordinary #PF, no CR2 save",
           ("pf_handler", "pf_reads_done"), ("pf_handler",), (FLAGS_TOKEN,), (_READS_DONE,)),
    Design("nmi-saves-cr2", "apf_cr2_race_nmi_saves_cr2.toml",
           "#PF entry; NMI takes an ordinary #PF, saves/restores CR2",
           ("pf_handler", "pf_reads_done"), ("pf_handler",), (FLAGS_TOKEN,), (_READS_DONE,)),
    Design("nmi-touches-swapped", "apf_nmi_blocked_kvm_injects.toml",
           "NMI handler, IF=1, SEND_ALWAYS, reads swapped memory",
           ("nmi_handler", "nmi_iret"), ("nmi_touch",), ("frames-intact",), (_NMI_IRET_4,)),
    Design("nmi-touches-swapped-no-send-always", "apf_nmi_blocked_kvm_injects.toml",
           "same, guest without SEND_ALWAYS (as Linux)",
           ("nmi_handler", "nmi_iret"), ("nmi_touch",), ("frames-intact",),
           (_NMI_IRET_4, _NO_SEND_ALWAYS)),
    Design("nmi-touches-swapped-if0", "apf_nmi_blocked_kvm_injects.toml",
           "same (SEND_ALWAYS), NMI handler keeps IF=0",
           ("nmi_handler", "nmi_iret"), ("nmi_touch",), ("frames-intact",),
           (_NMI_IRET_4, _NO_STI)),
    Design("pf-nmi-db-pf", "apf_pf_nmi_db_pf.toml",
           "#PF -> NMI -> #DB (IST2) -> ordinary #PF",
           ("nmi_handler", "nmi_iret"), ("nmi_after_db",), ("frames-intact",), (_NMI_IRET_DB,)),
)


@dataclass(frozen=True)
class Cell:
    """One policy's result for one design: the window's points and those that break the
    race invariant (labels, in execution order), and the first one's failure."""

    policy: str
    window: tuple[str, ...]
    breaking: tuple[str, ...]
    failure: str | None

    @property
    def points(self) -> int:
        return len(self.window)

    @property
    def reachable(self) -> bool:
        return bool(self.breaking)

    @property
    def first(self) -> str | None:
        return self.breaking[0] if self.breaking else None


@dataclass(frozen=True)
class Row:
    design: Design
    cells: tuple[Cell, ...] = field(default_factory=tuple)

    def cell(self, policy: str) -> Cell:
        return next(c for c in self.cells if c.policy == policy)


# -- the invariant ----------------------------------------------------------------------
def async_pf_reached_its_handler(result: RunResult, m: Machine) -> str | None:
    """The CR2/flags race's invariant: the #PF handler entries that saw flags != 0 (from
    the examples' `pf_log` of {flags, CR2} per entry, `pf_n` entries) are exactly one per
    page-not-present token the host issued, each with CR2 = that token."""
    issued = sorted(int(r["token"]) for r in result.trace.of_kind("apf_not_present")
                    if r.get("decision") == "inject")
    n = int.from_bytes(m.read_linear(m.symbols["pf_n"], 8), "little")
    log = m.read_linear(m.symbols["pf_log"], 16 * n)
    entries = [(int.from_bytes(log[i:i + 8], "little"), int.from_bytes(log[i + 8:i + 16],
                                                                          "little"))
               for i in range(0, len(log), 16)]
    seen = [cr2 for flags, cr2 in entries if flags]
    if sorted(seen) == issued:
        return None
    shown = ", ".join(f"{{flags {f:#x}, CR2 {c:#x}}}" for f, c in entries)
    return (f"async #PF tokens issued {[hex(t) for t in issued]}, but the #PF entries that "
            f"saw flags != 0 read CR2 {[hex(c) for c in seen]} (log: {shown})")


# -- variants -----------------------------------------------------------------------------
def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return hex(v) if v >= 0 else str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """TOML text for a scenario's data as `tomllib` reads it (scalars, arrays, inline
    tables; top-level tables and arrays of tables)."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items()
             if not isinstance(v, dict) and not (isinstance(v, list) and v
                                                  and all(isinstance(x, dict) for x in v))]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{_key(k)}]"] + [f"{_key(a)} = {_value(b)}" for a, b in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                lines += ["", f"[[{_key(k)}]]"]
                lines += [f"{_key(a)} = {_value(b)}" for a, b in item.items()]
    return "\n".join(lines) + "\n"


def example_text(name: str) -> str:
    return (resources.files("idtlab") / "examples" / "apf" / name).read_text()


def variant(design: Design, policy: str) -> str:
    """The exploration scenario for one cell, as TOML text."""
    if policy not in POLICIES:
        raise ValueError(f"unknown async-#PF policy {policy!r}; known: {', '.join(POLICIES)}")
    data = tomllib.loads(example_text(design.example))
    data.setdefault("apf", {})["policy"] = policy
    injects = data.get("inject", [])
    kept = [i for i in injects if i.get("before") not in design.takeover]
    if len(injects) - len(kept) != len(design.takeover):
        raise ValueError(f"{design.example}: expected an [[inject]] before each of "
                         f"{list(design.takeover)}")
    if kept:
        data["inject"] = kept
    else:
        data.pop("inject", None)
    data.pop("expect", None)
    for old, new in design.edits:
        hits = [c for c in data["code"] if old in c["asm"]]
        if len(hits) != 1 or hits[0]["asm"].count(old) != 1:
            raise ValueError(f"{design.example}: the edit for {design.name} expects "
                             f"{old!r} exactly once in the guest code")
        hits[0]["asm"] = hits[0]["asm"].replace(old, new)
    return (f"# {design.name} under policy {policy}: generated by idtlab.apf_matrix from "
            f"idtlab/examples/apf/{design.example}\n" + to_toml(data))


# -- the matrix ---------------------------------------------------------------------------
def explore_cell(design: Design, policy: str, workdir: Path, *, jobs: int = 1) -> Cell:
    path = workdir / f"{design.name}.{policy}.toml"
    path.write_text(variant(design, policy))
    start, end = design.window
    findings = explore(path, design.event, start, end, jobs=jobs,
                       invariants=design.invariants)
    bad = [f for f in findings if not f.ok]
    return Cell(policy, tuple(f.point.label for f in findings),
                tuple(f.point.label for f in bad), bad[0].failures[0] if bad else None)


def policy_matrix(designs: Sequence[Design] = DESIGNS, policies: Sequence[str] = POLICIES,
                  *, jobs: int = 1, workdir: Path | None = None) -> list[Row]:
    """Every design under every policy (rows in `designs` order, cells in `policies`
    order). The variant files go to `workdir` (a temporary directory by default)."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return [Row(d, tuple(explore_cell(d, p, workdir, jobs=jobs) for p in policies))
                for d in designs]
    with tempfile.TemporaryDirectory(prefix="idtlab-apf-matrix-") as tmp:
        return policy_matrix(designs, policies, jobs=jobs, workdir=Path(tmp))


def format_matrix(rows: Sequence[Row]) -> list[str]:
    """The matrix as text: one line per design, one column per policy; a cell is
    `race: N/M @ first-point` (N of the window's M points break) or `safe (M)`."""
    policies = [c.policy for c in rows[0].cells] if rows else []

    def text(c: Cell) -> str:
        return (f"race: {len(c.breaking)}/{c.points} @ {c.first}" if c.reachable
                else f"safe ({c.points})")

    width = max([len(r.design.name) for r in rows] + [6])
    cols = [max([len(p)] + [len(text(r.cell(p))) for r in rows]) for p in policies]
    lines = [f"{'design':<{width}}  " + "  ".join(f"{p:<{w}}" for p, w in zip(policies, cols,
                                                                             strict=True))]
    for r in rows:
        lines.append(f"{r.design.name:<{width}}  " + "  ".join(
            f"{text(r.cell(p)):<{w}}" for p, w in zip(policies, cols, strict=True)))
    lines.append("")
    for r in rows:
        lines.append(f"{r.design.name}: {r.design.what} ({r.design.example}; NMI at every "
                     f"point of {r.design.window[0]}..{r.design.window[1]}; invariant "
                     f"{', '.join(i.rpartition(':')[2] for i in r.design.invariants)})")
    return [line.rstrip() for line in lines]


def print_matrix(rows: Sequence[Row]) -> None:
    for line in format_matrix(rows):
        print(line)
