"""Every shipped example scenario runs and its own expectations hold (they document what
the example shows, including the broken behaviour of the naive handlers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from idtlab import scenario as scn
from idtlab.trace import to_jsonl

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "idtlab" / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_each_example_scenario_meets_its_own_expectations(path: Path) -> None:
    sc = scn.load(path)
    result = scn.run(sc)
    assert scn.check(sc, result) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_each_example_gives_the_same_trace_twice(path: Path) -> None:
    traces = []
    for _ in range(2):
        sc = scn.load(path)
        traces.append(to_jsonl(scn.run(sc).trace.records))
    assert traces[0] == traces[1]


def test_the_cr2_race_example_is_fixed_by_saving_cr2_in_the_nmi_handler(tmp_path: Path) -> None:
    text = (EXAMPLES[0].parent / "nmi_cr2_race.toml").read_text()
    fixed = text.replace("    # mov rax, cr2                  # the fix: save CR2 ...",
                         "    mov rax, cr2").replace(
        "    mov rax, qword ptr [rcx]        # a #PF inside the NMI handler: CR2 = 0x500000\n"
        "    # mov cr2, rax",
        "    push rax\n    mov rax, qword ptr [rcx]\n    pop rax\n    mov cr2, rax")
    assert fixed != text
    p = tmp_path / "fixed.toml"
    p.write_text(fixed)
    sc = scn.load(p)
    result = scn.run(sc)
    failures = {f.where: f for f in scn.check(sc, result)}
    # The outer #PF handler now logs the address of its own fault.
    assert sc.machine is not None
    assert int.from_bytes(sc.machine.read_linear(sc.symbols["pf_log"] + 8, 8), "little") == 0x400000
    assert "[[expect]] #3" in failures  # the example's "wrong address" expectation no longer holds
