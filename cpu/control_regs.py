"""Control-register writes: which values MOV to CR0/CR3/CR4/CR8 and XSETBV accept.

The engine would take any value (QEMU's TCG checks none of the rules below, and drops
CR4 bits its own CPU model lacks), so these writes are sites: Python checks the value
against the rules here and either raises #GP(0) or performs the write
(cpu/emulated.py for MOV to CR, cpu/checked_sites.py for XSETBV). The rules are those of
SDM Vol. 2 "MOV—Move to/from Control Registers" (64-Bit Mode Exceptions), Vol. 3A
"Control Registers" and Vol. 2 "XSETBV", applied to the declared CPU model
(cpu/cpu_model.py): a bit that belongs to a feature the model does not report is a
reserved bit.

CR0: bits 63:32 are reserved (a 1 there is #GP(0)); the reserved bits of 31:0 are not
checked ("attempts to set them have no impact": they stay 0) and ET (bit 4) reads as 1.
PG = 1 with PE = 0 and NW = 1 with CD = 0 are invalid combinations; clearing PG in
IA-32e mode is #GP(0) (this machine runs 64-bit code only: leaving IA-32e mode through
compatibility mode is not modelled).

CR3: with CR4.PCIDE = 0 (the model has no PCIDs) bits 63:MAXPHYADDR are reserved;
bits 2:0 and 11:5 are ignored and kept as written.

CR4: the bits `CR4_ALWAYS` names plus those whose feature the model reports
(`CR4_FEATURE`); every other bit is reserved — VME/PVI, LA57, VMXE, SMXE, PCIDE, CET,
LAM and the rest. Clearing PAE in IA-32e mode is #GP(0).

CR8: bits 63:4 are reserved; CR8[3:0] is TPR[7:4] of the local APIC (Vol. 3A "Task
Priority in IA-32e Mode").

XCR0 (XSETBV): ECX selects the register and only XCR0 exists (ECX[63:32] are ignored);
bit 0 (x87) must be 1, and a bit the model does not support
(CPUID.(EAX=0DH,ECX=0):EDX:EAX) is #GP(0). XGETBV reads only XCR0: the model does not
report XGETBV with ECX = 1 (CPUID.(EAX=0DH,ECX=1):EAX[2] = 0), so ECX = 1 is #GP(0) too.

UMIP: with CR4.UMIP = 1, SGDT, SIDT, SLDT, SMSW and STR at CPL > 0 are #GP(0)
(Vol. 3A "User-Mode Instruction Prevention").
"""

from __future__ import annotations

from cpu.cpu_model import XCR0_SUPPORTED, XFEATURE_X87, advertised
from cpu.mmu import MAXPHYADDR

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31
CR0_BITS = (CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_NW
            | CR0_CD | CR0_PG)

CR4_VME = 1 << 0
CR4_PVI = 1 << 1
CR4_TSD = 1 << 2
CR4_DE = 1 << 3
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_MCE = 1 << 6
CR4_PGE = 1 << 7
CR4_PCE = 1 << 8
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_UMIP = 1 << 11
CR4_LA57 = 1 << 12
CR4_VMXE = 1 << 13
CR4_SMXE = 1 << 14
CR4_FSGSBASE = 1 << 16
CR4_PCIDE = 1 << 17
CR4_OSXSAVE = 1 << 18
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_CET = 1 << 23
CR4_PKS = 1 << 24
CR4_FRED = 1 << 32  # writable only on a machine with FRED (cpu/fred.py)

# Bits that exist on every processor with long mode (PCE: RDPMC at CPL > 0 is allowed; the
# model has no counters, so RDPMC is #GP(0) either way).
CR4_ALWAYS = CR4_TSD | CR4_PAE | CR4_PCE | CR4_OSFXSR | CR4_OSXMMEXCPT
# Bits that exist when the model reports their feature (cpu/cpu_model.py FEATURES).
CR4_FEATURE: dict[int, str] = {
    CR4_VME: "vme", CR4_PVI: "vme", CR4_DE: "de", CR4_PSE: "pse", CR4_MCE: "mce",
    CR4_PGE: "pge", CR4_UMIP: "umip", CR4_LA57: "la57", CR4_VMXE: "vmx", CR4_SMXE: "smx",
    CR4_FSGSBASE: "fsgsbase", CR4_PCIDE: "pcid", CR4_OSXSAVE: "xsave", CR4_SMEP: "smep",
    CR4_SMAP: "smap", CR4_PKE: "pku", CR4_CET: "shstk", CR4_PKS: "pks",
}


