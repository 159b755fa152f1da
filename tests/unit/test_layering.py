"""The layering rule of docs/style.md: the model in `idt/` never touches the engine, and
`cpu/engine.py` (with its context-blob probe) is the only code that imports `unicorn`.

The sources are parsed, not imported, so a violation is found even in a module that
nothing imports yet, and this test needs neither Unicorn nor the native counter.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cpu", "idt", "idtlab")
IMPORTERS = ("__import__", "import_module")


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_roots(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, top-level package) for every import in `path`, including
    `importlib.import_module("x")` / `__import__("x")` with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).parts[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the package
                yield node.lineno, package
            elif node.module:
                yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (name in IMPORTERS and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                yield node.lineno, node.args[0].value.split(".")[0]


def offenders(paths: list[Path], forbidden: set[str], root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)}:{line} imports {name}"
            for p in paths for line, name in imported_roots(p, root) if name in forbidden]


def test_the_layering_check_sees_every_package() -> None:
    for package in PACKAGES:
        assert sources(package), f"no sources found under {package}/"
    assert ROOT / "cpu" / "engine.py" in sources("cpu")


def test_no_module_under_idt_imports_unicorn_or_anything_from_cpu() -> None:
    assert offenders(sources("idt"), {"unicorn", "cpu"}) == []


def test_cpu_engine_and_its_context_probe_are_the_only_modules_that_import_unicorn() -> None:
    engine = (ROOT / "cpu" / "engine.py", ROOT / "cpu" / "engine_blob.py")
    others = [p for pkg in PACKAGES for p in sources(pkg) if p not in engine]
    assert offenders(others, {"unicorn"}) == []
    for path in engine:
        assert any(root == "unicorn" for _, root in imported_roots(path))


@pytest.mark.parametrize("snippet", [
    "import unicorn", "import unicorn.x86_const as X", "from unicorn import Uc",
    "from cpu.engine import Engine", "import importlib\nimportlib.import_module('unicorn')",
    "__import__('cpu.machine')",
])
def test_the_check_catches_every_spelling_of_an_import(tmp_path: Path, snippet: str) -> None:
    module = tmp_path / "idt" / "bad.py"
    module.parent.mkdir()
    module.write_text(snippet + "\n")
    assert offenders([module], {"unicorn", "cpu"}, root=tmp_path)


def test_a_relative_import_inside_idt_is_not_an_offence(tmp_path: Path) -> None:
    module = tmp_path / "idt" / "ok.py"
    module.parent.mkdir()
    module.write_text("from .state import ArchState\nfrom idt.vectors import Vector\n")
    assert offenders([module], {"unicorn", "cpu"}, root=tmp_path) == []
