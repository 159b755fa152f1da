"""Helpers for the asynchronous-event tests (NMI, maskable interrupts, shadows, the local
APIC, injection points): build a machine with the constructor options these tests vary,
capture every delivered frame *at the moment it is pushed*, and name the APIC registers.

As in tests/delivery/rig.py, nothing here computes an expected value: the tests write
them down from the SDM rules (Vol. 3A "Interrupt and Exception Handling", "APIC") and these
helpers only read what the machine produced.

Why capture at delivery time: several tests deliver two events onto the same stack
address one after the other (an NMI latched behind another, two vectors from the same
boundary), so reading the frame back at the end of the run would only show the last one.
`Frames` hooks `Machine.on_deliver` and reads the five slots right after the pushes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

from cpu.machine import Machine
from idtlab.api import load_asm
from tests.delivery.rig import (
    CODE,
    DATA,
    IST1_TOP,
    IST2_TOP,
    MEMORY,
    RSP0_TOP,
    Frame,
    assert_record,
    handler_rsp,
    of_kind,
    read_frame,
)

# Local APIC (xAPIC MMIO page, SDM Vol. 3A "Local APIC Register Address Map").
APIC_BASE = 0xFEE00000
TPR = 0x080
EOI = 0x0B0
SVR = 0x0F0
ICR_LOW = 0x300
ICR_HIGH = 0x310
LVT_TIMER = 0x320
TIMER_INITIAL = 0x380
TIMER_DIVIDE = 0x3E0

SVR_ENABLED = 0x1FF  # bit 8 (software enable) | spurious vector 0xFF
LVT_PERIODIC = 1 << 17  # timer mode 01b
ICR_SELF = 0b01 << 18  # destination shorthand "self"
ICR_NMI = 0b100 << 8  # delivery mode NMI
ICR_INIT = 0b101 << 8  # delivery mode INIT (not modelled)
DIVIDE_BY_1 = 0b1011  # divide configuration register bits 3,1,0 = 1,1,1
DIVIDE_BY_2 = 0b0000  # 0,0,0

__all__ = [
    "APIC_BASE", "DIVIDE_BY_1", "DIVIDE_BY_2", "EOI", "ICR_HIGH", "ICR_INIT", "ICR_LOW",
    "ICR_NMI", "ICR_SELF", "LVT_PERIODIC", "LVT_TIMER", "SVR", "SVR_ENABLED",
    "TIMER_DIVIDE", "TIMER_INITIAL", "TPR", "Frames", "build", "cost", "expect", "kinds",
    "of_kind",
]


def build(source: str, *, gates: Mapping[int, Mapping[str, Any]], mode: str = "fast",
          sti_blocks_nmi: bool = True) -> tuple[Machine, dict[str, int]]:
    """A fresh machine (`mode`, `sti_blocks_nmi`) with `source` at CODE, the TSS stacks of
    rig.py (RSP0/IST1/IST2 at their *_TOP) and the IDT rows `gates` (rig.gate rows).
    Labels become machine symbols, so `inject(before="label")` works."""
    m = Machine(MEMORY, mode=mode, sti_blocks_nmi=sti_blocks_nmi)
    m.symbols["DATA"] = DATA
    sym = load_asm(m, textwrap.dedent(source), CODE, origin="test")
    m.set_tss(rsp0=RSP0_TOP, ist1=IST1_TOP, ist2=IST2_TOP)
    for vector, row in gates.items():
        row = dict(row)
        handler = row.pop("handler")
        m.set_gate(vector, sym[handler] if isinstance(handler, str) else handler, **row)
    return m, sym


class Frames:
    """Every `deliver` record of a run, paired with the frame read from guest memory
    right after that delivery pushed it (slot by slot, rig.read_frame); `blocked[i]` is
    `Machine.nmi_blocked` right after delivery i."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.seen: list[tuple[dict[str, Any], dict[str, int]]] = []
        self.blocked: list[bool] = []
        m.on_deliver.append(self._snap)

    def _snap(self, rec: dict[str, Any]) -> None:
        has_ec = rec["error_code"] is not None
        self.seen.append((rec, read_frame(self.m, rec["rsp"], error_code=has_ec)))
        self.blocked.append(self.m.nmi_blocked)


def expect(got: tuple[dict[str, Any], dict[str, int]], *, vector: int, frame: Frame,
           stack: str, stack_top: int, source: str, handler: int, cpl: int = 0) -> None:
    """One captured delivery: the record (vector, every pushed slot, stack, final RSP
    derived from `stack_top` by the SDM rule, CPL, source, handler) and the frame in
    memory, slot by slot, as it was right after the pushes."""
    rec, mem = got
    assert_record(rec, vector=vector, frame=frame, stack=stack, stack_top=stack_top, cpl=cpl)
    assert (rec["source"], rec["handler"]) == (source, handler)
    assert rec["rsp"] == handler_rsp(stack_top, error_code=frame.error_code is not None)
    assert mem == frame.slots()


def cost(m: Machine, cls: str) -> int:
    """Cycles one retired instruction of class `cls` (cpu.timing.classify) costs in the
    machine's mode: the profile's one figure in fast mode, the class's in timed mode."""
    if m.mode == "fast":
        return m.profile.cycles_per_instruction
    return m.profile.instructions[cls].cost


def kinds(records: list[dict[str, Any]]) -> list[str]:
    return [r["kind"] for r in records]



