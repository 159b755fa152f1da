"""Every self-logging image on the references: on Bochs (the SDM-faithful reference)
each image passes all of its own verdicts; QEMU agrees with Bochs modulo QEMU's listed
divergences, and exactly those divergences show up. Skipped, with the reason, where a
reference is not installed."""

from __future__ import annotations

import pytest

from guest_images import build as gib
from idtlab import cli, ref
from idtlab import diff as differ
from tests.differential.expected import CLASSIC_IMAGES, QEMU_DIVERGENCES, TESTS, verdicts

IMAGES = gib.mb_image_names()


def test_every_image_has_its_expected_test_list() -> None:
    assert sorted(TESTS) == IMAGES
    assert sorted(QEMU_DIVERGENCES) == list(CLASSIC_IMAGES)


@pytest.mark.parametrize("image", IMAGES)
def test_every_image_passes_its_own_verdicts_on_bochs(image: str,
                                                      bochs_logs: dict[str, ref.RefResult]) -> None:
    run = bochs_logs[image]
    assert not run.timed_out, run.status_line()
    assert run.note == "bochs: [UNMAP ] Shutdown port: shutdown requested"
    assert verdicts(run.log) == [(t, "PASS") for t in TESTS[image]], run.log
    records = differ.parse_log(run.log)
    assert records[0].text == f"idtlog1 begin {image}"
    assert records[-1].text == f"idtlog1 end {image} pass={len(TESTS[image]):#x} fail=0x0"
    assert run.verdict() == (len(TESTS[image]), 0)


@pytest.mark.parametrize("image", CLASSIC_IMAGES)
def test_qemu_agrees_with_bochs_modulo_exactly_its_listed_divergences(
        image: str, bochs_logs: dict[str, ref.RefResult], qemu_logs: dict[str, ref.RefResult]) -> None:
    qemu = qemu_logs[image]
    assert not qemu.timed_out, qemu.status_line()
    fails = qemu.verdict()
    assert fails is not None, qemu.log
    # QEMU's exit status is (v << 1) | 1 for the value v the image wrote to port 0xF4.
    assert qemu.status == (3 if fails[1] else 1)
    res = differ.diff_records(differ.parse_log(bochs_logs[image].log),
                              differ.parse_log(qemu.log), "qemu")
    assert res.equal, "\n".join(differ.report(res, "bochs", "qemu"))
    assert {i for e in res.expected for i in e.ids} == QEMU_DIVERGENCES[image]


def test_the_nmi_tests_log_where_the_latched_nmis_arrived_on_bochs(
        bochs_logs: dict[str, ref.RefResult], built_images: dict[str, gib.MultibootImage]) -> None:
    from cpu.elf import load_elf

    symbols = load_elf(built_images["nmi_apic"].elf).symbols
    checks = {(r.test, *r.fields[0]) for r in differ.parse_log(bochs_logs["nmi_apic"].log)
              if r.kind == "check" and r.test != "boot"}
    assert checks == {
        ("nmi_latched_until_iret", "latched_rip", f"{symbols['latch_after_spin']:#x}"),
        ("nmi_latched_until_iret", "latched_depth", "0x1"),
        ("nmi_nested_after_bp_iret", "nested_rip", f"{symbols['nest_after_int3']:#x}"),
        ("nmi_nested_after_bp_iret", "nested_depth", "0x2"),
        ("ipi_sti_shadow", "irr_before_sti", "0x1"),
    }


def test_idtlab_ref_prints_the_serial_log_and_exits_0_when_the_image_passes(
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = ref.available("qemu")
    if missing is not None:
        pytest.skip(f"reference qemu is not installed: {missing}")
    assert cli.main(["ref", "qemu", "bp_stacks"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "idtlog1 begin bp_stacks"
    assert out.splitlines()[-1] == "idtlog1 end bp_stacks pass=0x5 fail=0x0"
    assert err.startswith("idtlab: qemu exited with status 1 after ")
    assert err.endswith(" s (the image wrote 0x0 to port 0xf4); image verdict: pass=5 fail=0\n")


def test_idtlab_ref_exits_1_when_the_image_reports_failures(capsys: pytest.CaptureFixture[str]) -> None:
    missing = ref.available("qemu")
    if missing is not None:
        pytest.skip(f"reference qemu is not installed: {missing}")
    assert cli.main(["ref", "qemu", "rf_frames", "-q"]) == 1
    assert capsys.readouterr().err.endswith("image verdict: pass=3 fail=3\n")


def test_a_run_that_hits_the_time_limit_says_so() -> None:
    missing = ref.available("bochs")
    if missing is not None:
        pytest.skip(f"reference bochs is not installed: {missing}")
    run = ref.run_reference("bochs", "bp_stacks", timeout=0.01)
    assert (run.timed_out, run.status) == (True, None)
    assert run.status_line().startswith("bochs: no end after ")
    assert "time limit reached" in run.status_line()


def test_a_missing_reference_is_one_line_saying_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ref.shutil, "which", lambda name: None)
    assert ref.available("bochs") == ("bochs not found: install Bochs with "
                                      "`apt-get install bochs bochsbios vgabios`")
    assert cli.main(["ref", "qemu", "bp_stacks"]) == 2
    assert capsys.readouterr().err == ("idtlab: error: qemu-system-x86_64 not found: install QEMU "
                                       "with `apt-get install qemu-system-x86`\n")
