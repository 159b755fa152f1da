"""Declared layouts: the 64-bit IDT gate, code/data segment descriptors, the 64-bit TSS.

Every field has a name and a width; `pack` asserts widths, `unpack` never fails (any 16
bytes decode to *some* gate; whether it is legal is the delivery routine's business).
Sources: SDM Vol. 3A "64-Bit Mode IDT" (Figure "64-Bit IDT Gate Descriptors"),
"Segment Descriptors", "Task-State Segment (TSS)" in 64-bit mode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeVar

_D = TypeVar("_D")

GATE_SIZE = 16
GATE_TYPE_INTERRUPT = 0xE
GATE_TYPE_TRAP = 0xF

# 64-bit TSS (SDM Vol. 3A "Task Management in 64-bit Mode"): RSPn at 4 + 8n, ISTn at
# 0x1C + 8n, I/O map base at 0x66; the structure is 0x68 bytes.
TSS_SIZE = 0x68
TSS_IOMAP_BASE_OFFSET = 0x66


def TSS_RSP_OFFSET(n: int) -> int:
    if not 0 <= n <= 2:
        raise ValueError(f"RSP{n} does not exist (RSP0..RSP2)")
    return 4 + 8 * n


def TSS_IST_OFFSET(n: int) -> int:
    if not 1 <= n <= 7:
        raise ValueError(f"IST{n} does not exist (IST1..IST7)")
    return 0x1C + 8 * n


def _check(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value:#x} does not fit in {bits} bits")


@dataclass(frozen=True)
class GateDescriptor:
    """A 16-byte IA-32e IDT gate."""

    offset: int
    selector: int
    ist: int = 0
    type: int = GATE_TYPE_INTERRUPT
    dpl: int = 0
    present: bool = True
    s: int = 0  # must be 0 (system descriptor)
    reserved_ist: int = 0  # bits 39:35, must be 0 (not checked by hardware)
    reserved_high: int = 0  # bits 127:96

    def pack(self) -> bytes:
        _check("offset", self.offset, 64)
        _check("selector", self.selector, 16)
        _check("ist", self.ist, 3)
        _check("type", self.type, 4)
        _check("dpl", self.dpl, 2)
        _check("s", self.s, 1)
        _check("reserved_ist", self.reserved_ist, 5)
        _check("reserved_high", self.reserved_high, 32)
        b4 = self.ist | (self.reserved_ist << 3)
        b5 = self.type | (self.s << 4) | (self.dpl << 5) | (int(self.present) << 7)
        return struct.pack(
            "<HHBBHII",
            self.offset & 0xFFFF,
            self.selector,
            b4,
            b5,
            (self.offset >> 16) & 0xFFFF,
            self.offset >> 32,
            self.reserved_high,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> GateDescriptor:
        key = bytes(raw[:GATE_SIZE])
        found = _GATES.get(key)
        if found is None:
            found = _remember(_GATES, key, cls._decode(key))
        return found

    @classmethod
    def _decode(cls, raw: bytes) -> GateDescriptor:
        lo, sel, b4, b5, mid, hi, res = struct.unpack("<HHBBHII", raw[:GATE_SIZE])
        return cls(
            offset=lo | (mid << 16) | (hi << 32),
            selector=sel,
            ist=b4 & 7,
            reserved_ist=b4 >> 3,
            type=b5 & 0xF,
            s=(b5 >> 4) & 1,
            dpl=(b5 >> 5) & 3,
            present=bool(b5 >> 7),
            reserved_high=res,
        )

    @property
    def is_interrupt_gate(self) -> bool:
        return self.type == GATE_TYPE_INTERRUPT


@dataclass(frozen=True)
class SegmentDescriptor:
    """An 8-byte code/data descriptor (or the low half of a system descriptor)."""

    base: int = 0
    limit: int = 0xFFFFF
    type: int = 0
    s: int = 1
    dpl: int = 0
    present: bool = True
    avl: int = 0
    l: int = 0  # noqa: E741 - the SDM's name for the 64-bit code flag
    db: int = 0
    g: int = 1

    # type bits for S=1 descriptors
    @property
    def is_code(self) -> bool:
        return self.s == 1 and bool(self.type & 0x8)

    @property
    def is_data(self) -> bool:
        return self.s == 1 and not self.type & 0x8

    @property
    def conforming(self) -> bool:
        return self.is_code and bool(self.type & 0x4)

    @property
    def writable(self) -> bool:
        return self.is_data and bool(self.type & 0x2)

    @property
    def is_64bit_code(self) -> bool:
        return self.is_code and self.l == 1 and self.db == 0

    def pack(self) -> bytes:
        _check("base", self.base, 32)
        _check("limit", self.limit, 20)
        _check("type", self.type, 4)
        _check("dpl", self.dpl, 2)
        # The one-bit flags too: an unchecked l=2 would silently set D/B instead of L.
        for name in ("s", "avl", "l", "db", "g"):
            _check(name, getattr(self, name), 1)
        return struct.pack("<Q", self.raw)

    @property
    def raw(self) -> int:
        v = self.limit & 0xFFFF
        v |= (self.base & 0xFFFFFF) << 16
        v |= self.type << 40
        v |= self.s << 44
        v |= self.dpl << 45
        v |= int(self.present) << 47
        v |= ((self.limit >> 16) & 0xF) << 48
        v |= self.avl << 52
        v |= self.l << 53
        v |= self.db << 54
        v |= self.g << 55
        v |= ((self.base >> 24) & 0xFF) << 56
        return v

    @property
    def high_dword(self) -> int:
        """The upper 32 bits, which is what QEMU keeps as a segment cache's flags."""
        return self.raw >> 32

    @classmethod
    def unpack(cls, raw: bytes) -> SegmentDescriptor:
        key = bytes(raw[:8])
        found = _SEGMENTS.get(key)
        if found is None:
            found = _remember(_SEGMENTS, key, cls._decode(key))
        return found

    @classmethod
    def _decode(cls, raw: bytes) -> SegmentDescriptor:
        (v,) = struct.unpack("<Q", raw[:8])
        return cls(
            base=((v >> 16) & 0xFFFFFF) | (((v >> 56) & 0xFF) << 24),
            limit=(v & 0xFFFF) | (((v >> 48) & 0xF) << 16),
            type=(v >> 40) & 0xF,
            s=(v >> 44) & 1,
            dpl=(v >> 45) & 3,
            present=bool((v >> 47) & 1),
            avl=(v >> 52) & 1,
            l=(v >> 53) & 1,
            db=(v >> 54) & 1,
            g=(v >> 55) & 1,
        )


