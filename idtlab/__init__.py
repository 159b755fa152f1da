"""idtlab: a cycle-approximate x86-64 CPU core for testing interrupt and exception
handlers. The public API:

- `Machine`, `PageSpec`, `RunResult` — the machine (cpu.machine)
- `load_asm(machine, source, at)` — Intel-syntax code into a machine
- `raises(insn, cpl=...)` — the one-line "what does this raise?" primitive
- `load_scenario(path)`, `run_scenario(sc)`, `check_scenario(sc, result)` — scenario files
"""

from cpu.machine import Machine, PageSpec, RunResult
from idtlab.api import Raised, load_asm, raises
from idtlab.scenario import check as check_scenario
from idtlab.scenario import load as load_scenario
from idtlab.scenario import run as run_scenario

__all__ = ["Machine", "PageSpec", "Raised", "RunResult", "check_scenario", "load_asm",
           "load_scenario", "raises", "run_scenario"]
