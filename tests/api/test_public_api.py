"""The public API: what `idtlab` exports, its version, `python -m idtlab`, and the
examples in the docstrings (each runs as a doctest)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import idtlab
from cpu import events

ROOT = Path(__file__).resolve().parents[2]
# Exported objects whose docstrings live in cpu/ and have no example yet: strict, so each
# flips to a failure once its example lands.
EXPORTED = [n for n in idtlab.__all__ if n != "__version__"]


# The cpu/ modules whose public classes users meet through idtlab (their examples run too).
CPU_MODULES = ["cpu.errors", "cpu.events", "cpu.layout", "cpu.machine", "cpu.outcomes", "cpu.vmx"]


def idtlab_modules() -> list[str]:
    names = ["idtlab", *CPU_MODULES]
    for info in pkgutil.walk_packages(idtlab.__path__, "idtlab."):
        if info.name != "idtlab.__main__":
            names.append(info.name)
    return sorted(names)


def test_everything_in_all_is_exported_and_star_import_gives_exactly_that() -> None:
    space: dict[str, object] = {}
    exec("from idtlab import *", space)
    assert sorted(k for k in space if k != "__builtins__") == sorted(idtlab.__all__)
    assert {"Machine", "load_scenario", "raises", "Nmi", "Before"} <= set(idtlab.__all__)


def test_the_submodules_stay_reachable_under_their_names() -> None:
    # An export must not shadow a submodule: `from idtlab import explore` is the module.
    for name in ("explore", "scenario", "trace", "api", "cli"):
        importlib.import_module(f"idtlab.{name}")
        assert inspect.ismodule(getattr(idtlab, name)), name


def test_the_typed_events_and_points_are_exported_from_idtlab() -> None:
    for name in ("Nmi", "Interrupt", "AsyncPf", "EptRevoke", "Before", "AtIcount", "AtCycle",
                 "AtPort", "Now", "parse_event"):
        assert getattr(idtlab, name) is getattr(events, name)


def test_an_exported_nmi_injected_before_the_second_instruction_is_delivered_there() -> None:
    m = idtlab.Machine()
    idtlab.load_asm(m, "main:\n    nop\n    hlt\nnmi_handler:\n    iretq", 0x100000)
    m.set_gate(2, m.symbols["nmi_handler"])
    m.inject(idtlab.Nmi(), idtlab.Before(0x100001))
    result = m.run(entry=0x100000, rsp=0x70000)
    (d,) = result.deliveries
    assert (d["name"], d["source"], d["rip"], d["handler"]) == ("NMI", "nmi", 0x100001, 0x100002)
    assert result.outcome == idtlab.Outcome.HLT


def test_the_version_is_the_one_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert idtlab.__version__ == declared


@pytest.mark.parametrize("argv", [["-m", "idtlab"], ["-m", "idtlab.cli"]])
def test_version_on_the_command_line_and_python_m_idtlab(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, *argv, "--version"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)
    assert (proc.returncode, proc.stdout) == (0, f"idtlab {idtlab.__version__}\n")


def test_python_m_idtlab_runs_a_scenario_and_exits_with_its_status() -> None:
    proc = subprocess.run([sys.executable, "-m", "idtlab", "run", "-q",
                           "idtlab/examples/demo.toml"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert (proc.returncode, proc.stdout) == (0, "7/7 expectations hold\n")


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_class_and_function_has_a_docstring_with_an_example(name: str) -> None:
    obj = getattr(idtlab, name)
    assert inspect.isclass(obj) or inspect.isfunction(obj)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    assert ">>>" in doc, f"{name}'s docstring has no example"


@pytest.mark.parametrize("module", idtlab_modules())
def test_the_docstring_examples_of_every_idtlab_module_run_as_written(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0
