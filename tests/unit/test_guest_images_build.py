"""guest_images.build, and the guest image scenarios' references into their images."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

import guest_images.build as build
from cpu.elf import load_elf
from idtlab.assemble import resolve_address
from idtlab.errors import BadInput

pytestmark = pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                                reason="needs GNU binutils")

GUEST_DIR = Path(build.__file__).parent


def test_building_an_image_produces_an_x86_64_elf_in_the_output_directory(
        tmp_path: Path) -> None:
    out = build.build_image("pf_demo", tmp_path)
    assert out == tmp_path / "pf_demo.elf"
    assert out.read_bytes()[:4] == b"\x7fELF"
    assert load_elf(out).symbols["pf_handler"] > 0x200000
    assert [p.name for p in tmp_path.iterdir()] == ["pf_demo.elf"], "no leftovers"


def test_the_default_output_directory_is_guest_images_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path / "build")
    assert build.build_image("bp_ist") == tmp_path / "build" / "bp_ist.elf"


def test_a_fresh_image_is_not_rebuilt(tmp_path: Path) -> None:
    out = build.build_image("bp_ist", tmp_path)
    stamp = out.stat().st_mtime_ns + 10**9          # clearly newer than every input
    os.utime(out, ns=(stamp, stamp))
    assert build.build_image("bp_ist", tmp_path) == out
    assert out.stat().st_mtime_ns == stamp


def test_an_image_older_than_its_source_is_rebuilt(tmp_path: Path) -> None:
    out = build.build_image("bp_ist", tmp_path)
    out.write_bytes(b"stale")
    os.utime(out, ns=(0, 0))
    build.build_image("bp_ist", tmp_path)
    assert out.read_bytes()[:4] == b"\x7fELF"


def test_an_unknown_image_name_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(BadInput) as info:
        build.build_image("bp_isst", tmp_path)
    message = str(info.value)
    assert message.startswith("guest_images/bp_isst.S: no such guest image source")
    assert "bp_ist" in message and "pf_demo" in message


def test_a_path_is_not_an_image_name(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="not a guest image name"):
        build.build_image("../pf_demo", tmp_path)


def test_an_assembler_error_names_the_source_file_and_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = tmp_path / "src"
    sources.mkdir()
    (sources / "broken.S").write_text(".intel_syntax noprefix\nmain:\n  nop\n  movx rax, 1\n")
    monkeypatch.setattr(build, "GUEST_DIR", sources)
    with pytest.raises(BadInput) as info:
        build.build_image("broken", tmp_path / "out")
    assert str(info.value) == \
        "guest_images/broken.S:4: Error: no such instruction: `movx rax,1'"
    assert not (tmp_path / "out" / "broken.elf").exists()


def test_a_link_error_is_reported_on_one_line(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sources = tmp_path / "src"
    sources.mkdir()
    (sources / "undef.S").write_text(".text\nmain:\n  call nowhere\n")
    monkeypatch.setattr(build, "GUEST_DIR", sources)
    with pytest.raises(BadInput) as info:
        build.build_image("undef", tmp_path / "out")
    message = str(info.value)
    assert message.startswith("guest_images/undef.S: link failed: ")
    assert "nowhere" in message and "\n" not in message


def test_the_command_line_builds_every_image(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path)
    assert build.main([]) == 0
    built = sorted(Path(line).name for line in capsys.readouterr().out.split())
    assert built == [f"{name}.elf" for name in build.image_names()]
    assert {"bp_ist", "pf_demo"} <= set(build.image_names())


def test_the_command_line_reports_a_bad_name_and_exits_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["nosuch"]) == 2
    assert capsys.readouterr().err.startswith("error: guest_images/nosuch.S: no such")


# --------------------------------------------------------------------------- scenarios

def _scenario_names() -> list[str]:
    return sorted(p.stem for p in GUEST_DIR.glob("*.toml"))


@pytest.mark.parametrize("name", _scenario_names())
def test_a_guest_scenario_names_only_symbols_its_image_defines(name: str,
                                                               tmp_path: Path) -> None:
    path = GUEST_DIR / f"{name}.toml"
    scenario: dict[str, Any] = tomllib.loads(path.read_text())
    (image,) = scenario["image"]
    assert image["elf"] == f"build/{name}.elf"
    elf = load_elf(build.build_image(name, tmp_path))
    where = path.name
    for vector, gate in scenario["idt"].items():
        assert 0 <= int(vector) < 256
        resolve_address(gate["handler"], elf.symbols, f"{where} [idt] {vector}")
    entry = resolve_address(scenario["run"]["entry"], elf.symbols, f"{where} [run] entry")
    assert entry == elf.entry
    assert 0x20000 <= scenario["run"]["rsp"] < 0x200000, "stack outside the image, above "
    for i, expect in enumerate(scenario["expect"], 1):
        if "mem" in expect:
            at = resolve_address(expect["mem"], elf.symbols, f"{where} [[expect]] #{i} mem")
            assert any(seg.vaddr <= at < seg.vaddr + seg.memsz for seg in elf.segments
                       if seg.writable), f"expectation #{i} does not point into data"
            resolve_address(expect["equals"], elf.symbols, f"{where} [[expect]] #{i} equals")
    assert scenario["expect"][-1] == {"outcome": "hlt"}


def test_the_pf_demo_fault_address_is_outside_its_image(tmp_path: Path) -> None:
    scenario = tomllib.loads((GUEST_DIR / "pf_demo.toml").read_text())
    elf = load_elf(build.build_image("pf_demo", tmp_path))
    (page,) = scenario["pages"]
    assert page == {"va": 0x400000, "present": False}
    assert all(seg.vaddr + seg.memsz <= page["va"] for seg in elf.segments)


def test_the_bp_ist_expected_stack_is_ist1_minus_the_five_slot_frame() -> None:
    scenario = tomllib.loads((GUEST_DIR / "bp_ist.toml").read_text())
    seen = next(e for e in scenario["expect"] if e.get("mem") == "bp_seen_rsp")
    assert scenario["idt"]["3"]["ist"] == 1
    assert seen["equals"] == (scenario["tss"]["ist1"] & ~0xF) - 5 * 8
