"""Progress: a guest that loops through IRET without getting anywhere ends its run.

The hazard. The nested-NMI race leaves an IST frame that points back into the handler
that IRETs through it: `pop rax; iretq` returns to `pop rax; iretq` with the same RSP,
for ever. Nothing is delivered, so the event limit (`max_events`, which counts
deliveries and VM exits) never trips; only the instruction limit does, and an emulated
IRET costs the machine a Python stop each time: ten million instructions of that loop
took minutes and gigabytes of trace. A run should end in seconds, with an outcome that
says why.

The rule. An IRET that returns exactly as the previous IRET from the same address did
(same return RIP, RSP and RFLAGS, the same number of instructions since, no event
delivered in between, and every general-purpose register the same), NO_PROGRESS_IRETS
times in a row, is a loop without progress: the run ends with outcome "max_events" and a
detail naming the IRET and its target. Registers are read only once the cheap part of
that comparison matched (a candidate loop), so an ordinary IRET costs a tuple compare.

What it cannot see: a loop that changes only memory between identical IRETs (a counter
in RAM) looks the same. Such a guest ends after NO_PROGRESS_IRETS identical round trips;
the limit is far above what a test loops through an IRET on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.engine import GPRS
from cpu.outcomes import Outcome, Stop

if TYPE_CHECKING:
    from cpu.machine import Machine

NO_PROGRESS_IRETS = 10_000
# The registers compared besides the signature: all but RSP, which the signature holds as
# the IRET loaded it (an IRET run in its hook is looked at before it pops, one run by
# the stopped engine after: only RSP, RIP and RFLAGS differ, and those are compared there).
_COMPARED = tuple(r for r in GPRS if r != "rsp")


@dataclass
class ProgressState:
    # (IRET address, return RIP, RSP, RFLAGS, instructions since the last IRET, events)
    last: tuple[int, ...] | None = None
    registers: tuple[int, ...] | None = None  # the GPRs at `last` (a candidate loop)
    icount: int = 0  # the instruction count at the last IRET
    repeats: int = 0


class Progress:
    """Watches emulated IRETs for a loop that makes no progress."""

    def __init__(self, m: Machine, state: ProgressState) -> None:
        self.m = m
        self.state = state

    @staticmethod
    def limit() -> int:
        """Identical IRETs in a row that end a run (NO_PROGRESS_IRETS, read when asked)."""
        return NO_PROGRESS_IRETS

    def after_iret(self, address: int, rip: int, rsp: int, rflags: int) -> None:
        """An emulated IRET at `address` returned to `rip` with `rsp` and `rflags`."""
        st = self.state
        if self.observe(address, rip, rsp, rflags, self.m.engine.icount):
            raise Stop(Outcome.MAX_EVENTS,
                       f"no progress: the IRET at {address:#x} returned to {rip:#x} "
                       f"{st.repeats} times with the same registers and no event in between",
                       rip)

    def observe(self, address: int, rip: int, rsp: int, rflags: int, icount: int, *,
                final: bool = True) -> bool:
        """Note an IRET (`icount` instructions retired with it); True when it is the
        NO_PROGRESS_IRETS-th identical one in a row. `final` = False (an IRET run inside
        its code hook, cpu/emulated.py `iret_in_hook`): that last one is not noted, so the
        stopped-engine path notes it again and ends the run (`after_iret`)."""
        m = self.m
        st = self.state
        sig = (address, rip, rsp, rflags, icount - st.icount, m.state.run.events)
        if sig != st.last:
            st.icount = icount
            st.last, st.registers, st.repeats = sig, None, 0
            return False
        # `events` in the signature moves on with every delivery: equal means none.
        regs = tuple(m.engine.read(_COMPARED))
        if regs != st.registers:
            st.icount = icount
            st.registers, st.repeats = regs, 1
            return False
        if not final and st.repeats + 1 >= NO_PROGRESS_IRETS:
            return True
        st.icount = icount
        st.repeats += 1
        return st.repeats >= NO_PROGRESS_IRETS
