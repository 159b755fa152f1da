"""The scenario loader's public pieces: the checker the command line shares, the table
list the format documents, and `[[inject]]` going through the event vocabulary of
`cpu.events`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guest_images.vmx_ve import build as vmx_build
from idtlab import scenario as scn
from idtlab.cli import main
from idtlab.errors import BadInput
from tests.scenario.test_cli import GOOD, write

ROOT = Path(__file__).resolve().parents[2]


def test_every_table_the_loader_accepts_is_documented_and_only_those() -> None:
    doc = (ROOT / "docs" / "scenario-format.md").read_text()
    documented = set(re.findall(r"^\| `\[\[?(\w+)\]\]?`", doc, re.M))
    assert documented == set(scn.TABLES)


def test_the_checker_names_the_file_and_the_key_in_one_line() -> None:
    chk = scn.Checker(Path("some/dir/s.toml"))
    with pytest.raises(BadInput) as info:
        chk.int_(9, "[idt] 3 ist", 0, 7)
    assert str(info.value) == "s.toml: [idt] 3 ist: 0x9 outside 0x0..0x7"
    with pytest.raises(BadInput, match=r"^s.toml: \[\[pages\]\]: unknown key 'vaa' "
                                       r"\(did you mean 'va'\?\)$"):
        chk.keys({"vaa": 1}, ("va", "pa"), "[[pages]]")


@pytest.mark.parametrize(("text", "size"), [("16M", 16 << 20), ("512K", 512 << 10),
                                            ("1G", 1 << 30), ("64MiB", 64 << 20), (4096, 4096)])
def test_sizes_are_read_with_their_unit(text: str | int, size: int) -> None:
    assert scn.parse_size(text, "[machine] memory", scn.Checker("s.toml")) == size


def test_a_bad_memory_option_of_run_image_is_one_line_naming_the_option(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--image", "pf_codes", "--memory", "lots"]) == 2
    assert capsys.readouterr().err == ("idtlab: error: run: --memory: cannot read size 'lots' "
                                       "(use e.g. \"16M\", \"512K\", \"1G\")\n")


def test_an_async_pf_without_token_or_gpa_is_refused_by_the_event_vocabulary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD + '\n[apf]\n[[inject]]\nevent = "async_pf"\nbefore = "main"\n'
    assert main(["run", str(write(tmp_path, text))]) == 2
    assert capsys.readouterr().err == ("idtlab: error: s.toml: [[inject]] #1: an async_pf "
                                       "needs a token (CR2) or a swapped-out gpa\n")


def test_an_injected_interrupt_arrives_where_its_point_says_with_its_label(tmp_path: Path) -> None:
    text = GOOD.replace("    int3\n", "    nop\n    int3\n").replace(
        '[[expect]]\ndeliveries = ["#BP"]', '[[expect]]\ndeliveries = ["vec 0x30", "#BP"]') + """
[idt.0x30]
handler = "irq"
[[code]]
at = 0x101000
asm = '''
irq:
    mov rax, 0xfee000b0
    mov dword ptr [rax], 0              # EOI
    iretq
'''
[[inject]]
event = "interrupt"
vector = 0x30
before = "main"
hit = 1
label = "timer"
"""
    sc = scn.load(write(tmp_path, text))
    result = scn.run(sc)
    assert scn.check(sc, result) == []
    pending = result.trace.of_kind("interrupt_pending")
    assert [(r["vector"], r["before"], r["label"]) for r in pending] == [(0x30, 0x100000, "timer")]
    assert result.deliveries[0]["rip"] == 0x100000


def test_the_ve_image_a_scenario_names_is_built_on_demand(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Path] = []
    real = vmx_build.build

    def build() -> Path:
        built.append(real())
        return built[-1]

    monkeypatch.setattr(vmx_build, "build", build)
    sc = scn.load(ROOT / "guest_images" / "vmx_ve" / "guest.toml")
    assert built == [vmx_build.BUILD_DIR / "vmx_ve.elf"]
    assert "guest_entry" in sc.symbols
