"""Seed example: an EPT violation on the stack while the CPU delivers an NMI, re-injected
by the host with NMI blocking right (SDM Vol. 3C "Information for VM Exits That Occur
During Event Delivery": "an NMI causes subsequent NMIs to be blocked before the VM exit
commences"; KVM `__vmx_complete_interrupts`)."""

from __future__ import annotations

from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Resume
from tests.delivery.rig import gate
from tests.hyper.kit import STACK_PAGE, Script, build, ept_none, exits, of_kind, one, run

GUEST = """
start:
    nop
R:
    nop
back:
    nop
    hlt
nmi:
    nop
    iretq
"""


def test_the_exit_saves_nmi_blocking_and_the_reinjected_nmi_holds_a_second_one_until_iret(
        ) -> None:
    m, sym = build(GUEST, gates={2: gate("nmi")}, host="sdm")
    ept_none(m, STACK_PAGE)
    m.inject("nmi", before=sym["R"])
    m.inject("nmi", before=sym["nmi"])  # arrives inside the re-injected NMI's handler
    r = run(m)
    x = exits(r)[0]
    assert (x["exit_reason"], x["idt_vectoring_info"], x["interruptibility"], x["rip"]) == (
        48, 0x80000202, 0x8, sym["R"])
    assert x["gpa"] & ~0xFFF == STACK_PAGE
    assert one(r.trace.records, "vmentry")["injected"] == 0x80000202
    first, second = of_kind(r.trace.records, "deliver")
    assert (first["vector"], first["rip"]) == (2, sym["R"])
    # The second NMI waits for the first handler's IRET: its saved RIP is R.
    assert (second["vector"], second["rip"]) == (2, sym["R"])
    iret = of_kind(r.trace.records, "iret")[0]
    assert iret["seq"] < second["seq"]


def test_a_host_that_resumes_without_reinjecting_loses_the_nmi() -> None:
    host = Script(lambda e, v: (v.fix_ept(e.gpa), Resume(interruptibility=0))[1])
    m, sym = build(GUEST, gates={2: gate("nmi")}, host=host,
                   controls=VmxControls())
    ept_none(m, STACK_PAGE)
    m.inject("nmi", before=sym["R"])
    r = run(m)
    assert len(exits(r)) == 1
    assert of_kind(r.trace.records, "deliver") == []
