"""Every bad input ends with one line on stderr and exit status 2, never a traceback, and
never after the work was done: files that are not UTF-8, sizes and ranges the machine
cannot hold, numeric options out of range, output paths that cannot be written, and
assembly Keystone would hang on."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from idtlab.cli import main

GOOD = """
[machine]
memory = "16M"
[[code]]
at = 0x100000
asm = '''
main:
    int3
    hlt
bp_handler:
    iretq
'''
[idt]
3 = { handler = "bp_handler" }
[run]
entry = "main"
"""


def scenario(tmp_path: Path, text: str = GOOD, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def fails_cleanly(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr. Returns that line."""
    status = main(list(argv))
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("idtlab: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["run", "compare", "explore"])
def test_a_scenario_that_is_not_utf8_is_one_line_naming_the_byte(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes(GOOD.encode() + b"# caf\xe9\n")
    extra = ["--window", "main.."] if command == "explore" else []
    line = fails_cleanly(capsys, command, str(p), *extra)
    assert "not UTF-8 text (byte 0xe9 at line 17, column 6)" in line


def test_an_assembly_file_that_is_not_utf8_is_one_line(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "code.s").write_bytes(b"main:\n    hlt  # \xff\n")
    p = scenario(tmp_path, '[[code]]\nat = 0x100000\nfile = "code.s"\n[run]\nentry = "main"\n')
    assert "not UTF-8 text (byte 0xff" in fails_cleanly(capsys, "run", str(p))


@pytest.mark.parametrize("memory", ['"4G"', '"5000M"', '"1K"', "0x100001"])
def test_a_memory_size_the_machine_cannot_have_is_rejected_when_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], memory: str) -> None:
    p = scenario(tmp_path, GOOD.replace('"16M"', memory))
    assert "[machine] memory" in fails_cleanly(capsys, "run", str(p))


def test_run_image_memory_is_checked_by_the_same_rule(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails_cleanly(capsys, "run", "--image", "int_gates", "--memory", "4G")
    assert "I/O APIC" in line


def test_a_page_override_over_the_machines_gdt_page_is_rejected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = scenario(tmp_path, GOOD + "[[pages]]\nva = 0x1000\npresent = false\n")
    assert "unmaps or moves the machine's GDT and TSS page" in fails_cleanly(capsys, "run", str(p))


def test_an_ept_range_beyond_the_machines_physical_space_is_rejected_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = scenario(tmp_path, GOOD + "[[ept]]\ngpa = 0\nsize = 0x10000000000\n")
    started = time.monotonic()
    assert "[[ept]] #1 size" in fails_cleanly(capsys, "run", str(p))
    assert time.monotonic() - started < 10


def test_an_expected_delivery_of_vector_999_is_rejected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = scenario(tmp_path, GOOD + "[[expect]]\ndeliveries = [999]\n")
    assert "vector 999 outside 0..255" in fails_cleanly(capsys, "run", str(p))


@pytest.mark.parametrize("asm", ["'\\n'", "'nop; \\n'", "'x: \\'", "'.byte \\'",
                                 "'.ascii \"\\\"'"])
def test_a_backslash_keystone_would_hang_on_is_rejected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], asm: str) -> None:
    p = scenario(tmp_path, f"[[code]]\nat = 0x100000\nasm = {asm}\n[run]\nentry = 0x100000\n")
    started = time.monotonic()
    line = fails_cleanly(capsys, "run", str(p))
    assert "backslash outside a string" in line or "is not closed" in line
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("option", ["--trace", "--html"])
def test_an_output_path_in_a_missing_directory_is_rejected_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    p = scenario(tmp_path)
    out = str(tmp_path / "no" / "such" / "out")
    if option == "--trace":
        line = fails_cleanly(capsys, "run", str(p), option, out)
    else:
        line = fails_cleanly(capsys, "explore", str(p), "--window", "main..", option, out)
    assert f"{option} {out}: no such directory" in line


def test_an_output_path_that_is_a_directory_is_rejected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails_cleanly(capsys, "run", str(scenario(tmp_path)), "--trace", str(tmp_path))
    assert "is a directory" in line


@pytest.mark.parametrize(("args", "option"), [
    (["--random", "-5"], "--random -5"), (["--random", "0"], "--random 0"),
    (["--jobs", "0"], "--jobs 0"), (["--budget", "-1000"], "--budget -1000"),
    (["--max-events", "0", "--random", "3"], "--max-events 0"),
    (["--dask-timeout", "-1", "--dask", "tcp://127.0.0.1:1"], "--dask-timeout -1"),
])
def test_explore_numbers_out_of_range_are_rejected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], option: str) -> None:
    line = fails_cleanly(capsys, "explore", str(scenario(tmp_path)), "--window", "main..", *args)
    assert option in line


def test_run_max_insns_below_one_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--max-insns -5" in fails_cleanly(capsys, "run", "--image", "int_gates",
                                             "--max-insns", "-5")


def test_a_dask_address_that_is_not_one_is_rejected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("distributed")
    line = fails_cleanly(capsys, "explore", str(scenario(tmp_path)), "--window", "main..",
                         "--dask", "::::")
    assert "--dask '::::': not a scheduler address" in line


@pytest.mark.parametrize("event", ["async_pf:gpa=0x1000", "ept_revoke:0x1000"])
def test_a_host_event_for_a_guest_without_that_host_is_rejected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], event: str) -> None:
    line = fails_cleanly(capsys, "explore", str(scenario(tmp_path)), "--window", "main..",
                         "--event", event)
    assert event in line


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "idtlab.cli", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 1)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize(("table", "needle"), [
    ("[[data]]\nat = 0x200000\nsize = 0x100000000000\n", "outside guest memory"),
    ("[[pages]]\nva = 0x400000\ncount = 0x3f000\nwritable = false\n", "page tables would take"),
])
def test_sizes_beyond_what_the_machine_holds_are_rejected_before_allocating(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, needle: str) -> None:
    p = scenario(tmp_path, GOOD.replace('"16M"', '"1G"') + table)
    assert needle in fails_cleanly(capsys, "run", str(p))
