"""The event boundary: what happens between two instructions.

At every boundary the machine holds (between engine runs), in this order (Bochs'
`handleAsyncEvent`, QEMU's `cpu_handle_interrupt`):

1. arrivals at an injection point here count, and their events arrive;
2. time-based sources that are due fire: the APIC timer, the HPET, async-#PF page-ins
   and page-ready notifications, icount/cycle injections;
3. the blocking rules (`idt.blocking.arbitrate`: NMI blocking, IF, the STI/MOV-SS
   shadow, the APIC's priority) choose at most one event, NMI before INTR (SDM Vol. 3A
   6.9 "Priority Among Concurrent Exceptions and Interrupts"), which is delivered; then
   again from step 3 at the handler's first instruction, until nothing can be taken.

When an event is held only by a shadow or IF = 0, the next run executes one
instruction (`state.step`), so the boundary where it becomes deliverable is seen
exactly. HLT waits here: time jumps to the next deadline until an event is delivered,
and a HLT nothing can wake ends the run.

Shadows: STI that sets IF and MOV SS open a one-instruction shadow, recorded as "in
force at the boundary where `icount` instructions have retired and RIP is the next
instruction" (SDM Vol. 2 STI; Vol. 3A 6.8.3 "Masking Exceptions and Interrupts When
Switching Stacks"). A delivered event ends any shadow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cpu.decode import SiteKind
from cpu.outcomes import Outcome, Stop
from idt.blocking import Choice, Interruptibility, Shadow, arbitrate, shadow_after
from idt.state import RFLAGS_IF, RFLAGS_TF, Event, Source
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine


@dataclass
class BoundaryState:
    """Blocking state, the open shadow, and whether the CPU is halted."""

    intr: Interruptibility = field(default_factory=Interruptibility)
    # (icount after the shadow-opening instruction retires, the RIP after it, kind)
    shadow: tuple[int, int, Shadow] | None = None
    step: bool = False  # the next run executes one instruction
    halted: bool = False


class EventBoundary:
    """Arrival, arbitration and delivery of asynchronous events; HLT; deadlines."""

    def __init__(self, m: Machine, state: BoundaryState) -> None:
        self.m = m
        self.state = state

    # -- arrival -----------------------------------------------------------------------
    def nmi_arrives(self, source: str, where: dict[str, Any] | None = None) -> None:
        intr = self.state.intr
        arrival = intr.nmi_arrives()
        self.m.emit(arrival.value, source=source, nmi_blocked=intr.nmi_blocked, **(where or {}))

    def request_boundary(self) -> None:
        """Stop at the next boundary the counter sees (the next instruction in timed mode,
        the end of the current translation block in fast mode)."""
        e = self.m.engine
        e.set_stop_at(min(int(e.counter.stop_at), e.icount + 1))

    # -- shadows -----------------------------------------------------------------------
    def open_shadow(self, address: int, kind: SiteKind) -> bool:
        """At a STI or MOV SS site, before it executes (counted, not executed yet; if it
        faults instead, the delivery clears the record). The shadow after it is each
        instruction's own (`idt.blocking.shadow_after`): STI opens one when it sets IF,
        even right after a MOV SS; MOV SS opens one, even right after an STI, but not
        right after another MOV SS (docs/sdm-map.md, "Chained shadows"). Observation
        only: returns False (the instruction runs natively)."""
        m = self.m
        e = m.engine
        here = e.count_at(address)
        current = self.shadow_at(address, here - 1)
        rflags = e.read_reg("rflags")
        opening = Shadow.STI if kind is SiteKind.STI else Shadow.MOV_SS
        after = address + m.sites.lengths.get(address, 1)
        shadow = shadow_after(current, opening, if_before=bool(rflags & RFLAGS_IF))
        if shadow is not Shadow.NONE:
            self.state.shadow = (here, after, shadow)
        elif opening is Shadow.MOV_SS and rflags & RFLAGS_TF:
            # A MOV SS right after a MOV SS suppresses nothing: its single-step trap comes
            # right after it. The engine drops the trap after every MOV SS (QEMU), so the
            # machine raises it at that boundary.
            m.debug.trap_after(here, after, bs=True)
        return False

    def shadow_at(self, rip: int, retired: int) -> Shadow:
        rec = self.state.shadow
        if rec is not None and rec[0] == retired and rec[1] == rip:
            return rec[2]
        return Shadow.NONE

    # -- the boundary ------------------------------------------------------------------
    def _fire_due(self) -> None:
        m = self.m
        if m.apic is not None:
            m.apic.tick(m.engine.cycles)
        hpet = m.state.platform.hpet
        if hpet is not None and hpet.running:
            hpet.tick(m.engine.cycles)
        m.apf_host.service()
        m.injections.fire_due()

    def _arbitrate(self) -> Choice:
        m = self.m
        e = m.engine
        st = self.state
        intr = m.apic is not None and m.apic.pending_vector() is not None
        rip = e.read_reg("rip") if st.shadow is not None else 0
        st.intr.shadow = self.shadow_at(rip, e.icount) if st.shadow else Shadow.NONE
        if_flag = bool(e.read_reg("rflags") & RFLAGS_IF) if intr else False
        return arbitrate(st.intr, if_flag=if_flag, intr_pending=intr)

    def service(self) -> None:
        """At an instruction boundary: fire what is due, then deliver what the blocking
        rules allow, one event per boundary, until nothing more can be taken."""
        m = self.m
        st = self.state
        m.injections.raise_deferred()
        m.injections.arrive_here()
        self._fire_due()
        # A #DB trap owed for the instruction before this boundary ranks above NMI and
        # INTR (SDM Vol. 3A Table 6-2, "Traps on the Previous Instruction").
        m.debug.deliver_due()
        while True:
            if m.vmx_exits.at_boundary():
                continue  # a VM exit (window, NMI, interrupt) and the host's entry
            choice = self._arbitrate()
            st.step = choice.needs_stepping or m.apf_host.state.wants_step or \
                m.vmx_exits.wants_step()
            if choice.deliver is None:
                if m.alignment.fault_next():
                    continue  # #AC delivered: its handler's first instruction is a boundary
                return
            rip = m.engine.read_reg("rip")
            woke = st.halted
            st.halted = False
            if woke and m.debug.state.step_on_wake:
                # A HLT executed with TF = 1: its single-step trap comes first when the
                # CPU wakes; the waking event stays pending and is arbitrated again (an
                # interrupt is then held by the IF = 0 of the #DB's gate).
                m.engine.cycles += m.profile.event("hlt_wake")
                m.emit("wake", by=choice.deliver, vector=self._waking_vector(choice),
                       first="#DB")
                m.debug.on_wake()
                continue
            if choice.deliver == "nmi":
                st.intr.nmi_pending = False
                ev = Event(Vector.NMI, Source.NMI, rip, rip)
            else:
                assert m.apic is not None
                vector = m.apic.pending_vector()
                assert vector is not None
                m.apic.acknowledge(vector)
                ev = Event(vector, Source.INTERRUPT, rip, rip)
            if woke:
                m.engine.cycles += m.profile.event("hlt_wake")
                m.emit("wake", by=choice.deliver, vector=ev.vector)
            m.deliver(ev)
            m.injections.arrive_here()  # the handler's first instruction is a boundary too

    def _waking_vector(self, choice: Choice) -> int:
        if choice.deliver == "nmi":
            return int(Vector.NMI)
        assert self.m.apic is not None
        return self.m.apic.pending_vector() or 0

    def _pending_sources(self) -> tuple[object, ...]:
        apic = self.m.apic
        return (self.state.intr.nmi_pending, tuple(apic.irr) if apic is not None else ())

    def halt_wait(self) -> None:
        """HLT: let time pass to the next scheduled source until an event is delivered
        (which clears `halted`), or end the run when nothing can ever wake the CPU."""
        m = self.m
        e = m.engine
        st = self.state
        while st.halted:
            deadline = self.next_deadline()
            rip = e.read_reg("rip")
            if deadline is None:
                raise Stop(Outcome.HLT, "HLT with no event that can wake the CPU", rip)
            before = self._pending_sources()
            m.emit("hlt", rip=rip - 1, until=deadline)
            e.cycles = max(e.cycles, deadline)
            self.service()
            if st.halted and self._pending_sources() == before and \
                    not m.injections.cycle_deadlines():
                # Only a timer that re-sets an IRR bit already set (held by IF = 0 or
                # PPR) remains: time can pass forever without changing anything.
                raise Stop(Outcome.HLT, "HLT with every wake source held (IF = 0 or masked)",
                           rip)

    def next_stop_at(self) -> int:
        """The instruction count at which the next run stops."""
        m = self.m
        n = m.state.run.max_insns + 1
        due = m.injections.next_icount_stop()
        if due is not None:
            n = min(n, due)
        if self.state.step:
            n = min(n, m.engine.icount + 2)
        debug = m.debug.next_stop()
        if debug is not None:
            n = min(n, debug)
        return n

    def next_deadline(self) -> int | None:
        """The cycle of the next time-based source: a `cycle` injection, the APIC timer's
        next expiry, a page-in completing. None if there is none."""
        m = self.m
        deadlines: list[int | None] = list(m.injections.cycle_deadlines())
        if m.apic is not None:
            deadlines.append(m.apic.next_deadline())
        hpet = m.state.platform.hpet
        if hpet is not None and hpet.running:
            deadlines.append(hpet.next_deadline())
        if m.apf is not None:
            deadlines.append(m.apf.next_ready())
        return min((d for d in deadlines if d is not None), default=None)

    def next_stop_cycle(self) -> int:
        deadline = self.next_deadline()
        return 2**64 - 1 if deadline is None else deadline
