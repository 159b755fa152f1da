"""The MSR table: which model-specific registers exist, their reset values, which bits a
WRMSR may set, and where each value lives (SDM Vol. 4 "Architectural MSRs"; Vol. 2
"RDMSR", "WRMSR").

RDMSR and WRMSR are executed in Python (cpu/emulated.py) against `MSRS`:

* An index not in the table (nor claimed by KVM's paravirtual interface, cpu/apf_host.py,
  nor IA32_APIC_BASE, which the CPU model answers) raises #GP(0): "If the value in ECX
  specifies a reserved or unimplemented MSR address". So do the MSRs of features the
  model does not declare (cpu/cpu_model.py): no x2APIC range, no SPEC_CTRL/PRED_CMD/
  FLUSH_CMD, no performance counters, no MTRRs, no machine-check banks.
* A write that sets a bit outside `writable | readonly` raises #GP(0) ("If the source
  register contains a non-canonical address and ECX specifies one of the following
  MSRs ..., If the value ... sets a reserved bit"). Bits in `readonly` keep their value
  (IA32_MISC_ENABLE bits 7, 11 and 12 report what the processor has; a write does not
  change them). `check` adds the MSR's own rule: a canonical address for the MSRs that
  hold one (FS/GS bases, KERNEL_GS_BASE, LSTAR, CSTAR, SYSENTER_ESP/EIP: SDM WRMSR,
  "#GP(0) ... non-canonical address"), valid memory types in every IA32_PAT entry
  (SDM Vol. 3A "Programming the PAT": 2 and 3 are reserved encodings).
* `store` says where the value lives: in `MsrState` (the model's own), or in the engine,
  which uses it natively (the segment bases, the SYSCALL/SYSENTER targets, TSC_AUX for
  RDTSCP). SYSENTER_CS is kept whole here and copied to the engine, which keeps only
  its low 16 bits (the selector; SDM: bits 63:16 "can be read and written").

Special cases, each from its SDM section:

* IA32_TIME_STAMP_COUNTER (10H): the cycle counter plus an offset a write sets.
* IA32_EFER (C0000080H): SCE, LME, NXE writable, LMA read-only (a write keeps the
  processor's value); changing LME while CR0.PG = 1 is #GP(0) (Vol. 3A "Initializing
  IA-32e Mode"). A write can change paging (NXE), so it drops the TLB.
* IA32_PKRS (6E1H): protection keys for supervisor-mode pages (Vol. 3A "Protection
  Keys"); a write drops the TLB, whose entries were filled under the old keys.
* IA32_MISC_ENABLE (1A0H): reset 1801H (fast strings; BTS and PEBS unavailable; no
  performance monitoring, bit 7 = 0). Bit 22 ("Limit CPUID Maxval") and bit 34 ("XD
  Bit Disable") change what CPUID reports (cpu/cpu_model.py); bit 18 ("ENABLE MONITOR
  FSM") is stored but MONITOR/MWAIT stay unreported, as the model has neither
  (documented in docs/sdm-map.md). XD Bit Disable does not refuse EFER.NXE.
* IA32_MCG_CAP (179H): 0 — machine-check architecture with no error-reporting banks
  (and no IA32_MCG_CTL), so IA32_MCi_* do not exist; read-only (a write is #GP(0)). IA32_MCG_STATUS (17AH):
  RIPV, EIPV, MCIP writable, 0 at reset; no machine check is ever raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from cpu.mmu import CR0_PG, EFER_LMA, EFER_LME, EFER_NXE
from idt.fred import (
    CONFIG_RESERVED,
    MSR_FRED_CONFIG,
    MSR_FRED_RSP0,
    MSR_FRED_SSP1,
    MSR_FRED_STKLVLS,
)
from idt.state import is_canonical

if TYPE_CHECKING:
    from cpu.machine import Machine

MSR_TSC = 0x10
MSR_TSC_ADJUST = 0x3B
TSC_SOURCES = ("cycles", "host")
HOST_TSC_HZ = 2_000_000_000  # the host-clock TSC's nominal rate
MSR_APIC_BASE = 0x1B
MSR_SYSENTER_CS = 0x174
MSR_SYSENTER_ESP = 0x175
MSR_SYSENTER_EIP = 0x176
MSR_MCG_CAP = 0x179
MSR_MCG_STATUS = 0x17A
MSR_MISC_ENABLE = 0x1A0
MSR_PAT = 0x277
MSR_PKRS = 0x6E1
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_FMASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103

EFER_SCE = 1 << 0
MISC_ENABLE_FAST_STRING = 1 << 0
MISC_ENABLE_PERF_MON = 1 << 7
MISC_ENABLE_BTS_UNAVAILABLE = 1 << 11
MISC_ENABLE_PEBS_UNAVAILABLE = 1 << 12
MISC_ENABLE_LIMIT_CPUID_MAXVAL = 1 << 22
MISC_ENABLE_XD_DISABLE = 1 << 34
PAT_RESET = 0x0007040600070406  # WB, WT, UC-, UC, WB, WT, UC-, UC
PAT_VALID_TYPES = frozenset({0, 1, 4, 5, 6, 7})  # UC, WC, WT, WP, WB, UC-

ALL = 2**64 - 1
LOW32 = 0xFFFFFFFF


class MsrFault(Exception):
    """RDMSR/WRMSR raises #GP(0): unknown MSR, reserved bits, a bad value."""


