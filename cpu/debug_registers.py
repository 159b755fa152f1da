"""The debug registers DR0-DR3, DR6, DR7: which breakpoints an access matches, and what
a #DB writes to DR6 (SDM Vol. 3B, "Debug Registers", "Debug Exceptions").

The mechanism
-------------
DR0-DR3 hold four linear addresses (I/O port numbers for I/O breakpoints). DR7 arms
them: Ln/Gn (bits 2n, 2n+1) enable breakpoint n (local and global differ only across
task switches, which 64-bit mode does not have), R/Wn (bits 16+4n) say what it watches
and LENn (bits 18+4n) how many bytes:

    R/W  00 instruction execution    LEN 00  1 byte
         01 data writes                  01  2 bytes
         10 I/O reads and writes         11  4 bytes
            (only with CR4.DE = 1;       10  8 bytes
            undefined otherwise)
         11 data reads and writes

A data or I/O breakpoint covers the LEN bytes from its address with the low bits of
the address ignored (the address must be aligned to LEN); an access matches when any
of its bytes is covered. An instruction breakpoint (LEN must be 00) matches the first
byte of an instruction. `DebugRegisters.instruction_hits`, `data_hits` and `io_hits`
return the matching breakpoints as a mask of DR6 bits B0-B3.

When the #DB is raised
----------------------
An instruction breakpoint is a *fault* before the instruction runs, unless RFLAGS.RF =
1 ("the processor ... ignores instruction breakpoints for the next instruction" after an
IRETQ that loaded RF = 1): `instruction_hits(rip, rf=True)` is 0. Data and I/O
breakpoints are *traps* after the access's instruction completes. A data breakpoint hit
by MOV SS is held until the instruction after it has completed (Vol. 3A "Masking
Exceptions and Interrupts When Switching Stacks"): `hold` it, and `release` it into the
#DB after the next instruction. Single-step (RFLAGS.TF) traps after every instruction
(BS); one #DB reports a single step and the data breakpoints of the same instruction
together.

DR6 on a #DB (`commit`): B0-B3 become exactly the breakpoints this #DB reports ("certain
debug exceptions may clear bits 0-3"; Bochs clears them), BD (bit 13), BS (14) and BT (15)
are set when this #DB is of that kind and otherwise left as they were: "the remaining
contents of the DR6 register are never cleared by the processor"; software clears them.
Bits 4-11 and 16-31 read as 1, bit 12 as 0 (DR6_INIT = 0xffff0ff0).

General detect: with DR7.GD (bit 13) set, the next MOV to or from any debug register
is a #DB *fault* with BD = 1, and the processor clears GD when it enters the #DB handler
(so that the handler can use the debug registers). `mov_dr_fault` gives the fault of a
MOV DR in the SDM's order (Vol. 2 "MOV—Move to/from Debug Registers"): #GP(0) at CPL > 0,
#UD for DR4/DR5 with CR4.DE = 1, #DB for GD, #GP(0) for a 1 in bits 63:32 of DR6/DR7.

Pure: no engine. `cpu/machine.py` wires it (see docs/sdm-map.md, "Debug registers").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

DR6_INIT = 0xFFFF0FF0          # B0-B3, BD, BS, BT clear; reserved bits as they read
DR6_B_MASK = 0xF               # B0-B3
DR6_BD = 1 << 13
DR6_BS = 1 << 14
DR6_BT = 1 << 15
DR6_WRITABLE = DR6_B_MASK | DR6_BD | DR6_BS | DR6_BT
DR7_INIT = 0x400               # bit 10 reads as 1
DR7_GD = 1 << 13
DR7_WRITABLE = 0xFFFF23FF      # L0-G3, LE, GE, GD, R/W0-LEN3
CR4_DE = 1 << 3
GP, UD, DB = 13, 6, 1          # vectors (idt.vectors.Vector values)

# LENn encoding -> bytes.
LEN_BYTES = {0b00: 1, 0b01: 2, 0b11: 4, 0b10: 8}


class BreakKind(Enum):
    EXECUTE = 0b00
    WRITE = 0b01
    IO = 0b10
    READ_WRITE = 0b11


@dataclass(frozen=True)
class Breakpoint:
    index: int
    address: int
    kind: BreakKind
    length: int

    def covers(self, start: int, size: int) -> bool:
        """Some byte of [start, start + size) is in the breakpoint's aligned range."""
        lo = self.address & ~(self.length - 1)
        return start < lo + self.length and lo < start + size


