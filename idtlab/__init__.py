"""idtlab: a cycle-approximate x86-64 CPU core for testing interrupt and exception
handlers against the races real hardware allows.

Unicorn executes the guest's instructions; idtlab models what happens between them as
the Intel SDM describes it (Vol. 3A, "Interrupt and Exception Handling"): IDT and IST
delivery, exception classes and #DF, NMI blocking, the STI and MOV-SS shadows, the local
APIC, #VE, KVM async page faults. The public API:

- `Machine` (with `PageSpec`, `VmxConfig`), `RunResult`, `Outcome`: build a machine,
  load code, set gates, run it, read the trace
- `load_asm(machine, source, at)`: Intel-syntax code into a machine
- `raises(insn, cpl=...)`: the one-line "what does this instruction raise?"
- `Nmi`, `Interrupt`, `AsyncPf`, `EptRevoke` and the points `Before`, `AtIcount`,
  `AtCycle`, `AtPort`, `Now`: asynchronous events for `Machine.inject`; `parse_event`
  reads the command line's spelling of one
- `load_scenario(path)`, `run_scenario(sc)`, `check_scenario(sc, result)`, `Scenario`,
  `Failure`: scenario files (docs/scenario-format.md)
- `idtlab.explore.explore(path, event, start, end)`: the race explorer, a module of
  its own (docs/explorer.md); `run_exploration(Settings(...))` gives the whole result,
  which `idtlab.explore_report` (grouped text, JSON) and `idtlab.explore_html` (the
  HTML report) render
- `timeline(records, Symbolizer(symbols))`, `to_jsonl(records)`: the trace as text
- `BadInput`, `Unsupported`: the errors for bad input and for what idtlab does not model

    >>> import idtlab
    >>> idtlab.raises("int 0x80", cpl=3).error_code == 0x402  # a DPL-0 gate: #GP(IDT 0x80)
    True
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from cpu.errors import BadInput, Unsupported
from cpu.events import AsyncPf, AtCycle, AtIcount, AtPort, Before, EptRevoke, Interrupt, Nmi, Now, parse_event
from cpu.layout import PageSpec
from cpu.machine import Machine
from cpu.outcomes import Outcome, RunResult
from cpu.vmx import VmxConfig
from idtlab.api import Raised, load_asm, raises
from idtlab.scenario import Failure, Scenario
from idtlab.scenario import check as check_scenario
from idtlab.scenario import load as load_scenario
from idtlab.scenario import run as run_scenario
from idtlab.trace import Symbolizer, timeline, to_jsonl


def _version() -> str:
    """The installed distribution's version; in a source tree that was never installed,
    the one pyproject.toml declares."""
    try:
        return metadata.version("idtlab")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()

__all__ = [
    "AsyncPf", "AtCycle", "AtIcount", "AtPort", "BadInput", "Before", "EptRevoke", "Failure",
    "Interrupt", "Machine", "Nmi", "Now", "Outcome", "PageSpec", "Raised", "RunResult",
    "Scenario", "Symbolizer", "Unsupported", "VmxConfig", "__version__", "check_scenario",
    "load_asm", "load_scenario", "parse_event", "raises", "run_scenario", "timeline",
    "to_jsonl",
]
