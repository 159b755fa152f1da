"""Every built-in lab against its starter, its reference solution and the classic wrong
solutions (tests/labs/solutions/NN-name/, never installed): the starter fails with the
message the lab intends, the reference gets every point, and each wrong solution fails a
hidden check whose message names the event and the instruction boundary that broke it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from idtlab.labs import folder, grading

SOLUTIONS = Path(__file__).resolve().parent / "solutions"
LABS = [lab.name for lab in folder.all_labs(None)]

# What the starter must say: (check, a fragment of its failure lines). The starter may
# pass checks not listed (lab 5 and 7 start from a handler that is right for one event).
STARTER_FAILS: dict[str, list[tuple[str, str]]] = {
    "01-first-gate": [
        ("one-breakpoint", "outcome: expected exit, got shutdown (triple fault"),
        ("three-breakpoints", "bp_count: expected 0x3, got 0x0"),
        ("registers-preserved", "outcome: expected hlt, got shutdown"),
        ("interrupt-at-every-boundary", "execution never reaches the window start 'bp_handler'"),
    ],
    "02-page-faults": [
        ("demand-zero", "exit code: expected 0, got 238"),
        ("reject-user-write", "killed_addr: expected 0x600010, got 0x0"),
        ("user-faults", "killed_error: expected 0x4, got 0x0"),
        ("interrupts-in-the-handler", "the explorer could not run"),
    ],
    "03-stacks": [
        ("syscalls", "serial output: expected 'hi', got ''"),
        ("guard-page", "df_rsp: expected 0x7d000, got 0x0"),
        ("user-registers", "exit code: expected 0, got None"),
        ("nmi-everywhere", "execution never reaches the window start 'kernel_recurse'"),
    ],
    "04-timer-idle": [
        ("three-ticks", "exit code: expected 3, got None"),
        ("device-wakes-idle", "exit code: expected 1, got None"),
        ("idle-with-timer", "exit code: expected 2, got None"),
        ("lost-wakeup", "exit code: expected 1, got None"),
    ],
    "05-nmi-ist": [
        ("nmi-in-the-body", "outcome: expected exit, got max_insns"),
        ("one-more-nmi", "NMI at nmi_handler (#1)"),
        ("two-more-nmis", "NMI at nmi_handler (#1)"),
    ],
    "06-async-pf": [
        ("async-pf", "sleep_token: expected 0x1"),
        ("nmi-fixup", "fixups: expected 0x1, got 0x0"),
        ("nmi-at-pf-entry", "sleep_token: expected 0x1"),
        ("nmi-everywhere-in-pf", "NMI at pf_handler (#1), before `push rax`"),
    ],
    "07-ve-rearm": [
        ("two-ves", "exit code: expected 2, got 1"),
        ("nmi-in-ve-handler", "ve_info+4 (4 bytes): expected 0x0, got 0xffffffff"),
        ("revoke-in-ve-handler", "ve_info+4 (4 bytes): expected 0x0, got 0xffffffff"),
    ],
}

# The classic mistakes: (file, hidden check, "EVENT at BOUNDARY" fragment, the broken
# expectation or invariant).
WRONG: dict[str, list[tuple[str, str, str, str]]] = {
    "01-first-gate": [
        ("wrong_trap_gate_nonatomic.s", "interrupt-at-every-boundary",
         "interrupt 0x30 at bp_handler+0xb (#1), before `add rax, 1`",
         "bp_count: expected 0x2, got 0x1"),
    ],
    "02-page-faults": [
        ("wrong_cr2_after_sti.s", "interrupts-in-the-handler",
         "interrupt 0x30 at pf_handler (#1), before `push rax`",
         "mem 0x408000 (8 bytes): expected 0xfeed, got 0x0"),
        ("wrong_pool_race.s", "interrupts-in-the-handler",
         "interrupt 0x30 at pf_decide+0x21 (#1), before `add qword ptr",
         "mem 0x408000 (8 bytes): expected 0xfeed, got 0x1234"),
    ],
    "03-stacks": [
        ("wrong_nmi_shares_ist1.s", "nmi-everywhere",
         "NMI at df_handler (#1), before `inc qword ptr",
         "frames-intact: the #DF frame at 0x90fd0 was overwritten by a NMI delivery"),
        ("wrong_nmi_without_ist.s", "nmi-everywhere",
         "NMI at kernel_recurse (#117), before `call kernel_recurse`",
         "df_rsp: expected 0x7d000, got 0x7d028"),
    ],
    "04-timer-idle": [
        ("wrong_sti_then_check.s", "lost-wakeup",
         "interrupt 0x41 at idle_loop (#1), before `sti`",
         "exit code: expected 1, got None"),
    ],
    "05-nmi-ist": [
        ("wrong_executing_flag.s", "one-more-nmi",
         "NMI at nmi_handler (#1), before `cmp qword ptr",
         "idtlab.labs.invariants:nmi_handled: the NMI delivered at icount 12"),
        ("wrong_copy_no_repeat.s", "two-more-nmis",
         "NMI at nmi_handler (#1), before `push rax`, then NMI at nmi_handler (#1)",
         "was lost: no nmi_body run started after it"),
    ],
    "06-async-pf": [
        ("wrong_nmi_saves_cr2_only.s", "nmi-everywhere-in-pf",
         "NMI at pf_handler (#1), before `push rax`",
         "sleep_token: expected 0x1, got 0x500000"),
        ("wrong_nmi_saves_nothing.s", "nmi-everywhere-in-pf",
         "NMI at pf_handler (#1), before `push rax`",
         "cr2-consistent: the #PF handler read CR2 = 0x500000"),
    ],
    "07-ve-rearm": [
        ("wrong_clear_then_iret.s", "nmi-in-ve-handler",
         "NMI at ve_handler+0x18 (#1), before `pop rax`",
         "frames-intact: the #VE frame at 0x8ffd8 was overwritten by a #VE delivery"),
        ("wrong_clear_then_iret.s", "revoke-in-ve-handler",
         "EPT revoke 0x8f000 at ve_handler+0xe (#1)",
         "outcome: expected exit, got shutdown (triple fault"),
    ],
}


def student(tmp_path: Path, lab: folder.Lab, source: Path) -> Path:
    d = tmp_path / "student"
    d.mkdir()
    shutil.copyfile(source, d / lab.files[0])
    return d


def test_there_are_at_least_seven_labs_and_every_one_has_starter_reference_and_wrong_solutions() -> None:
    assert len(LABS) >= 7
    assert sorted(STARTER_FAILS) == LABS and sorted(WRONG) == LABS
    for name in LABS:
        assert (SOLUTIONS / name / "reference.s").is_file(), name
        assert WRONG[name], name


@pytest.mark.parametrize("name", LABS)
def test_the_starter_fails_its_checks_with_the_intended_messages(tmp_path: Path, name: str) -> None:
    lab = folder.find_lab(name, None)
    g = grading.grade(lab, student(tmp_path, lab, lab.path / "starter" / lab.files[0]))
    assert not g.passed
    results = {r.check.name: r for r in g.results}
    for check, fragment in STARTER_FAILS[name]:
        r = results[check]
        assert not r.passed and r.score == 0, check
        text = "\n".join(r.lines)
        assert fragment in text, f"{check}: {fragment!r} not in:\n{text}"


@pytest.mark.parametrize("name", LABS)
def test_the_reference_solution_passes_every_check_with_full_points(tmp_path: Path, name: str) -> None:
    lab = folder.find_lab(name, None)
    g = grading.grade(lab, student(tmp_path, lab, SOLUTIONS / name / "reference.s"))
    failing = {r.check.name: r.lines for r in g.results if not r.passed}
    assert not failing
    assert g.score == g.max_score == lab.max_score > 0


@pytest.mark.parametrize(("name", "wrong", "check", "where", "what"),
                         [(name, *w) for name, ws in WRONG.items() for w in ws],
                         ids=[f"{name}:{w[0]}:{w[1]}" for name, ws in WRONG.items() for w in ws])
def test_a_classic_wrong_solution_fails_a_hidden_check_naming_the_boundary_and_the_event(
        tmp_path: Path, name: str, wrong: str, check: str, where: str, what: str) -> None:
    lab = folder.find_lab(name, None)
    c = next(c for c in lab.checks if c.name == check)
    assert not c.visible and c.kind == "explore"
    g = grading.grade(lab, student(tmp_path, lab, SOLUTIONS / name / wrong), only=check)
    [r] = g.results
    assert not r.passed and r.score == 0
    text = "\n".join(r.lines)
    assert f"the first: {where}" in text, text
    assert what in text, text
