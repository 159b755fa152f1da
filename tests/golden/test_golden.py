"""Every shipped scenario, image and explore example gives byte for byte the output it
gave when the data files were recorded (see cases.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden.cases import DATA, Case, cases, produce


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_output_is_byte_identical_to_the_recorded_one(case: Case, tmp_path: Path) -> None:
    expected = (DATA / case.name).read_bytes()
    got = produce(case, tmp_path)
    if got != expected:
        got_lines, want_lines = got.decode().splitlines(), expected.decode().splitlines()
        first = next((i for i, (a, b) in enumerate(zip(got_lines, want_lines, strict=False))
                      if a != b), min(len(got_lines), len(want_lines)))
        pytest.fail(f"{case.name}: first difference at line {first + 1}:\n"
                    f"  recorded: {want_lines[first] if first < len(want_lines) else '<end>'}\n"
                    f"  now:      {got_lines[first] if first < len(got_lines) else '<end>'}")
