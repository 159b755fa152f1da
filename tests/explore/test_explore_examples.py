"""The race explorer's shipped examples and their exact findings: the nested-NMI IST
clobber, the #VE re-arm race (NMI and ept_revoke sweeps), and the async-#PF policy x
handler matrix. Every expected point list below is derived from the rules (SDM Vol. 3A
"Handling Multiple NMIs"; Vol. 3C "Virtualization Exceptions"; KVM's injection checks in
Linux arch/x86/kvm/x86.c), as the comments say, not copied from a run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cpu.devices.apf import POLICIES
from idtlab import apf_matrix
from idtlab.cli import main
from idtlab.explore import explore

EXAMPLES = Path(__file__).resolve().parents[2] / "idtlab" / "examples"
NAIVE = EXAMPLES / "explore" / "nested_nmi_naive.toml"
SAFE = EXAMPLES / "explore" / "nested_nmi_safe.toml"
VE_CLEAR = EXAMPLES / "explore" / "ve_rearm_clear_then_iret.toml"
VE_DEFERRED = EXAMPLES / "explore" / "ve_rearm_deferred.toml"
VE_STACK_PAGE = "0x8f000"  # IST1 = 0x90000: the #VE frame lives at 0x8ffd8

# The naive NMI handler's boundaries in the undisturbed run (one NMI, before `work`).
NAIVE_HANDLER = ["nmi_handler (#1)", "nmi_handler+0x1 (#1)", "nmi_handler+0x8 (#1)",
                 "bp_handler (#1)", "bp_iret (#1)", "nmi_after_int3 (#1)", "nmi_iret (#1)"]
# Back in main: `work` was reached once before the NMI; three loop iterations follow.
NAIVE_MAIN = ["work (#2)", "work+0x1 (#1)", "work+0x4 (#1)", "work (#3)", "work+0x1 (#2)",
              "work+0x4 (#2)", "work (#4)", "work+0x1 (#3)", "work+0x4 (#3)", "main_done (#1)"]


# -- the nested-NMI IST clobber -----------------------------------------------------------
def test_the_naive_nmi_handler_breaks_wherever_a_second_nmi_lands_before_its_own_iret() -> None:
    # SDM: NMIs are blocked from the first NMI's delivery to the next IRET - the #BP
    # handler's. A second NMI before bp_iret's IRETQ is latched and delivered right after
    # it, at nmi_after_int3, on IST1; one after it is delivered at once, on IST1. Either
    # way it overwrites the live NMI frame (latching does not help: the #BP IRET releases
    # the latch, not the NMI's own). After the NMI's IRETQ (back in `work`) it is harmless.
    findings = explore(NAIVE, "nmi", "nmi_handler", "main_done", invariants=("frames-intact",))
    assert [f.point.label for f in findings] == NAIVE_HANDLER + NAIVE_MAIN
    assert [f.point.label for f in findings if not f.ok] == NAIVE_HANDLER
    for f in findings[:len(NAIVE_HANDLER)]:
        assert f.outcome == "max_insns", f.name  # the outer NMI loops on the nested frame
        assert ("invariant frames-intact: the NMI frame at 0x121fd8 was overwritten by a NMI "
                "delivery before its IRET") in f.failures, f.name
    assert {f.outcome for f in findings[len(NAIVE_HANDLER):]} == {"exit"}


def test_the_nesting_safe_nmi_handler_survives_a_second_nmi_at_every_point() -> None:
    findings = explore(SAFE, "nmi", "nmi_handler", "main_done")
    labels = [f.point.label for f in findings]
    assert labels[0] == "nmi_handler (#1)" and labels[-len(NAIVE_MAIN):] == NAIVE_MAIN
    assert "bp_iret (#1)" in labels and "repeat_nmi (#1)" in labels
    assert [f.name for f in findings if not f.ok] == []
    assert {f.outcome for f in findings} == {"exit"}


def test_in_the_safe_handler_every_second_nmi_before_the_final_iret_nests_and_is_absorbed() -> None:
    # Not vacuous: inside the handler the second NMI really nests (it overwrites the
    # hardware frame at the IST1 top, which frames-intact reports) and the handler still
    # runs the body once per NMI (exit code 2); after the final IRETQ it does not nest.
    findings = explore(SAFE, "nmi", "nmi_handler", "main_done", invariants=("frames-intact",))
    nested = [f.point.label for f in findings if not f.ok]
    handler = [f.point.label for f in findings][:-len(NAIVE_MAIN)]
    assert nested == handler and handler[-1] == "end_repeat_nmi+0x1d (#1)"  # the final iretq
    for f in findings:
        assert [x for x in f.failures if not x.startswith("invariant frames-intact")] == [], f.name


def test_the_explore_command_gates_on_the_nested_nmi_examples(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", str(NAIVE), "--window", "nmi_handler..main_done",
                 "--invariant", "frames-intact"]) == 1
    assert "17 schedules, 7 break an expectation or invariant" in capsys.readouterr().out
    assert main(["explore", str(SAFE), "--window", "nmi_handler..main_done"]) == 0
    assert "45 schedules, 0 break" in capsys.readouterr().out


# -- expectations scoped to the runs they describe ------------------------------------------
def test_the_safe_nmi_handler_survives_every_pair_of_nmis_with_its_always_expectations() -> None:
    # Two explorer NMIs: wherever they land, the loop finishes and no NMI is left without
    # a body run after it. The body runs 2 or 3 times: two NMIs that arrive while NMIs
    # are blocked are one latched NMI, and nested NMIs merge into one repeat (Linux does
    # the same); neither is a lost NMI, so the count is not an expectation there.
    findings = explore(SAFE, ("nmi", "nmi"), "nmi_handler", "main_done")
    assert len(findings) == 45 * 46 // 2
    assert [f.name for f in findings if not f.ok] == []
    assert {f.outcome for f in findings} == {"exit"}


def test_the_safe_nmi_handler_survives_a_random_search_of_up_to_four_nmis() -> None:
    from idtlab.explore import random_search

    findings, minimal = random_search(SAFE, ("nmi",), "nmi_handler", "main_done", count=120,
                                      seed=1, max_events=4)
    assert minimal is None and [f.name for f in findings if not f.ok] == []
    assert max(len(f.events) for f in findings) == 4


def test_the_naive_nmi_handler_still_breaks_under_pairs_and_a_random_search() -> None:
    from idtlab.explore import random_search

    pairs = explore(NAIVE, ("nmi", "nmi"), "nmi_handler", "main_done")
    assert sum(not f.ok for f in pairs) > 0
    for f in pairs:
        if f.schedule[0].label in NAIVE_HANDLER:  # the first one alone clobbers the frame
            assert f.outcome == "max_insns", f.name
            assert f.failures[0].startswith("[[expect]] #1: outcome: expected exit, got "
                                            "max_insns"), f.name
    _, minimal = random_search(NAIVE, ("nmi",), "nmi_handler", "main_done", count=30, seed=1)
    assert minimal is not None and [p.label for p in minimal.schedule] == ["nmi_handler (#1)"]


def test_the_safe_handler_fails_its_pending_check_when_a_nested_nmi_does_not_ask_for_a_repeat(
        tmp_path: Path) -> None:
    # The expectations are not vacuous: without the nested NMI's rewrite of the iret
    # frame, an NMI that nests after the body started is never handled.
    text = SAFE.read_text()
    rewrite = "    mov qword ptr [0x121f00], rax   # the outer's final IRETQ now runs the body once more\n"
    assert text.count(rewrite) == 1
    broken = tmp_path / "no_repeat.toml"
    broken.write_text(text.replace(rewrite, "    nop\n"))
    findings = explore(broken, ("nmi", "nmi"), "nmi_handler", "main_done")
    assert any("[[expect]] #2: mem 0x110038 (8 bytes): expected 0x0, got 0x1" in f.failures
               for f in findings)


def test_a_run_of_the_example_alone_checks_only_what_describes_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(SAFE), "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        '4/4 expectations hold (1 more describe the explorer\'s runs only: scope "explored")')


# -- the #VE re-arm race ------------------------------------------------------------------
VE_CLEAR_POINTS = ["ve_handler (#1)", "ve_handler+0x1 (#1)", "ve_handler+0x8 (#1)",
                   "ve_rearm (#1)", "ve_rearmed (#1)", "ve_iret (#1)"]
VE_DEFERRED_POINTS = ["ve_handler (#1)", "ve_handler+0x1 (#1)", "ve_handler+0x8 (#1)",
                      "ve_handler+0xe (#1)", "ve_handler+0x18 (#1)", "ve_done (#1)",
                      "ve_iret (#1)"]
VMEXIT = "invariant no-vmexit: a VM exit happened (busy word is 0xffffffff)"


def test_clear_then_iret_breaks_exactly_between_clearing_the_busy_word_and_the_iret() -> None:
    # An NMI up to and including the re-arm store's boundary runs before the store: the
    # busy word is set, so its handler's violation is a VM exit (fixed, resumed). After
    # the store it is #VE 2, on IST1, over #VE 1's live frame.
    findings = explore(VE_CLEAR, "nmi", "ve_handler", "ve_iret",
                       invariants=("frames-intact", "no-vmexit"))
    assert [f.point.label for f in findings] == VE_CLEAR_POINTS
    for f in findings[:4]:
        assert f.outcome == "exit" and list(f.failures) == [VMEXIT], f.name
    for f in findings[4:]:
        assert f.outcome == "max_insns", f.name
        assert ("invariant frames-intact: the #VE frame at 0x8ffd8 was overwritten by a #VE "
                "delivery before its IRET") in f.failures, f.name
        assert not any("no-vmexit" in x for x in f.failures), f.name  # a #VE, not an exit


def test_deferred_rearm_survives_an_nmi_anywhere_in_the_ve_handler_by_a_vm_exit() -> None:
    findings = explore(VE_DEFERRED, "nmi", "ve_handler", "ve_iret",
                       invariants=("frames-intact", "no-vmexit"))
    assert [f.point.label for f in findings] == VE_DEFERRED_POINTS
    # Every point passes the scenario's expectations and frames-intact; the only failure
    # is the VM exit that the set busy word turns the NMI's violation into.
    assert [list(f.failures) for f in findings] == [[VMEXIT]] * len(VE_DEFERRED_POINTS)
    assert [f.name for f in explore(VE_DEFERRED, "nmi", "ve_handler", "ve_iret",
                                    invariants=("frames-intact",)) if not f.ok] == []


def test_revoking_the_ve_stack_page_breaks_clear_then_iret_from_the_rearm_store_on() -> None:
    # ept_revoke takes effect at the next access to the page. Before the store the next
    # stack access (push, add [rsp+8], pop) sees the busy word set: a VM exit. At the
    # store's boundary the next stack access is the pop *after* it: a #VE on IST1 whose
    # frame push is itself a VM exit (never a #VE during delivery), re-delivered over #VE
    # 1's frame. So one point earlier than the NMI sweep.
    findings = explore(VE_CLEAR, f"ept_revoke:{VE_STACK_PAGE}", "ve_handler", "ve_iret",
                       invariants=("frames-intact",))
    assert [f.point.label for f in findings] == VE_CLEAR_POINTS
    assert [f.point.label for f in findings if not f.ok] == [
        "ve_rearm (#1)", "ve_rearmed (#1)", "ve_iret (#1)"]
    assert all("the #VE frame at 0x8ffd8 was overwritten" in " ".join(f.failures)
               for f in findings if not f.ok)


def test_revoking_the_ve_stack_page_never_breaks_the_deferred_design() -> None:
    findings = explore(VE_DEFERRED, f"ept_revoke:{VE_STACK_PAGE}", "ve_handler", "ve_iret",
                       invariants=("frames-intact", "no-vmexit"))
    assert [list(f.failures) for f in findings] == [[VMEXIT]] * len(VE_DEFERRED_POINTS)


# -- the async-#PF policy x handler matrix ------------------------------------------------
@pytest.fixture(scope="module")
def matrix() -> dict[str, apf_matrix.Row]:
    return {r.design.name: r for r in apf_matrix.policy_matrix()}


# The #PF entry of the CR2/flags examples, up to the first instruction after its reads.
PF_ENTRY = ["pf_handler (#1)", "pf_handler+0x1 (#1)", "pf_handler+0x2 (#1)",
            "pf_handler+0x3 (#1)",   # mov eax, [flags]
            "pf_handler+0xc (#1)",   # mov dword ptr [flags], 0
            "pf_handler+0x16 (#1)",  # mov rbx, cr2
            "pf_reads_done (#1)"]


def test_the_matrix_has_one_row_per_design_and_one_cell_per_policy(
        matrix: dict[str, apf_matrix.Row]) -> None:
    assert list(matrix) == [d.name for d in apf_matrix.DESIGNS] == [
        "cr2-flags-race", "nmi-saves-cr2", "nmi-touches-swapped",
        "nmi-touches-swapped-no-send-always", "nmi-touches-swapped-if0", "pf-nmi-db-pf"]
    for row in matrix.values():
        assert [c.policy for c in row.cells] == list(POLICIES) == [
            "kvm", "kvm-send-always", "never-while-nmi-blocked", "always"]


@pytest.mark.parametrize("design, broken", [
    # No CR2 save: the NMI's ordinary #PF clobbers flags (consumed by the inner handler)
    # before the outer entry clears it, and CR2 before the outer entry reads it.
    ("cr2-flags-race", PF_ENTRY[:6]),
    # CR2 restored by the NMI: only the flags word is lost, up to the clearing store.
    ("nmi-saves-cr2", PF_ENTRY[:5]),
])
def test_the_cr2_flags_race_is_reachable_under_every_policy_up_to_the_entrys_last_read(
        matrix: dict[str, apf_matrix.Row], design: str, broken: list[str]) -> None:
    # The async #PF is forced (the policy is not asked) and the NMI's #PF is an ordinary
    # one, so every column is the same.
    for cell in matrix[design].cells:
        assert list(cell.window) == PF_ENTRY, cell.policy
        assert list(cell.breaking) == broken, cell.policy
        assert cell.failure is not None and "async #PF tokens issued ['0x1']" in cell.failure


# reachable per policy (kvm, kvm-send-always, never-while-nmi-blocked, always), from
# KVM (arch/x86/kvm/x86.c) / cpu.devices.apf.decide: the NMI handler's access is injected iff
# IF=1 (unless "always"), CPL 0 needs SEND_ALWAYS (or "kvm-send-always"/"always"), and
# "never-while-nmi-blocked" refuses while the NMI runs. An injected #PF makes the #PF or
# page-ready IRET unblock NMIs inside the NMI handler: a second NMI anywhere in it nests.
@pytest.mark.parametrize("design, reachable", [
    ("nmi-touches-swapped", (True, True, False, True)),
    ("nmi-touches-swapped-no-send-always", (False, True, False, True)),
    ("nmi-touches-swapped-if0", (False, False, False, True)),
    # #PF -> NMI -> #DB -> ordinary #PF: no policy is asked inside the NMI.
    ("pf-nmi-db-pf", (True, True, True, True)),
])
def test_the_nested_nmi_race_is_reachable_exactly_where_the_host_injects_into_the_nmi(
        matrix: dict[str, apf_matrix.Row], design: str, reachable: tuple[bool, ...]) -> None:
    row = matrix[design]
    assert tuple(c.reachable for c in row.cells) == reachable
    for cell in row.cells:
        assert cell.window[0] == "nmi_handler (#1)" and cell.window[-1] == "nmi_iret (#1)"
        # A #PF ran inside the NMI handler exactly when the race is reachable ...
        assert any(p.startswith("pf_handler") for p in cell.window) == cell.reachable
        if cell.reachable:
            # ... and then every point of the window breaks, from the first on.
            assert cell.breaking == cell.window, cell.policy
            assert cell.failure == ("invariant frames-intact: the NMI frame at 0x8ffd8 was "
                                    "overwritten by a NMI delivery before its IRET")


def test_apf_matrix_demo_prints_the_matrix(matrix: dict[str, apf_matrix.Row],
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(apf_matrix, "policy_matrix", lambda: list(matrix.values()))
    assert main(["demo", "apf-matrix"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["design", *POLICIES]
    cells = {line.split()[0]: line for line in lines[1:7]}
    assert cells["cr2-flags-race"].count("race: 6/7 @ pf_handler (#1)") == 4
    assert cells["nmi-saves-cr2"].count("race: 5/7 @ pf_handler (#1)") == 4
    assert cells["nmi-touches-swapped-if0"].count("safe (") == 3
    assert lines[7] == "" and lines[10].startswith(
        "nmi-touches-swapped: NMI handler, IF=1, SEND_ALWAYS, reads swapped memory "
        "(apf_nmi_blocked_kvm_injects.toml; NMI at every point of nmi_handler..nmi_iret; "
        "invariant frames-intact)")


def test_a_variant_sets_the_policy_drops_the_taken_over_event_and_the_expectations() -> None:
    design = apf_matrix.DESIGNS[3]  # nmi-touches-swapped-no-send-always
    data = tomllib.loads(apf_matrix.variant(design, "never-while-nmi-blocked"))
    assert data["apf"]["policy"] == "never-while-nmi-blocked"
    assert data["inject"] == [{"event": "nmi", "before": "the_nmi"}]
    assert "expect" not in data
    asm = data["code"][0]["asm"]
    assert "mov eax, 0x140009" in asm and "0x14000b" not in asm
    assert "nmi_iret:\n    iretq" in asm
    with pytest.raises(ValueError, match="unknown async-#PF policy 'sometimes'"):
        apf_matrix.variant(design, "sometimes")


@pytest.mark.parametrize("example", sorted(p.name for p in (EXAMPLES / "apf").glob("*.toml")))
def test_to_toml_writes_back_what_tomllib_read(example: str) -> None:
    data = tomllib.loads((EXAMPLES / "apf" / example).read_text())
    assert tomllib.loads(apf_matrix.to_toml(data)) == data
