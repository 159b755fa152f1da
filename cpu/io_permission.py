"""Protected-mode I/O permission: may IN/OUT/INS/OUTS touch these ports at this CPL?
(SDM Vol. 1, "Input/Output", "I/O Privilege Level" and "I/O Permission Bit Map"; Vol. 2
IN/OUT/INS/OUTS, "Operation").

The rule
--------
With CPL <= RFLAGS.IOPL every port is allowed (64-bit mode has no virtual-8086 mode,
the other case where the bitmap is read). Otherwise the processor consults the I/O
permission bit map of the current TSS: the 16-bit I/O map base at TSS offset 0x66 gives
the bitmap's offset in the TSS, and port P's bit is bit P % 8 of byte P // 8. An access
of N bytes (1, 2 or 4) at port P is allowed only if the bits of P .. P + N - 1 are all 0;
otherwise it is #GP(0).

The processor reads the bitmap *two bytes at a time* (the byte holding P's bit and the
next one, so that a multi-byte access whose bits straddle a byte boundary is checked in
one read). Both bytes must lie within the TSS limit: "any attempt to access an I/O port
whose bit ... lies beyond the limit ... causes a general-protection exception", which is
why the SDM asks for a byte of all ones after the bitmap. Hence, with B the I/O map base
and L the TSS limit (the offset of the last valid byte), the access is #GP(0) unless
B + P // 8 + 1 <= L. A map base at or past the limit (the usual way to say "no bitmap":
the runtime of guest_images/mb sets B = 0x68 with L = 0x67) therefore denies every port.
A TSS shorter than the 0x68-byte 64-bit TSS (L < 0x67) denies every port too (Bochs
`BX_CPU_C::allow_io`: "TR.limit < 103").

Pure: the caller passes the TSS limit and a reader of TSS-relative bytes (the machine
reads them at TR.base through guest paging as supervisor accesses).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

TSS_IOMAP_BASE = 0x66
TSS_MIN_LIMIT = 0x67


@dataclass(frozen=True)
class IoCheck:
    """The verdict: `allowed`, or #GP(0) with `why`."""

    allowed: bool
    why: str = ""


def io_permission(*, cpl: int, iopl: int, port: int, size: int, tss_limit: int,
                  read_tss: Callable[[int, int], bytes]) -> IoCheck:
    """May an I/O access of `size` bytes at `port` go ahead? `read_tss(offset, n)`
    returns n bytes of the TSS at `offset` (only called within the limit)."""
    if size not in (1, 2, 4):
        raise ValueError(f"I/O access size {size} (1, 2 or 4)")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port:#x} outside 0..0xffff")
    if cpl <= iopl:
        return IoCheck(True)
    if tss_limit < TSS_MIN_LIMIT:
        return IoCheck(False, f"TSS limit {tss_limit:#x} < {TSS_MIN_LIMIT:#x}")
    (base,) = struct.unpack("<H", read_tss(TSS_IOMAP_BASE, 2))
    offset = base + port // 8
    if offset + 1 > tss_limit:
        return IoCheck(False, f"port {port:#x}: bitmap bytes {offset:#x}..{offset + 1:#x} "
                              f"beyond the TSS limit {tss_limit:#x} (I/O map base {base:#x})")
    (bits,) = struct.unpack("<H", read_tss(offset, 2))
    mask = ((1 << size) - 1) << (port % 8)
    if bits & mask:
        return IoCheck(False, f"port {port:#x} ({size} bytes) denied by the I/O permission "
                              f"bitmap (bytes {bits:#06x} at TSS offset {offset:#x})")
    return IoCheck(True)
