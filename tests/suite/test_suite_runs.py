"""`idtlab suite` end to end, over guest_images/kut/mini.S: a kvm-unit-tests-style kernel
whose first argument chooses what it does (pass, fail, skip, lie, loader, hang, triple),
and guest_images/kut/unittests.cfg, one config per behaviour plus one per skip rule."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from guest_images.kut import build as kut_build
from idtlab import cli

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 not installed (apt-get install "
                                       "qemu-system-x86)")
QUICK = ["mini_pass", "mini_fail", "mini_skip", "mini_lie", "mini_loader", "mini_extra_params",
         "mini_triple"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini suite, laid out like kvm-unit-tests: x86/unittests.cfg, x86/mini.flat."""
    return kut_build.build(tmp_path_factory.mktemp("kut") / "x86")


def suite_json(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    status = cli.main(["suite", str(cfg), "--json", *args])
    return status, json.loads(capsys.readouterr().out)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["configs"]}


def test_each_mini_config_gets_its_status_exit_code_and_stop_on_idtlab(
        cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = suite_json(cfg, capsys, "--jobs", "2", "--only", *QUICK)
    got = {name: (c["idtlab"]["status"], c["idtlab"]["exit_code"], c["idtlab"]["stop"])
           for name, c in by_name(report).items()}
    assert got == {
        "mini_pass": ("PASS", 0, "exit 0"),
        "mini_fail": ("FAIL", 1, "exit 1; first of 1 FAIL lines: FAIL: mini: second check"),
        "mini_skip": ("SKIP", 38, "exit 38"),
        "mini_lie": ("FAIL", 0, "exit 0; first of 1 FAIL lines: FAIL: mini: a failure the exit "
                                "code hides"),
        "mini_loader": ("PASS", 0, "exit 0"),
        "mini_extra_params": ("PASS", 0, "exit 0"),
        "mini_triple": ("FAIL", None, "unsupported (an exception in 32-bit protected mode: #UD "
                                      "(vector 6) at 0x100132; events are modelled in real-address "
                                      "mode and from the switch to 64-bit mode on) at "
                                      "mode_triple+0x11"),
    }
    assert status == 1  # configs failed on idtlab
    assert report["totals"] == {"idtlab": {"PASS": 3, "FAIL": 3, "SKIP": 1, "TIMEOUT": 0,
                                           "ERROR": 0}, "reference": None}
    fail = by_name(report)["mini_fail"]["idtlab"]
    assert (fail["summary"], fail["fail_lines"]) == ("2 tests, 1 unexpected failures",
                                                     ["FAIL: mini: second check"])
    assert fail["log"] == ("PASS: mini: first check\nFAIL: mini: second check\n"
                           "SUMMARY: 2 tests, 1 unexpected failures\n")


def test_the_kernel_gets_its_arguments_after_its_own_name(cfg: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, report = suite_json(cfg, capsys, "--only", "mini_extra_params")
    c = by_name(report)["mini_extra_params"]
    assert c["cmdline"] == "x86/mini.flat pass"
    assert c["idtlab"]["command"] == (f"idtlab run --image {cfg.parent.resolve()}/mini.flat "
                                      "--cmdline 'x86/mini.flat pass' --memory 128M "
                                      "--max-insns 1000000000000")


def test_the_table_has_one_row_per_config_the_stops_and_the_totals(
        cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["suite", str(cfg), "--only", "mini_pass", "mini_fail", "mini_triple",
                       "mini_i386"])
    out, err = capsys.readouterr()
    assert status == 1
    assert out.splitlines() == [
        "config       idtlab",
        "mini_pass    PASS    exit 0",
        "mini_fail    FAIL    exit 1",
        "    idtlab: exit 1; first of 1 FAIL lines: FAIL: mini: second check",
        "    idtlab: FAIL: mini: second check",
        "mini_triple  FAIL    unsupported",
        "    idtlab: unsupported (an exception in 32-bit protected mode: #UD (vector 6) at "
        "0x100132; events are modelled in real-address mode and from the switch to 64-bit mode "
        "on) at mode_triple+0x11",
        "mini_i386    SKIP    skipped",
        "    idtlab skipped: i386 only",
        "",
        "idtlab: 1 PASS, 2 FAIL, 1 SKIP, 0 TIMEOUT, 0 ERROR",
        "PASS = exited through the test device (port 0xf4) with 0 and printed no FAIL/XPASS/ABORT "
        "line; SKIP = not run (reason shown) or every check skipped (exit 38)",
    ]
    # Progress on stderr: a heading, then one line per config as it finishes.
    lines = err.splitlines()
    assert lines[0] == f"idtlab suite: {cfg}: 4 configs, 3 to run on idtlab; 1 at a time"
    assert sorted(line.split("] ")[1].split(":")[0] for line in lines[1:]) == \
        ["mini_fail", "mini_i386", "mini_pass", "mini_triple"]


def test_the_default_policy_skips_the_configs_it_should_and_runs_the_rest(
        cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, report = suite_json(cfg, capsys, "--timeout", "1")
    skips = {n: c["idtlab"]["stop"] for n, c in by_name(report).items()
             if c["idtlab"]["how"] == "skipped"}
    assert skips == {
        "mini_smp": "needs 2 CPUs; idtlab models one; --only runs it on one",
        "mini_i386": "i386 only",
        "mini_kvm_only": "accel = kvm: KVM only",
        "mini_vmx": "needs VMX (group vmx), which idtlab does not model",
        "mini_manual": "group nodefault: run only on request; --only runs it",
        "mini_missing": f"no file {cfg.parent / 'missing.flat'}; build kvm-unit-tests first "
                        "(docs/kvm-unit-tests.md)",
    }
    hang = by_name(report)["mini_hang"]["idtlab"]
    assert (hang["status"], hang["how"]) == ("TIMEOUT", "after 1 s")
    assert hang["stop"].startswith("no end within 1 s")  # the last line, if it came in time


def test_a_config_that_never_ends_is_stopped_at_its_timeout_with_its_last_line(
        cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, report = suite_json(cfg, capsys, "--only", "mini_hang", "--timeout", "8")
    hang = by_name(report)["mini_hang"]["idtlab"]
    assert (hang["status"], hang["how"], hang["stop"]) == (
        "TIMEOUT", "after 8 s", "no end within 8 s; last line: INFO: mini: spinning forever")


def test_a_run_over_the_resident_memory_limit_is_stopped_as_an_error(
        cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, report = suite_json(cfg, capsys, "--only", "mini_hang", "--max-rss", "1", "--timeout", "30")
    hang = by_name(report)["mini_hang"]["idtlab"]
    assert (hang["status"], hang["how"]) == ("ERROR", "over --max-rss")
    assert hang["seconds"] < 30


@needs_qemu
def test_against_qemu_only_the_loader_config_differs_and_its_fail_line_is_shown(
        cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = suite_json(cfg, capsys, "--reference", "qemu", "--jobs", "2", "--only", *QUICK)
    configs = by_name(report)
    got = {n: (c["reference"]["status"], c["reference"]["exit_code"]) for n, c in configs.items()}
    assert got == {"mini_pass": ("PASS", 0), "mini_fail": ("FAIL", 1), "mini_skip": ("SKIP", 38),
                   "mini_lie": ("FAIL", 0), "mini_loader": ("FAIL", 1),
                   "mini_extra_params": ("PASS", 0), "mini_triple": ("FAIL", None)}
    assert configs["mini_triple"]["reference"]["stop"] == (
        "QEMU exited with status 0: the kernel did not exit through the test device (a triple "
        "fault or a reset, under -no-reboot)")
    differing = {n: c["differing_fail_lines"] for n, c in configs.items()
                 if c["differing_fail_lines"] != {"idtlab": [], "reference": []}}
    assert differing == {"mini_loader": {"idtlab": [], "reference": ["FAIL: mini: booted by idtlab"]}}
    assert status == 1


@needs_qemu
def test_the_table_against_qemu_shows_both_sides_and_where_they_disagree(
        cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["suite", str(cfg), "--reference", "qemu", "--only", "mini_pass", "mini_loader",
              "mini_fail"])
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "config       idtlab          qemu (TCG)",
        "mini_pass    PASS    exit 0  PASS    exit 0",
        "mini_fail    FAIL    exit 1  FAIL    exit 1",
        "    both: exit 1; first of 1 FAIL lines: FAIL: mini: second check",
        "mini_loader  PASS    exit 0  FAIL    exit 1",
        "    qemu: exit 1; first of 1 FAIL lines: FAIL: mini: booted by idtlab",
        "    qemu only: FAIL: mini: booted by idtlab",
        "",
        "idtlab: 2 PASS, 1 FAIL, 0 SKIP, 0 TIMEOUT, 0 ERROR",
        "qemu: 1 PASS, 2 FAIL, 0 SKIP, 0 TIMEOUT, 0 ERROR",
        "same status on both: 2 of the 3 configs run on both",
        "qemu passes, idtlab does not: none",
        "idtlab passes, qemu does not: mini_loader",
        "PASS = exited through the test device (port 0xf4) with 0 and printed no FAIL/XPASS/ABORT "
        "line; SKIP = not run (reason shown) or every check skipped (exit 38)",
    ]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.external.append(value)

    def handle_data(self, data: str) -> None:
        self.cells.append(data)


def test_the_html_report_stands_alone_and_shows_every_config_and_log(
        cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert cli.main(["suite", str(cfg), "--only", "mini_pass", "mini_fail", "--html", str(out)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"report written to {out}"
    page = _Page()
    page.feed(out.read_text())
    assert page.external == []  # no scripts, styles or images from elsewhere
    text = "".join(page.cells)
    for expected in ("mini_pass", "mini_fail", "FAIL: mini: second check",
                     "SUMMARY: 2 tests, 1 unexpected failures", "--cmdline 'x86/mini.flat fail'"):
        assert expected in text


@pytest.mark.parametrize(("args", "message"), [
    (["nope.cfg"], "idtlab: error: nope.cfg: no such file"),
    (["{cfg}", "--jobs", "0"], "idtlab: error: suite: --jobs 0: must be at least 1"),
    (["{cfg}", "--timeout", "0"], "idtlab: error: suite: --timeout 0: must be positive"),
    (["{cfg}", "--only", "nothing_like_it"], "idtlab: error: --only nothing_like_it: no config of "
                                             "{cfg} matches (there are 14: mini_pass, mini_fail, "
                                             "mini_skip, mini_lie, mini_loader, mini_extra_params, "
                                             "mini_triple, mini_hang, ...)"),
    (["{cfg}", "--html", "/no/such/dir/r.html"], "idtlab: error: suite: --html /no/such/dir/r.html: "
                                                 "no directory /no/such/dir"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(
        cfg: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert cli.main(["suite", *(a.format(cfg=cfg) for a in args)]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", message.format(cfg=cfg) + "\n")
