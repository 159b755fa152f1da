"""`idtlab run`'s timeline explains itself: a legend (`--legend`, and a hint under every
timeline), the instruction at each delivery, the end named by the instruction that
ended the run, a verdict when the guest is stuck in a loop, repeats collapsed, an icount
column that never goes backwards, colour only on a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from idtlab.cli import main
from idtlab.trace import HINT, LEGEND
from tests.scenario.test_cli import ROOT

EXAMPLES = ROOT / "idtlab" / "examples"


def test_legend_explains_every_symbol_the_timeline_uses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--legend"]) == 0
    out = capsys.readouterr().out
    for symbol in ("~ ", "! ", "!! ", "(#k)", "\u00d7", "returns to", "before X", "at X",
                   "stack=", "LATCHED", "DROPPED"):
        assert symbol in out, symbol
    assert out.splitlines()[1:] == [f"  {line}" for line in LEGEND]


def test_the_naive_nmi_run_collapses_its_iret_loop_and_says_the_guest_is_stuck(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "nested_nmi_naive.toml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "    15..39  13 \u00d7 iret at nmi_after_int3+0x1 -> nmi_after_int3 rsp=0x121fd0 " \
        "cpl 0" in lines
    assert sum("iret at nmi_after_int3+0x1" in line for line in lines) == 2
    assert ("verdict: the guest is stuck: the run ends in 13 identical IRETs (at "
            "nmi_after_int3+0x1, to nmi_after_int3) until the instruction limit") in lines
    assert HINT in lines
    assert ("         4    #BP software: int3 at nmi_handler+0x8, returns to nmi_after_int3 "
            "-> bp_handler  stack=current rsp=0x121fa8 cpl 0->0") in lines


def test_an_exit_names_the_out_instruction_that_ended_the_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "explore" / "cr2_race.toml")]) == 0
    end = [line for line in capsys.readouterr().out.splitlines() if " end: " in line]
    # RIP is pf_handler after the OUT: the line names the OUT, not the label after it.
    assert end == ["        41  end: exit after the_load+0x7: out dx, al (exit device: 0x0)"]


def test_the_icount_column_never_goes_backwards_in_either_mode(tmp_path: Path) -> None:
    # The timer handler writes a serial line, then EOIs: in fast mode the serial record
    # used to carry the count of the end of its translation block (19, then 16).
    for mode in ("fast", "timed"):
        out = tmp_path / f"{mode}.jsonl"
        assert main(["run", str(EXAMPLES / "apic_timer_idle.toml"), "--mode", mode, "-q",
                     "--trace", str(out)]) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        counts = [r["icount"] for r in records]
        assert counts == sorted(counts), mode
        assert [r["icount"] for r in records if r["kind"] == "serial"] == [15, 30, 45], mode


def _run(env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "idtlab.cli", "run",
                           str(EXAMPLES / "nested_nmi_naive.toml")], capture_output=True,
                          text=True, cwd=ROOT, timeout=120,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("NO_COLOR", "FORCE_COLOR")} | env)
    return proc.stdout


def test_colour_only_on_a_terminal_or_when_forced_and_never_with_no_color() -> None:
    assert "\x1b[" not in _run({})  # a pipe is not a terminal
    forced = _run({"FORCE_COLOR": "1"})
    assert "\x1b[31;1m!! NMI frame at 0x121fd8" in forced
    assert "\x1b[31;1mverdict: the guest is stuck" in forced
    assert "\x1b[" not in _run({"FORCE_COLOR": "1", "NO_COLOR": "1"})


ALL_EXAMPLES = sorted(EXAMPLES.rglob("*.toml"))


@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=[str(p.relative_to(EXAMPLES))
                                                    for p in ALL_EXAMPLES])
def test_every_shipped_example_has_an_icount_that_never_decreases_in_fast_mode(path: Path) -> None:
    from idtlab import scenario as scn

    sc = scn.load(path, mode="fast")
    counts = [r["icount"] for r in scn.run(sc).trace.records]
    assert counts == sorted(counts)
