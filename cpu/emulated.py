"""Instructions Python executes in place of the engine: IRET, HLT, RDMSR/WRMSR, CPUID,
MOV to/from control registers, RDPMC.

The engine stops at the instruction's site (cpu/sites.py) before it executes, counted
by the native counter as if it had; each emulation takes the count back (`uncount`)
and gives it again (`recount`) only when the instruction retires. A fault raised by the
instruction is delivered with the instruction's own RIP (SDM Vol. 3A 6.5 "Faults").

* IRETQ (SDM Vol. 2 IRET; `idt.iret`): NMI blocking ends first thing, even when the
  IRET then faults ("NMI Unblocking Due to IRET"); the frame pops through guest paging
  (and EPT); a privilege change loads CS/SS and the CPL.
  Where it changes nothing but the frame's registers and perhaps SS (same CPL and CS,
  no TF, no data segment to null: an IST handler's null SS returning to a selector
  loads SS's hidden part from the GDT, as the boundary path does) and the boundary
  after it holds nothing to do (no NMI or interrupt pending, no injection point, debug
  trap, stepping window or #AC check), it
  is executed inside the code hook, without stopping the engine (`iret_in_hook`): the
  new RIP redirects execution (Unicorn leaves the translation block; IRETQ ends one
  anyway, so nothing after it was counted), and the counter sees every threshold at the
  next block as it would at a held boundary. Once one has run there, Python vouches for
  the native IRETQ hook (cpu/native_paths.py, cpu/native/paths.c): the IRETQs that
  follow — in the same run, or in a later one that starts at a quiet boundary — run
  natively while the memory the IRET reads (the frame's page translation, the CS and SS
  descriptors) still holds what was vouched for, and their records reach the trace, in
  order, when Python next runs (`native_irets`). Timed mode stops at every IRETQ.
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
* RDRAND, RDSEED, XSAVEOPT, XSAVEC, XSAVES/XRSTORS, RDPID, INVPCID: the engine's own
  CPU model has some of them, the declared one none: #UD, as the SDM says for each when
  its CPUID flag is 0 (and RDRAND/RDSEED never reach the host's random source).
* RDTSC/RDTSCP (SDM Vol. 2; Vol. 3B "Time-Stamp Counter"): the TSC is the machine's
  cycle count plus the offset a write of IA32_TIME_STAMP_COUNTER sets (cpu/msrs.py), the
  same value RDMSR reads, so runs are deterministic (the engine's own RDTSC reads the
  host's TSC). #GP(0) at CPL > 0 with CR4.TSD = 1; RDTSCP also loads ECX with
  IA32_TSC_AUX[31:0]. Delay loops execute one every few instructions, so the plain case
  (TF = 0, no #GP, the boundary after it holds nothing; a pending interrupt held by
  IF = 0 counts as nothing, as IF stays 0) runs inside the code hook (`rdtsc_in_hook`:
  the TSC is the cycles before the instruction plus the offset, the fast-mode counter
  settled to just after it, RIP redirected past it), and from then on in the same run
  natively at that site (cpu/native_paths.py), each one checked the same way.
* RDPMC (SDM Vol. 2): the model reports no performance-monitoring counters
  (CPUID.0AH:EAX = 0), so every counter index is invalid: #GP(0), and #GP(0) at CPL > 0
  with CR4.PCE = 0 too.
* SYSENTER/SYSEXIT (SDM Vol. 2), for the same reason as SYSCALL/SYSRET: flat CS/SS from
  IA32_SYSENTER_CS, RIP/RSP from IA32_SYSENTER_EIP/ESP (SYSEXIT: RDX/RCX), #GP(0) when
  IA32_SYSENTER_CS[15:2] = 0, SYSEXIT at CPL > 0 or to a non-canonical RCX/RDX.
* SYSCALL/SYSRET (SDM Vol. 2): Unicorn's SYSCALL only calls hooks, and the CPL is the
  machine's to track, so both are executed here: #UD without EFER.SCE, the fixed flat
  CS/SS from IA32_STAR, RIP from IA32_LSTAR (or IA32_CSTAR from compatibility mode),
  RFLAGS masked by IA32_FMASK; SYSRET #GP(0) at CPL > 0 or to a non-canonical RCX, and
  back to 64-bit (REX.W) or compatibility mode.

Single-step (SDM Vol. 3B "Single-Step Exception Condition"): an emulated instruction
that completes with TF in force traps with DR6.BS after it, as the engine does for the
instructions it executes (cpu/debug.py delivers it). For SYSCALL, SYSRET, SYSENTER and
SYSEXIT TF is looked at when they complete (so an OS masks it with IA32_FMASK; what KVM's
emulator does, commit "KVM: x86: fix singlestepping over syscall"; SYSENTER leaves TF as
it was, so the trap comes at the entry point); for the others at their start (an IRET
that loads TF = 0 still traps after itself; one that loads TF = 1 traps only after the
next instruction). HLT's trap waits for the event that wakes the CPU and comes
before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpu.control_regs import (
    CR4_PCE,
    CR4_TSD,
    ControlFault,
    check_cr0,
    check_cr3,
    check_cr4,
    check_cr8,
)
from cpu.cpu_model import MsrFault
from cpu.decode import GPR_SLOTS, UNDECLARED_INSNS, control_move, decode_one
from cpu.ept import EptMisconfig, EptViolation
from cpu.mmu import CR4_PKE, CR4_PKS, Access, PagingControl
from cpu.msrs import (
    MSR_EFER,
    MSR_SYSENTER_CS,
    MSR_SYSENTER_EIP,
    MSR_SYSENTER_ESP,
    MSR_TSC,
    MSR_TSC_AUX,
)
from cpu.native_paths import IRET_CONTEXTS, IretVouch, ProgressView
from cpu.outcomes import Outcome, Stop
from idt.iret import UnsupportedIret, iret64
from idt.state import (
    RFLAGS_IF,
    RFLAGS_RF,
    RFLAGS_VM,
    ArchFault,
    ArchState,
    Event,
    is_canonical,
)
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine

RFLAGS_TF = 1 << 8
EFER_SCE = 1 << 0
MSR_FS_BASE, MSR_GS_BASE = 0xC0000100, 0xC0000101
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
# The fixed descriptors SYSCALL and SYSRET load (their high dwords, as the engine caches
# them; SDM Vol. 2 SYSCALL/SYSRET: base 0, limit 4 GiB, accessed, present).
_CS64_DPL0, _SS_DPL0 = 0x00AF9B00, 0x00CF9300
_CS64_DPL3, _CS32_DPL3, _SS_DPL3 = 0x00AFFB00, 0x00CFFB00, 0x00CFF300
# RFLAGS bits SYSRET loads from R11 (SDM Vol. 2 SYSRET: R11 AND 3C7FD7H, bit 1 set).
_SYSRET_RFLAGS = 0x3C7FD7


class Emulated:
    """IRET, HLT, SYSCALL/SYSRET, RDMSR/WRMSR, CPUID, MOV CR and RDPMC, executed at their
    sites."""

    # Derived, not state: rebuilt as needed.
    CACHES = frozenset({"_vouched_memory"})

    def __init__(self, m: Machine) -> None:
        self.m = m
        # The memory native-IRETQ vouches named, by (frame page, CS, SS, CPL, GDT base,
        # paging controls): (frame's physical page, words that must hold). A few: a
        # handler entered through an IST returns from another stack than one entered
        # without (`NativePaths` keeps IRET_CONTEXTS of them).
        self._vouched_memory: dict[tuple[object, ...], tuple[int, tuple[tuple[int, int], ...]]] \
            = {}

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
            m.vmx_exits.note_iret_fault(was_blocked)  # II bit 12 if the #PF/#GP exits
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
        if res.cpl > st.cpl and m.fred.active():
            # FRED: only ERETU returns to ring 3; IRET to an outer level is #GP(selector)
            # after its checks (Bochs iret.cc; NMIs are unblocked, as for any faulting IRET).
            why = "IRET to an outer privilege level with CR4.FRED = 1"
            m.emit("iret_fault", rip=address, vector=Vector.GP, error_code=res.cs & 0xFFFC,
                   nmi_unblocked=was_blocked, why=why)
            m.deliver(Event.exception(Vector.GP, address, res.cs & 0xFFFC), why=why)
            return
        e.recount()
        cost = m.profile.event("iret_to_user" if res.cpl > st.cpl else "iret_same_cpl")
        m.regs.load_segments(res.cs, res.ss, res.cpl, current=(st.cs, st.ss))
        e.write({"rip": res.rip, "rsp": res.rsp, "rflags": res.rflags})
        if res.null_segments:
            self._null_segments(res.null_segments)
        depth = m.frames.returned()
        rec = m.emit("iret", rip=address, to_rip=res.rip, to_rsp=res.rsp, to_cpl=res.cpl,
                     nmi_unblocked=res.nmi_unblocked, depth=depth)
        if res.null_segments:
            rec["null_segments"] = list(res.null_segments)
        e.cycles += cost
        m.progress.after_iret(address, res.rip, res.rsp, res.rflags)
        if res.rflags & RFLAGS_RF:
            m.debug.iret_loaded_rf(e.icount, res.rip)  # no instruction breakpoint there
        self.single_step(st.rflags)  # TF as the IRET found it, not as it loaded it

    def iret_in_hook(self, address: int) -> bool:
        """At the IRETQ site, while the engine runs: execute the IRETQ here and let the
        engine go on (True), or leave it to `iret` at the boundary (False). Anything
        that is not the plain case (see the module docstring) returns False before it
        changes anything; the IRET's own reads set the same A/D bits either way."""
        m = self.m
        e = m.engine
        c = e.counter
        if (not e.block_counting or address not in m.sites.iretq
                or e.count_at(address) != int(c.count) or not self.quiet_boundary()):
            return False
        st = m.regs.arch_state()
        if st.rflags & RFLAGS_TF or m.regs.state.stale_exception:
            return False
        m.sysmem.ctl = m.regs.last_paging()  # read with the state: one engine call
        try:
            res = iret64(m.sysmem, st)
        except (ArchFault, UnsupportedIret, EptViolation, EptMisconfig, Stop):
            return False
        finally:
            m.sysmem.ctl = None
        if res.cpl != st.cpl or res.cs != st.cs or res.null_segments or res.rflags & RFLAGS_TF:
            return False
        icount = int(c.count)  # the IRETQ retired, nothing after it (checked above)
        if m.progress.observe(address, res.rip, res.rsp, res.rflags, icount, final=False):
            return False  # the stopped-engine path ends the run (`Progress.after_iret`)
        m.intr.nmi_blocked = False
        c.last_cost = c.default_cost  # what the boundary path's count settling leaves
        cost = m.profile.event("iret_same_cpl")
        depth = m.frames.returned()
        m.trace.emit("iret", icount, int(c.cycles), rip=address, to_rip=res.rip, to_rsp=res.rsp,
                     to_cpl=res.cpl, nmi_unblocked=res.nmi_unblocked, depth=depth)
        if res.ss != st.ss:
            # Another SS at the same level (a handler entered through an IST, whose SS is
            # null, returning to a stack with a selector): its hidden part is loaded from
            # the GDT, as the boundary path does, and the engine goes on at the new RIP.
            m.regs.load_segments(res.cs, res.ss, res.cpl, current=(st.cs, st.ss))
        e.redirect(res.rip, {"rsp": res.rsp, "rflags": res.rflags})
        e.cycles += cost
        if res.rflags & RFLAGS_RF:
            m.debug.iret_loaded_rf(icount, res.rip)  # no instruction breakpoint there
        self._vouch_native_iret(address, st, icount, cost, res.ss)
        return True

    def _vouch_native_iret(self, address: int, st: ArchState, icount: int, cost: int,
                           frame_ss: int) -> None:
        """After `iret_in_hook` executed the IRETQ at `address`: let the native hook
        execute the IRETQs that follow in this run the same way (cpu/native_paths.py),
        vouching for what it cannot see. Only the memory this IRET read is vouched for
        (its frame's page, the CS, SS and frame SS descriptors): re-walking it sets no
        A/D bit."""
        m = self.m
        e = m.engine
        ctl = m.regs.last_paging()
        if (m.ept is not None or m.vmx_exits.enabled or ctl.cr4 & (CR4_PKE | CR4_PKS)
                or address in m.injections.state.before
                or address in m.debug.state.exec_breakpoints or m.progress.state.last is None):
            return
        key = (st.rsp >> 12, st.cs, st.ss, frame_ss, st.cpl, st.gdtr_base, ctl)
        memories = self._vouched_memory
        if e.paths.words_failed():
            memories.clear()  # some vouched memory changed: walk again
        memory = memories.get(key)
        if memory is None:
            # The memory to vouch for: what a walk reads now (the words the C code then
            # re-checks at every IRETQ; while they hold, the same key needs no walk).
            memory = self._memory_to_vouch(st, ctl, frame_ss)
            if memory is None:
                return
            if len(memories) >= 4 * IRET_CONTEXTS:
                memories.clear()
            memories[key] = memory
        stack_paddr, words = memory
        progress = self._progress_view()
        assert progress is not None  # `last` was checked above
        e.paths.learn_iret(address, IretVouch(
            cs=st.cs, ss=st.ss, cpl=st.cpl, stack_page=st.rsp >> 12, stack_paddr=stack_paddr,
            frame_ss=frame_ss,
            frame_ss_flags=0 if frame_ss == st.ss else m.regs.ss_flags(frame_ss, st.cpl),
            words=words, scope=(ctl.cr0, ctl.cr3, ctl.cr4, ctl.efer, st.gdtr_base),
            cost=cost, progress=progress))

    def _progress_view(self) -> ProgressView | None:
        """The no-progress state (cpu/progress.py) as the native IRETQ keeps it, or None
        when there is no previous IRET to compare with."""
        m = self.m
        p = m.progress.state
        last = p.last
        if last is None:
            return None
        return ProgressView(last=(last[0], last[1], last[2], last[3], last[4]),
                            icount=p.icount, registers=p.registers, repeats=p.repeats,
                            limit=m.progress.limit())

    def _memory_to_vouch(self, st: ArchState, ctl: PagingControl, frame_ss: int) -> tuple[
            int, tuple[tuple[int, int], ...]] | None:
        """(the frame page's physical page, the physical words that must hold: the
        paging-structure entries of the frame's page and of the CS, SS and frame SS
        descriptors, and the descriptors) for an IRETQ at `st` whose frame holds
        `frame_ss`, or None if it cannot be vouched for."""
        m = self.m
        words: dict[int, int] = {}
        walks = m.sysmem.walks
        try:
            t = walks.walk(ctl, st.rsp, Access.READ, user=st.cpl == 3)
            words.update(walks.last_used)
            for sel in sorted({st.cs, st.ss, frame_ss}):
                if sel & 0xFFFC == 0:
                    continue
                linear = st.gdtr_base + (sel >> 3) * 8
                d = walks.walk(ctl, linear, Access.READ, user=False)
                words.update(walks.last_used)
                paddr = d.paddr | (linear & 0xFFF)
                if not m.phys.contains(paddr, 8):
                    return None
                words[paddr] = int.from_bytes(m.phys.read(paddr, 8), "little")
        except ArchFault:
            return None
        if not m.phys.contains(t.paddr, 4096):
            return None
        return t.paddr, tuple(words.items())

    def rearm_native_iret(self) -> None:
        """As a run starts (`Engine.on_run_start`): let the native hook execute IRETQs at
        the sites vouched for earlier in this machine's life, if the boundary here is
        quiet (nothing can become pending without a Python hook, which disarms it) — so
        a handler's IRETQ after a delivery made between runs needs no Python call. What
        `_vouch_native_iret` checked in Python is checked again here; the memory and the
        selectors vouched for then are re-checked natively at each IRETQ."""
        m = self.m
        e = m.engine
        paths = e.paths
        if not paths.has_vouched_irets:
            return
        if (m.ept is not None or m.vmx_exits.enabled or not e.block_counting
                or m.regs.state.stale_exception or not self.quiet_boundary()):
            return
        scope = e.control_scope()  # CR0, CR3, CR4, EFER and the GDT base
        if scope[2] & (CR4_PKE | CR4_PKS):
            return
        before = m.injections.state.before
        breakpoints = m.debug.state.exec_breakpoints
        last = m.progress.state.last
        # An event since the last IRET: the next one's signature cannot match it.
        progress = None if last is None or last[5] != m.state.run.events else \
            self._progress_view()
        paths.rearm_iret(progress=progress,
                         site_ok=lambda a: a not in before and a not in breakpoints,
                         nmi_blocked=m.intr.nmi_blocked,
                         scope=scope)

    def native_irets(self, records: list[tuple[int, int, int, int, int, int, int]]) -> None:
        """IRETQs the native hook executed, in order (`Engine.irets_done`): the records
        and bookkeeping `iret_in_hook` makes for each."""
        m = self.m
        cpl = m.regs.state.cpl
        for address, icount, cycles, rip, rsp, rflags, unblocked in records:
            if unblocked:
                m.intr.nmi_blocked = False
            depth = m.frames.returned()
            m.trace.emit("iret", icount, cycles, rip=address, to_rip=rip, to_rsp=rsp,
                         to_cpl=cpl, nmi_unblocked=bool(unblocked), depth=depth)
            if rflags & RFLAGS_RF:
                m.debug.iret_loaded_rf(icount, rip)
        # The no-progress check ran natively (the same rule): take its state back.
        last, icount, registers, repeats = m.engine.paths.progress_state()
        p = m.progress.state
        p.last = (*last, m.state.run.events)
        p.icount, p.registers, p.repeats = icount, registers, repeats

    def quiet_boundary(self, if_after: bool = True) -> bool:
        """From a code hook while the engine runs: the boundary after the instruction
        holds nothing the run loop would do there (no event pending or deferred, no
        stepping window, debug trap or breakpoint pass, no #AC check, nothing listening
        to boundaries), so an instruction executed inside its hook may let the engine go
        on (`iret_in_hook`, `rdtsc_in_hook`). `if_after` = False: RFLAGS.IF is 0 after
        the instruction, so a pending interrupt stays held there."""
        m = self.m
        e = m.engine
        c = e.counter
        b = m.boundary.state
        # stop_at = 2**64 - 1: the engine runs a split block up to its threshold
        # (`Engine._split`), with the thresholds off.
        if (e.bits != 64 or m.stops.pending is not None or c.stopped
                or int(c.stop_at) == 2**64 - 1
                or m.intr.nmi_pending or b.step or b.halted or m.on_boundary or c.ac_check
                or (if_after and m.apic is not None and m.apic.pending_vector() is not None)
                or m.injections.state.deferred is not None or m.apf_host.state.wants_step):
            return False
        dbg = m.debug.state
        return dbg.trap is None and dbg.pass_at is None and not dbg.step_on_wake

    def _null_segments(self, names: tuple[str, ...]) -> None:
        """RETURN-TO-OUTER-PRIVILEGE-LEVEL: DS/ES/FS/GS that the new CPL may not use
        become NULL. In 64-bit mode the selector is what changes: FS and GS keep their
        bases (SDM Vol. 3A "Segment Loading Instructions in IA-32e Mode"; the engine's
        selector write clears them, so they are put back)."""
        e = self.m.engine
        bases = {msr: e.read_msr(msr) for name, msr in (("fs", MSR_FS_BASE), ("gs", MSR_GS_BASE))
                 if name in names}
        e.write(dict.fromkeys(names, 0))
        for msr, base in bases.items():
            e.write_msr(msr, base)

    def single_step(self, rflags: int) -> None:
        """After an emulated instruction retired (RIP is the next one): the single-step
        trap when `rflags` (TF at the instruction's start, or at its end for SYSCALL and
        SYSRET) has TF set (DR6.BS, cpu/debug.py)."""
        if rflags & RFLAGS_TF:
            self.m.debug.trap_now(bs=True)

    def syscall(self, address: int) -> None:
        m = self.m
        e = m.engine
        e.uncount()
        if m.fred.active():
            m.fred.syscall(address)  # an event of type 7 (cpu/fred.py)
            return
        if not e.read_msr(0xC0000080) & EFER_SCE:
            m.deliver(Event.exception(Vector.UD, address), why="SYSCALL with EFER.SCE = 0")
            return
        compat = not e.in_64bit_mode()
        rflags = e.read_reg("rflags")
        star, lstar, cstar, fmask = (e.read_msr(x) for x in (MSR_STAR, MSR_LSTAR, MSR_CSTAR,
                                                              MSR_FMASK))
        cs = (star >> 32) & 0xFFFC
        new_rflags = rflags & ~fmask & ~RFLAGS_RF
        target = cstar if compat else lstar
        e.recount()
        m.regs.load_fixed_segments(cs, _CS64_DPL0, cs + 8, _SS_DPL0, 0)
        e.write({"rcx": address + 2, "r11": rflags, "rflags": new_rflags, "rip": target})
        m.emit("syscall", rip=address, to_rip=target, compat=compat)
        self.single_step(new_rflags)

    def sysret(self, address: int) -> None:
        m = self.m
        e = m.engine
        e.uncount()
        size = m.sites.lengths.get(address, 2)
        to64 = size == 3  # REX.W: back to 64-bit mode
        if m.fred.active():
            m.fred.undefined(address, "SYSRET")
            return
        if not e.read_msr(0xC0000080) & EFER_SCE:
            m.deliver(Event.exception(Vector.UD, address), why="SYSRET with EFER.SCE = 0")
            return
        rcx, r11 = e.read(("rcx", "r11"))
        if m.regs.state.cpl != 0:
            m.deliver(Event.exception(Vector.GP, address, 0), why="SYSRET at CPL > 0")
            return
        if to64 and not is_canonical(rcx):
            m.deliver(Event.exception(Vector.GP, address, 0),
                      why=f"SYSRET to non-canonical RCX {rcx:#x}")
            return
        base = (e.read_msr(MSR_STAR) >> 48) & 0xFFFF
        cs = ((base + 16) if to64 else base) | 3
        rip = rcx if to64 else rcx & 0xFFFFFFFF
        rflags = (r11 & _SYSRET_RFLAGS) | 2
        e.recount()
        m.regs.load_fixed_segments(cs, _CS64_DPL3 if to64 else _CS32_DPL3, (base + 8) | 3,
                                   _SS_DPL3, 3)
        e.write({"rip": rip, "rflags": rflags})
        m.frames.user_mode()
        m.emit("sysret", rip=address, to_rip=rip, to_64bit=to64)
        self.single_step(rflags)

    def sysenter(self, address: int) -> None:
        """SYSENTER (SDM Vol. 2): #GP(0) if IA32_SYSENTER_CS[15:2] = 0; otherwise CPL 0 at
        IA32_SYSENTER_EIP with RSP = IA32_SYSENTER_ESP, CS = SYSENTER_CS AND FFFCH (flat,
        64-bit in IA-32e mode) and SS = CS + 8; RFLAGS.VM, IF, RF cleared (TF is not: a
        single-step trap comes after the SYSENTER, at the entry point)."""
        m = self.m
        e = m.engine
        e.uncount()
        if m.fred.active():
            m.fred.syscall(address, sysenter=True)
            return
        cs = m.model.rdmsr(MSR_SYSENTER_CS) & 0xFFFC
        if cs == 0:
            m.deliver(Event.exception(Vector.GP, address, 0),
                      why="SYSENTER with IA32_SYSENTER_CS[15:2] = 0")
            return
        rip, rsp = (e.read_msr(x) for x in (MSR_SYSENTER_EIP, MSR_SYSENTER_ESP))
        rflags = e.read_reg("rflags") & ~(RFLAGS_VM | RFLAGS_IF | RFLAGS_RF)
        e.recount()
        m.regs.load_fixed_segments(cs, _CS64_DPL0, cs + 8, _SS_DPL0, 0)
        e.write({"rip": rip, "rsp": rsp, "rflags": rflags})
        m.emit("sysenter", rip=address, to_rip=rip)
        self.single_step(rflags)

    def sysexit(self, address: int) -> None:
        """SYSEXIT (SDM Vol. 2): #GP(0) if IA32_SYSENTER_CS[15:2] = 0, at CPL > 0, or (to
        64-bit mode, REX.W) if RCX or RDX is not canonical; otherwise CPL 3 at RDX with
        RSP = RCX (EDX/ECX to compatibility mode), CS = SYSENTER_CS + 32 (+ 16) OR 3,
        SS = CS + 8, flat; RFLAGS unchanged."""
        m = self.m
        e = m.engine
        e.uncount()
        to64 = m.sites.lengths.get(address, 2) == 3  # REX.W
        if m.fred.active():
            m.fred.undefined(address, "SYSEXIT")
            return
        base = m.model.rdmsr(MSR_SYSENTER_CS) & 0xFFFF
        rcx, rdx, rflags = e.read(("rcx", "rdx", "rflags"))
        why = ("SYSEXIT with IA32_SYSENTER_CS[15:2] = 0" if base & 0xFFFC == 0 else
               f"SYSEXIT at CPL{m.regs.state.cpl}" if m.regs.state.cpl != 0 else
               f"SYSEXIT to non-canonical RCX/RDX {rcx:#x}/{rdx:#x}"
               if to64 and not (is_canonical(rcx) and is_canonical(rdx)) else "")
        if why:
            m.deliver(Event.exception(Vector.GP, address, 0), why=why)
            return
        cs = ((base + 32) if to64 else (base + 16)) | 3
        rip, rsp = (rdx, rcx) if to64 else (rdx & 0xFFFFFFFF, rcx & 0xFFFFFFFF)
        e.recount()
        m.regs.load_fixed_segments(cs, _CS64_DPL3 if to64 else _CS32_DPL3, cs + 8, _SS_DPL3, 3)
        e.write({"rip": rip, "rsp": rsp})
        m.emit("sysexit", rip=address, to_rip=rip, to_64bit=to64)
        self.single_step(rflags)

    def hlt(self, address: int) -> None:
        m = self.m
        m.engine.uncount()
        if m.regs.state.cpl != 0:
            m.deliver(Event.exception(Vector.GP, address, 0), why="HLT at CPL>0")
            return
        m.engine.recount()
        # HLT retires; the CPU waits at the boundary after it, so an event that wakes it
        # saves RIP = the instruction after the HLT (SDM HLT). The run loop does the wait.
        # With TF = 1 its single-step trap is delivered when the CPU wakes, before the
        # event that woke it (cpu/debug.py).
        m.engine.write({"rip": address + 1})
        m.boundary.state.halted = True
        if m.engine.read_reg("rflags") & RFLAGS_TF:
            m.debug.state.step_on_wake = True

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
        rflags = e.read_reg("rflags")  # TF as the instruction found it
        regs = {"rip": address + 2}
        if not write:
            regs.update(rax=value & 0xFFFFFFFF, rdx=value >> 32)
        e.write(regs)
        e.recount()
        self.single_step(rflags)

    def cpuid(self, address: int) -> None:
        e = self.m.engine
        e.uncount()
        rax, rcx = e.read(("rax", "rcx"))
        eax, ebx, ecx, edx = self.m.model.cpuid(rax & 0xFFFFFFFF, rcx & 0xFFFFFFFF)
        e.write({"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx, "rip": address + 2})
        e.recount()
        self.single_step(e.read_reg("rflags"))

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
        rflags = e.read_reg("rflags")
        if not move.to_cr:
            tpr = m.apic.tpr if m.apic is not None else e.read_reg("cr8") << 4
            e.write({reg: tpr >> 4, "rip": address + insn.size})
            e.recount()
            self.single_step(rflags)
            return
        value = e.read_reg(reg) & ((1 << width) - 1)
        efer = e.read_msr(MSR_EFER)
        try:
            if move.cr == 0:
                written = check_cr0(value, efer=efer)
            elif move.cr == 3:
                written = check_cr3(value)
            elif move.cr == 4:
                written = check_cr4(value, efer=efer, fred=m.fred.supported)
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
        self.single_step(rflags)

    def undeclared(self, address: int) -> None:
        """An instruction the CPU model does not report: #UD (SDM Vol. 2, each
        instruction's "#UD If CPUID... = 0")."""
        m = self.m
        m.engine.uncount()
        code = m.code_bytes(address, 15)
        insn = decode_one(code, address) if code is not None else None
        name = insn.mnemonic if insn is not None else "?"
        flag = UNDECLARED_INSNS.get(name, "its CPUID flag")
        m.deliver(Event.exception(Vector.UD, address), why=f"{name.upper()}: {flag} = 0")

    def rdtsc(self, address: int, *, rdtscp: bool = False) -> None:
        """RDTSC (0F 31) and RDTSCP (0F 01 F9), from the machine's TSC. Delay loops run
        one per iteration, so this path decodes nothing: the length is the site's."""
        m = self.m
        e = m.engine
        e.uncount()
        cpl = m.regs.state.cpl
        name = "RDTSCP" if rdtscp else "RDTSC"
        length = m.sites.lengths[address]  # a site's kind and length are noted together
        if cpl != 0 and e.read_reg("cr4") & CR4_TSD:
            m.deliver(Event.exception(Vector.GP, address, 0),
                      why=f"{name} at CPL{cpl} with CR4.TSD = 1")
            return
        tsc = m.model.msrs.read(MSR_TSC)
        out = {"rax": tsc & 0xFFFFFFFF, "rdx": tsc >> 32, "rip": address + length}
        if rdtscp:
            out["rcx"] = e.read_msr(MSR_TSC_AUX) & 0xFFFFFFFF
        rflags = e.read_reg("rflags")
        e.write(out)
        e.recount()
        self.single_step(rflags)

    def rdtsc_in_hook(self, address: int, *, rdtscp: bool = False) -> bool:
        """At the RDTSC/RDTSCP site, while the engine runs: execute it here and let the
        engine go on (True), or leave it to `rdtsc` at the boundary (False). The plain
        case: `quiet_boundary`, TF = 0, CR4.TSD = 0 or CPL 0, and no injection point at
        the next instruction (its arrival counts at a held boundary). The TSC read is
        the one `rdtsc` reads: the cycles of the instructions before this one, plus the
        offset. In fast mode the block's count was added when the block started, so the
        counter is settled to just after this instruction before RIP moves on (the rest
        of the block runs as a new block, counted when it starts), as the engine's stop
        would settle it (`Engine.hook_stamp`)."""
        m = self.m
        e = m.engine
        length = m.sites.lengths.get(address)
        if length is None or address + length in m.injections.state.before:
            return False
        rflags, cr4 = e.read(("rflags", "cr4"))
        if (rflags & RFLAGS_TF or (m.regs.state.cpl != 0 and cr4 & CR4_TSD)
                or not self.quiet_boundary(if_after=bool(rflags & RFLAGS_IF))):
            return False
        if e.block_counting and e.count_at(address) > int(e.counter.count):
            return False  # the block was not counted (the counter stopped it)
        c = e.counter
        icount, cycles = e.hook_stamp(address)
        cost = int(c.default_cost) if e.block_counting else int(c.last_cost)
        tsc = m.model.msrs.tsc_at(cycles - cost)
        out = {"rax": tsc & 0xFFFFFFFF, "rdx": tsc >> 32}
        if rdtscp:
            out["rcx"] = e.read_msr(MSR_TSC_AUX) & 0xFFFFFFFF
        if e.block_counting:
            c.count, c.cycles, c.last_cost = icount, cycles, c.default_cost
        e.redirect(address + length, out)
        if (m.model.msrs.state.tsc_source == "cycles" and address not in m.injections.state.before
                and address not in m.debug.state.exec_breakpoints):
            # The native site hook may repeat this in the same block (cpu/native_paths.py).
            block = ((int(c.block_addr), int(c.block_size), icount - int(c.block_before) - 1)
                     if e.block_counting else (0, 0, 0))
            aux = out.get("rcx", 0) if rdtscp else e.read_msr(MSR_TSC_AUX) & 0xFFFFFFFF
            e.paths.learn(address, block, tsc_offset=m.model.msrs.state.tsc_offset, tsc_aux=aux,
                          if_clear=not rflags & RFLAGS_IF)
        return True

    def rdpmc(self, address: int) -> None:
        m = self.m
        m.engine.uncount()
        cpl = m.regs.state.cpl
        if cpl != 0 and not m.engine.read_reg("cr4") & CR4_PCE:
            why = f"RDPMC at CPL{cpl} with CR4.PCE = 0"
        else:
            why = "RDPMC: this CPU model has no performance-monitoring counters"
        m.deliver(Event.exception(Vector.GP, address, 0), why=why)
