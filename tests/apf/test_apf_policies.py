"""Each host policy's decision, observed end to end: a guest access to a swapped-out page
either gets a page-not-present #PF (error code 0, CR2 = the token, `flags` = 1) or the
vCPU is stalled for the page-in latency and the access completes (Linux
arch/x86/kvm/x86.c `kvm_can_do_async_pf`, `kvm_can_deliver_async_pf`; cpu/devices/apf.py
`decide`).

The situations, each the first failing KVM check in its row:
    IF=0            kvm_can_do_async_pf: RFLAGS.IF=0 (a synchronous fault)
    CPL0            kvm_can_deliver_async_pf: CPL 0 without SEND_ALWAYS (artificial halt)
    NMI blocked     an NMI handler running with IF=1 (SEND_ALWAYS set): KVM does not look
                    at NMI blocking; only "never-while-nmi-blocked" halts
    user task       CPL3, IF=1, no shadow: the case KVM is made for; everyone injects
"always" injects whenever async #PF is enabled."""

from __future__ import annotations

import pytest

from tests.apf.kit import (
    AREA,
    CPL0_EN,
    DATA,
    ENABLE,
    EXIT,
    IST1_TOP,
    KERNEL_STACK,
    LINUX_EN,
    MSR_EN,
    PROBE,
    USER_STACK,
    build,
    kinds,
    of_kind,
    one,
)
from tests.delivery.rig import gate

LATENCY = 4000
PF_EXIT = 0xAF

PF_HANDLER = f"""
pf_handler:
    mov rax, cr2
    mov qword ptr [DATA], rax
    mov al, {PF_EXIT:#x}
{EXIT}
"""

SOURCES = {
    "IF=0": (CPL0_EN, 0, f"""
main:
{ENABLE}
    cli
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov al, 0
{EXIT}
{PF_HANDLER}
"""),
    "CPL0": (LINUX_EN, 0, f"""
main:
{ENABLE}
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov al, 0
{EXIT}
{PF_HANDLER}
"""),
    "NMI blocked": (CPL0_EN, 0, f"""
main:
{ENABLE}
nmi_here:
    nop
    mov al, 0x11
{EXIT}
nmi_handler:
    sti
    nop
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov al, 0
{EXIT}
{PF_HANDLER}
"""),
    "user task": (LINUX_EN, 3, f"""
main:
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    ud2
{PF_HANDLER}
"""),
}

WHY_IF, WHY_CPL0, WHY_NMI = "RFLAGS.IF=0", "CPL 0 without SEND_ALWAYS", "NMIs blocked"
INJECT = "inject"
EXPECTED = {  # (situation, policy) -> "inject" or the reason the host halts
    ("IF=0", "kvm"): WHY_IF, ("IF=0", "kvm-send-always"): WHY_IF,
    ("IF=0", "never-while-nmi-blocked"): WHY_IF, ("IF=0", "always"): INJECT,
    ("CPL0", "kvm"): WHY_CPL0, ("CPL0", "kvm-send-always"): INJECT,
    ("CPL0", "never-while-nmi-blocked"): WHY_CPL0, ("CPL0", "always"): INJECT,
    ("NMI blocked", "kvm"): INJECT, ("NMI blocked", "kvm-send-always"): INJECT,
    ("NMI blocked", "never-while-nmi-blocked"): WHY_NMI, ("NMI blocked", "always"): INJECT,
    ("user task", "kvm"): INJECT, ("user task", "kvm-send-always"): INJECT,
    ("user task", "never-while-nmi-blocked"): INJECT, ("user task", "always"): INJECT,
}


def run_situation(situation: str, policy: str):
    en, cpl, source = SOURCES[situation]
    gates = {14: gate("pf_handler")}
    if "nmi_handler:" in source:
        gates[2] = gate("nmi_handler", ist=1)
    m, sym = build(source, policy=policy, en=en, swapped=[(PROBE, LATENCY)], gates=gates)
    if cpl == 3:  # the kernel enabled async #PF before entering the user task
        assert m.apf is not None
        m.apf.wrmsr(MSR_EN, en, 0)
    if "nmi_here" in source:
        m.inject("nmi", before=sym["nmi_here"])
    result = m.run(entry=sym["main"], rsp=USER_STACK if cpl == 3 else KERNEL_STACK, cpl=cpl,
                   max_insns=200)
    return m, sym, result


@pytest.mark.parametrize(("situation", "policy"), list(EXPECTED))
def test_each_policy_injects_or_halts_as_kvm_would(situation: str, policy: str) -> None:
    m, sym, result = run_situation(situation, policy)
    recs = result.trace.records
    decision = one(recs, "apf_not_present")
    assert decision["policy"] == policy
    assert decision["gpa"] == PROBE and decision["gla"] == PROBE
    pfs = [r for r in of_kind(recs, "deliver") if r["vector"] == 14]
    if EXPECTED[situation, policy] == INJECT:
        assert (decision["decision"], decision["token"], decision["reason"]) == ("inject", 1, "allowed")
        assert len(pfs) == 1
        assert (pfs[0]["error_code"], pfs[0]["cr2"], pfs[0]["rip"]) == (0, 1, sym["the_access"])
        assert m.phys.read_uint(AREA, 4) == 1  # flags, written before the #PF
        assert m.phys.read_uint(DATA, 8) == 1  # the handler read CR2 = token 1
        assert of_kind(recs, "apf_halt") == []
        assert result.exit_code == PF_EXIT
    else:
        assert (decision["decision"], decision["token"]) == ("halt", None)
        assert decision["reason"] == EXPECTED[situation, policy]
        assert pfs == []
        assert m.phys.read_uint(AREA, 4) == 0  # no flags: the guest was told nothing
        halt = one(recs, "apf_halt")
        done = one(recs, "apf_page_in_done")
        assert (halt["gpa"], halt["cycles"]) == (PROBE, LATENCY)
        assert done["cycle"] - halt["cycle"] == LATENCY  # time advanced by the latency
        assert done["ok"] is True
        assert kinds(recs, ["apf_not_present", "apf_halt", "apf_page_in_done", "end"]) == [
            "apf_not_present", "apf_halt", "apf_page_in_done", "end"]
        assert result.exit_code == 0  # the access completed (slowly)
        assert m.apf is not None and not m.apf.is_swapped(PROBE)


def test_the_nmi_blocked_situation_really_runs_with_nmis_blocked_and_if_set() -> None:
    m, _, result = run_situation("NMI blocked", "kvm")
    nmi = [r for r in of_kind(result.trace.records, "deliver") if r["vector"] == 2]
    assert len(nmi) == 1 and nmi[0]["rsp"] == IST1_TOP - 40
    assert m.nmi_blocked  # no IRET ran: still inside the NMI handler
    pf = [r for r in of_kind(result.trace.records, "deliver") if r["vector"] == 14]
    assert pf[0]["rflags"] & (1 << 9)  # the interrupted NMI handler had IF=1
