"""The declared CPU model: what CPUID answers, as data, and the MSRs behind RDMSR/WRMSR.

A guest learns what the processor can do from CPUID and nothing else (SDM Vol. 2
"CPUID—CPU Identification"; Vol. 1 "Detection of ... features"). A differential tool
that lets the engine's CPUID through advertises whatever QEMU's CPU model has — SMAP
without the SMAP checks, LA57 without 5-level paging, a CR4.OSXSAVE bit that does not
follow CR4 — and the guest then takes paths idtlab does not implement. So the model
here is declared, not derived:

* `FEATURES` lists every feature bit CPUID may report, with its leaf, register and bit,
  and `semantics`: the mechanism in idtlab that implements it (a dotted name), or the
  test that shows the engine executes it as the SDM says (``tests/...::test_name``).
  tests/cpu_model/test_cpuid.py resolves every reference and checks that CPUID never
  reports a bit outside the table, so a feature cannot be advertised without its
  semantics.
* Everything else CPUID reports (vendor, signature, the XSAVE layout, address widths, the
  brand string) is a constant of this module.
* A few bits follow machine state (`CpuidInputs`): CPUID.1:ECX.OSXSAVE and
  CPUID.7.0:ECX.OSPKE mirror CR4.OSXSAVE and CR4.PKE (SDM "CPUID": "reflects the setting
  of CR4.OSXSAVE"); CPUID.1:EDX.APIC and the initial APIC ID (EBX[31:24]) exist only
  when the machine has a local APIC and it is globally enabled (IA32_APIC_BASE[11];
  Vol. 3A "Enabling or Disabling the Local APIC"); CPUID.1:ECX[31] (a hypervisor is present) and the
  leaves 0x40000000.. only when it models KVM's paravirtual interface
  (cpu/devices/apf.py); the XSAVE area size for the features XCR0 enables
  (CPUID.(EAX=0DH,ECX=0):EBX); IA32_MISC_ENABLE's "limit CPUID maxval" (bit 22: leaf 0
  reports 2) and "XD bit disable" (bit 34: CPUID.80000001H:EDX.NX = 0).

Leaves: 0 (the highest basic leaf, 0DH, and "GenuineIntel"), 1, 7 (subleaf 0), 0DH (XSAVE:
x87, SSE and PKRU state), 80000000H-80000004H (the brand string "idtlab x86-64 CPU
model"), 80000008H (40 physical and 48 linear address bits, as cpu/mmu.py walks). Every
other leaf up to the highest is all zero (no cache, topology, power or performance-
monitoring information: CPUID.0AH:EAX = 0 says there is no architectural PMU). A leaf
above the highest basic or extended leaf returns the highest basic leaf's data, as
Intel processors do (SDM "CPUID": "If a value entered for CPUID.EAX is higher than the
maximum input value for basic or extended function for that processor then the data
for the highest basic information leaf is returned"); the hypervisor range is all zero
without KVM's interface. The signature is family 6, model 55H, stepping 4 (the engine's
own model is QEMU's Skylake-Server, cpu/engine_blob.py), but the feature set is this
table's, not Skylake's: no AVX (the engine cannot execute it), no MONITOR/MWAIT, no PCID,
no x2APIC, no RDRAND/RDSEED (the engine's answers would come from the host's random
source), no performance monitoring, no VMX instructions.

RDMSR/WRMSR go through the MSR table in cpu/msrs.py (`MsrFile`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from cpu.devices.apf import ApfMsrError
from cpu.devices.apf import cpuid as apf_cpuid
from cpu.devices.apic import APIC_BASE
from cpu.errors import Unsupported
from cpu.mmu import MAXPHYADDR
from cpu.msrs import (
    MISC_ENABLE_LIMIT_CPUID_MAXVAL,
    MISC_ENABLE_XD_DISABLE,
    MSR_APIC_BASE,
    MSR_EFER,
    MSR_MISC_ENABLE,
    MSR_TSC,
    MsrFault,
    MsrFile,
    MsrState,
)

if TYPE_CHECKING:
    from cpu.machine import Machine

__all__ = ["FEATURES", "MSR_APIC_BASE", "MSR_EFER", "MSR_TSC", "CpuModel", "CpuidInputs",
           "Feature", "ModelState", "MsrFault", "Reg", "cpuid"]

APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_ADDRESS_MASK = ((1 << MAXPHYADDR) - 1) & ~0xFFF  # bits MAXPHYADDR-1:12
APIC_BASE_WRITABLE = APIC_BASE_BSP | APIC_BASE_ENABLE | APIC_BASE_ADDRESS_MASK


class Reg(IntEnum):
    """The CPUID output registers, in the order CPUID returns them."""

    EAX = 0
    EBX = 1
    ECX = 2
    EDX = 3


@dataclass(frozen=True)
class Feature:
    """One CPUID feature bit: `name` as Linux spells it (arch/x86/include/asm/
    cpufeatures.h, lower case), where CPUID reports it, and what implements it."""

    name: str
    leaf: int
    subleaf: int
    reg: Reg
    bit: int
    semantics: str  # "cpu.module.Name" or "tests/path.py::test_name"
    mirrors: str = ""  # set only while this machine state holds (see CpuidInputs)

    @property
    def mask(self) -> int:
        return 1 << self.bit


_NATIVE = "tests/cpu_model/test_native_features.py::"
_PROT = "tests/cpu_model/test_protection.py::"
_CR = "tests/cpu_model/test_control_registers.py::"
_TSC = "tests/cpu_model/test_tsc.py::"

E, B, C, D = Reg.EAX, Reg.EBX, Reg.ECX, Reg.EDX
L1, L7, LX = 0x1, 0x7, 0x80000001

FEATURES: tuple[Feature, ...] = (
    # CPUID.01H:EDX
    Feature("fpu", L1, 0, D, 0, _NATIVE + "test_x87_arithmetic_runs_as_the_sdm_defines_it"),
    Feature("de", L1, 0, D, 2, _CR + "test_with_cr4_de_a_mov_from_dr4_is_ud"),
    Feature("pse", L1, 0, D, 3, _CR + "test_cr4_bits_of_declared_features_are_writable"),
    Feature("tsc", L1, 0, D, 4,
            _TSC + "test_rdtsc_reads_the_value_written_to_the_tsc_msr_plus_the_cycles_since"),
    Feature("msr", L1, 0, D, 5, "cpu.emulated.Emulated.msr"),
    Feature("pae", L1, 0, D, 6, "cpu.mmu.walk"),
    Feature("mce", L1, 0, D, 7, _CR + "test_cr4_bits_of_declared_features_are_writable"),
    Feature("cx8", L1, 0, D, 8, _NATIVE + "test_cmpxchg8b_and_cmpxchg16b_run_natively"),
    Feature("apic", L1, 0, D, 9, "cpu.devices.apic.LocalApic", mirrors="apic"),
    Feature("sep", L1, 0, D, 11, "cpu.emulated.Emulated.sysenter"),
    Feature("pge", L1, 0, D, 13, "cpu.control_regs.CR4_PGE"),
    Feature("mca", L1, 0, D, 14, "cpu.msrs.MSR_MCG_CAP"),
    Feature("cmov", L1, 0, D, 15, _NATIVE + "test_cmov_and_lahf_run_natively"),
    Feature("pat", L1, 0, D, 16, "cpu.msrs.check_pat"),
    Feature("clflush", L1, 0, D, 19, _NATIVE + "test_cache_line_flushes_run_natively"),
    Feature("mmx", L1, 0, D, 23, _NATIVE + "test_mmx_runs_natively"),
    Feature("fxsr", L1, 0, D, 24, _NATIVE + "test_fxsave_and_fxrstor_run_natively"),
    Feature("xmm", L1, 0, D, 25, _NATIVE + "test_sse_and_sse2_run_natively"),
    Feature("xmm2", L1, 0, D, 26, _NATIVE + "test_sse_and_sse2_run_natively"),
    # CPUID.01H:ECX
    Feature("pni", L1, 0, C, 0, _NATIVE + "test_sse3_ssse3_and_sse4_run_natively"),
    Feature("pclmulqdq", L1, 0, C, 1, _NATIVE + "test_pclmulqdq_and_aes_run_natively"),
    Feature("ssse3", L1, 0, C, 9, _NATIVE + "test_sse3_ssse3_and_sse4_run_natively"),
    Feature("cx16", L1, 0, C, 13, _NATIVE + "test_cmpxchg8b_and_cmpxchg16b_run_natively"),
    Feature("xmm4_1", L1, 0, C, 19, _NATIVE + "test_sse3_ssse3_and_sse4_run_natively"),
    Feature("xmm4_2", L1, 0, C, 20, _NATIVE + "test_sse3_ssse3_and_sse4_run_natively"),
    Feature("movbe", L1, 0, C, 22, _NATIVE + "test_movbe_and_popcnt_run_natively"),
    Feature("popcnt", L1, 0, C, 23, _NATIVE + "test_movbe_and_popcnt_run_natively"),
    Feature("aes", L1, 0, C, 25, _NATIVE + "test_pclmulqdq_and_aes_run_natively"),
    Feature("xsave", L1, 0, C, 26, "cpu.control_regs.check_xsetbv"),
    Feature("osxsave", L1, 0, C, 27, "cpu.control_regs.CR4_OSXSAVE", mirrors="CR4.OSXSAVE"),
    Feature("hypervisor", L1, 0, C, 31, "cpu.apf_host.ApfHost", mirrors="kvm"),
    # CPUID.(EAX=07H,ECX=0)
    Feature("fsgsbase", L7, 0, B, 0, "cpu.canonical.check_base_write"),
    Feature("tsc_adjust", L7, 0, B, 1, _TSC + "test_tsc_adjust_and_the_tsc_move_together"),
    Feature("bmi1", L7, 0, B, 3, _NATIVE + "test_bmi1_bmi2_and_adx_run_natively"),
    Feature("smep", L7, 0, B, 7, "cpu.mmu.walk"),
    Feature("bmi2", L7, 0, B, 8, _NATIVE + "test_bmi1_bmi2_and_adx_run_natively"),
    Feature("erms", L7, 0, B, 9, _NATIVE + "test_rep_movsb_and_stosb_run_natively"),
    Feature("adx", L7, 0, B, 19, _NATIVE + "test_bmi1_bmi2_and_adx_run_natively"),
    Feature("smap", L7, 0, B, 20, "cpu.mmu.walk"),
    Feature("clflushopt", L7, 0, B, 23, _NATIVE + "test_cache_line_flushes_run_natively"),
    Feature("clwb", L7, 0, B, 24, _NATIVE + "test_cache_line_flushes_run_natively"),
    Feature("umip", L7, 0, C, 2, "cpu.control_regs.umip_blocks"),
    Feature("pku", L7, 0, C, 3, "cpu.mmu.walk"),
    Feature("ospke", L7, 0, C, 4, "cpu.control_regs.CR4_PKE", mirrors="CR4.PKE"),
    Feature("pks", L7, 0, C, 31, "cpu.mmu.walk"),
    # CPUID.(EAX=07H,ECX=1):EAX, only on a machine given FRED (Machine.enable_fred)
    Feature("fred", L7, 1, E, 17, "cpu.fred.Fred", mirrors="fred"),
    Feature("lkgs", L7, 1, E, 18, "cpu.fred.Fred.lkgs", mirrors="lkgs"),
    # CPUID.80000001H
    Feature("lahf_lm", LX, 0, C, 0, _NATIVE + "test_cmov_and_lahf_run_natively"),
    Feature("abm", LX, 0, C, 5, _NATIVE + "test_movbe_and_popcnt_run_natively"),
    Feature("syscall", LX, 0, D, 11, "cpu.emulated.Emulated.syscall"),
    Feature("nx", LX, 0, D, 20, "cpu.mmu.walk", mirrors="not MISC_ENABLE.XD_DISABLE"),
    Feature("pdpe1gb", LX, 0, D, 26, "cpu.mmu.walk"),
    Feature("rdtscp", LX, 0, D, 27, _TSC + "test_with_cr4_tsd_rdtsc_at_cpl3_is_gp0_and_at_cpl0_runs"),
    Feature("lm", LX, 0, D, 29, "cpu.control_regs.check_cr0"),
)

VENDOR = b"GenuineIntel"
SIGNATURE = 0x00050654  # family 6, model 55H, stepping 4 (EAX of CPUID.01H)
CLFLUSH_LINE_QWORDS = 8  # CPUID.01H:EBX[15:8]: CLFLUSH line size in 8-byte units (64 bytes)
MAX_BASIC_LEAF = 0x0D
MAX_EXTENDED_LEAF = 0x80000008
HYPERVISOR_FIRST, HYPERVISOR_LAST = 0x40000000, 0x4FFFFFFF
BRAND = b"idtlab x86-64 CPU model".ljust(48, b"\0")
LINEAR_ADDRESS_BITS = 48
LIMITED_MAX_LEAF = 2  # IA32_MISC_ENABLE bit 22 set

# XSAVE-managed state (SDM Vol. 1 "XSAVE-Supported Features and State-Component Bitmaps").
XFEATURE_X87 = 1 << 0
XFEATURE_SSE = 1 << 1
XFEATURE_PKRU = 1 << 9
XCR0_SUPPORTED = XFEATURE_X87 | XFEATURE_SSE | XFEATURE_PKRU
XSAVE_LEGACY_AND_HEADER = 512 + 64  # the legacy region and the XSAVE header
# Extended components: bit -> (size, offset) in the standard (non-compacted) format, as
# CPUID.(EAX=0DH,ECX=i):EAX/EBX report them. PKRU's offset is the architectural one.
XSAVE_COMPONENTS: dict[int, tuple[int, int]] = {9: (8, 0xA80)}


@dataclass(frozen=True)
class CpuidInputs:
    """The machine state CPUID depends on."""

    cr4: int = 0
    xcr0: int = XFEATURE_X87
    apic_id: int | None = None  # None: no local APIC
    kvm: bool = False  # KVM's paravirtual interface (the hypervisor bit and leaves)
    misc_enable: int = 0
    fred: bool = False  # the machine has FRED (cpu/fred.py)
    lkgs: bool = False


def _mirrored(f: Feature, s: CpuidInputs) -> bool:
    if f.mirrors == "":
        return True
    if f.mirrors == "CR4.OSXSAVE":
        return bool(s.cr4 & (1 << 18))
    if f.mirrors == "CR4.PKE":
        return bool(s.cr4 & (1 << 22))
    if f.mirrors == "apic":
        return s.apic_id is not None
    if f.mirrors == "kvm":
        return s.kvm
    if f.mirrors == "fred":
        return s.fred
    if f.mirrors == "lkgs":
        return s.lkgs
    if f.mirrors == "not MISC_ENABLE.XD_DISABLE":
        return not s.misc_enable & MISC_ENABLE_XD_DISABLE
    raise AssertionError(f"unknown mirror {f.mirrors!r}")


def feature_bits(leaf: int, subleaf: int, s: CpuidInputs) -> list[int]:
    """EAX..EDX of the feature bits `FEATURES` sets in (leaf, subleaf)."""
    regs = [0, 0, 0, 0]
    for f in FEATURES:
        if f.leaf == leaf and f.subleaf == subleaf and _mirrored(f, s):
            regs[f.reg] |= f.mask
    return regs


def _xsave_size(xcr0: int) -> int:
    end = XSAVE_LEGACY_AND_HEADER
    for bit, (size, offset) in XSAVE_COMPONENTS.items():
        if xcr0 & (1 << bit):
            end = max(end, offset + size)
    return end


def _words(data: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4))


def cpuid(leaf: int, subleaf: int, s: CpuidInputs) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX of CPUID with EAX = `leaf`, ECX = `subleaf` (see the module
    docstring)."""
    leaf &= 0xFFFFFFFF
    subleaf &= 0xFFFFFFFF
    if HYPERVISOR_FIRST <= leaf <= HYPERVISOR_LAST:
        regs = apf_cpuid(leaf) if s.kvm else None
        return regs if regs is not None else (0, 0, 0, 0)
    if MAX_BASIC_LEAF < leaf < HYPERVISOR_FIRST or leaf > MAX_EXTENDED_LEAF:
        return cpuid(MAX_BASIC_LEAF, subleaf, s)
    eax, ebx, ecx, edx = feature_bits(leaf, subleaf if leaf in (0x7, 0xD) else 0, s)
    if leaf == 0:
        max_leaf = LIMITED_MAX_LEAF if s.misc_enable & MISC_ENABLE_LIMIT_CPUID_MAXVAL \
            else MAX_BASIC_LEAF
        ebx, edx, ecx = _words(VENDOR)
        return max_leaf, ebx, ecx, edx
    if leaf == 1:
        ebx = CLFLUSH_LINE_QWORDS << 8
        if s.apic_id is not None:
            ebx |= (s.apic_id & 0xFF) << 24
        return SIGNATURE, ebx, ecx, edx
    if leaf == 7:
        if subleaf == 0:  # EAX: the highest subleaf (1 only when subleaf 1 has a bit)
            return (1 if s.fred or s.lkgs else 0), ebx, ecx, edx
        return eax, ebx, ecx, edx
    if leaf == 0xD:
        if subleaf == 0:
            return (XCR0_SUPPORTED & 0xFFFFFFFF, _xsave_size(s.xcr0),
                    _xsave_size(XCR0_SUPPORTED), XCR0_SUPPORTED >> 32)
        if subleaf in XSAVE_COMPONENTS:
            size, offset = XSAVE_COMPONENTS[subleaf]
            return size, offset, 0, 0  # ECX bit 0 = 0: a user state component (XCR0)
        return 0, 0, 0, 0  # subleaf 1: no XSAVEOPT/XSAVEC/XGETBV1/XSAVES
    if leaf == 0x80000000:
        return MAX_EXTENDED_LEAF, 0, 0, 0
    if 0x80000002 <= leaf <= 0x80000004:
        i = (leaf - 0x80000002) * 16
        a, b, c, d = _words(BRAND[i:i + 16])
        return a, b, c, d
    if leaf == 0x80000008:
        return MAXPHYADDR | (LINEAR_ADDRESS_BITS << 8), 0, 0, 0
    return eax, ebx, ecx, edx


