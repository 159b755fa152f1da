"""PCI: configuration mechanism #1, bus 0's device table, and the configuration space of
a conventional PCI function (PCI Local Bus Specification, revision 3.0; section titles
below are its own). A standalone model: pure, deterministic, no engine.

Configuration mechanism #1 ("Configuration Mechanism #1", 3.2.2.3.2)
---------------------------------------------------------------------
Two I/O locations. CONFIG_ADDRESS at 0xCF8 is a 32-bit register, reached only by a
doubleword access to 0xCF8 exactly ("Anytime a host bridge sees a full DWORD I/O write
from the host to CONFIG_ADDRESS, the bridge must latch the data"; byte and word
accesses to 0xCF8-0xCFB pass through as ordinary I/O):

    bit 31      Enable: CONFIG_DATA accesses become configuration cycles
    bits 30:24  reserved, read 0
    bits 23:16  bus number
    bits 15:11  device number
    bits 10:8   function number
    bits 7:2    register number (a doubleword of the 256-byte space)
    bits 1:0    "00" for a type 0 access (the specification has them read 0)

CONFIG_DATA is the doubleword at 0xCFC-0xCFF: a byte, word or doubleword access at
0xCFC + k reaches bytes k.. of the selected register (the byte enables of the
configuration cycle). With Enable clear, CONFIG_DATA is ordinary I/O too. An access
to 0xCFC-0xCFF that runs past 0xCFF is not defined and raises `PciUnsupported`.

One departure, for QEMU's sake: bits 1:0 of CONFIG_ADDRESS are kept as written and
ORed into the byte offset (QEMU pci_host_conf_write latches the whole doubleword and
pci_host_data_read reads at `config_reg | (port & 3)`). kvm-unit-tests depends on it:
its lib/x86/asm/pci.h writes the register number unaligned into CONFIG_ADDRESS and
reads CONFIG_DATA at 0xCFC, so `pci_config_readw(dev, PCI_DEVICE_ID)` reads offset 2
(Linux's arch/x86/pci/direct.c writes `reg & 0xFC` and reads at 0xCFC + (reg & 3), which
both readings agree on). docs/sdm-map.md records the decision.

A configuration read of a function that does not exist ends in a master abort, which
returns all ones ("the host bridge ... must return all 1's on a read"); a write is
dropped. The only bus is bus 0 (QEMU's q35 without bridges), so a type 1 cycle (bus
!= 0) always aborts.

A function's configuration space ("Configuration Space Organization", 6.1)
----------------------------------------------------------------------------
256 bytes, little-endian. Each byte has a write mask (the bits software may change) and
a write-1-to-clear mask; everything else is read-only, as QEMU's pci.c models it
(`wmask`, `w1cmask`). The predefined header (type 00h, 6.2) is:

    0x00 Vendor ID, 0x02 Device ID, 0x08 Revision ID, 0x09-0x0B Class Code,
    0x0E Header Type, 0x2C Subsystem Vendor ID, 0x2E Subsystem ID     read-only
    0x04 Command      writable: I/O Space (0), Memory Space (1), Bus Master (2),
                      SERR# Enable (8), Interrupt Disable (10); QEMU's mask
    0x06 Status       bit 4 Capabilities List, bit 3 Interrupt Status (the function's
                      INTx# is asserted, whatever Interrupt Disable says); read-only
    0x0C Cache Line Size, 0x3C Interrupt Line                        writable
    0x10-0x24 Base Address Registers                                 see below
    0x34 Capabilities Pointer, 0x3D Interrupt Pin                     read-only

Base Address Registers ("Address Maps", 6.2.5.1): a 32-bit memory BAR of 2^n bytes has
its bits 31:n writable and bits n-1:4 hardwired to 0; bits 3:0 read the type (0:
memory, 32-bit, not prefetchable). So writing all ones and reading back gives the size
mask — how software sizes a BAR. The function decodes its range while the Command
register's Memory Space bit is set ("Memory Space": "A value of 0 disables the device
response"); where the range overlaps RAM, RAM answers (the machine never routes a RAM
access to a device).

Not modelled, raising `PciUnsupported` (the machine ends the run with it): PCI
Express extended configuration space (0x100-0xFFF, reached only through MMCONFIG), I/O
BARs, 64-bit and prefetchable BARs, expansion ROM BARs, and writes to registers a
device model does not define.

All mutable state of a function is its configuration bytes (plus what the device model
keeps); the bus keeps CONFIG_ADDRESS. Both live in objects the machine's checkpoints
copy whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cpu.errors import Unsupported

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
CONFIG_PORTS = range(CONFIG_ADDRESS, CONFIG_DATA + 4)
CONFIG_ENABLE = 1 << 31
CONFIG_ADDRESS_MASK = 0x80FFFFFF   # bits 30:24 read 0 (1:0 kept, as QEMU keeps them)
CONFIG_SPACE = 256

# Predefined header offsets ("Type 00h Configuration Space Header").
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
HEADER_END = 0x40

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | \
    COMMAND_INTX_DISABLE   # QEMU pci_init_wmask
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4

QEMU_SUBSYSTEM_VENDOR = 0x1AF4     # QEMU's default subsystem IDs (hw/pci/pci.c)
QEMU_SUBSYSTEM = 0x1100


def devfn(device: int, function: int = 0) -> int:
    """The 8-bit device/function number of `device`.`function`."""
    return (device << 3) | function


class PciUnsupported(Unsupported):
    """A PCI access idtlab does not model; the message names it."""


@dataclass(frozen=True)
class MemoryBar:
    """A 32-bit, non-prefetchable memory BAR of `size` bytes (a power of two, at least
    16) at configuration offset 0x10 + 4 * `index`."""

    index: int
    size: int

    @property
    def offset(self) -> int:
        return BAR0 + 4 * self.index

    @property
    def mask(self) -> int:
        """The writable bits: the address bits above the size."""
        return ~(self.size - 1) & 0xFFFFFFF0


@dataclass
class PciFunction:
    """A function's configuration space (see the module docstring). Device models
    build on it: `config_written` hears about every write after it landed."""

    name: str
    config: bytearray = field(default_factory=lambda: bytearray(CONFIG_SPACE))
    wmask: bytearray = field(default_factory=lambda: bytearray(CONFIG_SPACE))
    w1cmask: bytearray = field(default_factory=lambda: bytearray(CONFIG_SPACE))
    bars: tuple[MemoryBar, ...] = ()
    # Offsets past the header a write may touch (the device's own registers).
    device_writable: tuple[range, ...] = ()

    def identity(self, *, vendor: int, device: int, revision: int, class_code: int,
                 pin: int = 0) -> None:
        """The read-only header fields, QEMU's subsystem IDs, and the writable ones."""
        self.put(VENDOR_ID, 2, vendor)
        self.put(DEVICE_ID, 2, device)
        self.put(REVISION_ID, 1, revision)
        self.put(CLASS_PROG, 3, class_code)
        self.put(SUBSYSTEM_VENDOR_ID, 2, QEMU_SUBSYSTEM_VENDOR)
        self.put(SUBSYSTEM_ID, 2, QEMU_SUBSYSTEM)
        self.put(INTERRUPT_PIN, 1, pin)
        self._mask(self.wmask, COMMAND, 2, COMMAND_WRITABLE)
        self._mask(self.wmask, CACHE_LINE_SIZE, 1, 0xFF)
        self._mask(self.wmask, INTERRUPT_LINE, 1, 0xFF)
        for bar in self.bars:
            self._mask(self.wmask, bar.offset, 4, bar.mask)

    # ----- raw bytes ---------------------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @staticmethod
    def _mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset:offset + size] = value.to_bytes(size, "little")

    # ----- configuration cycles -------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        """A configuration read of `size` bytes at `offset` (within one doubleword)."""
        return self.get(offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """A configuration write: writable bits take the value, write-1-to-clear bits
        clear where it has ones, the rest stay."""
        if offset >= HEADER_END and not any(offset in r and offset + size - 1 in r
                                            for r in self.device_writable):
            raise PciUnsupported(f"PCI {self.name}: {size}-byte configuration write of "
                                 f"{value:#x} at offset {offset:#04x}: a device-specific "
                                 "register this model does not define")
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            at = offset + i
            old = self.config[at]
            new = (old & ~self.wmask[at]) | (byte & self.wmask[at])
            self.config[at] = new & ~(byte & self.w1cmask[at])
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """After a configuration write (device models override)."""
        del offset, size

    # ----- what the bus and the machine ask -------------------------------------------------

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    def bar_range(self, bar: MemoryBar) -> tuple[int, int] | None:
        """[start, end) the BAR decodes now, or None (Memory Space off, or the BAR still
        at 0, where no range was assigned)."""
        if not self.command & COMMAND_MEMORY:
            return None
        base = self.get(bar.offset, 4) & bar.mask
        if base == 0:
            return None
        return base, base + bar.size

    def decodes(self, paddr: int) -> tuple[MemoryBar, int] | None:
        """The BAR whose range holds physical address `paddr` and its base, or None."""
        for bar in self.bars:
            r = self.bar_range(bar)
            if r is not None and r[0] <= paddr < r[1]:
                return bar, r[0]
        return None


class HostBridge(PciFunction):
    """QEMU q35's host bridge at 00:00.0 (hw/pci-host/q35.c: Intel 82G33 MCH,
    8086:29C0, class 060000h). Only its header is modelled: reads of its
    device-specific registers (PCIEXBAR, PAM, SMRAM, ...) return their reset value 0;
    writes to them raise `PciUnsupported`."""

    def __init__(self) -> None:
        super().__init__("00:00.0 q35 host bridge")
        self.identity(vendor=0x8086, device=0x29C0, revision=0, class_code=0x060000)


@dataclass
class PciBusState:
    """The bus's register: CONFIG_ADDRESS."""

    address: int = 0


class PciBus:
    """Bus 0 and configuration mechanism #1 (see the module docstring). `functions`
    maps device/function numbers (`devfn`) to functions."""

    def __init__(self, functions: dict[int, PciFunction]) -> None:
        self.functions = dict(sorted(functions.items()))
        self.state = PciBusState()

    @staticmethod
    def handles(port: int) -> bool:
        return port in CONFIG_PORTS

    def _target(self, port: int, size: int, what: str) -> tuple[PciFunction | None, int] | None:
        """The function and configuration offset an access to CONFIG_DATA reaches, or
        None when CONFIG_DATA is ordinary I/O now (Enable clear)."""
        address = self.state.address
        if not address & CONFIG_ENABLE:
            return None
        k = port - CONFIG_DATA
        if k + size > 4:
            raise PciUnsupported(f"PCI: {size}-byte {what} at port {port:#x} runs past "
                                 "CONFIG_DATA (0xcfc-0xcff)")
        bus = (address >> 16) & 0xFF
        offset = (address & 0xFF) | k  # QEMU: config_reg | (port & 3) (module docstring)
        if (offset & 3) + size > 4:
            raise PciUnsupported(f"PCI: {size}-byte {what} at configuration offset {offset:#04x} "
                                 "crosses a doubleword")
        function = self.functions.get((address >> 8) & 0xFF) if bus == 0 else None
        return function, offset

    def port_in(self, port: int, size: int) -> int | None:
        """An IN from 0xCF8-0xCFF: the value, or None when it is not a configuration
        access (ordinary I/O: the machine answers as for any port without a device)."""
        if port == CONFIG_ADDRESS:
            return self.state.address if size == 4 else None
        if port < CONFIG_DATA:
            return None
        target = self._target(port, size, "read")
        if target is None:
            return None
        function, offset = target
        if function is None:
            return (1 << (8 * size)) - 1  # master abort
        return function.read_config(offset, size)

    def port_out(self, port: int, size: int, value: int) -> bool:
        """An OUT to 0xCF8-0xCFF: True when it was a configuration access (done)."""
        if port == CONFIG_ADDRESS:
            if size != 4:
                return False
            self.state.address = value & CONFIG_ADDRESS_MASK
            return True
        if port < CONFIG_DATA:
            return False
        target = self._target(port, size, "write")
        if target is None:
            return False
        function, offset = target
        if function is not None:
            function.write_config(offset, size, value)
        return True  # a write to no function is dropped (master abort)

    def selected(self) -> tuple[int, int] | None:
        """(devfn, offset) CONFIG_ADDRESS selects on bus 0, for the trace (None when
        disabled or another bus)."""
        address = self.state.address
        if not address & CONFIG_ENABLE or (address >> 16) & 0xFF:
            return None
        return (address >> 8) & 0xFF, address & 0xFF

    def decode(self, paddr: int) -> tuple[PciFunction, MemoryBar, int] | None:
        """The function, BAR and base whose memory range holds `paddr`, or None."""
        for function in self.functions.values():
            hit = function.decodes(paddr)
            if hit is not None:
                return function, hit[0], hit[1]
        return None
