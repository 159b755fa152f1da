"""S7-S10 and S19 of the host-model test plan: VM-entry event injection. The injected
event is never checked against the bitmap; exceptions during its delivery are, with
the injected event as the IDT-vectoring information (SDM Vol. 3C "VM Exits During
Event Injection"); the entry checks fail as VMfailValid (error 7) or as a VM-entry
failure (exit reason 0x80000021) ("VM-Entry Control Fields", "Checks on Guest
Non-Register State"). S7-S9 are the KVM selftest nested_exceptions_test.c one level
down."""

from __future__ import annotations

import pytest

from cpu.machine import Machine
from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Inject
from idt.vmx_events import GuestEntryState, check_entry
from tests.hyper.kit import STOP, build, entries, exits, of_kind, one, run

CODE_SRC = """
start:
    nop
    hlt
"""


def zero_idt_limit(m: Machine) -> None:
    m.build()
    m.engine.write_table("idtr", 0, 0x2000, 0)


def launch_with(eii: int, ec: int, bitmap: list[int], length: int = 0) -> tuple[Machine, dict[str, int]]:
    m, sym = build(CODE_SRC, controls=VmxControls(exception_bitmap=sum(1 << v for v in bitmap)),
                   host=lambda e, v: STOP)
    zero_idt_limit(m)
    m.vmx_exits.launch(Inject(eii, ec, length))
    return m, sym


def test_s7_an_injected_ss_whose_idt_read_faults_exits_as_gp_with_the_ss_in_idt_vectoring() -> None:
    m, sym = launch_with(0x80000B0C, 0xBEEF, [8, 12, 13])
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["interruption_info"], x["interruption_error_code"],
            x["idt_vectoring_info"], x["idt_vectoring_error_code"], x["rip"]) == (
        0, 0x80000B0D, 0x0063, 0x80000B0C, 0xBEEF, sym["start"])
    assert r.icount == 0  # RIP not advanced


def test_s7_an_error_code_with_bits_31_16_set_fails_the_entry_with_vmfailvalid_7() -> None:
    m, _ = launch_with(0x80000B0C, 0xDEADBEEF, [8, 12, 13])
    r = run(m)
    e = one(r.trace.records, "vmentry")
    assert (e["vm_instruction_error"], e["exit_reason"]) == (7, None)
    assert r.outcome == "vmexit" and "VMfailValid" in (r.reason or "")
    assert exits(r) == []


def test_s8_ss_then_gp_not_intercepted_is_df_and_the_df_exit_has_no_idt_vectoring() -> None:
    m, _ = launch_with(0x80000B0C, 0xBEEF, [8, 12])
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["interruption_info"], x["interruption_error_code"], x["idt_vectoring_info"],
            x["idt_vectoring_error_code"]) == (0x80000B08, 0, 0, 0)


def test_s9_a_fault_delivering_that_df_is_a_triple_fault_exit() -> None:
    m, sym = launch_with(0x80000B0C, 0xBEEF, [12])
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["interruption_info"], x["idt_vectoring_info"], x["rip"]) == (
        2, 0, 0, sym["start"])
    assert of_kind(r.trace.records, "shutdown") == []


def test_s10_an_injected_df_whose_delivery_faults_exits_as_gp_with_ext_and_df_vectoring() -> None:
    m, _ = launch_with(0x80000B08, 0, [13])
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["interruption_info"], x["interruption_error_code"], x["idt_vectoring_info"],
            x["idt_vectoring_error_code"]) == (0x80000B0D, 0x0043, 0x80000B08, 0)


def test_s10_without_gp_interception_an_injected_df_that_faults_is_a_triple_fault_exit() -> None:
    m, _ = launch_with(0x80000B08, 0, [])
    r = run(m)
    assert one(r.trace.records, "vmexit")["exit_reason"] == 2


