"""cpu.devices.edu: QEMU's edu device (docs/specs/edu.rst, hw/misc/edu.c) — its
configuration space, registers, DMA, INTx and MSI — against a fake bus. No engine."""

from __future__ import annotations

import pytest

from cpu.devices.edu import (
    Edu,
    EduUnsupported,
    factorial32,
)


class FakeBus:
    """A bus of 64 KiB of RAM that records the device's interrupts."""

    def __init__(self) -> None:
        self.ram = bytearray(0x10000)
        self.intx_levels: list[bool] = []
        self.messages: list[tuple[int, int]] = []
        self.accept = 1 << 30   # bytes the bus takes before refusing (an IOMMU fault)

    def dma_read(self, address: int, size: int) -> bytes:
        size = min(size, self.accept)
        return bytes(self.ram[address:address + size])

    def dma_write(self, address: int, data: bytes) -> int:
        data = data[:self.accept]
        self.ram[address:address + len(data)] = data
        return len(data)

    def intx(self, asserted: bool) -> None:
        self.intx_levels.append(asserted)

    def msi(self, address: int, data: int) -> None:
        self.messages.append((address, data))


def edu(command: int = 0x0006) -> tuple[Edu, FakeBus]:
    fake = FakeBus()
    device = Edu(fake)
    device.write_config(0x04, 2, command)   # memory space + bus master
    return device, fake


def test_the_identification_register_reads_0x010000ed() -> None:
    d, _ = edu()
    assert d.read(0x00, 4) == 0x010000ED


def test_the_liveness_register_reads_the_inverse_of_what_was_written() -> None:
    d, _ = edu()
    d.write(0x04, 4, 0x12345678)
    assert d.read(0x04, 4) == 0xEDCBA987


@pytest.mark.parametrize(("n", "result"), [(0, 1), (5, 120), (12, 479001600),
                                            (13, 1932053504), (34, 0)])
def test_the_factorial_is_taken_modulo_2_to_the_32(n: int, result: int) -> None:
    assert factorial32(n) == result


def test_a_factorial_write_is_done_at_once_and_raises_0x001_when_asked() -> None:
    d, fake = edu()
    d.write(0x20, 4, 0x80)
    d.write(0x08, 4, 10)
    assert (d.read(0x08, 4), d.read(0x20, 4), d.read(0x24, 4)) == (3628800, 0x80, 0x001)
    assert fake.intx_levels == [True]


def test_accesses_of_the_wrong_width_read_all_ones_and_write_nothing() -> None:
    d, _ = edu()
    assert d.read(0x00, 8) == 0xFFFFFFFFFFFFFFFF
    assert d.read(0x00, 2) == 0xFFFF
    d.write(0x04, 8, 0)
    assert d.read(0x04, 4) == 0
    d.write(0x80, 8, 0x1_2345_6789)
    assert d.read(0x80, 8) == 0x1_2345_6789
    assert d.read(0x84, 4) == 0xFFFFFFFF      # no register at 0x84


def test_a_dma_copies_ram_into_the_buffer_and_back_and_clears_start() -> None:
    d, fake = edu()
    fake.ram[0x1000:0x1004] = b"\x78\x56\x34\x12"
    for reg, value in ((0x80, 0x1000), (0x88, 0x40000), (0x90, 4), (0x98, 0x1)):
        d.write(reg, 8 if reg < 0x98 else 4, value)
    assert d.read(0x98, 4) == 0
    for reg, value in ((0x80, 0x40000), (0x88, 0x1004), (0x90, 4), (0x98, 0x3)):
        d.write(reg, 8 if reg < 0x98 else 4, value)
    assert (d.read(0x98, 4), bytes(fake.ram[0x1004:0x1008])) == (0x2, b"\x78\x56\x34\x12")


def test_a_dma_with_bit_2_raises_interrupt_0x100() -> None:
    d, fake = edu()
    for reg, value in ((0x80, 0), (0x88, 0x40000), (0x90, 1)):
        d.write(reg, 8, value)
    d.write(0x98, 4, 0x5)
    assert (d.read(0x24, 4), fake.intx_levels) == (0x100, [True])


def test_a_dma_address_is_masked_to_28_bits() -> None:
    d, fake = edu()
    fake.ram[0x2000] = 0xAB
    for reg, value in ((0x80, 0xF0002000), (0x88, 0x40010), (0x90, 1), (0x98, 1)):
        d.write(reg, 8, value)
    assert d.edu.buffer[0x10] == 0xAB


def test_a_dma_outside_the_devices_buffer_is_unsupported() -> None:
    d, _ = edu()
    for reg, value in ((0x80, 0), (0x88, 0x40FFC), (0x90, 8)):
        d.write(reg, 8, value)
    with pytest.raises(EduUnsupported, match="leaves the device's buffer"):
        d.write(0x98, 4, 1)


def test_a_dma_without_bus_master_is_unsupported() -> None:
    d, _ = edu(command=0x0002)
    for reg, value in ((0x80, 0), (0x88, 0x40000), (0x90, 4)):
        d.write(reg, 8, value)
    with pytest.raises(EduUnsupported, match="Bus Master clear"):
        d.write(0x98, 4, 1)


def test_a_dma_the_bus_refuses_part_of_moves_what_was_accepted_and_completes() -> None:
    d, fake = edu()
    fake.ram[0:8] = b"abcdefgh"
    fake.accept = 4
    for reg, value in ((0x80, 0), (0x88, 0x40000), (0x90, 8)):
        d.write(reg, 8, value)
    d.write(0x98, 4, 1)
    assert (bytes(d.edu.buffer[:8]), d.read(0x98, 4)) == (b"abcd\0\0\0\0", 0)


def test_intx_is_a_level_held_while_the_interrupt_status_is_not_zero() -> None:
    d, fake = edu()
    d.write(0x60, 4, 0x3)
    d.write(0x64, 4, 0x1)
    assert (d.read(0x24, 4), fake.intx_levels, d.get(0x06, 2) & 0x08) == (0x2, [True], 0x08)
    d.write(0x64, 4, 0x2)
    assert (fake.intx_levels, d.get(0x06, 2) & 0x08) == ([True, False], 0)
    d.write(0x60, 4, 0)       # raising nothing leaves the line low
    assert fake.intx_levels == [True, False]


def test_interrupt_disable_drops_intx_but_not_the_status_bit() -> None:
    d, fake = edu()
    d.write(0x60, 4, 1)
    d.write_config(0x04, 2, 0x0406)
    assert (fake.intx_levels, d.get(0x06, 2) & 0x08) == ([True, False], 0x08)


def test_with_msi_enabled_each_raise_sends_the_message_and_intx_stays_low() -> None:
    d, fake = edu()
    assert (d.get(0x34, 1), d.get(0x40, 2), d.get(0x42, 2)) == (0x40, 0x0005, 0x0080)
    d.write_config(0x44, 4, 0xFEE00050)
    d.write_config(0x48, 4, 0)
    d.write_config(0x4C, 4, 0xABCD1234)      # the data register is 16 bits
    d.write_config(0x42, 2, 0x0001)
    assert d.get(0x4C, 4) == 0x1234
    d.write(0x60, 4, 1)
    d.write(0x60, 4, 0)                       # the status is still 1: another message
    assert (fake.messages, fake.intx_levels) == ([(0xFEE00050, 0x1234)] * 2, [])


def test_disabling_msi_with_an_interrupt_pending_asserts_intx() -> None:
    d, fake = edu()
    d.write_config(0x42, 2, 0x0001)
    d.write(0x60, 4, 1)
    d.write_config(0x42, 2, 0x0000)
    assert fake.intx_levels == [True]
