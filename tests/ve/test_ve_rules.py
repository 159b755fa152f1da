"""Each #VE rule on a real machine, through the Python API: when an EPT violation becomes
a #VE and when a VM exit, what the CPU writes in the VE-information area, the frame a
#VE pushes, the exit qualification bit by bit, violations during event delivery, the
host model, NMI unblocking by a faulting IRET, and #VE's place in the #DF table (SDM
Vol. 3C "EPT Violations", "Convertible EPT Violations", "Virtualization Exceptions",
"Exit Qualification for EPT Violations"; Vol. 3A Table "Conditions for Generating a
Double Fault").

Expected values are written down from those rules.
"""

from __future__ import annotations

import contextlib

import pytest

from cpu.ept import EPT_RWX, EPT_SUPPRESS_VE
from cpu.machine import Machine
from cpu.mmu import Access
from cpu.outcomes import OUTCOMES
from cpu.vmx import VmExit
from idt.ve import VeInfo
from tests.delivery.rig import (
    KERNEL_CS,
    KERNEL_DS,
    RFLAGS_RF,
    START_RFLAGS,
    Frame,
    PageSpec,
    assert_delivered,
    handler_rsp,
    read_frame,
)
from tests.ve.kit import (
    DATA,
    IST1_TOP,
    IST2_TOP,
    KERNEL_STACK,
    PAGE,
    PROBE,
    Q_EXECUTABLE,
    Q_FETCH,
    Q_FINAL,
    Q_GLA_VALID,
    Q_NMI_UNBLOCKED,
    Q_READ,
    Q_READABLE,
    Q_WRITABLE,
    Q_WRITE,
    VE_INFO,
    build,
    decoded,
    kinds,
    of_kind,
    one,
    without_stamps,
)

BUSY = 0xFFFFFFFF
EXIT_REASON = 48  # basic exit reason "EPT violation"
HIGH_GPA = 0x80_0000_0000  # 512 GiB: EPT PML4 slot 1, far above the 16 MiB of RAM
ADDR = ((1 << 52) - 1) & ~0xFFF

# One read of PROBE; the #VE handler halts (the run ends "hlt": nothing can wake it).
READ_PROBE = """
main:
    mov rcx, PROBE
the_load:
    mov rax, qword ptr [rcx]
after:
    mov dx, 0xf4
    out dx, al
ve_handler:
    hlt
"""

VE_GATE = {20: {"handler": "ve_handler"}}


def ve_record(*, icount: int | None, qual: int, gla: int, gpa: int, eptp_index: int = 0) -> dict[str, object]:
    """A `ve_info_written` record (without seq/cycle) as the SDM's values give it."""
    return {"icount": icount, "kind": "ve_info_written", "at": VE_INFO, "exit_reason": EXIT_REASON,
            "busy": BUSY, "qualification": qual, "gla": gla, "gpa": gpa, "eptp_index": eptp_index,
            **decoded(qual)}


def exit_record(*, icount: int | None, qual: int, gla: int | None, gpa: int | None, rip: int, why: str,
                action: str, during: str | None = None, nmi_unblocked: bool = False) -> dict[str, object]:
    """A `vmexit` record (without seq/cycle)."""
    return {"icount": icount, "kind": "vmexit", "reason": EXIT_REASON, "qualification": qual,
            "gpa": gpa, "gla": gla, "rip": rip, "during_delivery": during,
            "nmi_unblocked_by_iret": nmi_unblocked, "why": why, "action": action}


def area(m: Machine) -> bytes:
    return m.phys.read(VE_INFO, 0x28)


def without(rec: dict[str, object], *keys: str) -> dict[str, object]:
    return {k: v for k, v in rec.items() if k not in keys}


def ve_frame(rip: int, *, rsp: int = KERNEL_STACK, rflags: int = START_RFLAGS) -> Frame:
    """#VE is a fault without error code: saved RIP = the faulting instruction, RF = 1 in
    the pushed RFLAGS (as for every fault-class exception but #DB)."""
    return Frame(rip=rip, cs=KERNEL_CS, rflags=rflags | RFLAGS_RF, rsp=rsp, ss=KERNEL_DS)


# -- conversion ------------------------------------------------------------------------


def test_a_convertible_violation_becomes_a_ve_that_fills_the_area_and_pushes_a_fault_frame() -> None:
    m, s = build(READ_PROBE, gates=VE_GATE, eptp_index=5)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert r.outcome == "hlt"
    recs = r.trace.records
    assert kinds(recs) == ["ve_info_written", "deliver", "end"]
    qual = Q_READ | Q_GLA_VALID | Q_FINAL
    assert qual == 0x181
    assert without_stamps(one(recs, "ve_info_written")) == ve_record(
        icount=1, qual=0x181, gla=PROBE, gpa=PROBE, eptp_index=5)
    assert area(m) == VeInfo(exit_reason=48, busy=0xFFFFFFFF, qualification=0x181,
                             guest_linear=PROBE, guest_physical=PROBE, eptp_index=5).pack()
    assert area(m)[0x22:0x28] == bytes(6)  # padding after the architectural 0x22 bytes
    dlv = one(recs, "deliver")
    assert (dlv["name"], dlv["source"], dlv["handler"]) == ("#VE", "exception", s["ve_handler"])
    assert_delivered(m, dlv, vector=20, frame=ve_frame(s["the_load"]), stack="current",
                     stack_top=KERNEL_STACK)


