"""A builder for the #VE tests: one block of Intel-syntax code on a fresh machine with
VMX (EPT + the "EPT-violation #VE" control), and readers for what the SDM says the CPU
leaves behind: the `ve_info_written` / `vmexit` trace records and the VE-information
area (SDM Vol. 3C "Virtualization Exceptions", "Exit Qualification for EPT Violations").

Expected values in the tests are written down from the SDM rules, never computed by
running the code: the helpers only *read* what the machine produced.

Layout (the delivery rig's, tests/delivery/rig.py, plus the VE-information page):

    0x070000  KERNEL_STACK initial RSP (CPL0)
    0x090000  IST1_TOP     TSS.IST1
    0x0A0000  IST2_TOP     TSS.IST2
    0x100000  CODE         the test's code block (entry at its first instruction)
    0x130000  VE_INFO      the VE-information page ([vmx] ve_info)
    0x300000  DATA         scratch area handlers write to
    0x400000  PROBE        pages the tests give EPT rights to (GPA == linear here)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cpu.layout import PageSpec
from cpu.machine import Machine
from cpu.vmx import VmxConfig
from tests.delivery.rig import (
    CODE,
    DATA,
    IST1_TOP,
    IST2_TOP,
    KERNEL_STACK,
    PROBE,
    of_kind,
    one,
)
from tests.delivery.rig import build as rig_build

VE_INFO = 0x130000
PAGE = 0x1000

# Exit-qualification bits (SDM 3C Table "Exit Qualification for EPT Violations"),
# spelled out here rather than imported so the tests state the SDM's numbers.
Q_READ, Q_WRITE, Q_FETCH = 1 << 0, 1 << 1, 1 << 2
Q_READABLE, Q_WRITABLE, Q_EXECUTABLE = 1 << 3, 1 << 4, 1 << 5
Q_GLA_VALID, Q_FINAL = 1 << 7, 1 << 8
Q_NMI_UNBLOCKED = 1 << 12

# Fields every `ve_info_written` record has besides seq/icount/cycle/kind.
QUAL_FIELDS = ("read", "write", "fetch", "readable", "writable", "executable", "gla_valid",
               "final_translation", "nmi_unblocked_by_iret")

__all__ = [
    "CODE", "DATA", "IST1_TOP", "IST2_TOP", "KERNEL_STACK", "PAGE", "PROBE", "QUAL_FIELDS",
    "Q_EXECUTABLE", "Q_FETCH", "Q_FINAL", "Q_GLA_VALID", "Q_NMI_UNBLOCKED", "Q_READ",
    "Q_READABLE", "Q_WRITABLE", "Q_WRITE", "VE_INFO", "build", "decoded", "kinds", "of_kind",
    "one", "without_stamps",
]


def build(source: str, *, gates: Mapping[int, Mapping[str, Any]] | None = None,
          pages: Iterable[PageSpec] = (), ve: bool = True, ve_info: int | None = VE_INFO,
          eptp_index: int = 0, tss: Mapping[str, int] | None = None,
          known: Mapping[str, int] | None = None) -> tuple[Machine, dict[str, int]]:
    """A fresh VMX machine (16 MiB, EPT identity map with 2-MiB RWX leaves) with `source`
    at CODE, IDT rows `gates` ({vector: {"handler": label, "ist": n, ...}}), guest page
    overrides `pages`, and TSS.RSP0/IST1/IST2 at their *_TOP values (tests/delivery/rig)."""
    return rig_build(source, gates=gates, pages=pages, tss=tss,
                     known={"VE_INFO": VE_INFO, **(known or {})},
                     vmx=VmxConfig(ept_violation_ve=ve, ve_info=ve_info, eptp_index=eptp_index))


def kinds(records: list[dict[str, Any]], *wanted: str) -> list[str]:
    return [r["kind"] for r in records if not wanted or r["kind"] in wanted]


def without_stamps(rec: dict[str, Any]) -> dict[str, Any]:
    """A record without `seq` and `cycle` (the timing model's business, not #VE's)."""
    return {k: v for k, v in rec.items() if k not in ("seq", "cycle")}


def decoded(qual: int) -> dict[str, bool]:
    """The trace's named qualification bits, from the SDM bit numbers above (independent
    of idt.ve.decode_qualification)."""
    bits = (Q_READ, Q_WRITE, Q_FETCH, Q_READABLE, Q_WRITABLE, Q_EXECUTABLE, Q_GLA_VALID,
            Q_FINAL, Q_NMI_UNBLOCKED)
    return {name: bool(qual & bit) for name, bit in zip(QUAL_FIELDS, bits, strict=True)}
