"""The CLI contract: exit statuses, one-line errors, deterministic traces, shipped examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idtlab.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
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
3 = { handler = "bp_handler", ist = 1 }
[tss]
ist1 = 0x90000
[run]
entry = "main"
[[expect]]
deliveries = ["#BP"]
[[expect]]
outcome = "hlt"
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "idtlab.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_the_delivery_demo_runs_and_every_expectation_holds() -> None:
    proc = run_cli("demo", "delivery")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7/7 expectations hold" in proc.stdout
    assert "stack=ist1" in proc.stdout and "stack=rsp0" in proc.stdout


def test_the_default_demo_shows_the_latched_nmi_overwriting_the_outer_nmi_frame() -> None:
    proc = run_cli("demo", "--cycles")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LATCHED (NMIs blocked)" in proc.stdout
    assert "overwrites the live NMI frame" in proc.stdout
    assert "rip     0x100007 -> 0x100025  <- changed" in proc.stdout  # old vs new slot values
    assert "3/3 expectations hold" in proc.stdout
    assert "cycle" in proc.stdout.splitlines()[1]


def test_mode_on_the_command_line_overrides_the_scenario_and_changes_only_cycle_stamps(tmp_path: Path) -> None:
    sc = write(tmp_path, GOOD.replace("    int3\n", "    cpuid\n    int3\n"))  # cpuid: ~100 cycles timed
    fast, timed = tmp_path / "f.jsonl", tmp_path / "t.jsonl"
    assert main(["run", str(sc), "--trace", str(fast), "-q", "--mode", "fast"]) == 0
    assert main(["run", str(sc), "--trace", str(timed), "-q", "--mode", "timed"]) == 0
    f = [json.loads(line) for line in fast.read_text().splitlines()]
    t = [json.loads(line) for line in timed.read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "cycle"} for r in f]
    assert strip == [{k: v for k, v in r.items() if k != "cycle"} for r in t]
    assert [r["cycle"] for r in f] != [r["cycle"] for r in t]


def test_the_safe_demo_survives_the_same_nmi_schedule() -> None:
    proc = run_cli("demo", "nested-nmi-safe")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "end: exit after work+0x13: out dx, al" in proc.stdout
    assert "4/4 expectations hold" in proc.stdout


def test_a_passing_scenario_exits_0_and_a_failing_expectation_exits_1(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(write(tmp_path, GOOD))]) == 0
    bad = GOOD.replace('deliveries = ["#BP"]', 'deliveries = ["#PF"]')
    assert main(["run", str(write(tmp_path, bad, "b.toml"))]) == 1
    out = capsys.readouterr().out
    assert "FAIL [[expect]] #1: deliveries: expected [#PF], got [#BP]" in out


def test_the_same_scenario_gives_a_byte_identical_trace(tmp_path: Path) -> None:
    sc = write(tmp_path, GOOD)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["run", str(sc), "--trace", str(a), "-q"]) == 0
    assert main(["run", str(sc), "--trace", str(b), "-q"]) == 0
    assert a.read_bytes() == b.read_bytes()
    records = [json.loads(line) for line in a.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["deliver", "iret", "end"]
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert all({"seq", "icount", "cycle", "kind"} <= r.keys() for r in records)


BAD_INPUTS = [
    (GOOD.replace("[run]\nentry", "[run]\nentyr"), "s.toml: [run]: unknown key 'entyr' (did you mean 'entry'?)"),
    (GOOD.replace('handler = "bp_handler"', 'handler = "bp_handlr"'), "unknown symbol 'bp_handlr'; did you mean 'bp_handler'?"),
    (GOOD.replace("3 = {", "300 = {"), "[idt] 300: vector 300 outside 0..255"),
    (GOOD.replace("    int3\n", "    int3\n    movv rax, 1\n"), "line 7"),
    (GOOD.replace("ist = 1", "ist = 9"), "[idt] 3 ist: 0x9 outside 0x0..0x7"),
    (GOOD.replace("ist = 1", 'ist = "one"'), "[idt] 3 ist: expected an integer"),
    (GOOD + "\n[[data]]\nat = 0x100000\nsize = 16\n", "overlaps"),
    (GOOD + "\n[[data]]\nat = 0x2000000\nsize = 16\n", "outside guest memory"),
    (GOOD + "\n[bogus]\nx = 1\n", "top level: unknown table 'bogus'"),
    ("[run\nentry = 1", "TOML syntax error"),
    (GOOD + '\n[[image]]\nelf = "nope.elf"\n', "nope.elf"),
    (GOOD.replace('outcome = "hlt"', 'outcome = "halt"'), "'halt' is not one of"),
    (GOOD + '\n[[inject]]\nevent = "nmii"\n', "[[inject]] #1 event: 'nmii' is not one of nmi, interrupt, async_pf, ept_revoke (did you mean 'nmi'?)"),
    (GOOD + '\n[[inject]]\nevent = "nmi"\nbefore = "mian"\n', "unknown symbol 'mian'; did you mean 'main'?"),
    (GOOD + '\n[[inject]]\nevent = "nmi"\nicount = 3\ncycle = 9\n', "[[inject]] #1: give at most one of before, icount, cycle"),
    (GOOD + '\n[[inject]]\nevent = "interrupt"\n', "[[inject]] #1: an interrupt needs 'vector' (16..255)"),
    (GOOD + '\n[[inject]]\nevent = "interrupt"\nvector = 8\n', "[[inject]] #1 vector: 0x8 outside 0x10..0xff"),
    (GOOD + '\n[[inject]]\nevent = "nmi"\nvector = 0x30\n', "[[inject]] #1 vector: an nmi has no vector"),
    (GOOD + '\n[[inject]]\nevent = "nmi"\nhit = 2\n', "'hit' counts arrivals at a 'before' address"),
    (GOOD + '\n[[inject]]\nevent = "nmi"\nbefor = "main"\n', "unknown key 'befor' (did you mean 'before'?)"),
    (GOOD + '\n[machine]\nmode = "slow"\n', "[machine] mode: 'slow' is not one of fast, timed"),
    (GOOD + '\n[machine]\nprofile = "nope.toml"\n', "[machine] profile"),
    (GOOD + '\n[machine]\napic = false\n[[inject]]\nevent = "interrupt"\nvector = 0x30\n', "needs the local APIC"),
    (GOOD + '\n[[expect]]\nkinds = "deliver"\n', "kinds: expected a list of trace kinds"),
]


@pytest.mark.parametrize(("text", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(tmp_path: Path, text: str,
                                                           message: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("idtlab: error: ")
    assert message in err
    assert "Traceback" not in err


def test_an_elf_that_is_not_x86_64_is_rejected_with_exit_status_2(tmp_path: Path) -> None:
    src = tmp_path / "x.S"
    src.write_text(".text\n.globl _start\n_start: nop\n")
    obj, elf = tmp_path / "x.o", tmp_path / "x.elf"
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-o", str(elf), str(obj)], check=True)
    sc = write(tmp_path, GOOD + '\n[[image]]\nelf = "x.elf"\n')
    proc = run_cli("run", str(sc))
    assert proc.returncode == 2
    assert "x86-64" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["bp_ist", "pf_demo"])
def test_the_shipped_guest_image_scenarios_pass(name: str) -> None:
    proc = run_cli("run", f"guest_images/{name}.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout


def test_the_ve_rearm_race_demo_shows_both_handler_designs_side_by_side() -> None:
    proc = run_cli("demo", "ve-rearm-race")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "ve_rearm_race_clear_then_iret.toml" in first and "ve_rearm_race_deferred.toml" in first
    assert "overwrites the live #VE frame" in proc.stdout  # design 1: nested #VE on IST1
    assert "VM EXIT (EPT violation" in proc.stdout          # design 2: busy word still set
    assert "ve_rearm_race_clear_then_iret.toml: max_insns; 3/3 expectations hold" in proc.stdout
    assert "ve_rearm_race_deferred.toml: exit; 5/5 expectations hold" in proc.stdout


def test_compare_exits_1_when_an_expectation_of_either_scenario_fails(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD, "a.toml")
    bad = write(tmp_path, GOOD.replace('deliveries = ["#BP"]', 'deliveries = ["#PF"]'), "b.toml")
    assert main(["compare", str(good), str(good)]) == 0
    assert main(["compare", str(good), str(bad)]) == 1


LONG = """
[[code]]
at = 0x100000
asm = '''
main:
    mov rcx, 500
again:
    int3
    dec rcx
    jnz again
    hlt
bp_handler:
    iretq
'''
[idt]
3 = { handler = "bp_handler" }
[run]
entry = "main"
"""


def test_trace_tail_keeps_the_last_records_and_says_how_many_went(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, LONG)
    out_path = tmp_path / "t.jsonl"
    assert main(["run", str(path), "--trace-tail", "4", "--trace", str(out_path)]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    # 500 deliveries, 500 IRETs and the end: 1001 records, the last 4 kept.
    assert [r["kind"] for r in records] == ["iret", "deliver", "iret", "end"]
    assert [r["seq"] for r in records] == [997, 998, 999, 1000]
    assert "(997 earlier records not kept: --trace-tail)" in out


def test_trace_tail_is_refused_for_a_scenario_with_expectations(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert main(["run", str(path), "--trace-tail", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trace-tail" in err[0] and "[[expect]]" in err[0]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_trace_tail_below_one_is_bad_input(tmp_path: Path, value: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, LONG)
    assert main(["run", str(path), "--trace-tail", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"idtlab: error: run: --trace-tail {value}: keep at least 1 record"]


def test_trace_tail_keeps_the_last_records_of_an_image_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "t.jsonl"
    assert main(["run", "--image", "int_gates", "--trace", str(out_path), "--quiet",
                 "--trace-tail", "3"]) == 0
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(records) == 3 and records[-1]["kind"] == "end"
    assert records[0]["seq"] == records[-1]["seq"] - 2 > 0
