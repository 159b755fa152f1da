"""cpu.io_permission: CPL vs IOPL, the TSS I/O permission bitmap (every bit of a
multi-byte access, two bitmap bytes read, both within the TSS limit). The TSS is the one
guest_images/mb/io_perm.S builds: map base 0x68, a bitmap for ports 0..0x3ff with only
0x80, 0x84, 0x86, 0x87 and 0x3f8..0x3ff allowed, then the 0xff byte (limit 0xe8)."""

from __future__ import annotations

import struct

import pytest

from cpu.io_permission import IoCheck, io_permission

IOMAP = 0x68
LIMIT = IOMAP + 0x80


def tss(*, base: int = IOMAP) -> bytearray:
    t = bytearray(IOMAP + 0x81)
    struct.pack_into("<H", t, 0x66, base)
    t[IOMAP:IOMAP + 0x81] = b"\xff" * 0x81
    t[IOMAP + 0x10] &= ~((1 << 0) | (1 << 4) | (1 << 6) | (1 << 7)) & 0xFF
    t[IOMAP + 0x7F] = 0
    return t


def check(port: int, size: int = 1, *, cpl: int = 3, iopl: int = 0, limit: int = LIMIT,
          data: bytearray | None = None) -> IoCheck:
    t = tss() if data is None else data
    reads: list[tuple[int, int]] = []

    def read(offset: int, n: int) -> bytes:
        assert offset + n - 1 <= limit, "read beyond the TSS limit"
        reads.append((offset, n))
        return bytes(t[offset:offset + n])

    return io_permission(cpl=cpl, iopl=iopl, port=port, size=size, tss_limit=limit,
                         read_tss=read)


def test_cpl_at_or_below_iopl_skips_the_bitmap() -> None:
    assert check(0x81, cpl=3, iopl=3) == IoCheck(True)
    assert check(0x81, cpl=0, iopl=0) == IoCheck(True)


def test_an_allowed_port_at_cpl3_with_iopl0() -> None:
    assert check(0x80).allowed


def test_a_denied_port_is_gp() -> None:
    res = check(0x81)
    assert not res.allowed
    assert res.why == ("port 0x81 (1 bytes) denied by the I/O permission bitmap "
                       "(bytes 0xff2e at TSS offset 0x78)")


def test_a_word_access_needs_both_bits_clear() -> None:
    assert not check(0x84, 2).allowed
    assert check(0x86, 2).allowed
    assert not check(0x85, 4).allowed


def test_a_dword_whose_bits_straddle_a_bitmap_byte_reads_both_bytes() -> None:
    t = tss()
    t[IOMAP + 0x10] = 0x0F   # ports 0x84..0x87 allowed
    t[IOMAP + 0x11] = 0xFE   # port 0x88 allowed, 0x89.. denied
    assert check(0x85, 4, data=t).allowed        # 0x85..0x88
    assert not check(0x86, 4, data=t).allowed    # 0x86..0x89


def test_the_last_bitmap_byte_is_readable_with_the_extra_byte_in_the_limit() -> None:
    assert check(0x3FD).allowed


def test_the_second_bitmap_byte_beyond_the_limit_is_gp() -> None:
    res = check(0x3FD, limit=LIMIT - 1)
    assert res == IoCheck(False, "port 0x3fd: bitmap bytes 0xe7..0xe8 beyond the TSS limit "
                                 "0xe7 (I/O map base 0x68)")


def test_a_port_beyond_the_bitmap_is_gp() -> None:
    assert not check(0x400).allowed
    assert not check(0xFFFF).allowed


def test_a_map_base_past_the_limit_denies_every_port() -> None:
    assert not check(0x80, data=tss(base=0x68), limit=0x67).allowed


def test_a_tss_shorter_than_0x68_bytes_denies_every_port() -> None:
    assert check(0x80, limit=0x60) == IoCheck(False, "TSS limit 0x60 < 0x67")


def test_bad_sizes_and_ports_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        check(0x80, 3)
    with pytest.raises(ValueError):
        check(0x10000)
