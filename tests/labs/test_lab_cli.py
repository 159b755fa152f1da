"""`idtlab lab list|start|check|show|new`: exit statuses, one-line errors, the autograder
JSON, progress kept in the student's directory, a course's own labs with --labs-dir."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from idtlab.cli import main

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = Path(__file__).resolve().parent / "solutions"


def lab(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "idtlab.cli", "lab", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def started(tmp_path: Path, name: str = "01-first-gate") -> Path:
    d = tmp_path / "work"
    assert main(["lab", "start", name, str(d)]) == 0
    return d


def test_start_copies_the_lesson_the_starter_and_only_the_visible_checks(tmp_path: Path) -> None:
    d = started(tmp_path)
    assert sorted(p.name for p in (d / "checks").iterdir()) == ["one_breakpoint.toml",
                                                              "three_breakpoints.toml"]
    assert (d / "handler.s").read_text().startswith("# Lab 1: a first gate.")
    assert (d / "lesson.md").is_file()
    state = json.loads((d / ".idtlab" / "state.json").read_text())
    assert state["lab"] == "01-first-gate" and state["score"] is None


def test_a_visible_check_copied_to_the_student_runs_with_idtlab_run(tmp_path: Path) -> None:
    d = started(tmp_path)
    shutil.copyfile(SOLUTIONS / "01-first-gate" / "reference.s", d / "handler.s")
    assert main(["run", str(d / "checks" / "one_breakpoint.toml"), "-q"]) == 0


def test_check_exits_1_with_a_make_grade_total_when_a_check_fails(tmp_path: Path) -> None:
    d = started(tmp_path)
    proc = lab("check", str(d))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "lab 01-first-gate: A first gate"
    assert "score: 0/50 (4 of 4 checks fail)" in lines
    assert any(line.strip().startswith('hint: lesson.md, section "The IDT gate"') for line in lines)
    assert proc.stderr == ""


def test_check_exits_0_only_when_every_check_passes_and_records_progress(tmp_path: Path) -> None:
    d = started(tmp_path)
    shutil.copyfile(SOLUTIONS / "01-first-gate" / "reference.s", d / "handler.s")
    proc = lab("check", str(d))
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines()[-1] == "score: 50/50 (all checks pass)"
    state = json.loads((d / ".idtlab" / "state.json").read_text())
    assert state["score"] == state["best_score"] == state["max_score"] == 50
    assert state["failing"] == []
    listing = lab("list", str(tmp_path))
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if line.startswith("01-first-gate"))
    assert "PASSED 50/50 (best 50)" in row
    assert next(line for line in listing.stdout.splitlines()
                if line.startswith("02-page-faults")).rstrip().endswith("-")


def test_json_is_a_list_of_tests_with_name_score_max_score_and_output(tmp_path: Path) -> None:
    d = started(tmp_path)
    shutil.copyfile(SOLUTIONS / "01-first-gate" / "wrong_trap_gate_nonatomic.s", d / "handler.s")
    proc = lab("check", str(d), "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["score"] == 30 and out["max_score"] == 50
    assert [t["name"] for t in out["tests"]] == ["one-breakpoint", "three-breakpoints",
                                                 "registers-preserved",
                                                 "interrupt-at-every-boundary"]
    for t in out["tests"]:
        assert set(t) >= {"name", "score", "max_score", "output", "visibility"}
        assert isinstance(t["score"], int) and isinstance(t["max_score"], int)
        assert isinstance(t["output"], str) and t["output"]
    failed = out["tests"][3]
    assert failed["score"] == 0 and failed["max_score"] == 20
    assert failed["visibility"] == "after_due_date"
    assert "interrupt 0x30 at bp_handler+0xb (#1)" in failed["output"]
    assert out["tests"][0]["visibility"] == "visible" and out["tests"][0]["score"] == 10


def test_check_with_lab_grades_a_directory_that_was_never_started(tmp_path: Path) -> None:
    (tmp_path / "handler.s").write_text((SOLUTIONS / "04-timer-idle" / "reference.s").read_text())
    assert main(["lab", "check", str(tmp_path), "--lab", "timer-idle"]) == 0
    assert main(["lab", "check", str(tmp_path), "--lab", "4", "--only", "lost-wakeup"]) == 0


def test_the_students_assembly_error_is_a_failed_check_not_bad_input(tmp_path: Path) -> None:
    d = started(tmp_path)
    (d / "handler.s").write_text("install_gates:\n    movx rax, 1\n    ret\nbp_handler:\n    iretq\n")
    proc = lab("check", str(d))
    assert proc.returncode == 1
    assert "does not build or load: handler.s line 2" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["check", "/nonexistent/dir"], "/nonexistent/dir: no such directory"),
    (["start", "no-such-lab", "/tmp/x"], "lab 'no-such-lab': no such lab"),
    (["check", "."], "not a lab directory"),
    (["show", "/nonexistent/dir"], "/nonexistent/dir: no such directory"),
    (["list", "--labs-dir", "/nonexistent/labs"], "--labs-dir /nonexistent/labs: no such directory"),
    (["new", "Bad Name"], "a lab folder's name is lower-case letters"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(tmp_path: Path, args: list[str],
                                                             message: str) -> None:
    proc = lab(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_student_file_is_bad_input(tmp_path: Path) -> None:
    d = started(tmp_path)
    (d / "handler.s").unlink()
    proc = lab("check", str(d))
    assert proc.returncode == 2 and "handler.s: no such file" in proc.stderr


def test_bad_lab_metadata_is_bad_input_naming_the_file_and_key(tmp_path: Path) -> None:
    course = tmp_path / "course"
    course.mkdir()
    assert main(["lab", "new", "01-mine", "--labs-dir", str(course)]) == 0
    meta = course / "01-mine" / "lab.toml"
    text = meta.read_text()
    cases = [
        (text.replace('hint = "The concept"', 'hint = "No such section"'),
         "[[check]] #1 hint: 'No such section' is not a heading of lesson.md"),
        (text.replace("points = 10\nvisible = true", "points = -1\nvisible = true"),
         "[[check]] #1 points"),
        (text.replace('events = ["nmi"]', 'events = ["nmii"]'), "[[check]] #2 events"),
        (text.replace('scenario = "count.toml"', 'scenario = "nope.toml"'),
         "no file checks/nope.toml"),
        (text.replace("[lab]", "[lab]\ncolour = 1"), "[lab]: unknown key 'colour'"),
    ]
    for bad, message in cases:
        meta.write_text(bad)
        proc = lab("list", "--labs-dir", str(course))
        assert proc.returncode == 2, bad
        assert message in proc.stderr and str(meta) in proc.stderr, proc.stderr


def test_new_scaffolds_a_lab_whose_example_checks_pass_and_labs_dir_is_remembered(
        tmp_path: Path) -> None:
    course = tmp_path / "course"
    course.mkdir()
    assert main(["lab", "new", "08-fred", "--labs-dir", str(course)]) == 0
    assert main(["lab", "new", "08-fred", "--labs-dir", str(course)]) == 2
    listing = lab("list", "--labs-dir", str(course))
    assert listing.stdout.splitlines()[1].startswith("08-fred  Fred")
    d = tmp_path / "student"
    assert main(["lab", "start", "fred", str(d), "--labs-dir", str(course)]) == 0
    proc = lab("check", str(d))  # no --labs-dir: the state remembers it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "survives NMI at every boundary of bp_handler..after_bp" in proc.stdout


def test_start_refuses_to_overwrite_a_students_files(tmp_path: Path) -> None:
    d = started(tmp_path)
    proc = lab("start", "2", str(d))
    assert proc.returncode == 2 and "already exists; not overwriting" in proc.stderr


def test_show_writes_one_self_contained_page_with_the_lesson_timeline_and_pictures(
        tmp_path: Path) -> None:
    d = started(tmp_path)
    shutil.copyfile(SOLUTIONS / "01-first-gate" / "wrong_trap_gate_nonatomic.s", d / "handler.s")
    assert main(["lab", "check", str(d)]) == 1
    assert main(["lab", "show", str(d)]) == 0
    page = (d / "lab.html").read_text()
    assert page.count("<svg") >= 6 and "class='timeline'" in page
    assert "<h2 id='the-idt-gate'>The IDT gate</h2>" in page
    assert "64-bit trap gate: IF unchanged" in page
    for external in ("src='http", "href='http", "<script", "<link"):
        assert external not in page


def test_show_text_prints_the_timeline_and_the_stack_pictures(tmp_path: Path) -> None:
    d = started(tmp_path, "07-ve-rearm")
    shutil.copyfile(SOLUTIONS / "07-ve-rearm" / "wrong_clear_then_iret.s", d / "handler.s")
    assert main(["lab", "check", str(d)]) == 1
    proc = lab("show", str(d), "--text")
    assert proc.returncode == 0
    assert "overwrites the live #VE frame (pushed at icount 3): old -> new" in proc.stdout
    assert "stack: IST1 (TSS.IST1 = 0x90000)" in proc.stdout
    assert "type              bits 43:40   0xe" in proc.stdout


def test_show_before_any_check_says_there_is_no_run_yet(tmp_path: Path) -> None:
    d = started(tmp_path)
    proc = lab("show", str(d))
    assert proc.returncode == 0 and "no run yet" in proc.stdout
    assert "No run yet" in (d / "lab.html").read_text()
