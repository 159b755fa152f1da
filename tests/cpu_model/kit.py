"""Helpers for the CPU-model tests: run a few instructions on a fresh machine and look at
what they left — registers, the first event delivered, guest memory.

As elsewhere in tests/, nothing here computes an expected value: the tests write them
down from the SDM and these helpers only read what the machine produced.

Layout (tests/delivery/rig.py): code at CODE, scratch data at DATA, CPL0 stack at
KERNEL_STACK, CPL3 stack at USER_STACK, TSS.RSP0 at RSP0_TOP. Every vector 0-31 goes to
`fault:`, a HLT at CPL0 (IF = 0 in an interrupt gate, so the run ends there); a test
reads the `deliver` record of the first event.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cpu.layout import PageSpec
from cpu.machine import Machine
from cpu.outcomes import RunResult
from tests.delivery.rig import (
    CODE,
    DATA,
    KERNEL_STACK,
    PROBE,
    RSP0_TOP,
    USER_STACK,
    build,
    gate,
)

__all__ = ["CODE", "DATA", "KERNEL_STACK", "PROBE", "RSP0_TOP", "USER_STACK", "Ran", "leaf_entry",
           "run"]

FAULT = """
fault:
    hlt
"""


@dataclass
class Ran:
    m: Machine
    result: RunResult
    sym: dict[str, int]

    @property
    def first(self) -> dict[str, Any] | None:
        """The first `deliver` record (None: nothing was delivered)."""
        d = self.result.deliveries
        return d[0] if d else None

    def fault(self) -> tuple[int, int | None, int]:
        """(vector, error code, saved RIP) of the first event; fails if there is none."""
        d = self.first
        assert d is not None, f"no event was delivered (outcome {self.result.outcome})"
        return d["vector"], d["error_code"], d["rip"]

    def reg(self, name: str) -> int:
        return self.m.engine.read_reg(name)

    def u64(self, address: int) -> int:
        return int.from_bytes(self.m.phys.read(address, 8), "little")


def run(source: str, *, cpl: int = 0, regs: Mapping[str, int] | None = None,
        cr4: int = 0, cr0_clear: int = 0, pages: Iterable[PageSpec] = (),
        rflags: int = 0x202, max_insns: int = 10_000,
        memory: Mapping[int, bytes] | None = None,
        setup: Callable[[Machine], None] | None = None) -> Ran:
    """Run `source` (ending in `hlt`, or at a fault) at `cpl`, with CR4 |= `cr4` and
    CR0 &= ~`cr0_clear` before the first instruction and `memory` (physical address ->
    bytes) written; `setup(machine)` runs last, on the built machine."""
    m, sym = build(textwrap.dedent(source) + FAULT,
                   gates={v: gate("fault") for v in range(32)}, pages=pages)
    m.build()
    for address, data in (memory or {}).items():
        m.phys.write(address, data)
    if setup is not None:
        setup(m)
    e = m.engine
    if cr4 or cr0_clear:
        e.write({"cr4": e.read_reg("cr4") | cr4, "cr0": e.read_reg("cr0") & ~cr0_clear})
    result = m.run(entry=sym["main"], rsp=USER_STACK if cpl == 3 else KERNEL_STACK, cpl=cpl,
                   regs=dict(regs or {}), rflags=rflags, max_insns=max_insns)
    return Ran(m, result, sym)


def leaf_entry(m: Machine, va: int) -> int:
    """The physical address of the paging-structure entry that maps `va` (a PTE, or the
    PDE of a 2-MiB page), found by walking the machine's tables from CR3."""
    table = m.engine.read_reg("cr3") & ~0xFFF
    for level, shift in enumerate((39, 30, 21, 12)):
        slot = table + ((va >> shift) & 0x1FF) * 8
        entry = m.phys.read_u64(slot)
        if level == 3 or (level == 2 and entry & (1 << 7)):
            return slot
        table = entry & 0x000F_FFFF_FFFF_F000
    raise AssertionError("unreachable")
