"""cpu.devices.pci: configuration mechanism #1 (PCI Local Bus Specification 3.0,
3.2.2.3.2), the type 00h header's read-only and writable fields, BAR sizing (6.2.5.1)
and decoding, and q35's host bridge. No engine involved."""

from __future__ import annotations

import pytest

from cpu.devices.edu import Edu
from cpu.devices.pci import (
    HostBridge,
    PciBus,
    PciFunction,
    PciUnsupported,
    devfn,
)
from cpu.errors import Unsupported
from tests.unit.test_edu import FakeBus

EDU = devfn(2)


def bus() -> PciBus:
    return PciBus({devfn(0): HostBridge(), EDU: Edu(FakeBus())})


def address(dfn: int, offset: int, *, bus_number: int = 0, enable: bool = True) -> int:
    return (1 << 31 if enable else 0) | bus_number << 16 | dfn << 8 | offset


def config_read(b: PciBus, dfn: int, offset: int, size: int) -> int | None:
    b.port_out(0xCF8, 4, address(dfn, offset & ~3))
    return b.port_in(0xCFC + (offset & 3), size)


def test_a_dword_write_to_0xcf8_latches_config_address_and_reads_back_without_bits_30_to_24() -> None:
    b = bus()
    assert b.port_out(0xCF8, 4, 0xFFFFFFFF)
    assert b.port_in(0xCF8, 4) == 0x80FFFFFF


@pytest.mark.parametrize(("port", "size"), [(0xCF8, 1), (0xCF8, 2), (0xCF9, 1), (0xCFA, 2)])
def test_byte_and_word_accesses_to_0xcf8_to_0xcfb_are_ordinary_io(port: int, size: int) -> None:
    b = bus()
    b.port_out(0xCF8, 4, address(0, 0))
    assert not b.port_out(port, size, 0)
    assert b.port_in(port, size) is None
    assert b.port_in(0xCF8, 4) == address(0, 0)  # the latch did not change


def test_the_host_bridge_at_00_00_0_is_q35s_8086_29c0_host_bridge_class() -> None:
    b = bus()
    assert config_read(b, 0, 0x00, 4) == 0x29C08086
    assert config_read(b, 0, 0x08, 4) == 0x06000000      # class 060000h, revision 0
    assert config_read(b, 0, 0x2C, 4) == 0x11001AF4      # QEMU's subsystem IDs
    assert config_read(b, 0, 0x0E, 1) == 0x00            # header type 0


def test_config_data_reads_the_bytes_its_port_and_size_select() -> None:
    b = bus()
    assert config_read(b, EDU, 0x00, 4) == 0x11E81234
    assert config_read(b, EDU, 0x02, 2) == 0x11E8
    assert config_read(b, EDU, 0x03, 1) == 0x11
    assert config_read(b, EDU, 0x3D, 1) == 0x01          # interrupt pin INTA#


def test_an_unaligned_register_number_in_config_address_is_ored_into_the_offset_as_qemu_does() -> None:
    """kvm-unit-tests' pci_config_readw(dev, PCI_DEVICE_ID): CONFIG_ADDRESS with register
    2, then a word read of 0xCFC."""
    b = bus()
    b.port_out(0xCF8, 4, address(EDU, 0x02))
    assert b.port_in(0xCFC, 2) == 0x11E8


def test_a_function_that_does_not_exist_reads_all_ones_and_drops_writes() -> None:
    b = bus()
    assert config_read(b, devfn(5), 0x00, 4) == 0xFFFFFFFF
    assert config_read(b, devfn(2, 1), 0x00, 2) == 0xFFFF
    assert config_read(b, EDU, 0x00, 4, ) == 0x11E81234
    b.port_out(0xCF8, 4, address(EDU, 0, bus_number=1))   # bus 1: type 1, no bridge
    assert b.port_in(0xCFC, 4) == 0xFFFFFFFF
    assert b.port_out(0xCFC, 4, 0)                         # taken, and dropped


def test_with_enable_clear_config_data_is_ordinary_io() -> None:
    b = bus()
    b.port_out(0xCF8, 4, address(EDU, 0, enable=False))
    assert b.port_in(0xCFC, 4) is None
    assert not b.port_out(0xCFC, 4, 0)


def test_a_config_data_access_running_past_0xcff_is_unsupported() -> None:
    b = bus()
    b.port_out(0xCF8, 4, address(EDU, 0))
    with pytest.raises(PciUnsupported, match="runs past CONFIG_DATA"):
        b.port_in(0xCFE, 4)


def test_the_command_register_keeps_only_its_writable_bits() -> None:
    b = bus()
    b.port_out(0xCF8, 4, address(EDU, 0x04))
    b.port_out(0xCFC, 2, 0xFFFF)
    assert b.port_in(0xCFC, 2) == 0x0507   # I/O, memory, master, SERR#, interrupt disable


def test_writing_all_ones_to_a_1_mib_bar_reads_back_its_size_mask() -> None:
    b = bus()
    b.port_out(0xCF8, 4, address(EDU, 0x10))
    b.port_out(0xCFC, 4, 0xFFFFFFFF)
    assert b.port_in(0xCFC, 4) == 0xFFF00000
    b.port_out(0xCFC, 4, 0xFEA12345)
    assert b.port_in(0xCFC, 4) == 0xFEA00000
    assert config_read(b, EDU, 0x14, 4) == 0   # no BAR1: hardwired 0


def test_a_bar_decodes_only_while_memory_space_is_enabled() -> None:
    b = bus()
    b.port_out(0xCF8, 4, address(EDU, 0x10))
    b.port_out(0xCFC, 4, 0xFEA00000)
    assert b.decode(0xFEA00000) is None          # Memory Space still clear
    b.port_out(0xCF8, 4, address(EDU, 0x04))
    b.port_out(0xCFC, 2, 0x0002)
    hit = b.decode(0xFEA81000)
    assert hit is not None and isinstance(hit[0], Edu) and hit[2] == 0xFEA00000
    assert b.decode(0xFEB00000) is None          # past the 1-MiB range


def test_a_write_to_a_device_specific_register_the_model_does_not_define_is_unsupported() -> None:
    b = bus()
    b.port_out(0xCF8, 4, address(0, 0x60))          # the host bridge's PCIEXBAR
    with pytest.raises(Unsupported, match=r"offset 0x60: a device-specific register"):
        b.port_out(0xCFC, 4, 0xB0000001)
    assert config_read(b, 0, 0x60, 4) == 0          # reads its reset value


def test_read_only_header_fields_ignore_writes() -> None:
    f = PciFunction("test")
    f.identity(vendor=0x1234, device=0x5678, revision=1, class_code=0xFF0000)
    f.write_config(0x00, 4, 0)
    f.write_config(0x08, 4, 0)
    assert (f.get(0x00, 4), f.get(0x08, 4)) == (0x56781234, 0xFF000001)
