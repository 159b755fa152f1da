"""The CPU model: which MSRs exist and what they hold, and what CPUID answers.

RDMSR/WRMSR and CPUID are executed in Python (cpu/emulated.py) against this model, so
that a guest sees exactly the features idtlab implements: an MSR the model does not
declare raises #GP(0) (SDM Vol. 2 RDMSR/WRMSR, "If the value in ECX specifies a reserved
or unimplemented MSR address"), reserved bits in a write raise #GP(0), and a CPUID leaf
where the model differs from Unicorn's CPU is answered from here.

MSRs:

* IA32_EFER (0xC0000080): SCE, LME, LMA, NXE are writable; LMA is read-only (the
  processor's value is kept); changing LME with paging on is #GP (SDM Vol. 3A 10.8.5
  "Initializing IA-32e Mode").
* IA32_APIC_BASE (0x1B): the xAPIC at 0xFEE00000, BSP, enabled when the machine has one.
* IA32_TIME_STAMP_COUNTER (0x10): the cycle counter plus an offset a write sets.
* Those the engine keeps itself (SYSENTER_*, STAR, LSTAR, CSTAR, FMASK, FS/GS base,
  KERNEL_GS_BASE, TSC_AUX).
* KVM's paravirtual MSRs when the machine models the async-#PF host (cpu/apf_host.py).

CPUID: leaf 1 reports the local APIC (EDX bit 9) and its initial ID (EBX[31:24]) only
when there is one, and the hypervisor bit (ECX bit 31) only when the machine models
KVM's paravirtual interface, whose leaves 0x40000000.. it then answers (all zero
otherwise); leaf 0x80000001 adds 1-GiB pages (EDX bit 26), which the page walk
implements. Every other leaf is Unicorn's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.devices.apf import ApfMsrError
from cpu.devices.apf import cpuid as apf_cpuid
from cpu.devices.apic import APIC_BASE
from cpu.engine_blob import native_cpuid
from cpu.errors import Unsupported
from cpu.mmu import EFER_LMA, EFER_LME, EFER_NXE

if TYPE_CHECKING:
    from cpu.machine import Machine

MSR_TSC = 0x10
MSR_APIC_BASE = 0x1B
MSR_EFER = 0xC0000080
APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_ADDRESS_MASK = ((1 << 46) - 1) & ~0xFFF  # bits 45:12 (MAXPHYADDR 46)
APIC_BASE_WRITABLE = APIC_BASE_BSP | APIC_BASE_ENABLE | APIC_BASE_ADDRESS_MASK
EFER_WRITABLE = (1 << 0) | EFER_LME | EFER_LMA | EFER_NXE  # SCE, LME, LMA, NXE
# MSRs kept by the engine itself: SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, FMASK,
# FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX.
PASSTHROUGH_MSRS = frozenset({0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083,
                              0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103})
CPUID_FEATURES = 0x1
CPUID_1_EDX_APIC = 1 << 9
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_EXT_FEATURES = 0x80000001
CPUID_EXT_EDX_PAGE1GB = 1 << 26
CPUID_HYPERVISOR_FIRST, CPUID_HYPERVISOR_LAST = 0x40000000, 0x4FFFFFFF


class MsrFault(Exception):
    """RDMSR/WRMSR raises #GP(0): unknown MSR, reserved bits."""


@dataclass
class ModelState:
    """The CPU model's mutable state."""

    tsc_offset: int = 0  # IA32_TIME_STAMP_COUNTER - cycles


