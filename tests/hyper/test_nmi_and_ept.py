"""S11-S16 of the host-model test plan: EPT violations during event delivery and on
IRET, NMI blocking across the exit, and re-injection (SDM Vol. 3C "Information for VM
Exits That Occur During Event Delivery", "Information About NMI Unblocking Due to IRET",
"Resuming Guest Software after Handling an Exception"; KVM `__vmx_complete_interrupts`,
`vmx_recover_nmi_blocking`)."""

from __future__ import annotations

import struct

from cpu.layout import KERNEL_CS, KERNEL_DS
from cpu.vmx import VmxConfig
from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Inject, Resume, reinject
from tests.delivery.rig import DATA, IST1_TOP, PROBE, gate
from tests.hyper.kit import (
    IDT,
    KERNEL_STACK,
    Script,
    build,
    entries,
    ept_none,
    ept_read_only,
    exits,
    of_kind,
    one,
    run,
    unmapped,
)

Q_READ, Q_WRITE, Q_READABLE, Q_GLA, Q_FINAL, Q_NMI_UNBLOCKED = 1, 2, 8, 0x80, 0x100, 0x1000

NMI_GUEST = """
start:
    nop
R:
    nop
    hlt
nmi:
    hlt
"""


def test_s11_an_ept_violation_on_the_idt_during_nmi_delivery_keeps_nmis_blocked() -> None:
    m, sym = build(NMI_GUEST, gates={2: gate("nmi")}, host="sdm")
    ept_none(m, IDT)
    m.inject("nmi", before=sym["R"])
    r = run(m)
    x = exits(r)[0]
    assert (x["exit_reason"], x["qualification"] & ~Q_NMI_UNBLOCKED, x["idt_vectoring_info"],
            x["interruptibility"], x["rip"]) == (48, Q_READ | Q_GLA | Q_FINAL, 0x80000202,
                                                 0x8, sym["R"])
    assert IDT + 0x20 <= x["gpa"] <= IDT + 0x2F and x["gla"] == x["gpa"]
    assert one(r.trace.records, "vmentry")["injected"] == 0x80000202
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["rip"], d["handler"]) == (2, sym["R"], sym["nmi"])


def test_s11b_a_convertible_ept_violation_during_delivery_is_still_an_exit_not_a_ve() -> None:
    m, sym = build(NMI_GUEST, gates={2: gate("nmi")}, host="sdm",
                   vmx=VmxConfig(ept_violation_ve=True, ve_info=0x130000))
    ept_none(m, IDT)
    m.inject("nmi", before=sym["R"])
    r = run(m)
    assert exits(r)[0]["idt_vectoring_info"] == 0x80000202
    assert of_kind(r.trace.records, "ve_info_written") == []


VNMI = VmxControls(nmi_exiting=True, virtual_nmis=True)
HANDLER_EXIT = """
start:
    nop
    hlt
nmi:
    mov rax, [N]
after_gp:
    iretq
"""


def test_s12a_reinjecting_a_virtual_nmi_without_clearing_blocking_fails_the_entry() -> None:
    host = Script(lambda e, v: (v.fix_ept(e.gpa), Inject(0x80000202,
                                                          interruptibility=e.interruptibility))[1])
    m, _sym = build(NMI_GUEST, gates={2: {"handler": "nmi", "ist": 1}}, controls=VNMI, host=host)
    ept_read_only(m, IST1_TOP - 0x1000)
    m.vmx_exits.launch(Inject(0x80000202))
    r = run(m)
    x = exits(r)[0]
    assert (x["exit_reason"], x["qualification"] & ~Q_NMI_UNBLOCKED, x["idt_vectoring_info"],
            x["interruptibility"] & 0x8) == (48, Q_WRITE | Q_READABLE | Q_GLA | Q_FINAL,
                                             0x80000202, 0x8)
    failed = entries(r)[1]
    assert (failed["injected"], failed["exit_reason"]) == (0x80000202, 0x80000021)
    assert exits(r)[1]["exit_reason"] == 0x80000021
    assert of_kind(r.trace.records, "deliver") == []


