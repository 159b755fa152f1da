"""Every shipped scenario, image and explore example gives byte for byte the output it
gave when the data files were recorded (see cases.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_images.vmx_ve import build as vmx_ve_build
from tests.golden.cases import DATA, Case, cases, produce


@pytest.fixture(scope="module", autouse=True)
def vmx_ve_image() -> None:
    """guest_images/vmx_ve/guest.toml loads build/vmx_ve.elf, which the scenario loader
    does not build (only guest_images/build/ images): on a fresh checkout nothing had
    built it before this module ran, and its golden cases failed."""
    vmx_ve_build.build()


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
