"""Host events under the host's policy: an explorer's `async_pf` (or `ept_revoke`) means
"the host may do this here if its policy allows". The policy is asked at each point
(the scenario's `[apf] policy`, or the one the event names), a point where it refuses is
reported as refused and not checked, `--force` injects regardless, and a point where the
event cannot apply at all (the page is resident, or its page-in is in flight) is
reported as not applicable: never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpu.errors import BadInput
from cpu.events import AsyncPf, EptRevoke, parse_event
from cpu.machine import Machine
from idtlab import explore as ex
from idtlab import scenario as scn
from idtlab.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "idtlab" / "examples"
KVM_INJECTS = EXAMPLES / "apf" / "apf_nmi_blocked_kvm_injects.toml"

# KVM's async-#PF protocol enabled at CPL 0 with SEND_ALWAYS, then a CLI ... STI stretch
# and an NMI handler (entered at `the_nmi`) that runs with interrupts on. Under "kvm" the
# host may inject where IF = 1 outside a shadow, including inside the NMI handler (KVM
# never looks at NMI blocking); under "nmi-blocked-only" exactly where NMIs are not
# blocked. The #PF handler counts the async #PFs (the exit code) and returns: an
# injected async #PF is no instruction's fault, there is nothing to retry.
SCENARIO = """
[machine]
memory = "16M"
[apf]
policy = "kvm"
[[swapped]]
gpa = 0x400000
latency = 100000
[[code]]
at = 0x100000
asm = '''
main:
    mov ecx, 0x4b564d06
    mov eax, 0x40
    xor edx, edx
    wrmsr
    mov ecx, 0x4b564d02
    mov eax, 0x14000b               # area 0x140000 | DELIVERY_AS_INT | SEND_ALWAYS | ENABLED
    wrmsr
    cli
irq_off:
    nop
    nop
    sti
shadow:
    nop                             # the STI shadow covers this boundary
irq_on:
    nop
the_nmi:
    nop
back:
    nop
    mov dx, 0xf4
    mov al, byte ptr [pf_n]
    out dx, al

nmi_handler:
    sti                             # the NMI handler runs with interrupts on
nmi_body:
    nop
    nop
    iretq

pf_handler:
    inc qword ptr [pf_n]
    add rsp, 8
    iretq
ready_handler:
    iretq
'''
[[data]]
at = 0x110000
symbol = "pf_n"
size = 8
[[data]]
at = 0x140000
size = 64
[idt]
2 = { handler = "nmi_handler" }
14 = { handler = "pf_handler" }
0x40 = { handler = "ready_handler" }
[run]
entry = "main"
max_insns = 400
[[inject]]
event = "nmi"
before = "the_nmi"
[[expect]]
exit_code = 0                       # no async #PF reached the handler
"""


@pytest.fixture()
def scenario(tmp_path: Path) -> Path:
    p = tmp_path / "apf.toml"
    p.write_text(SCENARIO)
    return p


def _by_label(findings: list[ex.Finding]) -> dict[str, ex.Finding]:
    return {f.point.label: f for f in findings}


def test_a_host_event_asks_the_scenarios_policy_and_a_refusal_is_not_a_break(
        scenario: Path) -> None:
    got = _by_label(ex.explore(scenario, "async_pf:gpa=0x400000", "irq_off", "back"))
    # IF = 0 from the CLI to the STI; the STI's shadow at `shadow`: KVM refuses both.
    for label in ("irq_off (#1)", "irq_off+0x1 (#1)", "irq_off+0x2 (#1)"):
        f = got[label]
        assert f.status == "refused" and f.ok and f.failures == (), label
        assert f.declined == ex.Declined("refused", "async_pf:gpa=0x400000,policy=host",
                                         "RFLAGS.IF=0", "kvm"), label
    assert got["shadow (#1)"].declined is not None
    assert got["shadow (#1)"].declined.reason == "STI/MOV-SS interrupt shadow"
    # With IF = 1, no shadow: KVM injects, the #PF handler counts it: the expectation
    # (no async #PF) breaks - the host really would do this here.
    assert got["irq_on (#1)"].status == "breaks"
    assert got["irq_on (#1)"].failures == ("[[expect]] #1: exit code: expected 0, got 1",)
    # Inside the NMI handler: refused before its STI has run (IF = 0) and in the STI's
    # shadow; after that NMIs are still blocked, and KVM does not care: it injects.
    assert got["nmi_handler (#1)"].status == got["nmi_body (#1)"].status == "refused"
    assert got["nmi_body+0x1 (#1)"].status == "breaks"


def test_force_injects_wherever_the_schedule_puts_the_event(scenario: Path) -> None:
    got = _by_label(ex.explore(scenario, "async_pf:gpa=0x400000", "irq_off", "back",
                               force=True))
    assert {f.status for f in got.values()} == {"breaks"}
    assert got["irq_off (#1)"].failures == ("[[expect]] #1: exit code: expected 0, got 1",)


def test_a_host_that_only_checks_nmi_blocking_refuses_inside_the_nmi_handler_only(
        scenario: Path) -> None:
    # "Would a host that only checks NMI blocking inject here?" Yes with IF = 0 or in a
    # shadow (it does not look), no while NMIs are blocked.
    got = _by_label(ex.explore(scenario, "async_pf:gpa=0x400000,policy=nmi-blocked-only",
                               "irq_off", "back"))
    assert got["irq_off (#1)"].status == "breaks"
    assert got["shadow (#1)"].status == "breaks"
    for label in ("nmi_handler (#1)", "nmi_body (#1)", "nmi_body+0x1 (#1)",
                  "nmi_body+0x2 (#1)"):
        d = got[label].declined
        assert d is not None and (d.status, d.policy, d.reason) == (
            "refused", "nmi-blocked-only", "NMIs blocked"), label
    assert got["back (#1)"].status == "breaks"  # after the NMI's IRET


def test_a_python_policy_named_on_the_command_line_is_asked(
        scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "host.py"
    policy.write_text(
        "from cpu.devices.apf import Decision, decide\n"
        "def only_in_nmi(machine, g):\n"
        "    # KVM's checks, and only while NMIs are blocked\n"
        "    d = decide('kvm', g)\n"
        "    if d.inject and not g.nmi_blocked:\n"
        "        return Decision(False, 'this host injects inside NMI handlers only')\n"
        "    return d\n")
    code = main(["explore", str(scenario), "--event",
                 f"async_pf:gpa=0x400000,policy={policy}:only_in_nmi", "--window",
                 "irq_on..back"])
    out = capsys.readouterr().out
    assert code == 1
    assert "refused by policy only_in_nmi: this host injects inside NMI handlers only" in out
    assert "nmi_body+0x1 (#1) .. nmi_body+0x2 (#1)      2  exit       BREAKS" in out


def test_the_text_report_counts_refused_points_apart_and_force_with_a_policy_is_bad_input(
        scenario: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", str(scenario), "--event", "async_pf:gpa=0x400000", "--window",
                 "irq_off..shadow"]) == 0
    out = capsys.readouterr().out
    assert "refused by policy kvm: RFLAGS.IF=0" in out
    assert out.splitlines()[-1] == ("4 schedules, 0 break an expectation or invariant; "
                                    "4 refused by the host's policy")
    assert main(["explore", str(scenario), "--event", "async_pf:gpa=0x400000,policy=kvm",
                 "--force", "--window", "irq_off..shadow"]) == 2
    err = capsys.readouterr().err
    assert "names a policy, but --force injects whatever the policy says" in err


def test_a_page_in_flight_or_resident_is_not_applicable_never_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    # The former crash: the NMI handler's own access starts the page-in at nmi_touch;
    # from there on there is no swapped page to inject an async #PF for (forced or not).
    for force in ([], ["--force"]):
        code = main(["explore", str(KVM_INJECTS), "--event", "async_pf:gpa=0x400000",
                     "--window", "nmi_touch..nmi_out", *force])
        captured = capsys.readouterr()
        assert code in (0, 1) and "Traceback" not in captured.err, force
        assert ("not applicable: GPA 0x400000 is being paged in already (token 0x1): the "
                "host halts on a repeated fault, it never injects twice") in captured.out
        assert "not applicable: GPA 0x400000 is resident here: there is nothing to page in" \
            in captured.out
    findings = ex.explore(KVM_INJECTS, "async_pf:gpa=0x400000", "nmi_touch", "nmi_out")
    assert findings[0].status != "not_applicable"  # at nmi_touch the page is still out
    assert all(f.status == "not_applicable" for f in findings[1:])


def test_an_async_pf_whose_delivery_shuts_the_cpu_down_at_a_checkpoint_is_an_outcome(
        tmp_path: Path) -> None:
    # No #PF gate and no #DF gate: the injected #PF's delivery is a triple fault. The
    # first point of every checkpoint is injected between runs (Machine.arrive_now):
    # the shutdown must still end that run as an outcome.
    text = SCENARIO.replace("14 = { handler = \"pf_handler\" }\n", "")
    p = tmp_path / "no_pf_gate.toml"
    p.write_text(text)
    findings = ex.explore(p, "async_pf:gpa=0x400000", "irq_on", "irq_on", force=True)
    assert [(f.outcome, f.status) for f in findings] == [("shutdown", "breaks")]
    fresh = ex.check_schedule(ex.plan_for(p, "irq_on", "irq_on", force=True),
                              findings[0].events, findings[0].schedule)
    assert fresh == findings[0]


def test_an_ept_revoke_of_a_page_without_access_is_not_applicable(tmp_path: Path) -> None:
    p = tmp_path / "revoke.toml"
    p.write_text("""