def test_s12b_cleared_blocking_reinjects_and_the_nmi_window_opens_after_the_guests_iret() -> None:
    labels: dict[str, int] = {}

    def skip_gp(e, v):  # type: ignore[no-untyped-def]
        v.set_controls(nmi_window_exiting=True)
        v.m.engine.write({"rip": labels["after_gp"]})  # the host skips `mov rax, [N]`
        return Resume()
    host = Script(lambda e, v: (v.fix_ept(e.gpa), reinject(e, virtual_nmis=True))[1], skip_gp)
    m, sym = build(HANDLER_EXIT, gates={2: {"handler": "nmi", "ist": 1}}, host=host,
                   controls=VmxControls(nmi_exiting=True, virtual_nmis=True,
                                        exception_bitmap=1 << 13),
                   known={"N": 0x8000_0000_0000_0000})
    labels.update(sym)
    ept_read_only(m, IST1_TOP - 0x1000)
    m.vmx_exits.launch(Inject(0x80000202))
    r = run(m)
    _ept, gp, window = exits(r)
    assert entries(r)[1]["injected"] == 0x80000202
    assert (gp["interruption_info"], gp["interruptibility"] & 0x8) == (0x80000B0D, 0x8)
    assert (window["exit_reason"], window["rip"], window["interruptibility"]) == (
        8, sym["start"], 0)
    assert one(r.trace.records, "iret")["to_rip"] == sym["start"]


FRAME = PROBE + 0xF00
IRET_GUEST = """
start:
    nop
    hlt
nmi:
    mov rsp, FRAME
I:
    iretq
after:
    nop
    hlt
nmi2:
    hlt
pf:
    hlt
"""


def iret_machine(**kw):  # type: ignore[no-untyped-def]
    m, sym = build(IRET_GUEST, gates={2: gate("nmi"), 14: gate("pf", ist=1)},
                   known={"FRAME": FRAME}, **kw)
    m.phys.write(FRAME, struct.pack("<5Q", sym["after"], KERNEL_CS, 0x2, KERNEL_STACK,
                                    KERNEL_DS))
    m.inject("nmi", before=sym["start"])
    m.inject("nmi", before=sym["I"])  # latched: NMIs are blocked in the handler
    return m, sym


def test_s13_an_ept_violation_on_the_iret_frame_reports_nmi_unblocking_and_the_host_reblocks(
        ) -> None:
    m, sym = iret_machine(host="sdm")
    ept_none(m, FRAME)
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["qualification"], x["idt_vectoring_info"],
            x["interruptibility"], x["rip"]) == (48, Q_READ | Q_GLA | Q_FINAL | Q_NMI_UNBLOCKED,
                                                 0, 0, sym["I"])
    assert x["action"] == "resume (interruptibility 0x8)"
    second = of_kind(r.trace.records, "deliver")[1]
    assert of_kind(r.trace.records, "iret")[0]["to_rip"] == sym["after"]
    assert (second["vector"], second["rip"]) == (2, sym["after"])  # after the IRET retired


def test_s13_a_host_that_does_not_restore_blocking_lets_the_latched_nmi_in_before_the_iret(
        ) -> None:
    m, sym = iret_machine(host=Script(lambda e, v: (v.fix_ept(e.gpa), Resume())[1]))
    ept_none(m, FRAME)
    r = run(m)
    second = of_kind(r.trace.records, "deliver")[1]
    assert (second["vector"], second["rip"]) == (2, sym["I"])


def test_s14_an_intercepted_pf_on_an_iret_frame_sets_bit_12_of_the_interruption_info() -> None:
    host = Script(lambda e, v: (v.map_page(e.qualification),
                                Resume(interruptibility=e.interruptibility | 0x8))[1])
    m, sym = iret_machine(host=host, pages=unmapped(PROBE),
                          controls=VmxControls(exception_bitmap=1 << 14))
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["interruption_info"], x["interruption_error_code"], x["idt_vectoring_info"],
            x["interruptibility"], x["qualification"], x["rip"]) == (
        0x80001B0E, 0x0000, 0, 0, FRAME, sym["I"])
    second = of_kind(r.trace.records, "deliver")[1]
    assert (second["vector"], second["rip"]) == (2, sym["after"])


def test_s14b_the_sdm_host_reflects_it_without_bit_12_and_with_cr2() -> None:
    m, sym = iret_machine(host="sdm", pages=unmapped(PROBE),
                          controls=VmxControls(exception_bitmap=1 << 14))
    r = run(m)
    e = entries(r)[0]
    assert (e["injected"], e["error_code"], e["cr2"]) == (0x80000B0E, 0, FRAME)
    # Bit 3 left 0 (bare-metal semantics): the latched NMI comes in at the #PF
    # handler's first instruction.
    assert [(d["vector"], d["rip"]) for d in of_kind(r.trace.records, "deliver")][:3] == [
        (2, sym["start"]), (14, sym["I"]), (2, sym["pf"])]