class Store(Enum):
    MODEL = "model"  # kept in MsrState
    ENGINE = "engine"  # kept by the engine, which uses it natively
    BOTH = "both"  # kept here whole, copied to the engine (which keeps part of it)
    SPECIAL = "special"  # computed (TSC) or kept by the engine with its own rules (EFER)
    FRED = "fred"  # kept by the FRED mechanism (cpu/fred.py), which exists only with FRED


def canonical(value: int) -> str | None:
    return None if is_canonical(value) else f"non-canonical address {value:#x}"


def check_pat(value: int) -> str | None:
    """Every PAT entry must hold a valid memory type (bits 2:0 of each byte; bits 7:3
    are reserved and covered by the writable mask)."""
    for i in range(8):
        t = (value >> (8 * i)) & 0x7
        if t not in PAT_VALID_TYPES:
            return f"PA{i} holds the reserved memory type {t}"
    return None


def fred_stack_pointer(value: int) -> str | None:
    """IA32_FRED_RSP0-3: canonical and 64-byte aligned (bits 5:0 reserved)."""
    if value & 0x3F:
        return f"{value:#x} is not 64-byte aligned"
    return canonical(value)


def fred_shadow_stack_pointer(value: int) -> str | None:
    """IA32_FRED_SSP1-3: canonical and 8-byte aligned (bits 2:0 reserved)."""
    if value & 0x7:
        return f"{value:#x} is not 8-byte aligned"
    return canonical(value)


@dataclass(frozen=True)
class Msr:
    index: int
    name: str
    store: Store
    writable: int = 0
    readonly: int = 0
    reset: int = 0
    check: Callable[[int], str | None] | None = None
    flushes: bool = False  # a write changes address translation
    read_only: bool = False  # every WRMSR is #GP(0) ("R/O" in the SDM's MSR tables)


