"""The differ (idtlab/diff.py) on crafted logs: equal logs, the first divergence with its
context, known divergences reported as expected, unknown ones failing, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from idtlab import cli
from idtlab import diff as differ
from idtlab.errors import BadInput

BOCHS_LOG = """\
SeaBIOS noise that is not a record
idtlog1 begin np_df
idtlog1 boot check eax=0x2badb002
idtlog1 boot PASS
idtlog1 np_int ev=0b rsp=0x10efc0 err=0x282 rip=0x100051 cs=0x8 rflags=0x10002 sp=0x10eff0 ss=0x10
idtlog1 np_int PASS
idtlog1 gp_fault ev=0d rsp=0x10efc0 err=0x0 rip=0x100054 cs=0x8 rflags=0x10002 sp=0x10eff0 ss=0x10
idtlog1 gp_fault PASS
idtlog1 end np_df pass=0x3 fail=0x0
"""


def qemu_like(log: str) -> str:
    """The same run as QEMU 7.2 prints it: vector*16+2 error code, RF = 0 in fault frames,
    and the verdicts those cause."""
    return (log.replace("err=0x282", "err=0x502")
            .replace("rflags=0x10002", "rflags=0x2")
            .replace("idtlog1 np_int PASS", "idtlog1 np_int FAIL np error code is not (vector << 3) | 2")
            .replace("idtlog1 gp_fault PASS", "idtlog1 gp_fault FAIL rf is not set in the gp fault frame")
            .replace("pass=0x3 fail=0x0", "pass=0x1 fail=0x2"))


def diff(a: str, b: str, reference: str | None = None) -> differ.DiffResult:
    return differ.diff_records(differ.parse_log(a), differ.parse_log(b), reference)


def test_only_idtlog_records_count_and_a_prefix_before_the_tag_is_ignored() -> None:
    records = differ.parse_log("noise\n  | idtlog1 t ev=03 rsp=0x10 rip=0x1\r\nidtlog1x no\n")
    assert [(r.lineno, r.text, r.kind, r.test) for r in records] == [
        (2, "idtlog1 t ev=03 rsp=0x10 rip=0x1", "event", "t")]
    assert records[0].fields == (("ev", "03"), ("rsp", "0x10"), ("rip", "0x1"))


def test_records_are_classified_by_kind() -> None:
    records = differ.parse_log(BOCHS_LOG)
    assert [r.kind for r in records] == ["begin", "check", "verdict", "event", "verdict",
                                         "event", "verdict", "end"]
    end = records[-1]
    assert (end.test, end.int_field("pass"), end.int_field("fail")) == ("np_df", 3, 0)
    failed = differ.parse_log(qemu_like(BOCHS_LOG))[4]
    assert (failed.verdict, failed.reason) == ("FAIL", "np error code is not (vector << 3) | 2")


def test_equal_logs_are_equal_and_the_summary_says_so() -> None:
    res = diff(BOCHS_LOG, "other noise\n" + BOCHS_LOG)
    assert res.equal and res.identical == 8 and res.expected == []
    assert differ.report(res)[-1] == ("8 records compared: 8 identical, 0 expected divergences; "
                                      "equal modulo known divergences (reference: none)")


def test_the_first_divergence_is_reported_with_context_and_the_comparison_stops() -> None:
    b = BOCHS_LOG.replace("rip=0x100051", "rip=0x100053").replace("rip=0x100054", "rip=0x100099")
    res = diff(BOCHS_LOG, b)
    assert not res.equal
    assert (res.first, res.why) == (3, "rip differs (0x100051 vs 0x100053)")
    lines = differ.report(res, "bochs.log", "other.log", context=1)
    assert lines == [
        "",
        "first divergence: record 4: rip differs (0x100051 vs 0x100053)",
        "--- bochs.log",
        "      4  idtlog1 boot PASS",
        ">     5  idtlog1 np_int ev=0b rsp=0x10efc0 err=0x282 rip=0x100051 cs=0x8 rflags=0x10002 sp=0x10eff0 ss=0x10",
        "--- other.log",
        "      4  idtlog1 boot PASS",
        ">     5  idtlog1 np_int ev=0b rsp=0x10efc0 err=0x282 rip=0x100053 cs=0x8 rflags=0x10002 sp=0x10eff0 ss=0x10",
        "",
        "4 records compared: 3 identical, 0 expected divergences; first unexpected divergence at record 4",
    ]


def test_qemu_divergences_are_expected_with_reference_qemu_including_the_verdicts_they_cause() -> None:
    res = diff(BOCHS_LOG, qemu_like(BOCHS_LOG), "qemu")
    assert res.equal
    assert [(e.index, e.ids) for e in res.expected] == [
        (3, ("qemu-idt-error-code", "qemu-rf-fault-frames")),
        (4, ("qemu-idt-error-code",)),
        (5, ("qemu-rf-fault-frames",)),
        (6, ("qemu-rf-fault-frames",)),
        (7, ()),
    ]
    summary = differ.report(res)[-3]
    assert summary == ("8 records compared: 3 identical, 5 expected divergences "
                       "(qemu-idt-error-code x2, qemu-rf-fault-frames x3); equal modulo known "
                       "divergences (reference: qemu)")


def test_the_same_qemu_differences_are_divergences_without_the_qemu_table() -> None:
    for reference in (None, "bochs"):
        res = diff(BOCHS_LOG, qemu_like(BOCHS_LOG), reference)
        assert (res.first, res.why) == (3, "err differs (0x282 vs 0x502)")


def test_a_difference_outside_the_table_fails_even_with_the_reference_table() -> None:
    # IF differs: no known QEMU divergence explains it.
    b = qemu_like(BOCHS_LOG).replace("rflags=0x2 sp=0x10eff0 ss=0x10\nidtlog1 gp_fault FAIL",
                                     "rflags=0x202 sp=0x10eff0 ss=0x10\nidtlog1 gp_fault FAIL")
    res = diff(BOCHS_LOG, b, "qemu")
    assert (res.first, res.why) == (5, "rflags differs (0x10002 vs 0x202)")
    assert [e.index for e in res.expected] == [3, 4]


def test_rf_differences_are_expected_only_in_fault_frames() -> None:
    a = "idtlog1 t ev=03 rsp=0x10 rip=0x1 cs=0x8 rflags=0x10002 sp=0x20 ss=0x10\n"
    res = diff(a, a.replace("0x10002", "0x2"), "qemu")
    assert (res.first, res.why) == (0, "rflags differs (0x10002 vs 0x2)")


def test_an_error_code_is_expected_only_when_it_is_exactly_vector_times_16_plus_2() -> None:
    a = "idtlog1 t ev=0d rsp=0x10 err=0x40a rip=0x1 cs=0x23 rflags=0x10002 sp=0x20 ss=0x2b\n"
    assert diff(a, a.replace("err=0x40a", "err=0x812"), "qemu").equal
    res = diff(a, a.replace("err=0x40a", "err=0x813"), "qemu")
    assert (res.first, res.why) == (0, "err differs (0x40a vs 0x813)")


def test_a_fail_verdict_is_expected_only_if_its_reason_matches_a_divergence_seen_in_that_test() -> None:
    b = qemu_like(BOCHS_LOG).replace("FAIL rf is not set in the gp fault frame",
                                     "FAIL pushed rip is not the faulting instruction")
    res = diff(BOCHS_LOG, b, "qemu")
    assert (res.first, res.why) == (6, "different verdicts")


def test_the_saved_cs_rip_and_rf_of_a_double_fault_may_differ_for_every_reference() -> None:
    a = "idtlog1 t ev=08 rsp=0x10 err=0x0 rip=0x1 cs=0x8 rflags=0x10002 sp=0x20 ss=0x10\n"
    b = a.replace("rip=0x1 ", "rip=0x7 ").replace("rflags=0x10002", "rflags=0x2")
    res = diff(a, b)
    assert res.equal and [e.ids for e in res.expected] == [("df-state-undefined",)]
    res = diff(a, a.replace("err=0x0", "err=0x1"))
    assert res.why == "err differs (0x0 vs 0x1)"


def test_a_log_that_stops_early_diverges_where_it_ends() -> None:
    b = "\n".join(BOCHS_LOG.splitlines()[:5])
    res = diff(BOCHS_LOG, b)
    assert (res.first, res.why) == (4, "log B ends here (4 records)")
    assert "> (end of log after 4 records)" in differ.report(res, "a", "b")


def test_logs_of_different_images_are_bad_input() -> None:
    with pytest.raises(BadInput, match=r"^the logs are of different images \(np_df vs pf_codes\)$"):
        diff(BOCHS_LOG, BOCHS_LOG.replace("np_df", "pf_codes"))


def test_an_unreadable_or_recordless_log_is_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text("SeaBIOS\nno records here\n")
    with pytest.raises(BadInput, match=r"empty.log: no 'idtlog1' records"):
        differ.read_log(empty)
    with pytest.raises(BadInput, match=r"missing.log: no such file$"):
        differ.read_log(tmp_path / "missing.log")
    with pytest.raises(BadInput, match=r"unknown reference 'kvm'"):
        differ.known_divergences("kvm")


def test_the_cli_exits_0_when_equal_modulo_known_divergences_1_on_divergence_2_on_bad_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, other = tmp_path / "bochs.log", tmp_path / "qemu.log", tmp_path / "other.log"
    a.write_text(BOCHS_LOG)
    b.write_text(qemu_like(BOCHS_LOG))
    other.write_text(BOCHS_LOG.replace("rip=0x100054", "rip=0x100055"))
    assert cli.main(["diff", str(a), str(b), "--reference", "qemu"]) == 0
    assert cli.main(["diff", str(a), str(b)]) == 1
    assert cli.main(["diff", str(a), str(other), "--reference", "bochs"]) == 1
    capsys.readouterr()
    assert cli.main(["diff", str(a), str(tmp_path / "nope.log")]) == 2
    err = capsys.readouterr().err
    assert err == f"idtlab: error: {tmp_path / 'nope.log'}: no such file\n"
