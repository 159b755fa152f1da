"""The async-#PF example scenarios (idtlab/examples/apf/): each one's own [[expect]]
entries hold, its trace is byte-identical from run to run, and the records a TOML
expectation cannot look into (`apf_not_present` reasons, `apf_halt` cycles, the CR2 of
each #PF delivery, `iret.nmi_unblocked`, `frame_overwritten`) carry the values the
example's comment block explains (Linux arch/x86/kvm/x86.c; the CR2/flags race of the
LKML thread "[PATCH v2] x86/kvm: Disable KVM_ASYNC_PF_SEND_ALWAYS")."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from idtlab import scenario as scn
from idtlab.trace import to_jsonl
from tests.apf.kit import of_kind, one

APF_DIR = Path(__file__).resolve().parents[2] / "idtlab" / "examples" / "apf"
EXAMPLES = [
    "apf_protocol",
    "apf_cr2_flags_race",
    "apf_cr2_race_nmi_saves_cr2",
    "apf_nmi_blocked_kvm_injects",
    "apf_never_while_nmi_blocked",
    "apf_pf_nmi_db_pf",
    "apf_legacy_layout",
    "apf_wake_all_and_halt",
    "apf_error_gfn_loop",
    "apf_error_spte_tag",
]
PF, NMI, DB = 14, 2, 1


def run(name: str) -> tuple[scn.Scenario, Any]:
    sc = scn.load(APF_DIR / f"{name}.toml")
    return sc, scn.run(sc)


def test_every_apf_example_file_is_listed() -> None:
    assert sorted(p.stem for p in APF_DIR.glob("*.toml")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_apf_example_meets_its_own_expectations(name: str) -> None:
    sc, result = run(name)
    assert scn.check(sc, result) == []
    assert len(sc.expects) >= 5


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_apf_example_also_holds_in_timed_mode(name: str) -> None:
    sc = scn.load(APF_DIR / f"{name}.toml", mode="timed")
    assert scn.check(sc, scn.run(sc)) == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_apf_example_gives_the_same_trace_twice(name: str) -> None:
    traces = [to_jsonl(run(name)[1].trace.records) for _ in range(2)]
    assert traces[0] == traces[1]


def pf_cr2s(result: Any) -> list[int]:
    return [r["cr2"] for r in of_kind(result.trace.records, "deliver") if r["vector"] == PF]


@pytest.mark.parametrize("name", ["apf_cr2_flags_race", "apf_cr2_race_nmi_saves_cr2"])
def test_in_the_race_the_nmi_lands_before_the_outer_pf_reads_anything(name: str) -> None:
    sc, result = run(name)
    recs = result.trace.records
    forced, retry = of_kind(recs, "apf_not_present")
    assert (forced["token"], forced["reason"]) == (1, "forced by the scenario")
    # the outer handler, taking its async #PF for an ordinary one, retries the load:
    assert (retry["decision"], retry["reason"]) == ("halt", "page-in already in flight (repeated fault)")
    delivered = [(r["vector"], r["rip"]) for r in of_kind(recs, "deliver")][1:4]
    assert delivered == [(PF, sc.symbols["the_load"]), (NMI, sc.symbols["pf_handler"]),
                         (PF, sc.symbols["nmi_copy"])]
    assert pf_cr2s(result) == [1, 0x500000, 0x500000]  # the async token, then the NMI's own
    # The inner #PF's IRET (inside the NMI handler) is the one that unblocks NMIs.
    unblocking = [r for r in of_kind(recs, "iret") if r["nmi_unblocked"]]
    assert unblocking[0]["to_rip"] == sc.symbols["nmi_copy"]


def test_the_nmi_saved_cr2_but_the_flags_word_is_lost_either_way() -> None:
    logs = {}
    for name in ("apf_cr2_flags_race", "apf_cr2_race_nmi_saves_cr2"):
        sc, _ = run(name)
        logs[name] = [int.from_bytes(sc.machine.read_linear(sc.symbols["pf_log"] + 8 * i, 8), "little")
                      for i in range(6)]  # type: ignore[union-attr]
    # outer entry (the third): {flags, CR2}
    assert logs["apf_cr2_flags_race"][4:] == [0, 0x500000]
    assert logs["apf_cr2_race_nmi_saves_cr2"][4:] == [0, 1]


def test_the_nmi_blocked_pair_differs_only_in_the_policy() -> None:
    data = {n: tomllib.loads((APF_DIR / f"{n}.toml").read_text())
            for n in ("apf_nmi_blocked_kvm_injects", "apf_never_while_nmi_blocked")}
    a, b = data.values()
    assert a["apf"] == {"policy": "kvm"} and b["apf"] == {"policy": "never-while-nmi-blocked"}
    strip = {"apf", "expect"}
    assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def test_under_kvm_the_pf_is_injected_into_the_nmi_and_a_nested_nmi_overwrites_its_frame() -> None:
    sc, result = run("apf_nmi_blocked_kvm_injects")
    recs = result.trace.records
    decision = one(recs, "apf_not_present")
    assert (decision["decision"], decision["reason"], decision["policy"]) == ("inject", "allowed", "kvm")
    latched = one(recs, "nmi_latched")
    assert latched["seq"] < decision["seq"]  # NMIs were blocked when the host decided
    over = one(recs, "frame_overwritten")
    assert (over["by"], over["victim"]) == ("NMI", "NMI")
    assert dict((s[0], s[1:]) for s in over["slots"])["rip"] == [sc.symbols["the_nmi"],
                                                                  sc.symbols["wait_ready"] + 1]


def test_under_the_mitigation_the_host_halts_and_the_second_nmi_waits_its_turn() -> None:
    _, result = run("apf_never_while_nmi_blocked")
    recs = result.trace.records
    decision = one(recs, "apf_not_present")
    assert (decision["decision"], decision["reason"], decision["token"]) == ("halt", "NMIs blocked", None)
    assert one(recs, "apf_halt")["cycles"] == 5000
    assert of_kind(recs, "frame_overwritten") == []
    nmis = [r for r in of_kind(recs, "deliver") if r["vector"] == NMI]
    first_iret = next(r for r in of_kind(recs, "iret") if r["nmi_unblocked"])
    assert nmis[1]["seq"] > first_iret["seq"]


def test_the_chain_runs_pf_nmi_db_pf_and_the_second_nmi_nests() -> None:
    sc, result = run("apf_pf_nmi_db_pf")
    recs = result.trace.records
    chain = [(r["vector"], r["stack"]) for r in of_kind(recs, "deliver")][1:7]
    assert chain == [(PF, "current"), (NMI, "ist1"), (DB, "ist2"), (PF, "current"), (PF, "current"),
                     (NMI, "ist1")]
    assert pf_cr2s(result) == [1, 0x500000, 0x500000]
    unblocking = [r for r in of_kind(recs, "iret") if r["nmi_unblocked"]]
    assert unblocking[0]["to_rip"] == sc.symbols["db_copy"]  # the #DB handler's #PF returning
    over = one(recs, "frame_overwritten")
    assert dict((s[0], s[1:]) for s in over["slots"])["rip"] == [sc.symbols["pf_handler"],
                                                                  sc.symbols["nmi_after_db"]]


def test_the_legacy_layout_sends_both_events_as_pf_with_cr2_the_token() -> None:
    _, result = run("apf_legacy_layout")
    recs = result.trace.records
    assert pf_cr2s(result) == [1, 1]
    ready = one(recs, "apf_page_ready")
    assert (ready["token"], ready["vector"], ready["layout"]) == (1, PF, "legacy")
    assert all(r["error_code"] == 0 for r in of_kind(recs, "deliver"))


def test_the_halting_example_stalls_for_the_latency_for_the_reason_kvm_gives() -> None:
    _, result = run("apf_wake_all_and_halt")
    recs = result.trace.records
    assert [(r["decision"], r["reason"]) for r in of_kind(recs, "apf_not_present")] == [
        ("halt", "RFLAGS.IF=0"), ("halt", "CPL 0 without SEND_ALWAYS")]
    assert [r["cycles"] for r in of_kind(recs, "apf_halt")] == [3000, 3000]
    assert [r["token"] for r in of_kind(recs, "apf_page_ready")] == [0xFFFFFFFF]
