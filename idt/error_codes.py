"""Error-code formats (SDM Vol. 3A "Error Code" and "Page-Fault Exceptions").

Selector format: bit 0 EXT, bit 1 IDT, bit 2 TI, bits 15:3 the index. For IDT
references the index is the *vector number*, even though 64-bit gates are 16 bytes,
so the code is `(v << 3) | 2 | EXT` — never `v*16 + 2` (the bug class QEMU carried).
"""

from __future__ import annotations

from enum import IntFlag

EXT = 1 << 0
IDT = 1 << 1
TI = 1 << 2


def selector_error_code(index: int, *, idt: bool = False, ti: bool = False, ext: bool = False) -> int:
    """Build a selector-format error code from a descriptor-table index."""
    if not 0 <= index <= 0x1FFF:
        raise ValueError(f"descriptor index {index} does not fit in 13 bits")
    return (index << 3) | (IDT if idt else 0) | (TI if ti else 0) | (EXT if ext else 0)


def idt_error_code(vector: int, *, ext: bool) -> int:
    """Error code naming IDT entry `vector`: `(vector << 3) | IDT | EXT`."""
    return selector_error_code(vector, idt=True, ext=ext)


def selector_code(selector: int, *, ext: bool) -> int:
    """Error code naming a GDT/LDT selector: the selector with RPL dropped, EXT ORed in."""
    return (selector & 0xFFFC) | (EXT if ext else 0)


class PFErr(IntFlag):
    """#PF error-code bits (SDM Vol. 3A "Page-Fault Error Code")."""

    P = 1 << 0
    W = 1 << 1
    U = 1 << 2
    RSVD = 1 << 3
    ID = 1 << 4
    PK = 1 << 5
    SS = 1 << 6
    SGX = 1 << 15