def test_the_ve_gate_may_use_an_ist_stack_like_any_other() -> None:
    m, s = build(READ_PROBE, gates={20: {"handler": "ve_handler", "ist": 2}})
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert_delivered(m, one(r.trace.records, "deliver"), vector=20, frame=ve_frame(s["the_load"]),
                     stack="ist2", stack_top=IST2_TOP)


@pytest.mark.parametrize("busy", [0xFFFFFFFF, 1, 0x80000000])
def test_a_nonzero_busy_word_turns_a_convertible_violation_into_a_vm_exit(busy: int) -> None:
    m, s = build(READ_PROBE, gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    before = VeInfo(exit_reason=0x11, busy=busy, qualification=0x22, guest_linear=0x33,
                    guest_physical=0x44, eptp_index=0x55).pack()
    m.phys.write(VE_INFO, before)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert (r.outcome, r.rip) == ("vmexit", s["the_load"])
    recs = r.trace.records
    assert kinds(recs) == ["vmexit", "end"]
    assert without_stamps(one(recs, "vmexit")) == exit_record(
        icount=1, qual=0x181, gla=PROBE, gpa=PROBE, rip=s["the_load"],
        why=f"busy word is {busy:#x}", action="stop")
    end = one(recs, "end")
    assert (end["reason"], end["rip"]) == ("vmexit", s["the_load"])
    assert area(m) == before  # a VM exit writes nothing in the area
    assert m.engine.read_reg("rip") == s["the_load"]


def test_with_the_ve_control_off_every_violation_is_a_vm_exit() -> None:
    m, s = build(READ_PROBE, gates=VE_GATE, ve=False)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert r.outcome == "vmexit"
    assert without_stamps(one(r.trace.records, "vmexit")) == exit_record(
        icount=1, qual=0x181, gla=PROBE, gpa=PROBE, rip=s["the_load"], why="#VE not enabled",
        action="stop")
    assert area(m) == bytes(0x28)


# -- which suppress-#VE bit counts -------------------------------------------------------


@pytest.mark.parametrize(("rights", "access", "qual"), [
    ("---", "load", Q_READ | Q_GLA_VALID | Q_FINAL),  # 0x181
    ("R--", "store", Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL),  # 0x18a
], ids=["not-present-leaf", "read-only-leaf"])
def test_suppress_ve_in_the_leaf_makes_the_violation_a_vm_exit(rights: str, access: str, qual: int) -> None:
    m, s = build("""
        main:
            mov rcx, PROBE
        load:
            mov rax, qword ptr [rcx]
        store:
            mov qword ptr [rcx], rax
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=rights[0] == "R", write=False, execute=False, suppress_ve=True)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert (r.outcome, r.rip) == ("vmexit", s[access])
    assert without_stamps(one(r.trace.records, "vmexit")) == exit_record(
        icount=1 if access == "load" else 2, qual=qual, gla=PROBE, gpa=PROBE, rip=s[access],
        why="suppress-#VE bit set", action="stop")
    assert of_kind(r.trace.records, "ve_info_written") == []
    assert area(m) == bytes(0x28)


def test_bit_63_of_present_non_leaf_entries_is_ignored() -> None:
    m, s = build(READ_PROBE, gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False, suppress_ve=False)
    for level in (4, 3, 2):  # PML4E, PDPTE, PDE: present, pointing to the next table
        entry = m.ept.entry(PROBE, level)
        assert entry & EPT_RWX == EPT_RWX and not entry & (1 << 7)
        m.ept.set_entry(PROBE, level, entry | EPT_SUPPRESS_VE)
    assert m.ept.entry(PROBE, 1) == 0  # the PTE that stops the walk: not present, bit 63 = 0
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert kinds(r.trace.records) == ["ve_info_written", "deliver", "end"]
    assert without_stamps(one(r.trace.records, "ve_info_written")) == ve_record(
        icount=1, qual=0x181, gla=PROBE, gpa=PROBE)


@pytest.mark.parametrize("suppress", [None, False, True], ids=["kvm-fill", "bit63=0", "bit63=1"])
def test_a_not_present_pml4e_decides_by_its_own_bit_63(suppress: bool | None) -> None:
    m, s = build(READ_PROBE, gates=VE_GATE, pages=[PageSpec(va=PROBE, pa=HIGH_GPA)])
    if suppress is not None:
        m.ept.set_not_present(HIGH_GPA, 4, suppress_ve=suppress)
    # None: the PML4E idtlab (like KVM) fills new tables with: not present, bit 63 = 1.
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    recs = r.trace.records
    if suppress is False:
        assert kinds(recs) == ["ve_info_written", "deliver", "end"]
        assert without_stamps(one(recs, "ve_info_written")) == ve_record(
            icount=1, qual=0x181, gla=PROBE, gpa=HIGH_GPA)
        assert area(m) == VeInfo(qualification=0x181, guest_linear=PROBE,
                                 guest_physical=HIGH_GPA).pack()
        assert_delivered(m, one(recs, "deliver"), vector=20, frame=ve_frame(s["the_load"]),
                         stack="current", stack_top=KERNEL_STACK)
    else:
        assert (r.outcome, kinds(recs)) == ("vmexit", ["vmexit", "end"])
        assert without_stamps(one(recs, "vmexit")) == exit_record(
            icount=1, qual=0x181, gla=PROBE, gpa=HIGH_GPA, rip=s["the_load"],
            why="suppress-#VE bit set", action="stop")


# -- the qualification for each kind of access -----------------------------------------


@pytest.mark.parametrize(("execute", "qual"), [
    (False, Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL),  # R--: 0x18a
    (True, Q_WRITE | Q_READABLE | Q_EXECUTABLE | Q_GLA_VALID | Q_FINAL),  # R-X: 0x1aa
], ids=["R--", "R-X"])
def test_a_write_to_a_read_only_page_reports_write_and_the_rights_it_had(execute: bool, qual: int) -> None:
    m, s = build("""
        main:
            mov rcx, PROBE
            mov rdx, 0x5a5a
        the_store:
            mov qword ptr [rcx], rdx
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=True, write=False, execute=execute)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    recs = r.trace.records
    rec = without_stamps(one(recs, "ve_info_written"))
    assert rec == ve_record(icount=2, qual=qual, gla=PROBE, gpa=PROBE)
    assert (rec["read"], rec["write"], rec["readable"], rec["writable"]) == (False, True, True, False)
    assert area(m) == VeInfo(qualification=qual, guest_linear=PROBE, guest_physical=PROBE).pack()
    assert_delivered(m, one(recs, "deliver"), vector=20, frame=ve_frame(s["the_store"]),
                     stack="current", stack_top=KERNEL_STACK)
    assert m.phys.read_u64(PROBE) == 0  # the store did not happen


def test_a_fetch_from_a_non_executable_page_saves_the_target_instruction_as_rip() -> None:
    m, s = build("""
        main:
            mov rcx, PROBE
        the_jump:
            jmp rcx
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE)
    m.phys.write(PROBE, b"\xf4")  # hlt, never executed
    m.ept.set_range(PROBE, PAGE, read=True, write=True, execute=False)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    recs = r.trace.records
    qual = Q_FETCH | Q_READABLE | Q_WRITABLE | Q_GLA_VALID | Q_FINAL
    assert qual == 0x19C
    # The JMP retired (icount 2); the fetch at its target is what faulted.
    assert without_stamps(one(recs, "ve_info_written")) == ve_record(
        icount=2, qual=0x19C, gla=PROBE, gpa=PROBE)
    assert area(m) == VeInfo(qualification=0x19C, guest_linear=PROBE, guest_physical=PROBE).pack()
    assert_delivered(m, one(recs, "deliver"), vector=20, frame=ve_frame(PROBE), stack="current",
                     stack_top=KERNEL_STACK)


def _guest_pt_for_probe(m: Machine) -> int:
    """Guest-physical address of the guest page table mapping PROBE (read from the guest's
    own tables: PML4[0] -> PDPT[0] -> PD[2], which must point to a table, not a 2-MiB page)."""
    phys = m.phys
    m.build()
    table = m.symbols["pml4"]
    for index in (0, 0, PROBE >> 21):
        entry = phys.read_u64(table + 8 * index)
        assert entry & 1 and not (index == PROBE >> 21 and entry & (1 << 7))
        table = entry & ADDR
    return table


def test_a_guest_paging_structure_read_hitting_ept_clears_bit_8_and_reports_the_entry_gpa() -> None:
    # A 4-KiB override makes the guest map PROBE's 2 MiB through a page table of its own.
    m, s = build("""
        main:
            mov rcx, PROBE + 0x3000
        the_load:
            mov rax, qword ptr [rcx]
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE, pages=[PageSpec(va=PROBE + 0x10000, pa=PROBE + 0x10000)])
    pt = _guest_pt_for_probe(m)
    m.ept.set_range(pt, PAGE, read=False, write=False, execute=True)  # the table: --X
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    recs = r.trace.records
    # The walk's read of the PTE (entry 3 of the table): a read, rights --X, GLA valid,
    # NOT the final translation (bit 8 = 0); GPA = the entry's address.
    qual = Q_READ | Q_EXECUTABLE | Q_GLA_VALID
    assert qual == 0xA1
    assert without_stamps(one(recs, "ve_info_written")) == ve_record(
        icount=1, qual=0xA1, gla=PROBE + 0x3000, gpa=pt + 3 * 8)
    assert area(m) == VeInfo(qualification=0xA1, guest_linear=PROBE + 0x3000,
                             guest_physical=pt + 0x18).pack()
    assert_delivered(m, one(recs, "deliver"), vector=20, frame=ve_frame(s["the_load"]),
                     stack="current", stack_top=KERNEL_STACK)


def test_setting_the_accessed_bit_in_a_read_only_guest_page_table_is_a_non_final_write() -> None:
    m, s = build("""
        main:
            mov rcx, PROBE + 0x3000
        the_load:
            mov rax, qword ptr [rcx]
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE, pages=[PageSpec(va=PROBE + 0x10000, pa=PROBE + 0x10000)])
    pt = _guest_pt_for_probe(m)
    assert not m.phys.read_u64(pt + 0x18) & (1 << 5)  # PTE.A = 0: the walk must set it
    m.ept.set_range(pt, PAGE, read=True, write=False, execute=True)  # the table: R-X
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    rec = without_stamps(one(r.trace.records, "ve_info_written"))
    # Bit 0 (read) for the locked read-modify-write of an A/D update is left to the
    # implementation (the SDM defines "both bits" only with EPT A/D flags enabled);
    # everything else is fixed: write, rights R-X, GLA valid, not the final translation.
    qual = Q_WRITE | Q_READABLE | Q_EXECUTABLE | Q_GLA_VALID
    assert rec["qualification"] & ~Q_READ == qual == 0xAA
    assert {k: v for k, v in rec.items() if k not in ("qualification", "read")} == {
        k: v for k, v in ve_record(icount=1, qual=qual, gla=PROBE + 0x3000, gpa=pt + 0x18).items()
        if k not in ("qualification", "read")}
    assert not m.phys.read_u64(pt + 0x18) & (1 << 5)  # the A bit was not written


# -- violations during event delivery --------------------------------------------------


def test_a_violation_while_pushing_a_frame_is_a_vm_exit_and_the_delivery_reexecutes() -> None:
    m, s = build("""
        main:
        the_int3:
            int3
        after_int3:
            hlt
        bp_handler:
            hlt
        ve_handler:
            hlt
        """, gates={3: {"handler": "bp_handler", "ist": 1}, **VE_GATE})
    stack_page = IST1_TOP - PAGE
    m.ept.set_range(stack_page, PAGE, read=True, write=False, execute=False)
    seen: list[VmExit] = []

    def host(machine: Machine, vmexit: VmExit) -> str:
        seen.append(vmexit)
        return "resume-fixed"

    m.on_ept_violation = host
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert r.outcome == "hlt" and r.rip == s["bp_handler"] + 1
    recs = r.trace.records
    assert kinds(recs) == ["vmexit", "deliver", "end"]
    # The first push (SS, at the top of IST1) is a write to a read-only page.
    qual = Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL
    rec = without_stamps(one(recs, "vmexit"))
    assert rec["gpa"] >> 12 == stack_page >> 12  # the page offset: see the xfail test below
    assert without(rec, "gpa") == without(exit_record(
        icount=1, qual=qual, gla=IST1_TOP - 8, gpa=None, rip=s["the_int3"],
        why="during event delivery", action="resume-fixed", during="#BP"), "gpa")
    assert len(seen) == 1
    during = seen[0].during_delivery
    assert during is not None and (during.vector, during.name) == (3, "#BP")
    assert (seen[0].reason, seen[0].qualification, seen[0].gla, seen[0].rip) == (
        48, qual, IST1_TOP - 8, s["the_int3"])
    # Re-executed: #BP (a trap: saved RIP after the INT3, RF = 0) on IST1, as if nothing happened.
    assert_delivered(m, one(recs, "deliver"), vector=3,
                     frame=Frame(rip=s["after_int3"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=KERNEL_STACK, ss=KERNEL_DS),
                     stack="ist1", stack_top=IST1_TOP)
    assert area(m) == bytes(0x28)  # never converted
    assert m.ept.translate(IST1_TOP - 8, Access.WRITE) == IST1_TOP - 8  # the host's fix


def test_a_violation_while_delivering_the_ve_itself_is_a_vm_exit_and_the_ve_is_redelivered() -> None:
    m, s = build(READ_PROBE, gates={20: {"handler": "ve_handler", "ist": 2}})
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    m.ept.set_range(IST2_TOP - PAGE, PAGE, read=True, write=False, execute=False)
    m.on_ept_violation = "resume-fixed"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    recs = r.trace.records
    # The conversion happened (area written, busy set) before the delivery faulted.
    assert kinds(recs) == ["ve_info_written", "vmexit", "deliver", "end"]
    assert without_stamps(one(recs, "ve_info_written")) == ve_record(
        icount=1, qual=0x181, gla=PROBE, gpa=PROBE)
    rec = without_stamps(one(recs, "vmexit"))
    assert rec["gpa"] >> 12 == (IST2_TOP - PAGE) >> 12
    assert without(rec, "gpa") == without(exit_record(
        icount=1, qual=Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL, gla=IST2_TOP - 8,
        gpa=None, rip=s["the_load"], why="during event delivery", action="resume-fixed",
        during="#VE"), "gpa")
    assert area(m) == VeInfo(qualification=0x181, guest_linear=PROBE, guest_physical=PROBE).pack()
    assert_delivered(m, one(recs, "deliver"), vector=20, frame=ve_frame(s["the_load"]),
                     stack="ist2", stack_top=IST2_TOP)


# -- the host model --------------------------------------------------------------------


def test_host_stop_ends_the_run_with_outcome_vmexit_at_the_faulting_instruction() -> None:
    m, s = build(READ_PROBE, gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False, suppress_ve=True)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert (r.outcome, r.rip, r.icount) == ("vmexit", s["the_load"], 1)
    assert r.deliveries == []
    assert one(r.trace.records, "vmexit")["action"] == "stop"


def test_host_resume_without_a_fix_meets_the_same_violation_until_max_events() -> None:
    m, s = build(READ_PROBE, gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False, suppress_ve=True)
    m.on_ept_violation = "resume"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK, max_events=5)
    assert r.outcome == "max_events" and r.outcome in OUTCOMES
    exits = of_kind(r.trace.records, "vmexit")
    assert len(exits) == 5
    assert {(e["rip"], e["gpa"], e["action"]) for e in exits} == {(s["the_load"], PROBE, "resume")}


def test_a_python_host_can_inject_an_nmi_that_is_taken_before_the_access_reexecutes() -> None:
    m, s = build("""
        main:
            mov rcx, PROBE
        the_load:
            mov rax, qword ptr [rcx]
            mov dx, 0xf4
            out dx, al
        nmi_handler:
            inc qword ptr [DATA]
            iretq
        ve_handler:
            hlt
        """, gates={2: {"handler": "nmi_handler"}, **VE_GATE})
    m.phys.write_u64(PROBE, 0x42)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False, suppress_ve=True)
    seen: list[tuple[VmExit, bool]] = []

    def host(machine: Machine, vmexit: VmExit) -> str:
        seen.append((vmexit, machine.nmi_blocked))
        machine.nmi()
        return "resume-fixed"

    m.on_ept_violation = host
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert (r.outcome, r.exit_code) == ("exit", 0x42)  # the load completed after the fix
    assert seen == [(VmExit(reason=48, qualification=0x181, gpa=PROBE, gla=PROBE, rip=s["the_load"],
                            during_delivery=None, nmi_unblocked_by_iret=False,
                            why="suppress-#VE bit set"), False)]
    recs = r.trace.records
    assert kinds(recs, "vmexit", "deliver", "iret", "end") == ["vmexit", "deliver", "iret", "end"]
    (pending,) = of_kind(recs, "nmi_pending")
    assert pending["source"] == "api"
    nmi = one(recs, "deliver")
    # Delivered at the boundary before the load re-executes: saved RIP = the load.
    assert_delivered(m, nmi, vector=2,
                     frame=Frame(rip=s["the_load"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=KERNEL_STACK, ss=KERNEL_DS),
                     stack="current", stack_top=KERNEL_STACK)
    assert m.phys.read_u64(DATA) == 1


# -- IRET: NMI unblocking (qualification bit 12) ----------------------------------------

FRAME = DATA + 0x10000  # a prebuilt IRET frame, on a page the tests make EPT-not-present

IRET_THROUGH_FRAME = """
main:
    nop
work:
    nop
    hlt
back:                           # the prebuilt frame's RIP
    mov dx, 0xf4
    mov al, 0x77
    out dx, al
nmi_handler:
    nop
nmi_ready:
    mov rsp, FRAME
nmi_iret:
    iretq
ve_handler:
    nop
    hlt
"""


def _iret_machine(*, busy: int) -> tuple[Machine, dict[str, int]]:
    m, s = build(IRET_THROUGH_FRAME, gates={2: {"handler": "nmi_handler"},
                                            20: {"handler": "ve_handler", "ist": 2}},
                 known={"FRAME": FRAME})
    for i, v in enumerate((s["back"], KERNEL_CS, START_RFLAGS, KERNEL_STACK, KERNEL_DS)):
        m.phys.write_u64(FRAME + 8 * i, v)
    m.ept.set_range(FRAME, PAGE, read=False, write=False, execute=False)
    m.phys.write(VE_INFO + 4, busy.to_bytes(4, "little"))
    m.inject("nmi", before=s["work"], label="first")
    m.inject("nmi", before=s["nmi_ready"], label="latched")  # arrives while NMIs are blocked
    return m, s


def test_an_iret_that_unblocked_nmis_reports_bit_12_in_the_ve_and_the_ve_runs_unblocked() -> None:
    m, s = _iret_machine(busy=0)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK, max_insns=100)
    recs = r.trace.records
    qual = Q_READ | Q_GLA_VALID | Q_FINAL | Q_NMI_UNBLOCKED
    assert qual == 0x1181
    ve = without_stamps(one(recs, "ve_info_written"))
    assert without(ve, "icount") == without(ve_record(icount=None, qual=0x1181, gla=FRAME, gpa=FRAME),
                                            "icount")
    assert ve["nmi_unblocked_by_iret"] is True
    assert area(m) == VeInfo(qualification=0x1181, guest_linear=FRAME, guest_physical=FRAME).pack()
    # The IRET cleared NMI blocking before it faulted, and #VE sets none: the latched NMI
    # is taken at the #VE handler's first instruction.
    assert kinds(recs, "nmi_pending", "nmi_latched", "ve_info_written", "deliver") == [
        "nmi_pending", "deliver", "nmi_latched", "ve_info_written", "deliver", "deliver"]
    first, ve_dlv, second = of_kind(recs, "deliver")
    assert (first["name"], ve_dlv["name"], second["name"]) == ("NMI", "#VE", "NMI")
    assert second["rip"] == s["ve_handler"]
    # The #VE frame: RIP = the IRETQ, RSP = the frame it could not read, the NMI
    # handler's RFLAGS (IF = 0) with RF, on IST2.
    assert_delivered(m, ve_dlv, vector=20,
                     frame=ve_frame(s["nmi_iret"], rsp=FRAME, rflags=START_RFLAGS & ~(1 << 9)),
                     stack="ist2", stack_top=IST2_TOP)


def test_an_iret_vm_exit_reports_bit_12_and_the_host_reblocks_nmis_before_the_iret_reexecutes() -> None:
    m, s = _iret_machine(busy=BUSY)
    seen: list[tuple[VmExit, bool]] = []

    def host(machine: Machine, vmexit: VmExit) -> str:
        seen.append((vmexit, machine.nmi_blocked))
        return "resume-fixed"

    m.on_ept_violation = host
    r = m.run(entry=s["main"], rsp=KERNEL_STACK, max_insns=100)
    assert (r.outcome, r.exit_code) == ("exit", 0x77)
    recs = r.trace.records
    qual = Q_READ | Q_GLA_VALID | Q_FINAL | Q_NMI_UNBLOCKED
    ex = without_stamps(one(recs, "vmexit"))
    assert without(ex, "icount") == without(exit_record(
        icount=None, qual=qual, gla=FRAME, gpa=FRAME, rip=s["nmi_iret"], why="busy word is 0xffffffff",
        action="resume-fixed", nmi_unblocked=True), "icount")
    # At the exit NMIs are unblocked (the IRET cleared the blocking before faulting) ...
    assert len(seen) == 1 and seen[0][1] is False
    assert seen[0][0].nmi_unblocked_by_iret is True and seen[0][0].qualification == 0x1181
    # ... and the host re-blocks them: the latched NMI waits until the re-executed IRETQ
    # completes (which therefore reports nmi_unblocked), and is taken at its target.
    assert kinds(recs, "nmi_latched", "vmexit", "iret", "deliver") == [
        "deliver", "nmi_latched", "vmexit", "iret", "deliver", "iret"]
    iret = of_kind(recs, "iret")[0]
    assert (iret["rip"], iret["to_rip"], iret["nmi_unblocked"]) == (s["nmi_iret"], s["back"], True)
    assert of_kind(recs, "deliver")[1]["rip"] == s["back"]
    assert area(m)[4:8] == b"\xff" * 4 and area(m)[8:] == bytes(0x20)  # not written
    assert m.nmi_blocked is False


def test_an_iret_with_nmis_not_blocked_leaves_bit_12_clear() -> None:
    m, s = build("""
        main:
            int3
            hlt
        back:
            hlt
        bp_handler:
            mov rsp, FRAME
        bp_iret:
            iretq
        ve_handler:
            hlt
        """, gates={3: {"handler": "bp_handler"}, 20: {"handler": "ve_handler", "ist": 2}},
        known={"FRAME": FRAME})
    for i, v in enumerate((s["back"], KERNEL_CS, START_RFLAGS, KERNEL_STACK, KERNEL_DS)):
        m.phys.write_u64(FRAME + 8 * i, v)
    m.ept.set_range(FRAME, PAGE, read=False, write=False, execute=False)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    ve = without_stamps(one(r.trace.records, "ve_info_written"))
    assert ve == ve_record(icount=2, qual=0x181, gla=FRAME, gpa=FRAME)
    assert ve["nmi_unblocked_by_iret"] is False


# -- #VE in the #DF table --------------------------------------------------------------


def test_a_page_fault_while_delivering_a_ve_is_a_double_fault() -> None:
    m, s = build(READ_PROBE + """
        df_handler:
            hlt
        """, gates={20: {"handler": "ve_handler", "ist": 2}, 8: {"handler": "df_handler", "ist": 1}},
        pages=[PageSpec(va=IST2_TOP - PAGE, pa=IST2_TOP - PAGE, present=False)])
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert (r.outcome, r.rip) == ("hlt", s["df_handler"] + 1)
    recs = r.trace.records
    assert kinds(recs) == ["ve_info_written", "delivery_fault", "deliver", "end"]
    fault = without_stamps(one(recs, "delivery_fault"))
    assert {k: v for k, v in fault.items() if k != "why"} == {
        "icount": 1, "kind": "delivery_fault", "vector": 20, "name": "#VE", "fault": 14,
        "fault_name": "#PF", "error_code": 0b010, "action": "double-fault"}  # W=1, P=0, U=0
    df = one(recs, "deliver")
    assert (df["vector"], df["error_code"], df["double_fault_of"], df["stack"]) == (8, 0, [20, 14], "ist1")
    assert df["rsp"] == handler_rsp(IST1_TOP, error_code=True)
    slots = read_frame(m, df["rsp"], error_code=True)
    assert (slots["error_code"], slots["cs"], slots["rsp"], slots["ss"]) == (0, KERNEL_CS, KERNEL_STACK, KERNEL_DS)
    assert m.engine.read_reg("cr2") == IST2_TOP - 8  # the #PF loaded CR2 before becoming #DF
    assert area(m)[4:8] == b"\xff" * 4  # the conversion had happened


def test_a_contributory_fault_while_delivering_a_ve_is_a_double_fault_too() -> None:
    # Page-fault class then contributory: #DF (a benign #VE would give a plain #NP).
    m, s = build(READ_PROBE + """
        df_handler:
            hlt
        """, gates={20: {"handler": "ve_handler", "present": False},
                    8: {"handler": "df_handler", "ist": 1}})
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    recs = r.trace.records
    fault = one(recs, "delivery_fault")
    assert (fault["vector"], fault["fault"], fault["error_code"], fault["action"]) == (
        20, 11, 20 * 8 + 2 + 1, "double-fault")  # #NP(IDT, EXT=1)
    df = one(recs, "deliver")
    assert (df["vector"], df["error_code"], df["double_fault_of"]) == (8, 0, [20, 11])


# -- rules that an earlier version got wrong (kept as regression tests) ---------------



def test_the_gpa_in_the_area_keeps_the_page_offset_of_the_access() -> None:
    m, s = build(READ_PROBE.replace("mov rcx, PROBE", "mov rcx, PROBE + 0x123"), gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert area(m) == VeInfo(qualification=0x181, guest_linear=PROBE + 0x123,
                             guest_physical=PROBE + 0x123).pack()


def test_the_gpa_of_a_vm_exit_while_pushing_a_frame_is_the_pushed_address() -> None:
    m, s = build("""
        main:
            int3
            hlt
        bp_handler:
            hlt
        """, gates={3: {"handler": "bp_handler", "ist": 1}})
    m.ept.set_range(IST1_TOP - PAGE, PAGE, read=True, write=False, execute=False)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    rec = one(r.trace.records, "vmexit")
    assert rec["gpa"] == rec["gla"] == IST1_TOP - 8  # identity-mapped: GPA == linear




def test_a_write_after_a_read_of_an_ept_read_only_page_is_still_a_violation() -> None:
    m, s = build("""
        main:
            mov qword ptr [PROBE + 0x100000], 1   # same 2-MiB guest page: sets its D bit
            mov rcx, PROBE
            mov rax, qword ptr [rcx]              # allowed (R--): fills the TLB
        the_store:
            mov qword ptr [rcx], 5                # must be an EPT violation
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=True, write=False, execute=False)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert m.phys.read_u64(PROBE) == 0
    assert without_stamps(one(r.trace.records, "ve_info_written")) == ve_record(
        icount=3, qual=Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL, gla=PROBE, gpa=PROBE)


def test_a_fetch_after_a_read_of_an_ept_non_executable_page_is_still_a_violation() -> None:
    m, s = build("""
        main:
            mov rcx, PROBE
            mov al, byte ptr [rcx]                # allowed (RW-): fills the TLB
            jmp rcx                               # fetch: must be an EPT violation
        ve_handler:
            hlt
        """, gates=VE_GATE)
    m.phys.write(PROBE, b"\xf4")
    m.ept.set_range(PROBE, PAGE, read=True, write=True, execute=False)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert without_stamps(one(r.trace.records, "ve_info_written")) == ve_record(
        icount=3, qual=Q_FETCH | Q_READABLE | Q_WRITABLE | Q_GLA_VALID | Q_FINAL, gla=PROBE, gpa=PROBE)


def test_a_read_after_a_fetch_from_an_ept_execute_only_page_is_still_a_violation() -> None:
    m, s = build("""
        main:
            mov rcx, PROBE
            call rcx                              # allowed (--X): fills the TLB
        the_load:
            mov al, byte ptr [rcx]                # read: must be an EPT violation
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE)
    m.phys.write(PROBE, b"\xc3")  # ret
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=True)
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert without_stamps(one(r.trace.records, "ve_info_written")) == ve_record(
        icount=3, qual=Q_READ | Q_EXECUTABLE | Q_GLA_VALID | Q_FINAL, gla=PROBE, gpa=PROBE)




def test_a_host_resuming_without_a_fix_during_delivery_ends_the_run_as_vmexit_not_a_crash() -> None:
    m, s = build("""
        main:
            int3
            hlt
        bp_handler:
            hlt
        """, gates={3: {"handler": "bp_handler", "ist": 1}})
    m.ept.set_range(IST1_TOP - PAGE, PAGE, read=True, write=False, execute=False)
    m.on_ept_violation = "resume"
    outcome = "RecursionError escaped Machine.run"
    # Not re-raised: pytest takes minutes to format a traceback thousands of frames deep.
    with contextlib.suppress(RecursionError):
        outcome = m.run(entry=s["main"], rsp=KERNEL_STACK, max_events=5000).outcome
    assert outcome == "vmexit"




def test_an_ept_misconfiguration_on_a_guest_access_is_a_vm_exit_with_reason_49() -> None:
    m, s = build(READ_PROBE, gates=VE_GATE)
    m.ept.set_range(PROBE, PAGE, read=False, write=True, execute=False)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert of_kind(r.trace.records, "ve_info_written") == []
    assert (r.outcome, r.rip) == ("vmexit", s["the_load"])
    assert one(r.trace.records, "vmexit")["reason"] == 49


def test_an_ept_misconfiguration_while_pushing_a_frame_is_a_vm_exit_with_reason_49() -> None:
    m, s = build("""
        main:
            int3
            hlt
        bp_handler:
            hlt
        """, gates={3: {"handler": "bp_handler", "ist": 1}})
    m.ept.set_range(IST1_TOP - PAGE, PAGE, read=False, write=True, execute=False)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert r.outcome == "vmexit"
    assert one(r.trace.records, "vmexit")["reason"] == 49


# -- write intent ---------------------------------------------------------------------------


@pytest.mark.parametrize(("access", "qual"), [
    ("add qword ptr [rcx], rax", Q_WRITE | Q_GLA_VALID | Q_FINAL),        # 0x182
    ("lock xadd qword ptr [rcx], rax", Q_WRITE | Q_GLA_VALID | Q_FINAL),
    ("cmp qword ptr [rcx], rax", Q_READ | Q_GLA_VALID | Q_FINAL),         # 0x181
])
def test_a_read_modify_write_violation_is_qualified_as_a_write(access: str, qual: int) -> None:
    # SDM Vol. 3C "Exit Qualification for EPT Violations": bit 1, "the access causing the
    # EPT violation was a data write"; a read-modify-write is translated for writing from
    # its reading part on (Bochs read_RMW_virtual_*).
    m, s = build(f"""
        main:
            mov rcx, PROBE
        access:
            {access}
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE, ve=False)
    m.ept.set_range(PROBE, PAGE, read=False, write=False, execute=False)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert (r.outcome, r.rip) == ("vmexit", s["access"])
    assert without_stamps(one(r.trace.records, "vmexit")) == exit_record(
        icount=1, qual=qual, gla=PROBE, gpa=PROBE, rip=s["access"], why="#VE not enabled",
        action="stop")


def test_a_store_crossing_into_a_read_only_ept_page_exits_before_writing_its_first_page() -> None:
    # SDM Vol. 3A "Exception Classifications": nothing of a faulting instruction is done;
    # the violation names the first byte on the faulting page (GLA = GPA = PROBE).
    m, s = build("""
        main:
            mov rcx, PROBE - 4
            mov rax, -1
        store:
            mov qword ptr [rcx], rax
            hlt
        ve_handler:
            hlt
        """, gates=VE_GATE, ve=False)
    m.phys.write(PROBE - 8, bytes(8))
    m.ept.set_range(PROBE, PAGE, read=True, write=False, execute=False)
    m.on_ept_violation = "stop"
    r = m.run(entry=s["main"], rsp=KERNEL_STACK)
    assert (r.outcome, r.rip) == ("vmexit", s["store"])
    assert without_stamps(one(r.trace.records, "vmexit")) == exit_record(
        icount=2, qual=Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL, gla=PROBE, gpa=PROBE,
        rip=s["store"], why="#VE not enabled", action="stop")
    assert m.phys.read(PROBE - 8, 8) == bytes(8)