def cr4_writable() -> int:
    """The CR4 bits a MOV to CR4 may set under the declared model."""
    bits = CR4_ALWAYS
    for bit, feature in CR4_FEATURE.items():
        if advertised(feature):
            bits |= bit
    return bits


CR4_WRITABLE = cr4_writable()
CR3_RESERVED = (2**64 - 1) & ~((1 << MAXPHYADDR) - 1)
CR8_RESERVED = (2**64 - 1) & ~0xF
EFER_LMA = 1 << 10


class ControlFault(Exception):
    """The write raises #GP(0); the message says which rule."""


def check_cr0(value: int, *, efer: int) -> int:
    """The CR0 a MOV to CR0 of `value` leaves (ET set, reserved low bits clear), or raise
    `ControlFault`."""
    if value >> 32:
        raise ControlFault(f"CR0 bits 63:32 are reserved ({value:#x})")
    if value & CR0_PG and not value & CR0_PE:
        raise ControlFault("CR0.PG = 1 with CR0.PE = 0")
    if value & CR0_NW and not value & CR0_CD:
        raise ControlFault("CR0.NW = 1 with CR0.CD = 0")
    if efer & EFER_LMA and not value & CR0_PG:
        raise ControlFault("clearing CR0.PG in IA-32e mode")
    return (value & CR0_BITS) | CR0_ET


def check_cr3(value: int) -> int:
    """The CR3 a MOV to CR3 of `value` leaves, or raise `ControlFault`."""
    if value & CR3_RESERVED:
        raise ControlFault(f"CR3 bits {value & CR3_RESERVED:#x} are reserved "
                           f"(MAXPHYADDR {MAXPHYADDR}, no PCIDs)")
    return value


def check_cr4(value: int, *, efer: int, fred: bool = False) -> int:
    """The CR4 a MOV to CR4 of `value` leaves, or raise `ControlFault`. `fred`: the CPU
    has FRED, so bit 32 exists; setting it outside IA-32e mode is #GP(0) (SDM Vol. 3A
    "Control Registers": CR4.FRED "can be set only if IA32_EFER.LMA = 1")."""
    reserved = value & ~(CR4_WRITABLE | (CR4_FRED if fred else 0)) & (2**64 - 1)
    if fred and value & CR4_FRED and not efer & EFER_LMA:
        raise ControlFault("setting CR4.FRED while IA32_EFER.LMA = 0")
    if reserved:
        raise ControlFault(f"CR4 bits {reserved:#x} are reserved or belong to features "
                           "this CPU model does not report")
    if efer & EFER_LMA and not value & CR4_PAE:
        raise ControlFault("clearing CR4.PAE in IA-32e mode")
    return value


def check_cr8(value: int) -> int:
    """TPR[7:4] for a MOV to CR8 of `value`, or raise `ControlFault`."""
    if value & CR8_RESERVED:
        raise ControlFault(f"CR8 bits 63:4 are reserved ({value:#x})")
    return value


def check_xsetbv(ecx: int, value: int) -> None:
    """Raise `ControlFault` if XSETBV with ECX = `ecx`, EDX:EAX = `value` is #GP(0)."""
    index = ecx & 0xFFFFFFFF
    if index != 0:
        raise ControlFault(f"XCR{index} does not exist")
    if not value & XFEATURE_X87:
        raise ControlFault("XCR0 bit 0 (x87 state) must be 1")
    unsupported = value & ~XCR0_SUPPORTED
    if unsupported:
        raise ControlFault(f"XCR0 bits {unsupported:#x} are not supported "
                           "(CPUID.(EAX=0DH,ECX=0):EDX:EAX)")


def check_xgetbv(ecx: int) -> None:
    """Raise `ControlFault` if XGETBV with ECX = `ecx` is #GP(0)."""
    index = ecx & 0xFFFFFFFF
    if index != 0:
        raise ControlFault(f"XCR{index} cannot be read (only XCR0 exists)")


def umip_blocks(cr4: int, cpl: int) -> bool:
    """SGDT/SIDT/SLDT/SMSW/STR raise #GP(0): CR4.UMIP = 1 and CPL > 0."""
    return bool(cr4 & CR4_UMIP) and cpl > 0