@dataclass
class DebugRegisters:
    """DR0-DR3, DR6, DR7 and the data-breakpoint hits held by a MOV SS."""

    addresses: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    dr6: int = DR6_INIT
    dr7: int = DR7_INIT
    held: int = 0  # B0-B3 of data breakpoints hit by a MOV SS, not yet reported

    def breakpoint(self, n: int) -> Breakpoint | None:
        """Breakpoint n if DR7 enables it (Ln or Gn), else None."""
        if not self.dr7 >> (2 * n) & 0b11:
            return None
        bits = self.dr7 >> (16 + 4 * n)
        return Breakpoint(n, self.addresses[n], BreakKind(bits & 0b11), LEN_BYTES[bits >> 2 & 0b11])

    def _hits(self, kinds: tuple[BreakKind, ...], start: int, size: int) -> int:
        mask = 0
        for n in range(4):
            bp = self.breakpoint(n)
            if bp is not None and bp.kind in kinds and bp.covers(start, size):
                mask |= 1 << n
        return mask

    def instruction_hits(self, rip: int, *, rf: bool = False) -> int:
        """B0-B3 of the instruction breakpoints at `rip` (a fault before it executes);
        none while RFLAGS.RF = 1."""
        if rf:
            return 0
        mask = 0
        for n in range(4):
            bp = self.breakpoint(n)
            if bp is not None and bp.kind is BreakKind.EXECUTE and bp.address == rip:
                mask |= 1 << n
        return mask

    def data_hits(self, linear: int, size: int, *, write: bool) -> int:
        """B0-B3 of the data breakpoints an access of `size` bytes at `linear` matches:
        R/W = 11 for reads and writes, R/W = 01 for writes only."""
        kinds = (BreakKind.WRITE, BreakKind.READ_WRITE) if write else (BreakKind.READ_WRITE,)
        return self._hits(kinds, linear, size)

    def io_hits(self, port: int, size: int, *, cr4_de: bool) -> int:
        """B0-B3 of the I/O breakpoints an IN/OUT/INS/OUTS of `size` bytes at `port`
        matches; none without CR4.DE (R/W = 10 is then undefined: idtlab matches nothing)."""
        return self._hits((BreakKind.IO,), port, size) if cr4_de else 0

    def hold(self, hits: int) -> None:
        """Data breakpoints hit by a MOV SS: reported after the next instruction."""
        self.held |= hits & DR6_B_MASK

    def release(self) -> int:
        """The held hits, for the #DB after the instruction that followed the MOV SS."""
        hits, self.held = self.held, 0
        return hits

    def commit(self, hits: int = 0, *, bs: bool = False, bd: bool = False,
               bt: bool = False) -> int:
        """DR6 and DR7 as the processor leaves them when it delivers a #DB reporting
        `hits` (B0-B3) and single step / general detect / task switch: returns DR6."""
        sticky = self.dr6 & (DR6_BD | DR6_BS | DR6_BT)
        new = (DR6_INIT | sticky | (hits & DR6_B_MASK) | (DR6_BS if bs else 0)
               | (DR6_BD if bd else 0) | (DR6_BT if bt else 0))
        self.dr6 = new
        self.dr7 &= ~DR7_GD  # cleared on entry to the #DB handler
        return new

    def read(self, n: int) -> int:
        """MOV from DRn (DR4/DR5 alias DR6/DR7 when CR4.DE = 0; `mov_dr_fault` first)."""
        if n < 4:
            return self.addresses[n]
        return self.dr6 if n in (4, 6) else self.dr7

    def write(self, n: int, value: int) -> None:
        """MOV to DRn (after `mov_dr_fault` found none): reserved bits keep their values."""
        if n < 4:
            self.addresses[n] = value & (2**64 - 1)
        elif n in (4, 6):
            self.dr6 = DR6_INIT | (value & DR6_WRITABLE)
        else:
            self.dr7 = DR7_INIT | (value & DR7_WRITABLE)


def mov_dr_fault(n: int, *, cpl: int, cr4_de: bool, dr7: int, write: bool,
                 value: int = 0) -> int | None:
    """The vector a MOV to/from DRn raises (#GP(0), #UD, #DB with BD) or None."""
    if cpl != 0:
        return GP
    if n in (4, 5) and cr4_de:
        return UD
    if dr7 & DR7_GD:
        return DB
    if write and n in (4, 5, 6, 7) and value >> 32:
        return GP
    return None
