"""The race explorer (first version): every boundary of a dynamic window, one injected
NMI per boundary, the scenario's expectations checked at each; the CR2 race of the
2020 async-#PF thread is found exactly where it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from idtlab.cli import main
from idtlab.explore import enumerate_points, explore

# The #PF handler records CR2 for the fault of `main` only (its saved RIP is the_load);
# the NMI handler takes a #PF of its own, which overwrites CR2.
SCENARIO = """
[[code]]
at = 0x100000
asm = '''
main:
    mov rcx, 0x400000
the_load:
    mov rax, qword ptr [rcx]
    mov dx, 0xf4
    out dx, al

pf_handler:
    push rax
    push rbx
pf_read_cr2:
    mov rax, cr2
    lea rbx, [rip + the_load]
    cmp qword ptr [rsp + 24], rbx
    jne skip
    mov qword ptr [main_cr2], rax
skip:
    add qword ptr [rsp + 24], 3
    pop rbx
    pop rax
    add rsp, 8
pf_done:
    iretq

nmi_handler:
    push rcx
    mov rcx, 0x500000
    mov rcx, qword ptr [rcx]
    pop rcx
    iretq
'''
[[data]]
at = 0x110000
symbol = "main_cr2"
size = 8
[idt]
2 = { handler = "nmi_handler", ist = 1 }
14 = { handler = "pf_handler" }
[tss]
ist1 = 0x90000
[[pages]]
va = 0x400000
present = false
[[pages]]
va = 0x500000
present = false
[run]
entry = "main"
[[expect]]
mem = "main_cr2"
equals = 0x400000
"""


@pytest.fixture()
def scenario(tmp_path: Path) -> Path:
    p = tmp_path / "cr2.toml"
    p.write_text(SCENARIO)
    return p


def test_points_are_the_boundaries_of_the_window_in_execution_order(scenario: Path) -> None:
    points = enumerate_points(scenario, "pf_handler", "pf_done")
    assert [p.label for p in points] == [
        "pf_handler (#1)", "pf_handler+0x1 (#1)", "pf_read_cr2 (#1)", "pf_read_cr2+0x3 (#1)",
        "pf_read_cr2+0xa (#1)", "pf_read_cr2+0xf (#1)", "pf_read_cr2+0x11 (#1)", "skip (#1)",
        "skip+0x6 (#1)", "skip+0x7 (#1)", "skip+0x8 (#1)", "pf_done (#1)"]  # add [rsp+24],3 is 6 bytes
    assert points[0].icount == 1 and points[0].insn == "push rax"  # right after the delivery


def test_the_cr2_race_breaks_exactly_the_boundaries_before_the_cr2_read(scenario: Path) -> None:
    findings = explore(scenario, "nmi", "pf_handler", "pf_done")
    broken = [f.point.label for f in findings if not f.ok]
    assert broken == ["pf_handler (#1)", "pf_handler+0x1 (#1)", "pf_read_cr2 (#1)"]
    assert "expected 0x400000, got 0x500000" in findings[0].failures[0]


def test_saving_cr2_in_the_nmi_handler_closes_the_race(tmp_path: Path) -> None:
    fixed = SCENARIO.replace('''nmi_handler:
    push rcx
    mov rcx, 0x500000
    mov rcx, qword ptr [rcx]
    pop rcx''', '''nmi_handler:
    push rcx
    push rax
    mov rax, cr2
    mov rcx, 0x500000
    mov rcx, qword ptr [rcx]
    mov cr2, rax
    pop rax
    pop rcx''')
    p = tmp_path / "fixed.toml"
    p.write_text(fixed)
    assert all(f.ok for f in explore(p, "nmi", "pf_handler", "pf_done"))


def test_a_loop_gives_one_point_per_arrival(tmp_path: Path) -> None:
    p = tmp_path / "loop.toml"
    p.write_text('''
[[code]]
at = 0x100000
asm = """
main:
    mov ecx, 3
again:
    dec ecx
    jnz again
done:
    hlt
nmi_handler:
    iretq
