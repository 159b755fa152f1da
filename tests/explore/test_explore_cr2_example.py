"""The shipped CR2-race example: exactly the boundaries from the #PF handler's entry
through its CR2 read break, with the naive NMI handler; none with Linux's fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from idtlab import explore as ex
from idtlab import scenario as scn
from idtlab.cli import main

EXAMPLES = Path(ex.__file__).parent / "examples" / "explore"


def test_the_cr2_race_breaks_every_boundary_up_to_and_including_the_cr2_read() -> None:
    path = EXAMPLES / "cr2_race.toml"
    sym = scn.load(path).symbols
    findings = ex.explore(path, "nmi", "pf_handler", "pf_done", invariants=("cr2-consistent",))
    # Expected from the code's layout: an NMI taken before `mov rsi, cr2` executes (at
    # any boundary from the entry to that instruction) has its own #PF rewrite CR2 first.
    expected = [sym["pf_handler"] <= f.point.rip <= sym["pf_read_cr2"] for f in findings]
    assert [not f.ok for f in findings] == expected
    assert sum(expected) == 16 and len(findings) == 38
    assert findings[0].failures == (  # the invariant first: it names the mechanism
        f"invariant cr2-consistent: the #PF handler read CR2 = 0x500000 at "
        f"{sym['pf_read_cr2']:#x}, but its #PF was for 0x400000",
        "[[expect]] #1: mem 0x110000 (8 bytes): expected 0x400000, got 0x500000")


def test_with_cr2_saved_and_restored_in_the_nmi_handler_no_boundary_breaks() -> None:
    findings = ex.explore(EXAMPLES / "cr2_race_safe.toml", "nmi", "pf_handler", "pf_done",
                          invariants=("cr2-consistent",))
    assert len(findings) == 38 and all(f.ok for f in findings)


@pytest.mark.parametrize("name, status", [("cr2_race.toml", 1), ("cr2_race_safe.toml", 0)])
def test_the_command_line_exit_status_gates_on_the_findings(
        name: str, status: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", str(EXAMPLES / name), "--event", "nmi", "--window",
                 "pf_handler..pf_done", "--invariant", "cr2-consistent"]) == status
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"38 schedules, {16 if status else 0} break an expectation " \
        "or invariant"