def advertised(name: str, s: CpuidInputs | None = None) -> bool:
    """Whether CPUID reports the feature `name` (in state `s`, default: reset state)."""
    f = next((f for f in FEATURES if f.name == name), None)
    if f is None:
        return False
    return bool(cpuid(f.leaf, f.subleaf, s or CpuidInputs())[f.reg] & f.mask)


@dataclass
class ModelState:
    """The CPU model's mutable state: the MSRs it keeps (cpu/msrs.py)."""

    msrs: MsrState = field(default_factory=MsrState)


class CpuModel:
    """CPUID from the declared model; RDMSR/WRMSR through the MSR table."""

    def __init__(self, m: Machine, state: ModelState) -> None:
        self.m = m
        self.state = state
        self.msrs = MsrFile(m, state.msrs)

    def inputs(self) -> CpuidInputs:
        m = self.m
        e = m.engine
        # "Enabling or Disabling the Local APIC": CPUID.1:EDX.APIC reads 0 while the
        # APIC is globally disabled (IA32_APIC_BASE[11] = 0).
        apic_id = m.apic.apic_id if m.apic is not None and m.apic.enabled else None
        return CpuidInputs(cr4=e.read_reg("cr4"), xcr0=e.xcr0(), apic_id=apic_id,
                           kvm=m.apf is not None,
                           misc_enable=self.state.msrs.values.get(MSR_MISC_ENABLE, 0),
                           fred=m.fred.supported, lkgs=m.fred.lkgs_supported)

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        return cpuid(leaf, subleaf, self.inputs())

    def rdmsr(self, msr: int) -> int:
        m = self.m
        if msr == MSR_APIC_BASE:
            enabled = m.apic is not None and m.apic.enabled
            return APIC_BASE | APIC_BASE_BSP | (APIC_BASE_ENABLE if enabled else 0)
        if m.apf is not None and m.apf.handles(msr):
            return m.apf.rdmsr(msr)
        return self.msrs.read(msr)

    def wrmsr(self, msr: int, value: int) -> None:
        m = self.m
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
            m.engine.flush_tlb()
            return
        if m.apf is not None and m.apf.handles(msr):
            try:
                m.apf.wrmsr(msr, value, m.engine.cycles)
            except ApfMsrError as exc:
                raise MsrFault(str(exc)) from None
            return
        self.msrs.write(msr, value)
