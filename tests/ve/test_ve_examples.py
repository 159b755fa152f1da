"""The #VE example scenarios (idtlab/examples/ve/): each one's own [[expect]] entries hold,
its trace is byte-identical from run to run, and the records a TOML expectation cannot
look into (`ve_info_written`, `vmexit`, `delivery_fault`, the #DF's `double_fault_of`)
carry the values the example's comment block explains (SDM Vol. 3C "Virtualization
Exceptions", "Exit Qualification for EPT Violations")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from idtlab import scenario as scn
from idtlab.trace import to_jsonl
from tests.ve.kit import decoded, of_kind

VE_DIR = Path(__file__).resolve().parents[2] / "idtlab" / "examples" / "ve"
EXAMPLES = [
    "ve_first",
    "ve_second_before_rearm",
    "ve_rearm_then_again",
    "ve_during_delivery",
    "ve_suppress_leaf",
    "ve_suppress_pml4",
    "ve_suppress_pml4_suppressed",
    "ve_pf_during_delivery_df",
    "ve_iret_nmi_unblock",
]
VE_INFO = 0x130000
BUSY = 0xFFFFFFFF


def run(name: str) -> tuple[scn.Scenario, Any]:
    sc = scn.load(VE_DIR / f"{name}.toml")
    return sc, scn.run(sc)


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_ve_example_meets_its_own_expectations(name: str) -> None:
    sc, result = run(name)
    assert scn.check(sc, result) == []
    assert len(sc.expects) >= 4


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_ve_example_gives_the_same_trace_twice(name: str) -> None:
    traces = [to_jsonl(run(name)[1].trace.records) for _ in range(2)]
    assert traces[0] == traces[1]


def ve(qual: int, gla: int, gpa: int, eptp_index: int = 0) -> dict[str, Any]:
    return {"at": VE_INFO, "exit_reason": 48, "busy": BUSY, "qualification": qual, "gla": gla,
            "gpa": gpa, "eptp_index": eptp_index, **decoded(qual)}


def vmexit(qual: int, gla: int, gpa: int | None, rip: int, why: str, action: str,
           during: str | None = None, nmi: bool = False) -> dict[str, Any]:
    rec = {"reason": 48, "qualification": qual, "gla": gla, "rip": rip, "during_delivery": during,
           "nmi_unblocked_by_iret": nmi, "why": why, "action": action}
    if gpa is not None:
        rec["gpa"] = gpa
    return rec


def fields(records: list[dict[str, Any]], kind: str, like: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of `kind`, each cut down to the keys of the matching expected record."""
    got = of_kind(records, kind)
    assert len(got) == len(like), f"{len(got)} {kind} records, expected {len(like)}"
    return [{k: r.get(k) for k in want} for r, want in zip(got, like, strict=True)]


def test_second_before_rearm_converts_the_first_violation_and_exits_on_the_second() -> None:
    sc, r = run("ve_second_before_rearm")
    s, recs = sc.symbols, r.trace.records
    want_ve = [ve(0x181, 0x400000, 0x400000, eptp_index=3)]
    want_exit = [vmexit(0x181, 0x401000, 0x401000, s["second_load"], "busy word is 0xffffffff",
                        "resume-fixed")]
    assert fields(recs, "ve_info_written", want_ve) == want_ve
    assert fields(recs, "vmexit", want_exit) == want_exit


def test_rearm_then_again_writes_the_area_twice() -> None:
    _sc, r = run("ve_rearm_then_again")
    want = [ve(0x181, 0x400000, 0x400000), ve(0x182, 0x402000, 0x402000)]
    assert fields(r.trace.records, "ve_info_written", want) == want
    assert of_kind(r.trace.records, "vmexit") == []


