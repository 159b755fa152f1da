"""Debug exceptions (#DB) in the machine: the debug registers wired in, and the
single-step traps the engine cannot raise (the pure rules are cpu/debug_registers.py;
SDM Vol. 3B "Debug Registers", "Debug Exceptions").

The registers
-------------
DR0-DR3, DR6 and DR7 live in the engine's registers (one copy: a context save holds
them, `engine.read_reg("dr6")` reads what the guest would); `registers` reads them into
a `DebugRegisters`, `store` writes one back. The engine itself does nothing with them
(Unicorn's register write does not arm QEMU's breakpoints), so every MOV to or from a
debug register is a site (`SiteKind.MOV_DR`) executed here (`mov_dr`): #GP(0) at CPL > 0,
#UD for DR4/DR5 with CR4.DE = 1, and with DR7.GD = 1 a #DB *fault* with DR6.BD (general
detect), in the SDM's order (`mov_dr_fault`). After a write, the breakpoints DR7 enables
are armed (`_arm`):

* instruction breakpoints (R/W = 00) get a site at their address: before that
  instruction runs, a #DB fault with B0-B3 — unless RFLAGS.RF = 1 for this very
  instruction. RF = 1 comes from an IRETQ (cpu/emulated.py records where it lands,
  `rf_at`): the engine clears RF only at the end of a translation block, so an RF still
  set further on in the block is stale and does not suppress anything;
* data breakpoints (R/W = 01 writes, 11 reads and writes) keep their pages out of the
  engine's TLB (cpu/translation.py `Translator.fill` poisons them for data accesses, and
  never lets the native fill front remember them): every data access to such a page
  stops at its instruction (cpu/stops.py `memory_fault` -> `data_access`), which decodes
  the instruction's accesses (`cpu.decode.access_ranges`) against DR0-DR3
  (`DebugRegisters.data_hits`), lets that one instruction run with the pages mapped
  (`pass_at`), and owes a #DB *trap* after it. A data breakpoint hit by MOV SS is held
  until the instruction after the MOV SS has completed (Vol. 3A "Masking Exceptions and
  Interrupts When Switching Stacks");
* I/O breakpoints (R/W = 10, only with CR4.DE = 1) are checked at the IN/OUT/INS/OUTS
  sites (`io_site`): a trap after the instruction.

Where a #DB comes from, then
-----------------------------
The engine raises the single-step trap (RFLAGS.TF) itself after every instruction it
executes (cpu/stops.py `hooked_exception` -> `single_step_native`, which adds the data
breakpoints owed at the same boundary: one #DB reports both). Everything else is raised
here, at an instruction boundary the machine holds:

* the single-step trap after an instruction Python executed (IRET, RDMSR/WRMSR, CPUID,
  a device-register access, SYSCALL/SYSRET, MOV DR; cpu/emulated.py, cpu/mmio.py) —
  `trap_now`;
* a trap owed after a natively executed instruction (`trap_after`): a data or I/O
  breakpoint, and the single-step trap the engine suppresses but the architecture does
  not — QEMU drops the trap after *every* MOV SS, the SDM only after the first of two
  (idt.blocking `shadow_after`). `deliver_due` (cpu/boundary.py calls it before it
  arbitrates: a trap on the previous instruction ranks above NMI and INTR, SDM Vol. 3A
  Table 6-2 "Priority Among Simultaneous Exceptions and Interrupts") delivers it; any
  other event delivered first voids it (`before_delivery`: the instruction faulted);
* HLT with TF = 1: the trap is owed after the HLT, but the CPU is halted at that
  boundary; it is delivered when an event wakes the CPU, before that event (what Bochs
  2.7 does: guest_images/mb/step_emulated.S `tf_over_hlt_wake`) — `step_on_wake`.

DR6 on every #DB comes from `DebugRegisters.commit`: B0-B3 are the breakpoints this #DB
reports, BS/BD/BT are set for this #DB's kind and otherwise kept (sticky), and DR7.GD is
cleared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.debug_registers import (
    DB,
    DR6_B_MASK,
    GP,
    BreakKind,
    DebugRegisters,
    mov_dr_fault,
)
from cpu.decode import access_ranges, decode_one, port_access
from idt.blocking import Shadow
from idt.state import RFLAGS_RF, Event, Source
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine

_DRS = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")
CR4_DE = 1 << 3
RFLAGS_TF = 1 << 8


@dataclass
class PendingTrap:
    """A #DB trap owed at the boundary where `icount` instructions have retired (and RIP
    is `rip`, when known): the breakpoints it reports (B0-B3), whether it is a single
    step."""

    icount: int
    rip: int | None
    hits: int = 0
    bs: bool = False


@dataclass
class DebugState:
    """The #DB traps owed, and what DR7 arms (derived from the debug registers when a
    MOV DR writes them, kept here so that a checkpoint holds both together)."""

    trap: PendingTrap | None = None
    step_on_wake: bool = False  # a HLT executed with TF = 1: its trap waits for the wake
    # (icount, RIP) of the boundary where an IRETQ loaded RFLAGS.RF = 1.
    rf_at: tuple[int, int] | None = None
    exec_breakpoints: frozenset[int] = frozenset()  # addresses of instruction breakpoints
    watched: frozenset[int] = frozenset()  # pages holding an enabled data breakpoint
    # The boundary (instructions retired) where one instruction starts that runs with
    # the watched pages mapped (a data-breakpoint pass), or None.
    pass_at: int | None = None


class Debug:
    """The debug registers, and the #DB traps the engine does not raise."""

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

    def mov_dr(self, address: int) -> None:
        """MOV to or from DR0-DR7 at `address` (a site; SDM Vol. 2 "MOV—Move to/from Debug
        Registers"): the faults first, then the move; the instruction retires."""
        m = self.m
        e = m.engine
        e.uncount()
        insn = decode_one(m.stops.insn_bytes(address) or b"", address)
        assert insn is not None  # a site is a decoded instruction
        dst, src = (x.strip() for x in insn.op_str.split(","))
        write = dst.startswith("dr")
        n, gpr = (int(dst[2:]), src) if write else (int(src[2:]), dst)
        value = e.read_reg(gpr) if write else 0
        regs = self.registers()
        rflags = e.read_reg("rflags")
        fault = mov_dr_fault(n, cpl=m.regs.state.cpl, cr4_de=bool(e.read_reg("cr4") & CR4_DE),
                             dr7=regs.dr7, write=write, value=value)
        if fault == DB:
            # General detect: a fault (RIP = the MOV), DR6.BD, and GD cleared for the
            # handler (`commit`).
            regs.commit(bd=True)
            self.store(regs)
            m.deliver(Event(Vector.DB, Source.EXCEPTION, address, address),
                      why=f"{insn.text} with DR7.GD = 1")
            return
        if fault is not None:
            m.deliver(Event.exception(fault, address, 0 if fault == GP else None),
                      why=f"{insn.text}")
            return
        if write:
            regs.write(n, value)
            self.store(regs)
            if n in (0, 1, 2, 3, 7) or (n == 5 and not e.read_reg("cr4") & CR4_DE):
                self._arm(regs)
            e.write({"rip": address + insn.size})
        else:
            e.write({gpr: regs.read(n), "rip": address + insn.size})
        e.recount()
        m.emulated.single_step(rflags)

    def _arm(self, regs: DebugRegisters) -> None:
        """What DR7 enables now: a site at each instruction breakpoint, the pages of the
        data breakpoints out of the engine's TLB."""
        st = self.state
        e = self.m.engine
        execs: set[int] = set()
        pages: set[int] = set()
        for n in range(4):
            bp = regs.breakpoint(n)
            if bp is None:
                continue
            if bp.kind is BreakKind.EXECUTE:
                execs.add(bp.address)
            elif bp.kind in (BreakKind.WRITE, BreakKind.READ_WRITE):
                lo = bp.address & ~(bp.length - 1)
                pages.update({lo & ~0xFFF, (lo + bp.length - 1) & ~0xFFF})
        for address in execs - e.site_addresses:
            e.add_site(address)
        st.exec_breakpoints = frozenset(execs)
        if frozenset(pages) != st.watched:
            st.watched = frozenset(pages)
            e.flush_tlb()
            e.forget_fills()

    # -- instruction breakpoints -------------------------------------------------------------
    def breakpoint_site(self, address: int) -> bool:
        """At a site hook: True (stop, #DB fault pending) when an instruction breakpoint
        matches the instruction about to run and RF does not suppress it."""
        st = self.state
        if address not in st.exec_breakpoints:
            return False
        e = self.m.engine
        regs = self.registers()
        here = e.count_at(address)
        rf = st.rf_at == (here - 1, address) and bool(e.read_reg("rflags") & RFLAGS_RF)
        hits = regs.instruction_hits(address, rf=rf)
        if not hits or self.m.boundary.shadow_at(address, here - 1) & Shadow.MOV_SS:
            # Intel: an instruction breakpoint on the instruction right after MOV SS is not
            # reported; the instruction runs and the breakpoint is gone with it (SDM Vol.
            # 3A "Masking Exceptions and Interrupts When Switching Stacks": debug
            # exceptions are inhibited; kvm-unit-tests x86/emulator.c
            # test_mov_pop_ss_code_db expects no #DB on Intel, one on AMD).
            return False

        def fault() -> None:
            e.uncount()
            regs.commit(hits)
            self.store(regs)
            self.m.deliver(Event(Vector.DB, Source.EXCEPTION, address, address),
                           why="instruction breakpoint")

        self.m.stops.pending = fault
        return True

    def iret_loaded_rf(self, icount: int, rip: int) -> None:
        """An IRETQ loaded RFLAGS.RF = 1: it suppresses the instruction breakpoints of the
        instruction at `rip`, the next to run."""
        self.state.rf_at = (icount, rip)

    # -- data breakpoints --------------------------------------------------------------------
    def watches(self, vpage: int) -> bool:
        """Whether data accesses to `vpage` must stop (Translator.fill)."""
        st = self.state
        return bool(st.watched) and vpage in st.watched and st.pass_at is None

    def data_access(self, rip: int, vaddr: int) -> bool:
        """A data access at `vaddr` by the instruction at RIP (not retired) stopped on a
        watched page: owe the #DB of the breakpoints its accesses match after it, and
        let it run alone with the pages mapped. False if `vaddr` is not watched."""
        st = self.state
        m = self.m
        if vaddr & ~0xFFF not in st.watched:
            return False
        regs = self.registers()
        code = m.stops.insn_bytes(rip)
        hits = 0
        held = False
        if code is not None:
            for r in access_ranges(code, rip, m.stops.decode_regs()):
                hits |= regs.data_hits(r.start, r.size, write=r.write)
            insn = decode_one(code, rip)
            held = insn is not None and insn.mnemonic == "mov" and insn.op_str.startswith("ss,")
        e = m.engine
        st.pass_at = e.icount
        e.flush_tlb()
        if hits:
            # After the instruction; a MOV SS holds it until the next one has run.
            self.trap_after(e.icount + (2 if held else 1), None, hits=hits)
        return True

    def _end_pass(self) -> None:
        if self.state.pass_at is not None:
            self.state.pass_at = None
            self.m.engine.flush_tlb()

    # -- I/O breakpoints ----------------------------------------------------------------------
    def io_site(self, address: int) -> bool:
        """At an IN/OUT/INS/OUTS site, before it runs: when I/O breakpoints match its
        port (with CR4.DE = 1), stop before it (True) and owe their trap after it; the
        next run then executes it alone (a translation block goes on past an IN/OUT, so
        a stop requested from inside the block would come too late in fast mode)."""
        m = self.m
        e = m.engine
        if not e.read_reg("dr7") & 0xFF:
            return False  # no breakpoint enabled (the common case: one register read)
        regs = self.registers()
        here = e.count_at(address)
        t = self.state.trap
        if t is not None and t.icount == here:
            return False  # owed already: this is the run that executes it
        insn = decode_one(m.stops.insn_bytes(address) or b"", address)
        if insn is None:
            return False
        port, size = port_access(insn)
        if port is None:
            port = e.read_reg("rdx") & 0xFFFF
        hits = regs.io_hits(port, size, cr4_de=bool(e.read_reg("cr4") & CR4_DE))
        if not hits:
            return False

        def owe() -> None:
            e.uncount()  # stopped before it: it runs in the next run, alone
            self.trap_after(e.icount + 1, address + insn.size, hits=hits)

        m.stops.pending = owe
        return True

    # -- traps -----------------------------------------------------------------------------
    def trap_now(self, *, hits: int = 0, bs: bool = False, why: str = "single-step") -> None:
        """Deliver a trap-class #DB at the current boundary (RIP = the next instruction)."""
        m = self.m
        if m.vmx_exits.db_trap(hits=hits, bs=bs):
            return  # a #DB the exception bitmap claims: DR6 untouched (cpu/vmx_exits.py)
        regs = self.registers()
        regs.commit(hits, bs=bs)
        self.store(regs)
        rip = m.engine.read_reg("rip")
        m.deliver(Event(Vector.DB, Source.EXCEPTION, rip, rip, trap_like=True), why=why)

    def trap_after(self, icount: int, rip: int | None, *, hits: int = 0, bs: bool = False) -> None:
        """A #DB trap is owed at the boundary where `icount` instructions have retired
        (RIP = `rip` if known): stop there (`deliver_due` delivers it)."""
        t = self.state.trap
        if t is not None and t.icount == icount:
            t.hits |= hits
            t.bs = t.bs or bs
            t.rip = t.rip if rip is None else rip
        else:
            self.state.trap = PendingTrap(icount, rip, hits, bs)
        e = self.m.engine
        e.set_stop_at(min(int(e.counter.stop_at), icount + 1))

    def next_stop(self) -> int | None:
        """The instruction count the next run must stop at for this module: the boundary
        of an owed trap, or after the one instruction of a data-breakpoint pass."""
        st = self.state
        stops = []
        if st.trap is not None:
            stops.append(st.trap.icount + 1)
        if st.pass_at is not None:
            stops.append(st.pass_at + 2)
        return min(stops, default=None)

    def deliver_due(self) -> None:
        """At a boundary: end a data-breakpoint pass whose instruction has run, and
        deliver the trap owed here."""
        e = self.m.engine
        if self.state.pass_at is not None and e.icount > self.state.pass_at:
            self._end_pass()
        t = self.state.trap
        if t is None:
            return
        if e.icount < t.icount:
            return  # owed after a later instruction (a MOV SS's)
        self.state.trap = None
        if e.icount == t.icount and t.rip in (None, e.read_reg("rip")):
            self.trap_now(hits=t.hits, bs=t.bs,
                          why="single-step" if t.bs and not t.hits else "debug trap")

    def before_delivery(self, ev: Event) -> None:
        """An event is delivered: a trap still owed is void (its instruction faulted, or
        never ran), and a data-breakpoint pass is over. Except a software interrupt (INT n,
        INT3, INTO) that ends the instruction the trap is owed after (the one after a MOV
        SS that hit a data breakpoint): that instruction completed by delivering it, so
        the trap comes at the next boundary, the handler's first instruction (kvm-unit-
        tests x86/debug.c "MOV SS + watchpoint + int $1" / "+ INT3": the #DB handler
        runs before the INT's handler). INT1 (ICEBP) is itself a #DB and takes the owed
        one with it."""
        t = self.state.trap
        if t is not None and ev.source is Source.SOFTWARE and self.m.engine.icount == t.icount:
            t.rip = None  # wherever the delivery lands
        else:
            self.state.trap = None
        self._end_pass()

    def single_step_native(self) -> None:
        """The engine raised #DB after an instruction it executed: the single-step trap
        (the engine has set DR6.BS, and B0-B3 for an instruction breakpoint at the next
        RIP, as Bochs reports both in one #DB). One #DB reports it with any data or I/O
        breakpoint owed at this same boundary."""
        t, self.state.trap = self.state.trap, None
        e = self.m.engine
        hits = 0
        if t is not None and t.icount == e.icount and t.rip in (None, e.read_reg("rip")):
            hits = t.hits
        self.trap_now(hits=hits | (e.read_reg("dr6") & DR6_B_MASK), why="")

    def on_wake(self) -> bool:
        """The CPU leaves a HLT to deliver an event: deliver the HLT's single-step trap
        first, if one is owed. True when it was."""
        if not self.state.step_on_wake:
            return False
        self.state.step_on_wake = False
        self.trap_now(bs=True)
        return True