class CpuModel:
    """MSR reads and writes, and the CPUID leaves this machine answers itself."""

    def __init__(self, m: Machine, state: ModelState) -> None:
        self.m = m
        self.state = state

    def rdmsr(self, msr: int) -> int:
        m = self.m
        if msr == MSR_EFER:
            return m.engine.read_msr(msr)
        if msr == MSR_APIC_BASE:
            enabled = m.apic is not None and m.apic.enabled
            return APIC_BASE | APIC_BASE_BSP | (APIC_BASE_ENABLE if enabled else 0)
        if msr == MSR_TSC:
            return (m.engine.cycles + self.state.tsc_offset) & (2**64 - 1)
        if msr in PASSTHROUGH_MSRS:
            return m.engine.read_msr(msr)
        if m.apf is not None and m.apf.handles(msr):
            return m.apf.rdmsr(msr)
        raise MsrFault(f"MSR {msr:#x} is not implemented by this machine")

    def wrmsr(self, msr: int, value: int) -> None:
        m = self.m
        e = m.engine
        if msr == MSR_EFER:
            old = e.read_msr(msr)
            if value & ~EFER_WRITABLE:
                raise MsrFault(f"reserved EFER bits {value & ~EFER_WRITABLE:#x}")
            if (value ^ old) & EFER_LME:
                raise MsrFault("EFER.LME changed while paging is on")
            # LMA is read-only: keep the processor's value.
            e.write_msr(msr, (value & ~EFER_LMA) | (old & EFER_LMA))
            m.regs.forget()
            e.flush_tlb()
            return
        if msr == MSR_APIC_BASE:
            # "Local APIC Status and Location" (IA32_APIC_BASE): BSP flag 8 (read-only),
            # x2APIC enable 10 (reserved: x2APIC is not advertised), global enable 11,
            # base 12 and up; the rest is reserved.
            if value & ~APIC_BASE_WRITABLE:
                raise MsrFault(f"reserved IA32_APIC_BASE bits {value & ~APIC_BASE_WRITABLE:#x}")
            if m.apic is None:
                raise MsrFault("IA32_APIC_BASE: this machine has no local APIC")
            if value & APIC_BASE_ADDRESS_MASK != APIC_BASE:
                raise Unsupported(f"IA32_APIC_BASE write {value:#x}: moving the local APIC "
                                  "page is not modelled")
            m.apic.set_global_enable(bool(value & APIC_BASE_ENABLE))
            e.flush_tlb()
            return
        if msr == MSR_TSC:
            self.state.tsc_offset = (value - e.cycles) & (2**64 - 1)
            return
        if msr in PASSTHROUGH_MSRS:
            e.write_msr(msr, value)
            return
        if m.apf is not None and m.apf.handles(msr):
            try:
                m.apf.wrmsr(msr, value, e.cycles)
            except ApfMsrError as exc:
                raise MsrFault(str(exc)) from None
            return
        raise MsrFault(f"MSR {msr:#x} is not implemented by this machine")

    def cpuid(self, leaf: int) -> tuple[int, int, int, int] | None:
        """CPUID where this machine differs from Unicorn's CPU model (None: Unicorn's own
        answer is right); see the module docstring."""
        m = self.m
        if leaf == CPUID_FEATURES:
            eax, ebx, ecx, edx = native_cpuid(leaf)
            edx &= ~CPUID_1_EDX_APIC
            ecx &= ~CPUID_1_ECX_HYPERVISOR
            ebx &= 0x00FFFFFF
            if m.apic is not None and m.apic.enabled:
                # "Enabling or Disabling the Local APIC": the flag reads 0 while disabled.
                edx |= CPUID_1_EDX_APIC
                ebx |= m.apic.apic_id << 24
            if m.apf is not None:
                ecx |= CPUID_1_ECX_HYPERVISOR
            return eax, ebx, ecx, edx
        if leaf == CPUID_EXT_FEATURES:
            eax, ebx, ecx, edx = native_cpuid(leaf)
            return eax, ebx, ecx, edx | CPUID_EXT_EDX_PAGE1GB
        if CPUID_HYPERVISOR_FIRST <= leaf <= CPUID_HYPERVISOR_LAST:
            regs = apf_cpuid(leaf) if m.apf is not None else None
            return regs if regs is not None else (0, 0, 0, 0)
        return None
