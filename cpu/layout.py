"""System-structure layout: where the machine puts the GDT, TSS, IDT and page tables in
guest memory, and the calls that configure them.

Everything is in guest memory, so a guest can read and rewrite it, and delivery reads it
at the moment of delivery (as the CPU does: SDM Vol. 3A 6.10 "Interrupt Descriptor
Table (IDT)", 7.7 "Task Management in 64-bit Mode")::

    0x1000  GDT   null, 0x08 kernel code64, 0x10 kernel data, 0x1b user code64,
                  0x23 user data, 0x28 64-bit TSS (16 bytes)
    0x1100  TSS   64-bit TSS, 0x68 bytes (RSP0-2, IST1-7), no I/O bitmap
    0x2000  IDT   256 gates, 4 KiB, not-present unless configured
    0x3000  page tables (identity map of guest memory), up to RESERVED_END

A multiboot image (cpu/multiboot.py) brings its own structures and overwrites this area.
Configuration happens before the first run; nothing here changes while the machine runs,
so nothing here is checkpointed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.devices.apic import APIC_BASE
from cpu.devices.ioapic import IOAPIC_BASE
from cpu.mmu import (
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PTE_P,
    PTE_U,
    PTE_W,
    PTE_XD,
    build_identity_map,
    identity_map_size,
)
from idt.descriptors import (
    GATE_TYPE_INTERRUPT,
    GATE_TYPE_TRAP,
    TSS_IOMAP_BASE_OFFSET,
    TSS_IST_OFFSET,
    TSS_RSP_OFFSET,
    TSS_SIZE,
    GateDescriptor,
    SegmentDescriptor,
    kernel_code64,
    kernel_data,
    tss64_descriptor,
    user_code64,
    user_data,
)

if TYPE_CHECKING:
    from cpu.machine import Machine

GDT_BASE = 0x1000
TSS_BASE = 0x1100
IDT_BASE = 0x2000
PT_BASE = 0x3000
RESERVED_END = 0x20000
MIN_MEMORY = RESERVED_END + 0x1000


def memory_size_problem(size: int) -> str | None:
    """Why `size` bytes cannot be a machine's guest RAM (None if it can): a multiple of
    4 KiB, at least the system area plus a page, and ending below the I/O APIC's MMIO
    page (RAM is one range from 0; the device pages above it are not RAM). The one
    check `Machine`, the scenario loader and the command line share."""
    if size % 4096 or not MIN_MEMORY <= size <= IOAPIC_BASE:
        return (f"{size:#x} must be a multiple of 4 KiB between {MIN_MEMORY:#x} and the "
                f"I/O APIC at {IOAPIC_BASE:#x}")
    return None
KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
GDT_ENTRIES: list[bytes] = [
    bytes(8),
    kernel_code64().pack(),
    kernel_data().pack(),
    user_code64().pack(),
    user_data().pack(),
    tss64_descriptor(TSS_BASE),
]
GDT_LIMIT = sum(len(e) for e in GDT_ENTRIES) - 1
CR0_DEFAULT = 0x80010033  # PG | WP | NE | ET | MP | PE
CR4_DEFAULT = CR4_PAE | (1 << 9) | (1 << 10)  # PAE, OSFXSR, OSXMMEXCPT
EFER_DEFAULT = EFER_LME | EFER_LMA | EFER_NXE
MSR_EFER = 0xC0000080


@dataclass(frozen=True)
class PageSpec:
    """A 4-KiB override of the default identity map.

        >>> PageSpec(va=0x400000, pa=0x400000, present=False).pte
        0
    """

    va: int
    pa: int
    present: bool = True
    writable: bool = True
    user: bool = True
    nx: bool = False

    @property
    def pte(self) -> int:
        if not self.present:
            return 0
        return (self.pa & ~0xFFF) | PTE_P | (PTE_W if self.writable else 0) | (
            PTE_U if self.user else 0) | (PTE_XD if self.nx else 0)


class SystemLayout:
    """The machine's GDT, TSS, IDT and identity-mapped page tables (see the module
    docstring), written into guest memory by `Machine.__init__` and `build`."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.pages: dict[int, PageSpec] = {}  # configuration: fixed once built
        self.built = False
        m.phys.write(GDT_BASE, b"".join(GDT_ENTRIES))
        # Unconfigured vectors hold *not-present* 64-bit interrupt gates (not zeroes: a
        # zeroed gate has type 0 and raises #GP before the present check is reached).
        absent = GateDescriptor(offset=0, selector=KERNEL_CS, present=False).pack()
        m.phys.write(IDT_BASE, absent * 256)

    def set_gate(self, vector: int, handler: int, *, ist: int = 0, gate_type: str = "interrupt",
                 dpl: int = 0, present: bool = True, selector: int = KERNEL_CS) -> None:
        if not 0 <= vector <= 255:
            raise ValueError(f"vector {vector} outside 0..255")
        t = {"interrupt": GATE_TYPE_INTERRUPT, "trap": GATE_TYPE_TRAP}[gate_type]
        gate = GateDescriptor(offset=handler, selector=selector, ist=ist, type=t, dpl=dpl,
                              present=present)
        self.m.phys.write(IDT_BASE + 16 * vector, gate.pack())

    def write_gate_raw(self, vector: int, raw: bytes) -> None:
        self.m.phys.write(IDT_BASE + 16 * vector, raw)

    def set_tss(self, **slots: int) -> None:
        for name, value in slots.items():
            if name.startswith("rsp"):
                off = TSS_RSP_OFFSET(int(name[3:]))
            elif name.startswith("ist"):
                off = TSS_IST_OFFSET(int(name[3:]))
            else:
                raise ValueError(f"unknown TSS field {name!r}")
            self.m.phys.write_u64(TSS_BASE + off, value)

    def set_page(self, spec: PageSpec) -> None:
        if self.built:
            raise RuntimeError("page overrides must be set before the first run")
        if spec.va & ~0xFFF == GDT_BASE and (not spec.present or spec.pa & ~0xFFF != GDT_BASE):
            raise ValueError(f"{GDT_BASE:#x} is the machine's GDT and TSS page: it must stay "
                             "present and identity-mapped (the CPU reads it at start and at "
                             "every privilege change); its rights may change")
        self.pages[spec.va & ~0xFFF] = spec

    def tables_problem(self) -> str | None:
        """Why the page overrides set so far cannot be built (None if they can): every
        2-MiB region they touch needs a page table, and the tables live in the system
        area below RESERVED_END."""
        pages = set(self.pages)
        if self.m.apic is not None:
            pages.add(APIC_BASE)
        size = identity_map_size(self.m.phys.size, pages)
        if PT_BASE + size > RESERVED_END:
            return (f"the page tables would take {size:#x} bytes, more than the system area "
                    f"{PT_BASE:#x}..{RESERVED_END:#x} holds: override pages in fewer 2-MiB "
                    "regions")
        return None

    def build(self) -> None:
        """Write the page tables and load the control registers and descriptor-table
        registers (once, before the first run)."""
        if self.built:
            return
        self.built = True
        m = self.m
        m.phys.write_u64(TSS_BASE + TSS_IOMAP_BASE_OFFSET - 2, 0)
        m.phys.write(TSS_BASE + TSS_IOMAP_BASE_OFFSET, struct.pack("<H", TSS_SIZE))
        problem = self.tables_problem()
        if problem is not None:
            raise ValueError(problem)
        overrides = {va: p.pte for va, p in self.pages.items()}
        if m.apic is not None:
            # The APIC page: supervisor, writable, not executable (as Linux maps it).
            overrides.setdefault(APIC_BASE, APIC_BASE | PTE_P | PTE_W | PTE_XD)
        cr3, end = build_identity_map(m.phys, PT_BASE, m.phys.size, overrides)
        if end > RESERVED_END:
            raise ValueError("page tables overflow the reserved system area")
        m.symbols["pml4"] = cr3
        e = m.engine
        m.regs.forget()
        e.write({"cr4": CR4_DEFAULT})
        e.write_msr(MSR_EFER, EFER_DEFAULT)
        e.write({"cr3": cr3, "cr0": CR0_DEFAULT})
        e.write_table("gdtr", 0, GDT_BASE, GDT_LIMIT)
        e.write_table("idtr", 0, IDT_BASE, 256 * 16 - 1)
        e.write_table("tr", TSS_SEL, TSS_BASE, TSS_SIZE - 1,
                      SegmentDescriptor.unpack(GDT_ENTRIES[5][:8]).high_dword)
