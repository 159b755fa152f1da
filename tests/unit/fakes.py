"""A tiny scripted world for the pure `idt/` model: no Unicorn, no paging walk.

`FakeMemory` implements `idt.state.SystemMemory` over a flat bytearray with linear
addresses identity-mapped onto it. Pages listed in `not_present` (and everything past the
end of the array) raise `ArchFault(#PF, code, cr2=first byte on that page)`; a
non-canonical address raises #SS(0) for stack accesses and #GP(0) otherwise. Every
access is logged, so tests can check that delivery's implicit accesses are supervisor
accesses and that the frame is pushed from SS down.

`World` lays out the same system structures as `cpu.machine` (GDT, 64-bit TSS, IDT) in a
`FakeMemory` and hands out `ArchState`s that point at them. `make_state` builds an
`ArchState` with sensible CPL0 defaults and keyword overrides.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from idt.deliver import deliver
from idt.descriptors import (
    GATE_SIZE,
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
from idt.error_codes import PFErr
from idt.state import ArchFault, ArchState, Event, Source, is_canonical
from idt.vectors import Vector

PAGE = 4096
MEM_SIZE = 1 << 20

GDT_BASE = 0x1000
TSS_BASE = 0x1100
IDT_BASE = 0x2000
KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
GDT_SLOTS = 8  # null, kcode, kdata, ucode, udata, TSS (2 slots), one spare (0x38)
GDT_LIMIT = GDT_SLOTS * 8 - 1
SPARE_SEL = 0x38  # a GDT slot tests fill with odd descriptors
BEYOND_GDT_SEL = GDT_SLOTS * 8  # 0x40: the first selector past GDTR.limit

HANDLER = 0xFFFF_FFFF_8000_1000  # canonical upper-half handler address
KERNEL_RSP = 0x8000  # the interrupted stack at CPL0
USER_RSP = 0x9000  # the interrupted stack at CPL3
RSP0 = 0x20000
IST = {n: 0x30000 + n * 0x1000 for n in range(1, 8)}  # IST1..IST7 tops


@dataclass(frozen=True)
class Access:
    kind: str  # "read" | "write"
    linear: int
    size: int
    user: bool
    stack: bool


class FakeMemory:
    """Flat, identity-mapped guest memory with optional not-present pages."""

    def __init__(self, size: int = MEM_SIZE, not_present: set[int] | None = None) -> None:
        self.data = bytearray(size)
        self.not_present: set[int] = set(not_present or ())
        self.log: list[Access] = []

    def _check(self, linear: int, size: int, *, write: bool, user: bool, stack: bool) -> None:
        for addr in (linear, linear + size - 1):
            if not is_canonical(addr):
                raise ArchFault(Vector.SS if stack else Vector.GP, 0,
                                why=f"non-canonical {addr:#x}")
        page = linear & ~(PAGE - 1)
        while page < linear + size:
            if page in self.not_present or page + PAGE > len(self.data):
                first = max(page, linear)
                code = (PFErr.W if write else 0) | (PFErr.U if user else 0)
                raise ArchFault(Vector.PF, int(code), cr2=first, why=f"page {page:#x} not present")
            page += PAGE

    def read(self, linear: int, size: int, *, user: bool = False, stack: bool = False) -> bytes:
        self.log.append(Access("read", linear, size, user, stack))
        self._check(linear, size, write=False, user=user, stack=stack)
        return bytes(self.data[linear : linear + size])

    def write(self, linear: int, data: bytes, *, user: bool = False, stack: bool = False) -> None:
        self.log.append(Access("write", linear, len(data), user, stack))
        self._check(linear, len(data), write=True, user=user, stack=stack)
        self.data[linear : linear + len(data)] = data

    # -- test-side helpers (no fault checks, not logged) -----------------------------
    def poke(self, addr: int, data: bytes) -> None:
        self.data[addr : addr + len(data)] = data

    def peek(self, addr: int, size: int) -> bytes:
        return bytes(self.data[addr : addr + size])

    def u64(self, addr: int) -> int:
        return int(struct.unpack_from("<Q", self.data, addr)[0])

    def put_u64(self, addr: int, value: int) -> None:
        struct.pack_into("<Q", self.data, addr, value & (2**64 - 1))

    def writes(self) -> list[Access]:
        return [a for a in self.log if a.kind == "write"]


def make_state(**overrides: Any) -> ArchState:
    """An `ArchState` at CPL0 on the kernel stack, pointing at the `World` tables."""
    fields: dict[str, Any] = dict(
        rip=0x40_1000, rsp=KERNEL_RSP, rflags=0x202, cs=KERNEL_CS, ss=KERNEL_DS, cpl=0,
        idtr_base=IDT_BASE, idtr_limit=256 * GATE_SIZE - 1,
        gdtr_base=GDT_BASE, gdtr_limit=GDT_LIMIT,
        tr_selector=TSS_SEL, tr_base=TSS_BASE, tr_limit=TSS_SIZE - 1,
    )
    fields.update(overrides)
    return ArchState(**fields)


def user_state(**overrides: Any) -> ArchState:
    """An `ArchState` at CPL3 on the user stack."""
    base: dict[str, Any] = dict(cpl=3, cs=USER_CS, ss=USER_DS, rsp=USER_RSP)
    base.update(overrides)
    return make_state(**base)


@dataclass
class World:
    """A `FakeMemory` holding a GDT, a 64-bit TSS and an IDT of not-present gates."""

    mem: FakeMemory = field(default_factory=FakeMemory)

    def __post_init__(self) -> None:
        gdt = [bytes(8), kernel_code64().pack(), kernel_data().pack(), user_code64().pack(),
               user_data().pack(), tss64_descriptor(TSS_BASE), bytes(8)]
        self.mem.poke(GDT_BASE, b"".join(gdt))
        absent = GateDescriptor(offset=0, selector=KERNEL_CS, present=False).pack()
        self.mem.poke(IDT_BASE, absent * 256)
        self.set_tss(rsp0=RSP0, **{f"ist{n}": top for n, top in IST.items()})

    def set_gate(self, vector: int, *, offset: int = HANDLER, selector: int = KERNEL_CS,
                 **fields: Any) -> GateDescriptor:
        gate = GateDescriptor(offset=offset, selector=selector, **fields)
        self.mem.poke(IDT_BASE + GATE_SIZE * vector, gate.pack())
        return gate

    def set_gate_raw(self, vector: int, raw: bytes) -> None:
        assert len(raw) == GATE_SIZE
        self.mem.poke(IDT_BASE + GATE_SIZE * vector, raw)

    def set_descriptor(self, selector: int, desc: SegmentDescriptor) -> None:
        self.mem.poke(GDT_BASE + (selector & ~7), desc.pack())

    def set_tss(self, **slots: int) -> None:
        """TSS fields by name: rsp0..rsp2, ist1..ist7."""
        for name, value in slots.items():
            n = int(name[3:])
            off = TSS_RSP_OFFSET(n) if name.startswith("rsp") else TSS_IST_OFFSET(n)
            self.mem.put_u64(TSS_BASE + off, value)

    def stack(self, top: int, slots: int) -> list[int]:
        """`slots` qwords upwards from `top` (a final RSP)."""
        return [self.mem.u64(top + 8 * i) for i in range(slots)]


# -- events and one-line primitives ---------------------------------------------------
INSN_RIP = 0x40_1000  # where the event's instruction lies


def exception(vector: int, error_code: int | None = None, *, cr2: int | None = None) -> Event:
    """A processor-detected fault at INSN_RIP."""
    return Event.exception(vector, INSN_RIP, error_code, cr2)


def software(vector: int, *, length: int = 2) -> Event:
    """INT n (or INT3 with length=1) at INSN_RIP: a trap, saved RIP after the instruction."""
    return Event(vector, Source.SOFTWARE, INSN_RIP + length, INSN_RIP)


def interrupt(vector: int) -> Event:
    """An external interrupt taken at the boundary INSN_RIP."""
    return Event(vector, Source.INTERRUPT, INSN_RIP, INSN_RIP)


def nmi() -> Event:
    return Event(Vector.NMI, Source.NMI, INSN_RIP, INSN_RIP)


def icebp() -> Event:
    """INT1 / ICEBP (0xF1): a privileged software trap through vector 1."""
    return Event(Vector.DB, Source.PRIV_SOFTWARE, INSN_RIP + 1, INSN_RIP)


def fault_of(world: World, ev: Event, st: ArchState | None = None) -> tuple[int, int | None]:
    """Deliver `ev` and return the (vector, error code) of the fault it raises.

    Fails the test if the delivery succeeds.
    """
    try:
        deliver(world.mem, st or make_state(), ev)
    except ArchFault as fault:
        return int(fault.vector), fault.error_code
    raise AssertionError(f"{ev.name} was delivered; a fault was expected")
