"""The repository stands alone: its code, docs, examples and tests cite the Intel SDM
(volume and section title), Linux files, LKML threads and Bochs or QEMU functions, never
notes that live outside it, and its comments describe the code, not its history."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Notes a reader of this repository does not have, and history words. The repository's
# own docs/fred.md is cited by its path ("docs/fred.md", or a link target "(fred.md)"
# inside docs/); a bare "fred.md" is someone else's note.
OUTSIDE = re.compile(r"shared/|(?:semantics|unicorn|style|timing|reference-emulators|"
                     r"vmx-events)\.md|(?<![/(])fred\.md|docs/ARCHITECTURE\.md")
HISTORY = re.compile(r"\bissue[- ]\d|\bstop \d+\b", re.IGNORECASE)
AREAS = ("cpu", "idt", "idtlab", "guest_images", "tests", "docs", "benchmarks", "top level")


def tracked(area: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    me = Path(__file__).resolve()
    paths = []
    for name in out:
        top = name.split("/")[0] if "/" in name else "top level"
        path = ROOT / name
        if top == area and path != me and not name.startswith("tests/golden/data/"):
            paths.append(path)
    return paths


def citations(paths: list[Path], pattern: re.Pattern[str]) -> list[str]:
    found = []
    for path in paths:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    return found


@pytest.mark.parametrize("area", AREAS)
def test_no_file_cites_notes_outside_the_repository(area: str) -> None:
    assert tracked(area)
    assert citations(tracked(area), OUTSIDE) == []


@pytest.mark.parametrize("area", AREAS)
def test_no_comment_tells_the_history_of_the_code(area: str) -> None:
    assert citations(tracked(area), HISTORY) == []


@pytest.mark.parametrize(("line", "outside", "history"), [
    # The team-folder citation the check exists to catch, assembled so that this file
    # does not itself contain one.
    ("# see " + "shared" + "/docs/semantics.md §6.2", True, False),
    ("(unicorn.md fact 4)", True, False),
    ("# issue 4: reference runners", False, True),
    ("the issue-6 table", False, True),
    ("(unicorn-engine/unicorn issue #1883)", False, False),
    ("SDM Vol. 3A \"Handling Multiple NMIs\"", False, False),
])
def test_the_patterns_catch_what_they_are_meant_to(line: str, outside: bool, history: bool) -> None:
    assert bool(OUTSIDE.search(line)) == outside
    assert bool(HISTORY.search(line)) == history
