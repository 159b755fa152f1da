"""The `[fred]` scenario table and `idtlab demo fred-vs-idt`: the keys reach the MSRs,
bad values are one line on stderr with exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from idtlab import scenario as scn
from idtlab.cli import main

GOOD = """
[[code]]
at = 0x100000
asm = '''
main:
    ud2
'''

[[code]]
at = 0x101000
asm = '''
fred_entry:
    hlt
'''

[[code]]
at = 0x101100
asm = '''
kernel_entry:
    hlt
'''

[fred]
entry = "fred_entry"
rsp0 = 0x80000
rsp2 = 0x82000
stack_levels = { 2 = 2, 8 = 3, 1 = 1 }
interrupt_level = 1
red_zone = 128

[run]
entry = "main"

[[expect]]
reg = "rip"
equals = "kernel_entry+1"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_the_fred_table_programs_the_msrs_and_cr4(tmp_path: Path) -> None:
    sc = scn.load(write(tmp_path, GOOD))
    m = sc.machine
    assert m is not None
    f = m.state.fred
    assert f.config == 0x101000 | 1 << 9 | 128
    assert (f.rsp0, f.rsp2, f.stklvls) == (0x80000, 0x82000, 2 << 4 | 3 << 16 | 1 << 2)
    result = scn.run(sc)
    assert scn.check(sc, result) == []
    (d,) = [r for r in result.trace.records if r["kind"] == "deliver"]
    assert (d["fred"], d["rsp"]) == (True, ((0x70000 - 128) & ~0x3F) - 64)
    assert m.engine.read_reg("cr4") & (1 << 32)
    assert m.engine.read_msr(0xC0000081) == 0x08 << 32  # IA32_STAR: kernel CS 0x08


def test_with_enabled_false_the_cpu_has_fred_but_delivers_through_the_idt(tmp_path: Path) -> None:
    sc = scn.load(write(tmp_path, GOOD.replace("red_zone = 128", "red_zone = 128\nenabled = false")
                        + '\n[idt]\n6 = { handler = "kernel_entry" }\n'))
    assert sc.machine is not None
    result = scn.run(sc)
    (d,) = [r for r in result.trace.records if r["kind"] == "deliver"]
    assert "fred" not in d
    assert sc.machine.model.cpuid(7, 1)[0] & (1 << 17)


BAD = [
    (GOOD.replace('entry = "fred_entry"', 'entry = "main+4"'), "[fred] entry: 0x100004 is not 4-KiB aligned"),
    (GOOD.replace('entry = "fred_entry"\n', ""), "[fred]: missing key 'entry'"),
    (GOOD.replace("red_zone = 128", "red_zone = 100"), "[fred] red_zone: 100 is not a multiple of 64"),
    (GOOD.replace("red_zone = 128", "red_zone = 512"), "[fred] red_zone"),
    (GOOD.replace("interrupt_level = 1", "interrupt_level = 4"), "[fred] interrupt_level"),
    (GOOD.replace("8 = 3", "40 = 3"), "[fred] stack_levels: vector 40 outside 0..31"),
    (GOOD.replace("8 = 3", "8 = 5"), "[fred] stack_levels 8"),
    (GOOD.replace("rsp2 = 0x82000", "rsp2 = 0x82008"), "IA32_FRED_RSP2: 0x82008 is not 64-byte aligned"),
    (GOOD.replace("interrupt_level = 1", "interupt_level = 1"), "unknown key 'interupt_level'"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_a_bad_fred_table_is_one_line_on_stderr_and_exit_status_2(
        tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def test_the_fred_vs_idt_demo_shows_the_clobber_on_one_side_only(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "fred-vs-idt"]) == 0
    out = capsys.readouterr().out
    left = [line.split("|")[0] for line in out.splitlines() if "|" in line]
    right = [line.split("|", 1)[1] for line in out.splitlines() if "|" in line]
    assert any("overwrites the live NMI frame" in line for line in left)
    assert not any("overwrites" in line for line in right)
    assert "erets at nmi_eret -> work" in " ".join(right)  # NMI #1 returns where it was
    assert "nested_nmi_naive.toml: max_insns; 3/3 expectations hold" in out
    assert "nested_nmi_fred.toml: exit; 4/4 expectations hold" in out
