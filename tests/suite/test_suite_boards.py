"""The machine a config asks for: `idtlab run --image` takes `--machine q35 --device
intel-iommu --device edu` (cpu/board.py), rejects what it cannot build in one line with
exit status 2, and `idtlab suite` maps a config's QEMU `-M`/`-device` parameters to
those options (idtlab/suite.py board_args); a config that uses only the boot CPU runs
on one (ONE_CPU_SUFFICES)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guest_images.kut import build as kut_build
from idtlab import cli, suite

INTEL_IOMMU = ("-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off "
               "-device edu")


def fails_cleanly(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status = cli.main(list(argv))
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("argv", "line"), [
    (["--machine", "q36"], "idtlab: error: run: --machine q36: unknown machine type (known: pc, "
                           "q35)"),
    (["--device", "edu"], "idtlab: error: run: --device edu needs --machine q35 (the pc machine "
                          "is modelled without PCI)"),
    (["--machine", "q35", "--device", "virtio-net"], "idtlab: error: run: --device virtio-net: "
                                                     "unknown device (known: intel-iommu, edu)"),
    (["--machine", "q35", "--device", "intel-iommu,eim=on"],
     "idtlab: error: run: --device intel-iommu,eim=on: idtlab models intel-iommu with "
     "intremap=on,eim=off only (not eim=on)"),
])
def test_a_machine_or_device_idtlab_cannot_build_is_one_line_and_exit_2(
        capsys: pytest.CaptureFixture[str], argv: list[str], line: str) -> None:
    assert fails_cleanly(capsys, "run", "--image", "int_gates", *argv) == line


def test_machine_and_device_belong_to_image_runs(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    line = fails_cleanly(capsys, "run", str(tmp_path / "s.toml"), "--machine", "q35")
    assert line == ("idtlab: error: run: --machine and --device choose the machine of an "
                    "--image run (a scenario describes its own)")


@pytest.mark.parametrize(("params", "argv", "skip"), [
    ((), [], None),
    (("-machine", "pit=off"), [], None),
    (("-machine", "vmport=on", "-cpu", "max"), [], None),
    (tuple(INTEL_IOMMU.split()), ["--machine", "q35", "--device", "intel-iommu", "--device", "edu"],
     None),
    (("-machine", "type=pc-q35-7.2"), ["--machine", "q35"], None),
    (("-M", "pc-i440fx-7.2"), [], None),
    (("-M", "microvm"), [], "needs QEMU's microvm machine, which idtlab does not model"),
    (("-M", "q35", "-device", "intel-iommu"), [],
     "needs -device intel-iommu; idtlab models intel-iommu,eim=off,intremap=on only"),
    (("-device", "hyperv-testdev"), [], "needs -device hyperv-testdev, which idtlab does not "
                                        "model"),
    (("-device", "edu"), [], "needs -device edu: --device edu needs --machine q35 (the pc "
                             "machine is modelled without PCI)"),
])
def test_qemu_machine_and_device_parameters_map_to_idtlabs_board(
        params: tuple[str, ...], argv: list[str], skip: str | None) -> None:
    assert suite.board_args(params) == (argv, skip)


def write_cfg(directory: Path, text: str) -> Path:
    (directory / "x86").mkdir(exist_ok=True)
    (directory / "x86" / "t.flat").write_bytes(b"")
    cfg = directory / "x86" / "unittests.cfg"
    cfg.write_text(text)
    return cfg


def test_intel_iommu_asks_for_4_cpus_and_runs_on_one_on_q35_with_its_devices(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "[intel_iommu]\nfile = intel-iommu.flat\nsmp = 4\n"
                              f"qemu_params = {INTEL_IOMMU}\n")
    (tmp_path / "x86" / "intel-iommu.flat").write_bytes(b"")
    [p] = suite.plan(cfg, suite.parse_config(cfg), None, None, "qemu")
    assert (p.idtlab_skip, p.reference_skip) == (None, None)
    assert p.idtlab_argv(10)[-6:] == ["--machine", "q35", "--device", "intel-iommu", "--device",
                                      "edu"]
    qemu = p.qemu_argv()
    assert qemu[qemu.index("-smp") + 1] == "1"
    assert qemu[qemu.index("-smp") + 2:qemu.index("-kernel")] == INTEL_IOMMU.split()


def test_another_config_asking_for_4_cpus_is_still_skipped(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, f"[a]\nfile = t.flat\nsmp = 4\nqemu_params = {INTEL_IOMMU}\n")
    [p] = suite.plan(cfg, suite.parse_config(cfg), None, None, None)
    assert p.idtlab_skip == "needs 4 CPUs; idtlab models one; --only runs it on one"


def test_only_runs_a_config_with_an_unmodelled_device_on_idtlabs_nearest_machine(
        tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "[a]\nfile = t.flat\nqemu_params = -M q35 -device e1000\n")
    [p] = suite.plan(cfg, suite.parse_config(cfg), None, None, None)
    assert p.idtlab_skip == "needs -device e1000, which idtlab does not model"
    [p] = suite.plan(cfg, suite.parse_config(cfg), ["a"], None, None)
    assert p.idtlab_skip is None and "--machine" not in p.idtlab_argv(10)


def test_idtlab_suite_runs_a_q35_config_with_the_mapped_options_and_it_passes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The mini kernel on q35 with both devices: it does not touch them, so it passes
    as on the pc machine; the command shows the mapping."""
    cfg = kut_build.build(tmp_path / "x86")
    cfg.write_text("[mini_q35]\nfile = mini.flat\ntest_args = pass\n"
                   f"qemu_params = {INTEL_IOMMU}\n"
                   "[mini_microvm]\nfile = mini.flat\ntest_args = pass\nqemu_params = -M microvm\n")
    status = cli.main(["suite", str(cfg), "--json"])
    report = json.loads(capsys.readouterr().out)
    rows = {c["name"]: c["idtlab"] for c in report["configs"]}
    assert status == 0
    assert rows["mini_q35"]["status"] == "PASS"
    assert rows["mini_q35"]["command"].endswith("--machine q35 --device intel-iommu --device edu")
    assert (rows["mini_microvm"]["status"], rows["mini_microvm"]["stop"]) == \
        ("SKIP", "needs QEMU's microvm machine, which idtlab does not model")
