"""How a run ends: the outcomes, the internal signal that ends the run loop, and the
result a run returns.

A run ends with exactly one outcome, recorded as the trace's last record (`end`, with
`reason` = the outcome). Guest misbehaviour — a triple fault, a runaway event storm, an
access outside RAM, an instruction form idtlab does not model — is an outcome, never a
Python exception escaping `Machine.run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cpu.trace import Trace


class Outcome(StrEnum):
    """Why a run ended (the `end` record's `reason`).

        >>> Outcome("hlt") is Outcome.HLT, str(Outcome.SHUTDOWN)
        (True, 'shutdown')
    """

    HLT = "hlt"  # HLT with nothing that can ever wake the CPU
    SHUTDOWN = "shutdown"  # triple fault (SDM Vol. 3A 6.15, "Interrupt 8")
    MAX_INSNS = "max_insns"  # the instruction limit
    MAX_EVENTS = "max_events"  # the delivery/VM-exit limit (a runaway event storm)
    EXIT = "exit"  # the guest wrote an exit device (isa-debug-exit, Bochs' "Shutdown")
    OUTSIDE_MEMORY = "outside_memory"  # an access that maps to no RAM
    UNSUPPORTED = "unsupported"  # a mechanism idtlab does not model; `reason` names it
    VMEXIT = "vmexit"  # a VM exit the host model stops at
    PAUSE = "pause"  # `Machine.run(pause_at=...)` reached its point (no `end` record)


# The outcomes a run can end with (a pause is a stop in the middle, not an end).
OUTCOMES = tuple(o.value for o in Outcome if o is not Outcome.PAUSE)


class Stop(Exception):
    """Raised anywhere below the run loop to end the run with `outcome` at `rip`."""

    def __init__(self, outcome: Outcome, reason: str, rip: int,
                 exit_code: int | None = None) -> None:
        super().__init__(reason)
        self.outcome, self.reason, self.rip, self.exit_code = outcome, reason, rip, exit_code


@dataclass
class RunResult:
    """What `Machine.run` returns: the outcome, where and when it happened, the trace,
    the exit device's value (outcome "exit"), and what the UART transmitted.

        >>> from cpu.machine import Machine
        >>> m = Machine()
        >>> m.load(0x100000, bytes.fromhex("cc f4"), code=True)  # int3; hlt
        >>> m.set_gate(3, 0x100001)                            # #BP -> the hlt
        >>> r = m.run(entry=0x100000)
        >>> r.outcome, r.icount, [d["name"] for d in r.deliveries]
        ('hlt', 2, ['#BP'])
    """

    outcome: str
    rip: int
    icount: int
    trace: Trace
    exit_code: int | None = None
    reason: str = ""
    serial: str = ""
    cycles: int = 0

    @property
    def deliveries(self) -> list[dict[str, Any]]:
        """The trace's `deliver` records, in order."""
        return self.trace.of_kind("deliver")
