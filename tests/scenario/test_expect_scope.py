"""`[[expect]]` entries scoped to the runs they describe (`scope`: always, undisturbed,
explored with `events = N`) and values counted from the run (`{ deliveries = "NMI" }`).
The same scenario is checked by `idtlab run` (no explorer events) and by the explorer
(N events added): each entry is checked where it describes the run, and nowhere else."""

from __future__ import annotations

from pathlib import Path

import pytest

from idtlab import explore as ex
from idtlab import scenario as scn
from idtlab.cli import main

# Counts NMIs in RAX; the scenario's own [[inject]] sends one.
GUEST = """
[[code]]
at = 0x100000
asm = '''
main:
    xor eax, eax
    nop
    nop
    nop
done:
    mov dx, 0xf4
    out dx, al
nmi_handler:
    inc eax
    iretq
'''
[idt]
2 = { handler = "nmi_handler" }
[run]
entry = "main"
[[inject]]
event = "nmi"
before = "main+0x2"
"""


def _scenario(tmp_path: Path, expects: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(GUEST + expects)
    return p


def test_undisturbed_holds_for_the_scenarios_own_run_and_explored_for_the_explorers(
        tmp_path: Path) -> None:
    p = _scenario(tmp_path, """
[[expect]]
exit_code = 1
scope = "undisturbed"
[[expect]]
exit_code = 2
scope = "explored"
events = 1
[[expect]]
exit_code = 3
scope = "explored"
events = 2
""")
    sc = scn.load(p)
    assert [(e.scope, e.events) for e in sc.expects] == [
        ("undisturbed", None), ("explored", (1,)), ("explored", (2,))]
    assert scn.check(sc, scn.run(sc)) == []  # only #1 applies, and holds
    # One explorer NMI in `main`'s stretch of NOPs: two NMIs in all, #2 applies.
    assert [f.failures for f in ex.explore(p, "nmi", "main+0x3", "main+0x3")] == [()]
    # Two, at distinct points: #3 applies and holds; at the same point they merge into
    # one pending NMI (the second is dropped), so #3 fails there: a real finding.
    pairs = ex.explore(p, ("nmi", "nmi"), "main+0x3", "main+0x4")
    assert [(f.name, f.failures) for f in pairs] == [
        ("nmi @ main+0x3 (#1) + nmi @ main+0x3 (#1)", ("[[expect]] #3: exit code: expected 3, "
                                                        "got 2",)),
        ("nmi @ main+0x3 (#1) + nmi @ main+0x4 (#1)", ()),
        ("nmi @ main+0x4 (#1) + nmi @ main+0x4 (#1)", ("[[expect]] #3: exit code: expected 3, "
                                                        "got 2",))]


def test_a_count_of_deliveries_holds_however_many_nmis_a_schedule_brings(tmp_path: Path) -> None:
    p = _scenario(tmp_path, """
[[expect]]
exit_code = { deliveries = "NMI" }
[[expect]]
reg = "rax"
equals = { deliveries = 2 }
""")
    sc = scn.load(p)
    assert scn.check(sc, scn.run(sc)) == []
    pairs = ex.explore(p, ("nmi", "nmi"), "main+0x3", "main+0x4")
    assert [f.failures for f in pairs] == [(), (), ()]


def test_a_count_that_does_not_match_says_what_it_counted(tmp_path: Path) -> None:
    p = _scenario(tmp_path, """
[[expect]]
exit_code = { deliveries = "#BP" }
""")
    sc = scn.load(p)
    assert [str(f) for f in scn.check(sc, scn.run(sc))] == [
        "[[expect]] #1: exit code: expected 0 (the number of #BP deliveries), got 1"]


def test_idtlab_run_counts_only_the_expectations_that_describe_its_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _scenario(tmp_path, """
[[expect]]
outcome = "exit"
[[expect]]
exit_code = 2
scope = "explored"
""")
    assert main(["run", str(p), "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        '1/1 expectations hold (1 more describe the explorer\'s runs only: scope "explored")')


def test_invariants_only_ignores_the_expectations(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    p = _scenario(tmp_path, """
[[expect]]
exit_code = 1
""")
    assert main(["explore", str(p), "--window", "main+0x3..main+0x3"]) == 1
    capsys.readouterr()
    assert main(["explore", str(p), "--window", "main+0x3..main+0x3", "--invariants-only",
                 "--invariant", "no-shutdown"]) == 0
    assert main(["explore", str(p), "--window", "main+0x3..main+0x3",
                 "--invariants-only"]) == 2
    assert "--invariants-only: give the invariants to check" in capsys.readouterr().err


def test_a_baseline_that_already_breaks_is_said_first(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    p = _scenario(tmp_path, """
[[expect]]
exit_code = 7
""")
    assert main(["explore", str(p), "--window", "main+0x3..main+0x3"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == ["note: the run without the explorer's events already breaks (every "
                       "schedule inherits this):",
                       "    [[expect]] #1: exit code: expected 7, got 1"]


@pytest.mark.parametrize("expect, message", [
    ('exit_code = 1\nscope = "sometimes"', "[[expect]] #1 scope: 'sometimes' is not one of "
     "always, undisturbed, explored"),
    ('exit_code = 1\nscope = "always"\nevents = 1', "[[expect]] #1 events: counts the "
     "explorer's events: it goes with scope = \"explored\""),
    ("exit_code = 1\nevents = 0", "[[expect]] #1 events: 0x0 outside 0x1..0x40"),
    ('exit_code = { deliveries = "#XX" }', "[[expect]] #1 exit_code deliveries: unknown "
     "vector name '#XX'"),
    ('exit_code = { count = 1 }', "[[expect]] #1 exit_code: unknown key 'count'"),
])
def test_a_bad_scope_or_count_is_one_line_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], expect: str, message: str) -> None:
    p = _scenario(tmp_path, f"[[expect]]\n{expect}\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