def test_during_delivery_exits_with_the_bp_in_the_idt_vectoring_information() -> None:
    sc, r = run("ve_during_delivery")
    # GPA: only its page is checked here (the page offset is lost, see
    # test_ve_rules.py::test_the_gpa_of_a_vm_exit_while_pushing_a_frame_is_the_pushed_address).
    want = [vmexit(0x18A, 0x121FF8, None, sc.symbols["main"], "during event delivery",
                   "resume-fixed", during="#BP")]
    assert fields(r.trace.records, "vmexit", want) == want
    assert of_kind(r.trace.records, "vmexit")[0]["gpa"] >> 12 == 0x121
    assert of_kind(r.trace.records, "ve_info_written") == []


def test_suppress_leaf_converts_only_the_leaf_without_bit_63() -> None:
    sc, r = run("ve_suppress_leaf")
    s, recs = sc.symbols, r.trace.records
    want_ve = [ve(0x181, 0x400000, 0x400000)]
    want_exit = [vmexit(0x181, 0x401000, 0x401000, s["load_exit"], "suppress-#VE bit set", "resume-fixed"),
                 vmexit(0x18A, 0x402000, 0x402000, s["store_exit"], "suppress-#VE bit set", "resume-fixed")]
    assert fields(recs, "ve_info_written", want_ve) == want_ve
    assert fields(recs, "vmexit", want_exit) == want_exit


def test_suppress_pml4_reports_the_gpa_far_above_ram_and_its_eptp_index() -> None:
    _sc, r = run("ve_suppress_pml4")
    want = [ve(0x181, 0x400000, 0x80_0000_0000, eptp_index=1)]
    assert fields(r.trace.records, "ve_info_written", want) == want


def test_suppress_pml4_suppressed_is_a_vm_exit_the_host_stops_at() -> None:
    sc, r = run("ve_suppress_pml4_suppressed")
    want = [vmexit(0x181, 0x400000, 0x80_0000_0000, sc.symbols["the_load"], "suppress-#VE bit set",
                   "stop")]
    assert fields(r.trace.records, "vmexit", want) == want
    assert (r.outcome, r.rip) == ("vmexit", sc.symbols["the_load"])


def test_pf_during_delivery_gives_a_df_of_ve_then_pf() -> None:
    sc, r = run("ve_pf_during_delivery_df")
    recs = r.trace.records
    want_ve = [ve(0x181, 0x400000, 0x400000)]
    assert fields(recs, "ve_info_written", want_ve) == want_ve
    want_fault = [{"vector": 20, "name": "#VE", "fault": 14, "fault_name": "#PF", "error_code": 2,
                   "action": "double-fault"}]
    assert fields(recs, "delivery_fault", want_fault) == want_fault
    (df,) = of_kind(recs, "deliver")
    assert (df["vector"], df["name"], df["error_code"], df["stack"], df["double_fault_of"]) == (
        8, "#DF", 0, "ist1", [20, 14])
    assert df["handler"] == sc.symbols["df_handler"]


def test_iret_nmi_unblock_sets_bit_12_in_both_the_ve_and_the_vm_exit() -> None:
    sc, r = run("ve_iret_nmi_unblock")
    s, recs = sc.symbols, r.trace.records
    want_ve = [ve(0x1181, 0x150000, 0x150000)]
    want_exit = [vmexit(0x1181, 0x150000, 0x150000, s["nmi_iret"], "busy word is 0xffffffff",
                        "resume-fixed", nmi=True)]
    assert fields(recs, "ve_info_written", want_ve) == want_ve
    assert fields(recs, "vmexit", want_exit) == want_exit
    nmis = [d for d in of_kind(recs, "deliver") if d["name"] == "NMI"]
    # NMI #3 was latched in NMI #2's handler and taken only after the re-executed IRETQ,
    # at its target `back`, not at the IRETQ.
    assert [d["rip"] for d in nmis] == [s["p1"], s["p2"], s["back"]]
    (ve_dlv,) = [d for d in of_kind(recs, "deliver") if d["name"] == "#VE"]
    assert (ve_dlv["rip"], ve_dlv["old_rsp"], ve_dlv["stack"]) == (s["nmi_iret"], 0x150000, "ist2")
