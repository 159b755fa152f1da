"""Instructions Python executes in place of the engine: IRET, HLT, RDMSR/WRMSR, CPUID,
MOV to/from control registers, RDPMC.

The engine stops at the instruction's site (cpu/sites.py) before it executes, counted
by the native counter as if it had; each emulation takes the count back (`uncount`)
and gives it again (`recount`) only when the instruction retires. A fault raised by the
instruction is delivered with the instruction's own RIP (SDM Vol. 3A 6.5 "Faults").

* IRETQ (SDM Vol. 2 IRET; `idt.iret`): NMI blocking ends first thing, even when the
  IRET then faults ("NMI Unblocking Due to IRET"); the frame pops through guest paging
  (and EPT); a privilege change loads CS/SS and the CPL.
* HLT (SDM Vol. 2 HLT): #GP(0) at CPL > 0; otherwise it retires and the CPU waits at
  the boundary after it (cpu/boundary.py), so the event that wakes it saves RIP = the
  next instruction.
* RDMSR/WRMSR (SDM Vol. 2): #GP(0) at CPL > 0 or for what the CPU model refuses
  (cpu/cpu_model.py).
* CPUID: every leaf from the declared CPU model (cpu/cpu_model.py), with ECX as the
  subleaf.
* MOV to CR0/CR2/CR3/CR4/CR8 and MOV from CR8 (SDM Vol. 2 "MOV—Move to/from Control
  Registers"): #GP(0) at CPL > 0 or for a value cpu/control_regs.py refuses; otherwise
  the register is written, and a write of CR0, CR3 or CR4 drops the engine's TLB and the
  cached paging controls (the walk depends on all three, on CR4.PKE/PKS and CR0.WP
  too, which QEMU would not flush for). CR8 is the local APIC's TPR[7:4] (Vol. 3A "Task
  Priority in IA-32e Mode"); a machine without an APIC keeps it in the engine. MOV from
  CR0/CR3/CR4 runs natively.
* RDPMC (SDM Vol. 2): the model reports no performance-monitoring counters
  (CPUID.0AH:EAX = 0), so every counter index is invalid: #GP(0), and #GP(0) at CPL > 0
  with CR4.PCE = 0 too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpu.control_regs import (
    CR4_PCE,
    ControlFault,
    check_cr0,
    check_cr3,
    check_cr4,
    check_cr8,
)
from cpu.cpu_model import MsrFault
from cpu.decode import GPR_SLOTS, control_move, decode_one
from cpu.ept import EptMisconfig, EptViolation
from cpu.msrs import MSR_EFER
from cpu.outcomes import Outcome, Stop
from idt.iret import UnsupportedIret, iret64
from idt.state import ArchFault, Event
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine


class Emulated:
    """IRET, HLT, RDMSR/WRMSR and CPUID, executed at their sites."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def iret(self, address: int) -> None:
        m = self.m
        e = m.engine
        e.uncount()
        if address not in m.sites.iretq:
            raise Stop(Outcome.UNSUPPORTED, "IRET without REX.W (IRETD/IRETW) is not modelled",
                       address)
        st = m.regs.arch_state()
        was_blocked = st.nmi_blocked
        try:
            with m.paging_snapshot():
                res = iret64(m.sysmem, st)
        except ArchFault as fault:
            m.intr.nmi_blocked = st.nmi_blocked  # cleared even though the IRET faulted
            m.emit("iret_fault", rip=address, vector=fault.vector, error_code=fault.error_code,
                   nmi_unblocked=was_blocked, why=fault.why)
            m.deliver(Event.exception(fault.vector, address, fault.error_code, fault.cr2),
                      why=fault.why)
            return
        except UnsupportedIret as exc:
            raise Stop(Outcome.UNSUPPORTED, str(exc), address) from None
        except EptViolation as violation:
            # NMI blocking was cleared first thing (idt.iret); bit 12 of the
            # qualification says so when it was in force before this IRET.
            m.intr.nmi_blocked = False
            m.vmx_host.ept_violation(violation, address, violation.access, nmi_unblocked=was_blocked)
            return
        except EptMisconfig as bad:
            m.intr.nmi_blocked = was_blocked  # the host re-blocks: the IRET re-executes
            m.vmx_host.ept_misconfig(bad, address)
            return
        m.intr.nmi_blocked = False
        e.recount()
        cost = m.profile.event("iret_to_user" if res.cpl > st.cpl else "iret_same_cpl")
        m.regs.load_segments(res.cs, res.ss, res.cpl, current=(st.cs, st.ss))
        e.write({"rip": res.rip, "rsp": res.rsp, "rflags": res.rflags})
        depth = m.frames.returned()
        m.emit("iret", rip=address, to_rip=res.rip, to_rsp=res.rsp, to_cpl=res.cpl,
               nmi_unblocked=res.nmi_unblocked, depth=depth)
        e.cycles += cost

    def hlt(self, address: int) -> None:
        m = self.m
        m.engine.uncount()
        if m.regs.state.cpl != 0:
            m.deliver(Event.exception(Vector.GP, address, 0), why="HLT at CPL>0")
            return
        m.engine.recount()
        # HLT retires; the CPU waits at the boundary after it, so an event that wakes it
        # saves RIP = the instruction after the HLT (SDM HLT). The run loop does the wait.
        m.engine.write({"rip": address + 1})
        m.boundary.state.halted = True

    def msr(self, address: int, *, write: bool) -> None:
        """RDMSR/WRMSR (SDM Vol. 2): #GP(0) at CPL > 0, for an MSR this machine does not
        implement, or for reserved bits; otherwise EDX:EAX <-> MSR[ECX]."""
        m = self.m
        e = m.engine
        e.uncount()
        rax, rcx, rdx = e.read(("rax", "rcx", "rdx"))
        msr = rcx & 0xFFFFFFFF
        name = "WRMSR" if write else "RDMSR"
        cpl = m.regs.state.cpl
        if cpl != 0:
            m.deliver(Event.exception(Vector.GP, address, 0), why=f"{name} at CPL{cpl}")
            return
        value = ((rdx & 0xFFFFFFFF) << 32) | (rax & 0xFFFFFFFF)
        try:
            if write:
                m.model.wrmsr(msr, value)
            else:
                value = m.model.rdmsr(msr)
        except MsrFault as fault:
            m.emit("msr_fault", msr=msr, write=write, why=str(fault))
            m.deliver(Event.exception(Vector.GP, address, 0), why=f"{name} {msr:#x}: {fault}")
            return
        m.emit("msr_write" if write else "msr_read", msr=msr, value=value)
        regs = {"rip": address + 2}
        if not write:
            regs.update(rax=value & 0xFFFFFFFF, rdx=value >> 32)
        e.write(regs)
        e.recount()

    def cpuid(self, address: int) -> None:
        e = self.m.engine
        e.uncount()
        rax, rcx = e.read(("rax", "rcx"))
        eax, ebx, ecx, edx = self.m.model.cpuid(rax & 0xFFFFFFFF, rcx & 0xFFFFFFFF)
        e.write({"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx, "rip": address + 2})
        e.recount()

    def mov_cr(self, address: int) -> None:
        """MOV to CR0/CR2/CR3/CR4/CR8, MOV from CR8 (see the module docstring)."""
        m = self.m
        e = m.engine
        e.uncount()
        code = m.code_bytes(address, 15)
        insn = decode_one(code, address) if code is not None else None
        move = control_move(insn) if insn is not None else None
        if insn is None or move is None or move.gpr not in GPR_SLOTS:
            raise Stop(Outcome.UNSUPPORTED, f"control-register move at {address:#x} could not "
                       "be decoded", address)
        cpl = m.regs.state.cpl
        if cpl != 0:
            m.deliver(Event.exception(Vector.GP, address, 0), why=f"MOV CR{move.cr} at CPL{cpl}")
            return
        reg, _, width = GPR_SLOTS[move.gpr]
        if not move.to_cr:
            tpr = m.apic.tpr if m.apic is not None else e.read_reg("cr8") << 4
            e.write({reg: tpr >> 4, "rip": address + insn.size})
            e.recount()
            return
        value = e.read_reg(reg) & ((1 << width) - 1)
        efer = e.read_msr(MSR_EFER)
        try:
            if move.cr == 0:
                written = check_cr0(value, efer=efer)
            elif move.cr == 3:
                written = check_cr3(value)
            elif move.cr == 4:
                written = check_cr4(value, efer=efer)
            elif move.cr == 8:
                written = check_cr8(value)
            else:
                written = value  # CR2: any value
        except ControlFault as fault:
            m.deliver(Event.exception(Vector.GP, address, 0), why=f"MOV to CR{move.cr}: {fault}")
            return
        if move.cr == 8 and m.apic is not None:
            m.apic.tpr = written << 4
        else:
            e.write({f"cr{move.cr}": written})
        if move.cr in (0, 3, 4):
            m.regs.forget()
            e.flush_tlb()
        e.write({"rip": address + insn.size})
        e.recount()

    def rdpmc(self, address: int) -> None:
        m = self.m
        m.engine.uncount()
        cpl = m.regs.state.cpl
        if cpl != 0 and not m.engine.read_reg("cr4") & CR4_PCE:
            why = f"RDPMC at CPL{cpl} with CR4.PCE = 0"
        else:
            why = "RDPMC: this CPU model has no performance-monitoring counters"
        m.deliver(Event.exception(Vector.GP, address, 0), why=why)