[[ept]]
gpa = 0x300000
read = false
write = false
exec = false
[[code]]
at = 0x100000
asm = '''
main:
    nop
    nop
    hlt
'''
[run]
entry = "main"
""")
    findings = ex.explore(p, "ept_revoke:0x200000", "main", "main+0x1")
    assert [f.status for f in findings] == ["ok", "ok"]
    gone = ex.explore(p, "ept_revoke:0x300000", "main", "main+0x1")
    assert [f.status for f in gone] == ["not_applicable", "not_applicable"]
    assert gone[0].declined is not None and gone[0].declined.reason == (
        "GPA 0x300000 has no EPT access already: nothing to revoke")
    assert [f.status for f in ex.explore(p, "ept_revoke:0x300000", "main", "main",
                                         force=True)] == ["ok"]


def test_a_host_event_on_a_scenario_without_its_host_is_bad_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "plain.toml"
    p.write_text('[[code]]\nat = 0x100000\nasm = """\nmain:\n    hlt\n"""\n[run]\nentry = "main"\n')
    assert main(["explore", str(p), "--event", "async_pf:gpa=0x400000", "--window",
                 "main..main"]) == 2
    assert "has no async page faults ([apf] or [[swapped]])" in capsys.readouterr().err
    assert main(["explore", str(p), "--event", "ept_revoke:0x400000", "--window",
                 "main..main"]) == 2
    assert "is not a VMX guest with EPT" in capsys.readouterr().err


def test_the_event_spelling_carries_the_policy() -> None:
    ev = parse_event("async_pf:gpa=0x400000,policy=never-while-nmi-blocked")
    assert ev == AsyncPf(gpa=0x400000, policy="never-while-nmi-blocked")
    assert ev.text == "async_pf:gpa=0x400000,policy=never-while-nmi-blocked"
    assert parse_event("ept_revoke:0x8f000,policy=host") == EptRevoke(0x8f000, policy="host")
    with pytest.raises(BadInput, match="unknown async-#PF policy 'kvmm'"):
        parse_event("async_pf:gpa=0x400000,policy=kvmm")
    with pytest.raises(BadInput, match=r"only host events \(async_pf, ept_revoke\) take a "
                       "policy"):
        parse_event("nmi,policy=kvm")


def test_a_scenario_injection_may_ask_the_policy_and_the_trace_says_it_declined(
        tmp_path: Path) -> None:
    text = SCENARIO.replace('''[[inject]]
event = "nmi"
before = "the_nmi"''', '''[[inject]]
event = "async_pf"
gpa = 0x400000
policy = "host"
before = "irq_off"''')
    p = tmp_path / "asks.toml"
    p.write_text(text)
    sc = scn.load(p)
    result = scn.run(sc)
    declined = result.trace.of_kind("host_declines")
    assert [(r["status"], r["policy"], r["reason"]) for r in declined] == [
        ("refused", "kvm", "RFLAGS.IF=0")]
    assert result.exit_code == 0 and scn.check(sc, result) == []
    assert isinstance(sc.machine, Machine)
