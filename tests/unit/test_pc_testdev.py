"""cpu.devices.testdev: QEMU pc-testdev's data register (ports 0xE0-0xE3, 0xE8-0xEB), its
interrupt-line ports (0x2000-0x2017) and IORAM at 0xFF000000 (QEMU hw/misc/pc-testdev.c),
as kvm-unit-tests uses them. No engine involved."""

from __future__ import annotations

import dataclasses

import pytest

from cpu.devices.testdev import (
    IORAM_BASE,
    IORAM_SIZE,
    PcTestdev,
    PcTestdevState,
    PcTestdevUnsupported,
)
from cpu.errors import Unsupported
from cpu.memory import PhysicalMemory


@pytest.fixture
def dev() -> PcTestdev:
    return PcTestdev()


def test_ioram_is_64_kib_at_0xff000000() -> None:
    assert (IORAM_BASE, IORAM_SIZE) == (0xFF000000, 0x10000)


def test_ioram_reads_back_what_was_written_little_endian_at_any_size(dev: PcTestdev) -> None:
    dev.write(0x10, 8, 0x77665544332211)  # x86/emulator.c test_scas
    assert [dev.read(0x10, 1), dev.read(0x10, 2), dev.read(0x10, 4), dev.read(0x10, 8)] == [
        0x11, 0x2211, 0x44332211, 0x77665544332211]
    assert dev.read(0x13, 4) == 0x77665544  # unaligned
    dev.write(0x20, 16, (1 << 128) - 2)      # an SSE store
    assert dev.read(0x20, 16) == (1 << 128) - 2
    assert dev.iomem.read(0x20, 2) == b"\xfe\xff"


def test_a_store_keeps_only_its_own_bytes(dev: PcTestdev) -> None:
    dev.write(0, 8, 0x1111111111111111)
    dev.write(2, 2, 0xABCDEF)  # the value's extra bits are not stored
    assert dev.read(0, 8) == 0x11111111CDEF1111


def test_the_last_bytes_of_the_window_are_usable_and_one_past_is_not(dev: PcTestdev) -> None:
    dev.write(IORAM_SIZE - 4, 4, 0xDEADBEEF)
    assert dev.read(IORAM_SIZE - 4, 4) == 0xDEADBEEF
    with pytest.raises(PcTestdevUnsupported, match=r"pc-testdev: 8-byte read at IORAM offset "
                                                   r"0xfffc runs past the end of the 64-KiB window"):
        dev.read(IORAM_SIZE - 4, 8)


def test_the_data_register_keeps_32_bits_in_byte_lanes_by_port(dev: PcTestdev) -> None:
    dev.port_write(0xE0, 4, 0x44332211)
    assert [dev.port_read(0xE0 + k, 1) for k in range(4)] == [0x11, 0x22, 0x33, 0x44]
    assert dev.port_read(0xE1, 2) == 0x3322
    dev.port_write(0xE2, 1, 0xAA)
    assert dev.port_read(0xE0, 4) == 0x44AA2211


def test_bytes_past_lane_3_are_dropped(dev: PcTestdev) -> None:
    # test_ioport_write: mask and data shifted in 32-bit arithmetic.
    dev.port_write(0xE2, 4, 0x99887766)
    assert dev.port_read(0xE0, 4) == 0x77660000
    assert dev.port_read(0xE3, 4) == 0x77


def test_the_byte_ports_reach_the_same_register(dev: PcTestdev) -> None:
    dev.port_write(0xE8, 4, 0x0A0B0C0D)
    assert dev.port_read(0xE0, 4) == 0x0A0B0C0D
    dev.port_write(0xE1, 1, 0xFF)
    assert dev.port_read(0xE9, 1) == 0xFF


def test_rep_outsb_leaves_the_last_byte_and_rep_insw_reads_the_register_each_time(dev: PcTestdev) -> None:
    # x86/emulator.c test_stringio: "outsb up" reads back the last character written.
    for ch in b"abcdefghijklmnop":
        dev.port_write(0xE0, 1, ch)
    assert dev.port_read(0xE0, 1) == ord("p")
    dev.port_write(0xE0, 2, 0x9999)  # string_io_mmio: outw 0x9999, then rep insb
    assert [dev.port_read(0xE0, 1) for _ in range(3)] == [0x99] * 3


def test_an_interrupt_line_write_sets_the_isa_line_and_reads_return_0() -> None:
    lines: list[tuple[int, bool]] = []
    dev = PcTestdev(on_irq_line=lambda line, up: lines.append((line, up)))
    dev.port_write(0x200E, 1, 1)    # set_irq_line(0x0e, 1)
    dev.port_write(0x200E, 1, 0)
    dev.port_write(0x2000, 1, 0x80)  # any non-zero byte asserts
    assert lines == [(14, True), (14, False), (0, True)]
    assert dev.state.irq_lines == 1
    assert dev.port_read(0x200E, 1) == 0


@pytest.mark.parametrize(("port", "expected"), [
    (0xDF, False), (0xE0, True), (0xE3, True), (0xE4, False), (0xE7, False), (0xE8, True),
    (0xEB, True), (0xEC, False), (0x2000, True), (0x2017, True), (0x2018, False), (0xF4, False),
])
def test_the_ports_it_answers(port: int, expected: bool) -> None:
    assert PcTestdev.handles_port(port) is expected


def test_a_wide_interrupt_line_write_is_one_byte_per_line_as_qemu_splits_it_for_kvm() -> None:
    lines: list[tuple[int, bool]] = []
    dev = PcTestdev(on_irq_line=lambda line, up: lines.append((line, up)))
    dev.port_write(0x200B, 4, 1)     # realmode.flat's `outl %eax, %dx` with EAX = 1
    assert lines == [(11, True), (12, False), (13, False), (14, False)]
    dev.port_write(0x2016, 4, 0x01010101)  # the bytes past line 23 go nowhere
    assert lines[4:] == [(22, True), (23, True)]
    assert dev.state.irq_lines == (1 << 11) | (1 << 22) | (1 << 23)
    assert dev.port_read(0x200B, 4) == 0
    assert issubclass(PcTestdevUnsupported, Unsupported)


def test_all_mutable_state_is_one_dataclass_plus_ioram_and_restore_copies_into_the_same_buffer(
        dev: PcTestdev) -> None:
    dev.write(0x100, 4, 0xCAFEF00D)
    dev.port_write(0xE0, 4, 0x12345678)
    dev.port_write(0x2005, 1, 1)
    saved = dev.save()
    buffer = dev.iomem
    dev.write(0x100, 4, 0)
    dev.port_write(0xE0, 4, 0)
    dev.port_write(0x2005, 1, 0)
    dev.restore(saved)
    assert dev.state == saved.state == PcTestdevState(ioport_data=0x12345678, irq_lines=1 << 5)
    assert dev.iomem is buffer
    assert dev.read(0x100, 4) == 0xCAFEF00D
    assert {f.name for f in dataclasses.fields(PcTestdevState)} == {"ioport_data", "irq_lines"}
    assert set(vars(dev)) == {"state", "iomem", "on_irq_line"}


def test_ioram_given_to_the_device_must_be_the_64_kib_window() -> None:
    with pytest.raises(ValueError, match="IORAM is 0x10000 bytes, not 0x1000"):
        PcTestdev(iomem=PhysicalMemory(0x1000))
