"""S17 and S18 of the host-model test plan: NMI and external-interrupt exits, and the
interrupt-window and NMI-window exits (SDM Vol. 3C "Other Causes of VM Exits",
"Interrupt-Window Exiting and Virtual-Interrupt Delivery", "NMI-Window Exiting"; KUT
`vmx_nmi_window_test`, `vmx_intr_window_test`)."""

from __future__ import annotations

from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Inject, Resume
from tests.delivery.rig import gate
from tests.hyper.kit import KERNEL_STACK, STOP, build, exits, of_kind, one, run

GUEST = """
start:
    nop
R:
    nop
    nop
    hlt
h:
    hlt
"""


def test_s17a_an_nmi_with_nmi_exiting_exits_directly_and_blocks_nothing_in_the_guest() -> None:
    m, sym = build(GUEST, gates={2: gate("h")}, host=lambda e, v: STOP,
                   controls=VmxControls(nmi_exiting=True))
    m.inject("nmi", before=sym["R"])
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["interruption_info"], x["idt_vectoring_info"],
            x["interruptibility"], x["rip"]) == (0, 0x80000202, 0, 0, sym["R"])
    assert of_kind(r.trace.records, "deliver") == []
    assert not m.intr.nmi_blocked and not m.intr.nmi_pending


def test_s17b_an_interrupt_exits_with_if_clear_and_ack_on_exit_puts_it_in_service() -> None:
    m, sym = build(GUEST, gates={0x20: gate("h")}, host=lambda e, v: STOP,
                   controls=VmxControls(external_interrupt_exiting=True))
    m.interrupt(0x20)
    r = m.run(entry=sym["start"], rsp=KERNEL_STACK, rflags=0x2)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["interruption_info"], x["rip"], r.icount) == (
        1, 0x80000020, sym["start"], 0)
    assert m.apic is not None and (m.apic.isr, m.apic.irr) == ([0x20], [])


def test_s17c_without_ack_on_exit_the_interruption_info_is_invalid_and_irr_stays_set() -> None:
    m, sym = build(GUEST, gates={0x20: gate("h")}, host=lambda e, v: STOP,
                   controls=VmxControls(external_interrupt_exiting=True,
                                        ack_interrupt_on_exit=False))
    m.interrupt(0x20)
    r = m.run(entry=sym["start"], rsp=KERNEL_STACK, rflags=0x2)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["interruption_info"] >> 31) == (1, 0)
    assert m.apic is not None and (m.apic.isr, m.apic.irr) == ([], [0x20])


NMI_WINDOW = VmxControls(nmi_exiting=True, virtual_nmis=True, nmi_window_exiting=True)


def test_s18_the_nmi_window_exits_at_once_without_blocking() -> None:
    m, sym = build(GUEST, host=lambda e, v: STOP, controls=NMI_WINDOW)
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["rip"], r.icount) == (8, sym["start"], 0)


def test_s18_the_nmi_window_waits_one_instruction_after_an_entry_with_mov_ss_blocking() -> None:
    m, sym = build(GUEST, host=lambda e, v: STOP, controls=NMI_WINDOW)
    m.vmx_exits.launch(Resume(interruptibility=0x2))
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["rip"], r.icount) == (8, sym["R"], 1)


def test_s18_the_nmi_window_comes_after_an_injected_db_at_its_handlers_first_instruction() -> None:
    m, sym = build(GUEST, gates={1: gate("h")}, host=lambda e, v: STOP, controls=NMI_WINDOW)
    m.vmx_exits.launch(Inject(0x80000301))
    r = run(m)
    assert one(r.trace.records, "deliver")["vector"] == 1
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["rip"]) == (8, sym["h"])


def test_s18_with_virtual_nmi_blocking_the_nmi_window_opens_after_the_guests_iret() -> None:
    m, sym = build("""
    start:
        mov rax, rsp
        push 0x10
        push rax
        pushfq
        push 0x8
        lea rcx, [target]
        push rcx
        iretq
    target:
        nop
        hlt
    """, host=lambda e, v: STOP, controls=NMI_WINDOW)
    m.vmx_exits.launch(Resume(interruptibility=0x8))
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["rip"], x["interruptibility"]) == (8, sym["target"], 0)
    assert one(r.trace.records, "iret")["to_rip"] == sym["target"]


INTR_WINDOW = VmxControls(interrupt_window_exiting=True)


def test_s18_the_interrupt_window_exits_at_once_with_if_set() -> None:
    m, _sym = build(GUEST, host=lambda e, v: STOP, controls=INTR_WINDOW)
    r = run(m)
    assert (one(r.trace.records, "vmexit")["exit_reason"], r.icount) == (7, 0)


def test_s18_the_interrupt_window_waits_out_an_sti_shadow_from_the_entry() -> None:
    m, sym = build(GUEST, host=lambda e, v: STOP, controls=INTR_WINDOW)
    m.vmx_exits.launch(Resume(interruptibility=0x1))
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["rip"], r.icount) == (7, sym["R"], 1)


def test_s18_with_if_clear_the_interrupt_window_opens_after_the_first_stis_shadow() -> None:
    m, sym = build("""
    start:
        sti
        sti
    after:
        nop
        hlt
    """, host=lambda e, v: STOP, controls=INTR_WINDOW)
    r = m.run(entry=sym["start"], rsp=KERNEL_STACK, rflags=0x2)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["rip"], r.icount) == (7, sym["after"], 2)
    assert len(exits(r)) == 1


def test_s18_pending_debug_exceptions_at_a_non_vectoring_entry_come_before_the_nmi_window(
        ) -> None:
    m, sym = build(GUEST, gates={1: gate("h")}, host=lambda e, v: STOP, controls=NMI_WINDOW)
    m.vmx_exits.launch(Resume(pending_debug=1 << 14))
    r = run(m)
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["rip"]) == (1, sym["start"])
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["rip"]) == (8, sym["h"])
    assert m.engine.read_reg("dr6") & (1 << 14)  # BS


def test_s18_a_pending_single_step_the_bitmap_claims_exits_with_bs_in_the_qualification(
        ) -> None:
    m, sym = build(GUEST, gates={1: gate("h")}, host=lambda e, v: STOP,
                   controls=VmxControls(exception_bitmap=1 << 1, interrupt_window_exiting=True))
    m.vmx_exits.launch(Resume(pending_debug=1 << 14))
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["interruption_info"], x["qualification"], x["rip"]) == (
        0, 0x80000301, 0x4000, sym["start"])
    assert m.engine.read_reg("dr6") == 0xFFFF0FF0  # untouched: the bits are in the qualification
    assert of_kind(r.trace.records, "deliver") == []