MSRS: tuple[Msr, ...] = (
    Msr(MSR_TSC, "IA32_TIME_STAMP_COUNTER", Store.SPECIAL, writable=ALL),
    Msr(MSR_TSC_ADJUST, "IA32_TSC_ADJUST", Store.SPECIAL, writable=ALL),
    Msr(MSR_SYSENTER_CS, "IA32_SYSENTER_CS", Store.BOTH, writable=ALL),
    Msr(MSR_SYSENTER_ESP, "IA32_SYSENTER_ESP", Store.ENGINE, writable=ALL, check=canonical),
    Msr(MSR_SYSENTER_EIP, "IA32_SYSENTER_EIP", Store.ENGINE, writable=ALL, check=canonical),
    Msr(MSR_MCG_CAP, "IA32_MCG_CAP", Store.MODEL, read_only=True),
    Msr(MSR_MCG_STATUS, "IA32_MCG_STATUS", Store.MODEL, writable=0b111),
    Msr(MSR_MISC_ENABLE, "IA32_MISC_ENABLE", Store.MODEL,
        writable=MISC_ENABLE_FAST_STRING | (1 << 3) | (1 << 16) | (1 << 18)
        | MISC_ENABLE_LIMIT_CPUID_MAXVAL | (1 << 23) | MISC_ENABLE_XD_DISABLE,
        readonly=MISC_ENABLE_PERF_MON | MISC_ENABLE_BTS_UNAVAILABLE
        | MISC_ENABLE_PEBS_UNAVAILABLE,
        reset=MISC_ENABLE_FAST_STRING | MISC_ENABLE_BTS_UNAVAILABLE
        | MISC_ENABLE_PEBS_UNAVAILABLE),
    Msr(MSR_PAT, "IA32_PAT", Store.MODEL, writable=0x0707070707070707, reset=PAT_RESET,
        check=check_pat),
    Msr(MSR_PKRS, "IA32_PKRS", Store.MODEL, writable=LOW32, flushes=True),
    Msr(MSR_EFER, "IA32_EFER", Store.SPECIAL, writable=EFER_SCE | EFER_LME | EFER_NXE,
        readonly=EFER_LMA, flushes=True),
    Msr(MSR_STAR, "IA32_STAR", Store.ENGINE, writable=ALL),
    Msr(MSR_LSTAR, "IA32_LSTAR", Store.ENGINE, writable=ALL, check=canonical),
    Msr(MSR_CSTAR, "IA32_CSTAR", Store.ENGINE, writable=ALL, check=canonical),
    Msr(MSR_FMASK, "IA32_FMASK", Store.ENGINE, writable=LOW32),
    Msr(MSR_FS_BASE, "IA32_FS_BASE", Store.ENGINE, writable=ALL, check=canonical),
    Msr(MSR_GS_BASE, "IA32_GS_BASE", Store.ENGINE, writable=ALL, check=canonical),
    Msr(MSR_KERNEL_GS_BASE, "IA32_KERNEL_GS_BASE", Store.ENGINE, writable=ALL,
        check=canonical),
    Msr(MSR_TSC_AUX, "IA32_TSC_AUX", Store.ENGINE, writable=LOW32),
    # FRED (SDM Vol. 4 "Model-Specific Registers"; the WRMSR checks of KVM and Bochs).
    *(Msr(MSR_FRED_RSP0 + n, f"IA32_FRED_RSP{n}", Store.FRED, writable=ALL,
          check=fred_stack_pointer) for n in range(4)),
    Msr(MSR_FRED_STKLVLS, "IA32_FRED_STKLVLS", Store.FRED, writable=ALL),
    *(Msr(MSR_FRED_SSP1 + n - 1, f"IA32_FRED_SSP{n}", Store.FRED, writable=ALL,
          check=fred_shadow_stack_pointer) for n in range(1, 4)),
    Msr(MSR_FRED_CONFIG, "IA32_FRED_CONFIG", Store.FRED, writable=ALL & ~CONFIG_RESERVED),
)
BY_INDEX: dict[int, Msr] = {msr.index: msr for msr in MSRS}


def msr_name(index: int) -> str:
    msr = BY_INDEX.get(index)
    return msr.name if msr is not None else f"MSR {index:#x}"


def checked_value(msr: Msr, value: int, current: int) -> int:
    """The value a WRMSR of `value` leaves in `msr` (whose value is `current`), or raise
    `MsrFault` for a reserved bit or a value the MSR's own rule refuses."""
    if msr.read_only:
        raise MsrFault(f"{msr.name} is read-only")
    reserved = value & ~(msr.writable | msr.readonly) & ALL
    if reserved:
        raise MsrFault(f"{msr.name}: reserved bits {reserved:#x}")
    if msr.check is not None:
        why = msr.check(value)
        if why is not None:
            raise MsrFault(f"{msr.name}: {why}")
    return (value & ~msr.readonly) | (current & msr.readonly)