def test_an_injected_event_is_delivered_even_when_its_own_bitmap_bit_is_set() -> None:
    m, sym = build("""
    start:
        nop
        hlt
    gp:
        hlt
    """, gates={13: {"handler": "gp"}}, controls=VmxControls(exception_bitmap=1 << 13),
        host=lambda e, v: STOP)
    m.vmx_exits.launch(Inject(0x80000B0D, 0x18))
    r = run(m)
    assert exits(r) == []
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["rip"]) == (13, 0x18, sym["start"])
    assert one(r.trace.records, "vmentry")["injected"] == 0x80000B0D


# -- S19: the entry checks, row by row --------------------------------------------------
ACTIVE = GuestEntryState(rflags_if=True, interruptibility=0)

VMFAIL_ROWS = [
    ("type 1", 0x80000100, 0, 0),
    ("type 7 vector 1", 0x80000701, 0, 0),
    ("NMI with vector 3", 0x80000203, 0, 0),
    ("hardware exception vector 32", 0x80000320, 0, 0),
    ("#GP without bit 11", 0x8000030D, 0, 0),
    ("#UD with bit 11", 0x80000B06, 0, 0),
    ("bit 12 copied from II", 0x80001B0E, 0, 0),
    ("bit 30 set", 0xC0000B0E, 0, 0),
    ("error code bit 16", 0x80000B0D, 0x10000, 0),
    ("error code bit 31", 0x80000B0D, 0x80000000, 0),
    ("INT n length 16", 0x80000421, 0, 16),
    ("INT1 length 0xffffffff", 0x80000501, 0, 0xFFFFFFFF),
    ("INT3 length 0", 0x80000603, 0, 0),
]


@pytest.mark.parametrize("row,eii,ec,length", VMFAIL_ROWS, ids=[r[0] for r in VMFAIL_ROWS])
def test_s19_each_bad_control_field_is_vmfailvalid_error_7(row: str, eii: int, ec: int,
                                                          length: int) -> None:
    v = check_entry(eii, ec, length, ACTIVE)
    assert (v.ok, v.vm_instruction_error, v.exit_reason) == (False, 7, None), row


STATE_ROWS = [
    ("external interrupt with IF = 0", 0x80000030, GuestEntryState(False, 0)),
    ("external interrupt in an STI shadow", 0x80000030, GuestEntryState(True, 0x1)),
    ("NMI in a MOV-SS shadow", 0x80000202, GuestEntryState(True, 0x2)),
    ("NMI with virtual-NMI blocking", 0x80000202,
     GuestEntryState(True, 0x8, virtual_nmis=True)),
    ("#PF in the HLT activity state", 0x80000B0E, GuestEntryState(True, 0, activity="hlt")),
]


@pytest.mark.parametrize("row,eii,guest", STATE_ROWS, ids=[r[0] for r in STATE_ROWS])
def test_s19_each_guest_state_that_refuses_the_event_is_exit_reason_0x80000021(
        row: str, eii: int, guest: GuestEntryState) -> None:
    v = check_entry(eii, 0, 0, guest)
    assert (v.ok, v.vm_instruction_error, v.exit_reason) == (False, None, 0x80000021), row


def test_s19_an_nmi_injected_without_virtual_nmis_passes_with_nmi_blocking_set() -> None:
    assert check_entry(0x80000202, 0, 0, GuestEntryState(True, 0x8)).ok


def test_s19_a_vmresume_in_a_mov_ss_shadow_fails_with_error_26() -> None:
    v = check_entry(0, 0, 0, GuestEntryState(True, 0, in_mov_ss_shadow=True))
    assert (v.ok, v.vm_instruction_error) == (False, 26)


def test_s19_on_the_machine_an_interrupt_injected_with_if_clear_exits_0x80000021_unchanged() -> None:
    m, sym = build(CODE_SRC, host=lambda e, v: STOP)
    m.vmx_exits.launch(Inject(0x80000030))
    r = m.run(entry=sym["start"], rsp=0x70000, rflags=0x2)
    e = one(r.trace.records, "vmentry")
    x = one(r.trace.records, "vmexit")
    assert (e["exit_reason"], x["exit_reason"], x["rip"]) == (0x80000021, 0x80000021,
                                                              sym["start"])
    assert of_kind(r.trace.records, "deliver") == []
    assert entries(r) == [e]
