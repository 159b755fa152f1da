"""Alignment checking: #AC(0) for an unaligned data access at CPL 3 with CR0.AM = 1 and
RFLAGS.AC = 1 (SDM Vol. 3A "Interrupt 17—Alignment Check Exception (#AC)"; the pure
condition is `cpu.decode.alignment_check_faults`).

The engine has no alignment checking (QEMU's x86 TCG ignores CR0.AM), and a memory hook
sees an access only while it is being done: too late for a fault, which must leave the
instruction undone. So the check is made *before* the instruction, in three layers that
keep the common cases free:

* CPL < 3 or CR0.AM = 0 (every kernel, and user code under an OS that clears AM): the
  native counter does not look (`arm`, at every CPL change — CR0 cannot change at CPL 3).
* CPL 3, CR0.AM = 1, RFLAGS.AC = 0 (Linux user code: Linux sets CR0.AM, programs rarely
  set AC): the counter reads RFLAGS.AC before each translation block, natively (timed
  mode: before each instruction). AC changes only where QEMU ends a block (POPF ends one
  "because TF/AC flag may change"; IRET and SYSRET are the machine's), so a look per
  block is exact.
* AC = 1: the counter stops before the instruction (`cpu/native/counter.c` `ac_stop`);
  at that boundary, once no event is delivered there, `fault_next` decodes the
  instruction's data accesses (`cpu.decode.access_ranges`, the implicit stack access of
  PUSH/POP/CALL/RET included) and raises #AC(0) — a fault: saved RIP = the instruction,
  nothing done — or lets that one instruction run alone and looks again before the next.
  Python per instruction, only while a CPL3 program runs with AC set.

Accesses the processor makes for itself (descriptor tables, the TSS, an event's frame)
are supervisor accesses and never checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpu.decode import access_ranges, alignment_check_faults
from idt.state import RFLAGS_AC, Event
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine

CR0_AM = 1 << 18


class AlignmentCheck:
    """Arms the native look at RFLAGS.AC and checks the instruction it stopped before."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def arm(self, cpl: int) -> None:
        """At a CPL change: alignment checking can apply only at CPL 3 with CR0.AM = 1."""
        e = self.m.engine
        e.set_alignment_check(cpl == 3 and bool(e.read_reg("cr0") & CR0_AM))

    def fault_next(self) -> bool:
        """At a boundary where no event is delivered: if the counter stopped here because
        RFLAGS.AC = 1, check the next instruction's data accesses. Returns True when it
        raised #AC(0); otherwise lets that instruction run alone (False)."""
        m = self.m
        e = m.engine
        if not e.alignment_stopped:
            return False
        rip = e.read_reg("rip")
        code = m.stops.insn_bytes(rip)
        regs = m.stops.decode_regs()
        if code is not None and m.regs.state.cpl == 3:
            for r in access_ranges(code, rip, regs):
                if alignment_check_faults(cpl=3, cr0_am=True,
                                          rflags_ac=bool(regs["rflags"] & RFLAGS_AC),
                                          linear=r.start, size=r.size):
                    e.pass_alignment_check()  # consumed: the #AC handler runs at CPL 0
                    m.deliver(Event.exception(Vector.AC, rip, 0),
                              why=f"{r.size}-byte access at {r.start:#x} with RFLAGS.AC = 1")
                    return True
        e.pass_alignment_check()
        m.boundary.state.step = True  # one instruction, then look again
        return False