# Decoded descriptors by their bytes: descriptors are immutable values, and delivery and
# IRET decode the same few (the gate, CS, SS) at every event.
_GATES: dict[bytes, GateDescriptor] = {}
_SEGMENTS: dict[bytes, SegmentDescriptor] = {}
_MEMO_LIMIT = 4096


def _remember(memo: dict[bytes, _D], key: bytes, value: _D) -> _D:
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo[key] = value
    return value


def kernel_code64() -> SegmentDescriptor:
    return SegmentDescriptor(type=0xB, dpl=0, l=1)


def kernel_data() -> SegmentDescriptor:
    return SegmentDescriptor(type=0x3, dpl=0, db=1)


def user_code64() -> SegmentDescriptor:
    return SegmentDescriptor(type=0xB, dpl=3, l=1)


def user_data() -> SegmentDescriptor:
    return SegmentDescriptor(type=0x3, dpl=3, db=1)


def tss64_descriptor(base: int, limit: int = TSS_SIZE - 1, busy: bool = True) -> bytes:
    """The 16-byte 64-bit TSS descriptor (type 9 available, 0xB busy)."""
    low = SegmentDescriptor(
        base=base & 0xFFFFFFFF, limit=limit, type=0xB if busy else 0x9, s=0, g=0
    ).pack()
    return low + struct.pack("<II", base >> 32, 0)
