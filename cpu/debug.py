"""Debug exceptions (#DB) in the machine: single-step traps the engine cannot raise, and
the debug registers (the pure rules are cpu/debug_registers.py).

Where a #DB comes from
----------------------
The engine raises the single-step trap (RFLAGS.TF) itself after every instruction it
executes (cpu/stops.py `hooked_exception`). Everything else is raised here, at an
instruction boundary the machine holds:

* the single-step trap after an instruction Python executed (IRET, RDMSR/WRMSR, CPUID,
  a device-register access, SYSCALL/SYSRET; cpu/emulated.py, cpu/mmio.py) — `trap_now`;
* the single-step trap the engine suppresses but the architecture does not: QEMU drops
  the trap after *every* MOV SS, the SDM only after the first of two (Vol. 3A "Masking
  Exceptions and Interrupts When Switching Stacks"; idt.blocking `shadow_after`) —
  `trap_after`: a trap owed at the boundary after a natively executed instruction,
  delivered there by `deliver_due` (cpu/boundary.py calls it before it arbitrates: a
  trap on the previous instruction ranks above NMI and INTR, SDM Vol. 3A Table 6-2
  "Priority Among Simultaneous Exceptions and Interrupts");
* HLT with TF = 1: the trap is owed after the HLT, but the CPU is halted at that
  boundary; it is delivered when an event wakes the CPU, before that event (what Bochs
  2.7 does: guest_images/mb/step_emulated.S `tf_over_hlt_wake`) — `step_on_wake`.

DR6 on every #DB the machine delivers comes from `DebugRegisters.commit`: B0-B3 are the
breakpoints this #DB reports, BS/BD/BT are set for this #DB's kind and otherwise kept
(sticky), and DR7.GD is cleared. The values of DR0-DR3, DR6 and DR7 live in the engine's
registers (one copy: a context save holds them, `engine.read_reg("dr6")` reads what the
guest would); `registers` reads them into a `DebugRegisters`, `store` writes one back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.debug_registers import DR6_B_MASK, DebugRegisters
from idt.state import Event, Source
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine

_DRS = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")


@dataclass
class PendingTrap:
    """A #DB trap owed at the boundary where `icount` instructions have retired and RIP
    is `rip`: the breakpoints it reports (B0-B3) and whether it is a single step."""

    icount: int
    rip: int
    hits: int = 0
    bs: bool = False


@dataclass
class DebugState:
    """The debug registers and the #DB traps owed."""

    trap: PendingTrap | None = None
    step_on_wake: bool = False  # a HLT executed with TF = 1: its trap waits for the wake


class Debug:
    """Raises the #DB traps the engine does not, and keeps DR6/DR7 per the SDM."""

    def __init__(self, m: Machine, state: DebugState) -> None:
        self.m = m
        self.state = state

    # -- the registers -------------------------------------------------------------------
    def registers(self) -> DebugRegisters:
        """DR0-DR3, DR6, DR7 as the engine holds them."""
        dr0, dr1, dr2, dr3, dr6, dr7 = self.m.engine.read(_DRS)
        return DebugRegisters(addresses=[dr0, dr1, dr2, dr3], dr6=dr6, dr7=dr7)

    def store(self, r: DebugRegisters) -> None:
        """Write `r` back into the engine."""
        self.m.engine.write(dict(zip(_DRS, (*r.addresses, r.dr6, r.dr7), strict=True)))

    # -- traps -----------------------------------------------------------------------------
    def trap_now(self, *, hits: int = 0, bs: bool = False, why: str = "single-step") -> None:
        """Deliver a trap-class #DB at the current boundary (RIP = the next instruction)."""
        m = self.m
        regs = self.registers()
        regs.commit(hits, bs=bs)
        self.store(regs)
        rip = m.engine.read_reg("rip")
        m.deliver(Event(Vector.DB, Source.EXCEPTION, rip, rip, trap_like=True), why=why)

    def trap_after(self, icount: int, rip: int, *, hits: int = 0, bs: bool = False) -> None:
        """A #DB trap is owed at the boundary (`icount` retired, RIP = `rip`) after an
        instruction about to run natively: stop there (`deliver_due` delivers it)."""
        t = self.state.trap
        if t is not None and (t.icount, t.rip) == (icount, rip):
            t.hits |= hits
            t.bs = t.bs or bs
        else:
            self.state.trap = PendingTrap(icount, rip, hits, bs)
        e = self.m.engine
        e.set_stop_at(min(int(e.counter.stop_at), icount + 1))

    def deliver_due(self) -> None:
        """At a boundary: deliver the trap owed here. One owed at another boundary is
        void (its instruction faulted instead, or an event intervened)."""
        t = self.state.trap
        if t is None:
            return
        self.state.trap = None
        e = self.m.engine
        if (e.icount, e.read_reg("rip")) == (t.icount, t.rip):
            self.trap_now(hits=t.hits, bs=t.bs,
                          why="single-step" if t.bs and not t.hits else "debug trap")

    def single_step_native(self) -> None:
        """The engine raised #DB after an instruction it executed: the single-step trap
        (the engine has set DR6.BS, and B0-B3 for an instruction breakpoint at the next
        RIP, as Bochs reports both in one #DB). One #DB reports it with any data
        breakpoint owed at this same boundary."""
        t, self.state.trap = self.state.trap, None
        e = self.m.engine
        hits = t.hits if t is not None and (t.icount, t.rip) == (e.icount, e.read_reg("rip")) else 0
        self.trap_now(hits=hits | (e.read_reg("dr6") & DR6_B_MASK), why="")

    def on_wake(self) -> bool:
        """The CPU leaves a HLT to deliver an event: deliver the HLT's single-step trap
        first, if one is owed. True when it was."""
        if not self.state.step_on_wake:
            return False
        self.state.step_on_wake = False
        self.trap_now(bs=True)
        return True