"""
[idt]
2 = { handler = "nmi_handler" }
[run]
entry = "main"
[[expect]]
outcome = "hlt"
''')
    labels = [pt.label for pt in enumerate_points(p, "again", "done")]
    assert labels == ["again (#1)", "again+0x2 (#1)", "again (#2)", "again+0x2 (#2)", "again (#3)",
                      "again+0x2 (#3)", "done (#1)"]


def test_the_report_is_the_same_with_one_or_two_worker_processes(scenario: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", str(scenario), "--window", "pf_handler..pf_done", "--json"]) == 1
    one = capsys.readouterr().out
    assert main(["explore", str(scenario), "--window", "pf_handler..pf_done", "--json",
                 "--jobs", "2"]) == 1
    two = capsys.readouterr().out
    assert one == two
    assert sum(1 for f in json.loads(one)["findings"] if f["failures"]) == 3


def test_bad_windows_are_one_line_errors_with_status_2(scenario: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", str(scenario), "--window", "pf_handler"]) == 2
    assert "expected START..END" in capsys.readouterr().err
    assert main(["explore", str(scenario), "--window", "nmi_handler..pf_done"]) == 2
    assert "never reaches the window start 'nmi_handler'" in capsys.readouterr().err


def test_pairs_cover_every_ordered_pair_and_break_where_either_nmi_lands_before_the_read(
        scenario: Path) -> None:
    findings = explore(scenario, ("nmi", "nmi"), "pf_handler", "pf_done")
    n = 12
    assert len(findings) == n * (n + 1) // 2
    early = {"pf_handler (#1)", "pf_handler+0x1 (#1)", "pf_read_cr2 (#1)"}
    for f in findings:
        if f.schedule[0].label in early:
            assert not f.ok, f.name  # the first NMI alone breaks it
    # Two NMIs can also break it after the read: the second, latched while the first
    # one's #PF handler runs, lands on the NMI IST after that handler's IRET and the
    # outer NMI returns through a clobbered frame (the run no longer finishes).
    late = [f for f in findings if f.schedule[0].label not in early and not f.ok]
    assert late and all(f.outcome == "max_insns" for f in late)


def test_a_random_search_finds_the_race_and_shrinks_it_to_one_nmi_at_the_earliest_point(
        scenario: Path) -> None:
    from idtlab.explore import random_search

    findings, minimal = random_search(scenario, ("nmi",), "pf_handler", "pf_done", count=12,
                                      seed=3, max_events=3)
    again, _ = random_search(scenario, ("nmi",), "pf_handler", "pf_done", count=12, seed=3,
                             max_events=3)
    assert [f.name for f in findings] == [f.name for f in again]  # deterministic per seed
    assert any(not f.ok for f in findings) and minimal is not None
    assert [p.label for p in minimal.schedule] == ["pf_handler (#1)"]
    assert not minimal.ok


def test_the_frames_intact_invariant_flags_a_nested_nmi_on_the_same_ist(tmp_path: Path) -> None:
    p = tmp_path / "nmi.toml"
    p.write_text('''
[[code]]
at = 0x100000
asm = """
main:
    int3
done:
    mov dx, 0xf4
    out dx, al
bp_handler:                 # IST1
    nop
bp_iret:
    iretq
nmi_handler:                # IST1 too: a nested NMI lands on the #BP frame
    iretq
"""
[idt]
2 = { handler = "nmi_handler", ist = 1 }
3 = { handler = "bp_handler", ist = 1 }
[tss]
ist1 = 0x90000
[run]
entry = "main"
''')
    findings = explore(p, "nmi", "bp_handler", "bp_iret", invariants=("frames-intact",))
    assert [f.ok for f in findings] == [False, False]
    assert "invariant frames-intact: the #BP frame at 0x8ffd8 was overwritten by a NMI" in \
        findings[0].failures[0]


def test_the_html_report_groups_the_points_and_shows_a_timeline_per_counterexample(
        scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert main(["explore", str(scenario), "--window", "pf_handler..pf_done", "--html",
                 str(out)]) == 1
    page = out.read_text()
    assert page.count("<details class='group st-breaks'") == 1
    assert page.count("<details class='group st-ok'") == 1
    assert "3 sched." in page and "9 sched." in page
    assert "Counterexample 1: nmi @ pf_handler (#1)" in page
    assert "id='legend'" in page and "id='parameters'" in page
    assert "<code>pf_handler..pf_done</code>: 12 points" in page
    # One file, nothing fetched: no external script, style, image or font.
    assert not re.search(r"<link|<script src|<img|@import|url\(", page)
