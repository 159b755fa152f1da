"""From a scenario file to a machine ready to run: the order the tables are built in.

The order is fixed by what each table needs from the ones before it: the machine
(`[machine]`, `[vmx]`) first; then what fills guest memory and defines symbols
(`[[data]]`, `[[image]]`, `[[code]]`); then what names those symbols (`[idt]`, `[tss]`,
`[[pages]]`, `[[ept]]`, `[host]`, `[hypervisor]`, `[apf]`, `[[swapped]]`, `[run]`, `[[inject]]`,
`[[expect]]`). A problem stops the build at the first table that has one.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpu.machine import Machine
from cpu.outcomes import RunResult
from idtlab.errors import BadInput, read_text_input
from idtlab.scenario.apf import build_apf, build_swapped
from idtlab.scenario.checker import Checker, did_you_mean
from idtlab.scenario.code import build_code
from idtlab.scenario.context import Build
from idtlab.scenario.data import build_data
from idtlab.scenario.expect import Expectation, Failure, check_expectations, parse_expectations
from idtlab.scenario.fred import build_fred
from idtlab.scenario.hypervisor import build_hypervisor
from idtlab.scenario.images import build_images, check_multiboot
from idtlab.scenario.inject import build_injections
from idtlab.scenario.machine import build_machine
from idtlab.scenario.start import run_args
from idtlab.scenario.system import build_idt, build_pages, build_tss
from idtlab.scenario.vmx import build_ept, build_host

# Every top-level table a scenario may have (docs/scenario-format.md).
TABLES = ("machine", "code", "data", "image", "idt", "tss", "pages", "run", "inject", "vmx",
          "ept", "host", "hypervisor", "apf", "swapped", "expect", "fred")


@dataclass
class Scenario:
    """A loaded scenario: its file, the parsed TOML, the machine built from it (not yet
    run), the symbols its tables define, its expectations and the arguments of its run.

        >>> import idtlab
        >>> from pathlib import Path
        >>> sc = load(Path(idtlab.__file__).parent / "examples" / "demo.toml")
        >>> hex(sc.symbols["user_main"]), sc.run_args["cpl"]
        ('0x100000', 3)
    """

    path: Path
    data: dict[str, Any]
    machine: Machine | None = None
    symbols: dict[str, int] = field(default_factory=dict)
    expects: list[Expectation] = field(default_factory=list)
    run_args: dict[str, Any] = field(default_factory=dict)


def load(path: str | Path, *, mode: str | None = None) -> Scenario:
    """Parse and validate a scenario file and build its machine (not yet run); `mode`
    ("fast" or "timed") overrides `[machine] mode`. Any problem with the file is a
    `BadInput` naming the file, the table and the key.

        >>> load("no/such.toml")
        Traceback (most recent call last):
        ...
        cpu.errors.BadInput: no/such.toml: cannot read scenario: No such file or directory
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise BadInput(f"{path}: cannot read scenario: No such file or directory")
    text = read_text_input(path, "a scenario")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path.name}: TOML syntax error: {exc}") from None
    return build(path, data, text, mode=mode)


def build(path: Path, data: dict[str, Any], text: str = "", *, mode: str | None = None) -> Scenario:
    """Validate `data` (a parsed scenario; `path` names it in errors and anchors its
    relative file names, `text` gives assembly errors their TOML line) and build its
    machine; `mode` overrides `[machine] mode`.

        >>> sc = build(Path("inline.toml"), {"code": [{"at": 0x100000, "asm": "hlt"}],
        ...                                  "run": {"entry": 0x100000}})
        >>> run(sc).outcome
        'hlt'
    """
    chk = Checker(path)
    for key in data:
        if key not in TABLES:
            raise chk.fail("top level", f"unknown table '{key}'{did_you_mean(key, TABLES)}")
    m, memory = build_machine(path, data, chk, mode)
    b = Build(path, data, text, chk, m, memory, multiboot=check_multiboot(data, chk))
    b.symbols.update(m.symbols)
    b.symbols["pml4"] = 0x3000  # the machine's identity map starts its tables there
    build_data(b)
    build_images(b)
    build_code(b)
    m.symbols.update(b.symbols)
    build_idt(b)
    build_tss(b)
    build_pages(b)
    build_fred(b)
    build_ept(b)
    build_host(b)
    build_hypervisor(b)
    build_apf(b)
    build_swapped(b)
    sc = Scenario(path=path, data=data, machine=m, symbols=b.symbols)
    sc.run_args = run_args(b)
    build_injections(b)
    sc.expects = parse_expectations(b)
    return sc


def run(sc: Scenario) -> RunResult:
    """Run the scenario's machine from the state `[run]` gives (once: a machine that has
    run is not reset; load the scenario again for another run).

        >>> import idtlab
        >>> from pathlib import Path
        >>> result = run(load(Path(idtlab.__file__).parent / "examples" / "demo.toml"))
        >>> result.outcome, [d["name"] for d in result.deliveries]
        ('hlt', ['#BP', '#PF', 'vec 0x80', '#GP'])
    """
    assert sc.machine is not None
    return sc.machine.run(**sc.run_args)


def check(sc: Scenario, result: RunResult, *, explored: int = 0) -> list[Failure]:
    """Compare every `[[expect]]` that describes the run with it (`explored`: how many
    events the race explorer added, 0 for the scenario's own run: the entry's `scope`);
    return the failures (empty: all hold).

        >>> import idtlab
        >>> from pathlib import Path
        >>> sc = load(Path(idtlab.__file__).parent / "examples" / "demo.toml")
        >>> check(sc, run(sc))
        []
    """
    assert sc.machine is not None
    return check_expectations(sc.expects, sc.machine, result, explored=explored)
