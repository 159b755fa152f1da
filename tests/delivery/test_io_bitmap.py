"""IN/OUT/INS/OUTS at CPL > IOPL consult the TSS's I/O permission bitmap (SDM Vol. 1
"I/O Permission Bit Map"; Vol. 2 IN/OUT "Operation"): port P's bit is bit P % 8 of byte
I/O-map-base + P // 8 of the TSS, every bit of the access must be 0, and the two bytes
read must lie within the TSS limit; anything else is #GP(0) — a fault: saved RIP = the
instruction, RF = 1, nothing done (an IN leaves RAX as it was). At CPL <= IOPL the
bitmap is not read.

The CPL3 code below runs one I/O instruction then INT3 (a DPL3 gate whose handler
halts): a #GP and a #BP are both delivered on TSS.RSP0 with the CPL3 frame.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from cpu.layout import TSS_BASE, TSS_SEL
from tests.delivery.rig import (
    CODE,
    RFLAGS_RF,
    RSP0_TOP,
    USER_CS,
    USER_DS,
    USER_STACK,
    Frame,
    assert_delivered,
    build,
    deliveries,
    gate,
)

GP, BP = 13, 3
IOMAP = 0x68             # the bitmap right after the 0x68-byte TSS
TSS_IOMAP_BASE = 0x66
RFLAGS_IOPL3 = 3 << 12
RAX = 0x5555_5555


def run_io(insn: str, *, iopl3: bool = False, bitmap: bytes | None = None,
           limit: int | None = None, dx: int = 0) -> tuple[Any, Any, dict[str, int]]:
    """`insn` at CPL3 (RAX = 0x55555555, RDX = `dx`, RSI/RDI at a user buffer), with the
    machine's TSS (no bitmap: I/O map base 0x68, limit 0x67) or `bitmap` at offset 0x68
    and TR.limit = `limit`."""
    m, sym = build(f"""
    start:
    the_io:
        {insn}
    after_io:
        int3
    after_int3:
        nop
    gp_handler:
        hlt
    bp_handler:
        hlt
    """, gates={GP: gate("gp_handler"), BP: gate("bp_handler", dpl=3)})
    rflags = 0x2 | (RFLAGS_IOPL3 if iopl3 else 0)
    m.start_state(entry=CODE, rsp=USER_STACK, cpl=3, rflags=rflags,
                  regs={"rax": RAX, "rdx": dx, "rsi": 0x300000, "rdi": 0x300000})
    if bitmap is not None:
        m.phys.write(TSS_BASE + TSS_IOMAP_BASE, struct.pack("<H", IOMAP))
        m.phys.write(TSS_BASE + IOMAP, bitmap)
        _sel, base, _limit = m.engine.read_table("tr")
        m.engine.write_table("tr", TSS_SEL, base, limit if limit is not None else IOMAP + len(bitmap) - 1,
                             0x00008B00)
    r = m.run()
    assert r.outcome == "hlt"
    return m, r, sym


def assert_gp(m: Any, r: Any, sym: dict[str, int], *, rflags: int = 0x2) -> None:
    (rec,) = deliveries(r.trace.records)
    assert r.rip == sym["gp_handler"] + 1
    assert_delivered(m, rec, vector=GP, stack="rsp0", stack_top=RSP0_TOP, cpl=0,
                     frame=Frame(error_code=0, rip=sym["the_io"], cs=USER_CS,
                                 rflags=rflags | RFLAGS_RF, rsp=USER_STACK, ss=USER_DS))
    assert rec["icount"] == 0
    assert m.engine.read_reg("rax") == RAX  # an IN that faulted loaded nothing


def assert_allowed(m: Any, r: Any, sym: dict[str, int], *, rflags: int = 0x2) -> None:
    (rec,) = deliveries(r.trace.records)
    assert r.rip == sym["bp_handler"] + 1
    assert_delivered(m, rec, vector=BP, stack="rsp0", stack_top=RSP0_TOP, cpl=0,
                     frame=Frame(rip=sym["after_int3"], cs=USER_CS, rflags=rflags,
                                 rsp=USER_STACK, ss=USER_DS))


def test_cpl3_with_iopl0_and_no_bitmap_is_gp_0_on_in() -> None:
    m, r, sym = run_io("in al, 0x80")
    assert_gp(m, r, sym)


def test_cpl3_with_iopl0_and_no_bitmap_is_gp_0_on_out() -> None:
    m, r, sym = run_io("out 0x80, al")
    assert_gp(m, r, sym)
    assert [x for x in r.trace.records if x["kind"] == "port"] == []  # nothing reached a port


def test_cpl3_with_iopl3_skips_the_bitmap() -> None:
    m, r, sym = run_io("in al, 0x80", iopl3=True)
    assert_allowed(m, r, sym, rflags=0x2 | RFLAGS_IOPL3)
    assert m.engine.read_reg("rax") == (RAX & ~0xFF) | 0xFF  # no device: all ones


# Bitmap: port 0x80 allowed (bit 0 of byte 0x10), 0x81 denied, 0x84 allowed, 0x85 denied,
# 0x86/0x87 allowed; the byte after the bitmap is all ones, as the SDM asks.
BITMAP = bytes(0x10) + bytes([0b0010_0010]) + bytes(0x0F) + b"\xff"


@pytest.mark.parametrize(("insn", "dx", "allowed"), [
    ("in al, 0x80", 0, True),
    ("in al, 0x81", 0, False),
    ("in ax, dx", 0x84, False),      # 0x84 allowed, 0x85 denied: every bit must be 0
    ("in ax, dx", 0x86, True),
    ("out dx, al", 0x81, False),
    ("out dx, eax", 0x80, False),    # 0x80..0x83 with 0x81 denied
    ("insb", 0x81, False),
    ("outsb", 0x80, True),
])
def test_the_bitmap_allows_an_access_only_when_every_bit_of_it_is_0(insn: str, dx: int,
                                                                    allowed: bool) -> None:
    m, r, sym = run_io(insn, bitmap=BITMAP, dx=dx)
    (assert_allowed if allowed else assert_gp)(m, r, sym)


@pytest.mark.parametrize(("limit", "allowed"), [
    (IOMAP + 0x10, False),   # the byte of port 0x80 is the last one: its pair is beyond
    (IOMAP + 0x11, True),    # both bytes within the limit
])
def test_both_bitmap_bytes_read_must_lie_within_the_tss_limit(limit: int, allowed: bool) -> None:
    m, r, sym = run_io("in al, 0x80", bitmap=BITMAP, limit=limit)
    (assert_allowed if allowed else assert_gp)(m, r, sym)
