"""Canonical-address checks on the writes that load a base address.

In IA-32e mode a linear address is canonical when bits 63:47 are all equal (48-bit
linear addresses, SDM Vol. 1 "Canonical Addressing"; the model has no 5-level paging).
Accesses through a non-canonical address fault where they happen (cpu/stops.py), but
several instructions *load* an address that is used later, and the processor checks it
when it is loaded, so that the fault names the instruction that set it up:

* WRMSR of IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_LSTAR, IA32_CSTAR,
  IA32_SYSENTER_ESP, IA32_SYSENTER_EIP: #GP(0) (SDM Vol. 2 "WRMSR"; the MSR table,
  cpu/msrs.py, checks these with `canonical`).
* WRFSBASE/WRGSBASE: #GP(0) "if the source register contains a non-canonical address"
  (SDM Vol. 2 "WRFSBASE/WRGSBASE"), after the #UD for CR4.FSGSBASE = 0.
* LGDT/LIDT in 64-bit mode with a non-canonical base in the 10-byte operand: #GP(0).
  The SDM's exception list names only a non-canonical *operand* address; processors
  also refuse a non-canonical base, and so does KVM's instruction emulator
  (`em_lgdt_lidt`). Decided here and in docs/sdm-map.md.
* LLDT/LTR in 64-bit mode, whose 16-byte system descriptor holds a non-canonical base:
  #GP(selector) (error code = the selector with RPL cleared), as KVM's emulator
  (`__load_segment_descriptor`) and kvm-unit-tests' x86/la57.c expect of hardware;
  also in docs/sdm-map.md. Every other LLDT/LTR check (type, presence, the busy bit)
  is the engine's.

The checks run at the instruction's site before it executes (cpu/checked_sites.py): a
refused value raises the fault there; an accepted one lets the engine execute the
instruction natively, so nothing else about it changes.
"""

from __future__ import annotations

import struct

from idt.state import is_canonical


class CanonicalFault(Exception):
    """The load raises #GP with `error_code`; the message names the address."""

    def __init__(self, why: str, error_code: int = 0) -> None:
        super().__init__(why)
        self.error_code = error_code


def check_base_write(value: int, what: str) -> None:
    """WRFSBASE/WRGSBASE (and the base MSRs): `value` must be canonical."""
    if not is_canonical(value):
        raise CanonicalFault(f"{what}: non-canonical address {value:#x}")


def pseudo_descriptor_base(operand: bytes) -> int:
    """The base of LGDT/LIDT's 64-bit-mode operand: 2-byte limit, then 8-byte base."""
    return int(struct.unpack_from("<Q", operand, 2)[0])


def check_table_base(operand: bytes, what: str) -> None:
    """LGDT/LIDT in 64-bit mode: the loaded base must be canonical."""
    base = pseudo_descriptor_base(operand)
    if not is_canonical(base):
        raise CanonicalFault(f"{what}: non-canonical base {base:#x}")


def system_descriptor_base(desc: bytes) -> int:
    """The 64-bit base of a 16-byte LDT or TSS descriptor (SDM Vol. 3A "Segment
    Descriptor Tables", "TSS Descriptor in 64-bit mode")."""
    low, high, upper = (int(x) for x in struct.unpack_from("<IIQ", desc, 0))
    return ((low >> 16) | ((high & 0xFF) << 16) | (high & 0xFF000000)
            | ((upper & 0xFFFFFFFF) << 32))


def check_system_descriptor(desc: bytes, selector: int, what: str) -> None:
    """LLDT/LTR in 64-bit mode: the descriptor's base must be canonical."""
    base = system_descriptor_base(desc)
    if not is_canonical(base):
        raise CanonicalFault(f"{what} {selector:#x}: non-canonical base {base:#x}",
                             error_code=selector & 0xFFFC)