def _reset_values() -> dict[int, int]:
    return {m.index: m.reset for m in MSRS if m.store in (Store.MODEL, Store.BOTH)}


@dataclass
class MsrState:
    """The MSR values the model keeps itself, and the TSC's offset from the cycles."""

    values: dict[int, int] = field(default_factory=_reset_values)
    tsc_offset: int = 0  # IA32_TIME_STAMP_COUNTER - cycles
    tsc_adjust: int = 0  # IA32_TSC_ADJUST: what WRMSRs have added to the TSC
    # Where the TSC counts from: "cycles" (the machine's cycle count: deterministic, the
    # default) or "host" (the host's monotonic clock at HOST_TSC_HZ: for guests that spin
    # until a TSC goal, as kvm-unit-tests' vmexit benchmarks do; not deterministic).
    tsc_source: str = "cycles"


class MsrFile:
    """RDMSR/WRMSR against `MSRS` (see the module docstring)."""

    def _clock(self) -> int:
        """What the TSC counts: the machine's cycles, or the host's clock."""
        if self.state.tsc_source == "host":
            return time.monotonic_ns() * HOST_TSC_HZ // 1_000_000_000
        return int(self.m.engine.cycles)

    def tsc_at(self, cycles: int) -> int:
        """The TSC when the machine's cycle count is `cycles` (an instruction inside a
        running block, whose cycles the engine's counter is ahead of)."""
        if self.state.tsc_source == "host":
            return self.read(MSR_TSC)
        return (cycles + self.state.tsc_offset) & ALL

    def _write_tsc(self, index: int, value: int) -> None:
        """A WRMSR of the TSC or of IA32_TSC_ADJUST: whatever one adds to the TSC, it
        adds to the other (SDM Vol. 3B "Time-Stamp Counter Adjustment": "If an execution
        of WRMSR to the IA32_TIME_STAMP_COUNTER MSR adds (or subtracts) value X from the
        TSC, the logical processor also adds (or subtracts) value X from the
        IA32_TSC_ADJUST MSR", and a write of IA32_TSC_ADJUST changes the TSC alike)."""
        st = self.state
        delta = (value - (self.read(MSR_TSC) if index == MSR_TSC else st.tsc_adjust)) & ALL
        st.tsc_offset = (st.tsc_offset + delta) & ALL
        st.tsc_adjust = (st.tsc_adjust + delta) & ALL

    def __init__(self, m: Machine, state: MsrState) -> None:
        self.m = m
        self.state = state

    def read(self, index: int) -> int:
        msr = BY_INDEX.get(index)
        if msr is None:
            raise MsrFault(f"MSR {index:#x} is not implemented by this machine")
        e = self.m.engine
        if index == MSR_TSC:
            return (self._clock() + self.state.tsc_offset) & ALL
        if index == MSR_TSC_ADJUST:
            return self.state.tsc_adjust
        if msr.store is Store.FRED:
            return self.m.fred.read_msr(index)
        if msr.store in (Store.MODEL, Store.BOTH):
            return self.state.values[index]
        return e.read_msr(index)

    def write(self, index: int, value: int) -> None:
        msr = BY_INDEX.get(index)
        if msr is None:
            raise MsrFault(f"MSR {index:#x} is not implemented by this machine")
        m = self.m
        e = m.engine
        if index in (MSR_TSC, MSR_TSC_ADJUST):
            self._write_tsc(index, value)
            return
        current = self.read(index)
        new = checked_value(msr, value, current)
        if index == MSR_EFER and (new ^ current) & EFER_LME and e.read_reg("cr0") & CR0_PG:
            raise MsrFault("IA32_EFER.LME changed while paging is on")
        if msr.store is Store.FRED:
            self.m.fred.write_msr(index, new)
            return
        if msr.store in (Store.MODEL, Store.BOTH):
            self.state.values[index] = new
        if msr.store is not Store.MODEL:
            e.write_msr(index, new)
        if msr.flushes:
            m.regs.forget()
            e.flush_tlb()
            e.forget_fills()  # the native fill front remembers translations too
