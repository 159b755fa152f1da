"""The explorer's output quoted in docs/explorer.md is what the explorer prints: each
```-block that starts with `$ idtlab explore ...` is run and compared line by line (a
line `...` stands for any number of lines)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from idtlab.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "explorer.md"


def _blocks() -> list[tuple[list[str], list[str]]]:
    out = []
    for block in re.findall(r"```\n(\$ idtlab explore .*?)```", DOC.read_text(), re.S):
        lines = block.rstrip("\n").splitlines()
        command = lines.pop(0)[2:]
        while command.endswith("\\"):
            command = command[:-1] + lines.pop(0).strip()
        out.append((shlex.split(command)[1:], lines))
    return out


BLOCKS = _blocks()


def test_the_doc_quotes_the_explorer() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("argv, expected", BLOCKS, ids=[" ".join(a[1:3]) for a, _ in BLOCKS])
def test_a_quoted_run_prints_what_the_doc_says(argv: list[str], expected: list[str]) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.chdir(ROOT):
        main(argv)
    got = buf.getvalue().splitlines()
    if "..." in expected:
        cut = expected.index("...")
        head, tail = expected[:cut], expected[cut + 1:]
        assert got[:len(head)] == head and got[len(got) - len(tail):] == tail
    else:
        assert got == expected
