"""Scenario files (TOML): parse, validate, build a machine, run it, check expectations.

A scenario describes one experiment: the machine, the code and data in guest memory,
the IDT gates and TSS stacks, the page mappings, the start state, the events injected
during the run and what must hold afterwards. The format is documented in
docs/scenario-format.md. `load` reads a file and builds its machine, `run` runs it, and
`check` compares the run with the scenario's `[[expect]]` entries:

    >>> import idtlab
    >>> from pathlib import Path
    >>> sc = load(Path(idtlab.__file__).parent / "examples" / "demo.toml")
    >>> result = run(sc)
    >>> result.outcome, check(sc, result)
    ('hlt', [])

Every problem with the file is a `BadInput` whose message names the file, the table and
the key (and, for assembly, the line), so the command line can print one line and exit
with status 2.

One module per table (or per group of tables that belong together), each with one
builder; `loader` calls them in the order their dependencies need:

- `checker`: `Checker`, typed reads of TOML values with errors that say where;
  `parse_size`, `did_you_mean`
- `context`: `Build`, the state the builders share (machine, symbols, claimed memory)
- `machine`: `[machine]`; `vmx`: `[vmx]`, `[[ept]]`, `[host]`
- `data`: `[[data]]`; `images`: `[[image]]` (ELF and multiboot); `code`: `[[code]]`
- `system`: `[idt]`, `[tss]`, `[[pages]]`
- `apf`: `[apf]`, `[[swapped]]`
- `start`: `[run]`; `inject`: `[[inject]]`
- `expect`: `[[expect]]`, `Expectation`, `Failure`, and checking them after a run
- `loader`: `Scenario`, `load`, `build`, `run`, `check`
"""

from __future__ import annotations

from idtlab.scenario.checker import Checker, did_you_mean, parse_size
from idtlab.scenario.expect import Expectation, Failure
from idtlab.scenario.loader import TABLES, Scenario, build, check, load, run

__all__ = ["TABLES", "Checker", "Expectation", "Failure", "Scenario", "build", "check",
           "did_you_mean", "load", "parse_size", "run"]
