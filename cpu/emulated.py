"""Instructions Python executes in place of the engine: IRET, HLT, RDMSR/WRMSR, CPUID.

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
* CPUID: the leaves the CPU model answers itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpu.cpu_model import MsrFault
from cpu.ept import EptMisconfig, EptViolation
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

    def cpuid_site(self, address: int) -> bool:
        """At a CPUID: stop to emulate it when the model answers the leaf in RAX."""
        leaf = self.m.engine.read_reg("rax") & 0xFFFFFFFF
        if self.m.model.cpuid(leaf) is None:
            return False  # Unicorn's own CPUID
        self.m.stops.pending = lambda: self.cpuid(address, leaf)
        return True

    def cpuid(self, address: int, leaf: int) -> None:
        e = self.m.engine
        e.uncount()
        regs = self.m.model.cpuid(leaf)
        assert regs is not None
        eax, ebx, ecx, edx = regs
        e.write({"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx, "rip": address + 2})
        e.recount()