def test_s14c_copying_the_interruption_info_verbatim_is_vmfailvalid_7() -> None:
    host = Script(lambda e, v: Inject(e.interruption_info, e.interruption_error_code))
    m, _sym = iret_machine(host=host, pages=unmapped(PROBE),
                          controls=VmxControls(exception_bitmap=1 << 14))
    r = run(m)
    e = one(r.trace.records, "vmentry")
    assert (e["injected"], e["vm_instruction_error"]) == (0x80001B0E, 7)
    assert r.outcome == "vmexit"


INTR_GUEST = """
start:
    nop
R:
    nop
    hlt
h30:
    mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    iretq
"""


def test_s15_an_ept_violation_delivering_an_interrupt_is_reinjected_not_reraised() -> None:
    m, sym = build(INTR_GUEST, gates={0x30: gate("h30")}, host="sdm")
    ept_none(m, IDT)
    m.inject("interrupt", vector=0x30, before=sym["R"])
    seen: list[tuple[list[int], list[int], int]] = []
    inner = m.vmx_exits.state.host
    assert inner is not None

    def watching(e, v):  # type: ignore[no-untyped-def]
        apic = v.m.apic
        seen.append((apic.isr, apic.irr, v.m.engine.read_reg("rflags") & 0x200))
        return inner(e, v)
    m.vmx_exits.state.host = watching
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["idt_vectoring_info"], x["interruptibility"], x["rip"]) == (
        48, 0x80000030, 0, sym["R"])
    assert seen == [([0x30], [], 0x200)]
    assert one(r.trace.records, "vmentry")["injected"] == 0x80000030
    assert [d["vector"] for d in of_kind(r.trace.records, "deliver")] == [0x30]
    assert m.apic is not None and m.apic.isr == [] and m.apic.irr == []


def soft_guest(insn: str) -> str:
    return f"""
    start:
        nop
    R:
        {insn}
    back:
        hlt
    h:
        hlt
    """


def test_s16a_an_int_n_whose_delivery_exits_reports_type_4_and_length_2() -> None:
    m, sym = build(soft_guest("int 0x21"), gates={0x21: gate("h")}, host="sdm")
    ept_none(m, IDT)
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["idt_vectoring_info"], x["instruction_length"], x["rip"]) == (
        48, 0x80000421, 2, sym["R"])
    e = one(r.trace.records, "vmentry")
    assert (e["injected"], e["length"]) == (0x80000421, 2)
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["rip"]) == (0x21, sym["R"] + 2)
    assert r.icount == 2  # nop and HLT: the INT never retired, the entry delivered it


def test_s16b_int3_reports_type_6_and_length_1() -> None:
    m, sym = build(soft_guest("int3"), gates={3: gate("h")}, host="sdm")
    ept_none(m, IDT)
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["idt_vectoring_info"], x["instruction_length"]) == (0x80000603, 1)
    assert one(r.trace.records, "deliver")["rip"] == sym["back"]


def test_s16c_int1_reports_type_5_and_length_1() -> None:
    m, sym = build(soft_guest("int1"), gates={1: gate("h")}, host="sdm")
    ept_none(m, IDT)
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["idt_vectoring_info"], x["instruction_length"]) == (0x80000501, 1)
    assert one(r.trace.records, "deliver")["rip"] == sym["back"]


def test_s16d_resuming_without_injection_reexecutes_the_int() -> None:
    host = Script(lambda e, v: (v.fix_ept(e.gpa), Resume())[1])
    m, sym = build(soft_guest("int 0x21"), gates={0x21: gate("h")}, host=host)
    ept_none(m, IDT)
    r = run(m)
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["rip"], d["source"]) == (0x21, sym["back"], "software")
    assert r.icount == 3  # nop, the INT when it re-executes, HLT


def test_s16_reinjecting_a_software_interrupt_with_length_0_is_vmfailvalid() -> None:
    host = Script(lambda e, v: (v.fix_ept(e.gpa), Inject(e.idt_vectoring_info, 0, 0))[1])
    m, _sym = build(soft_guest("int 0x21"), gates={0x21: gate("h")}, host=host)
    ept_none(m, IDT)
    r = run(m)
    assert one(r.trace.records, "vmentry")["vm_instruction_error"] == 7
    assert DATA  # (layout constant in use by other tests)
