"""QEMU's educational PCI device, `edu` (QEMU docs/specs/edu.rst, "EDU device"; the
register semantics below are hw/misc/edu.c's where the document is silent). A
standalone model: pure, deterministic, no engine; what it does to the rest of the
machine goes through an `EduBus` (DMA, INTx, MSI).

Configuration space (cpu/devices/pci.py)
----------------------------------------
1234:11E8, revision 10h, class 00FF00h ("unclassified"), interrupt pin INTA#, QEMU's
subsystem IDs, and:

    BAR0   1 MiB of 32-bit memory: the registers below, at the BAR's base
    0x40   MSI capability (PCI Local Bus Specification 3.0, 6.8.1 "MSI Capability
           Structure"), the only one (Capabilities Pointer 0x40, Status bit 4):
           0x42 Message Control (Enable bit 0 and Multiple Message Enable 6:4
           writable; 64-bit address capable, one vector requested), 0x44 Message
           Address (bits 31:2), 0x48 Message Upper Address, 0x4C Message Data (16 bits)

Registers ("MMIO area spec"): offsets below 0x80 take only 4-byte accesses, the rest 4
or 8; any other access reads all ones and writes nothing (edu_mmio_read/write).

    0x00 RO  identification 0x010000ED (version 1.0)
    0x04 RW  liveness: reads the inverse (~) of what was last written
    0x08 RW  factorial: a write starts computing the factorial of the value (mod 2^32),
             unless one is being computed; the result replaces the value
    0x20 RW  status: bit 0 computing (RO), bit 7 raise interrupt 0x001 when a
             factorial is done
    0x24 RO  interrupt status
    0x60 WO  interrupt raise: ORed into the interrupt status
    0x64 WO  interrupt acknowledge: cleared from the interrupt status
    0x80 RW  DMA source, 0x88 DMA destination, 0x90 DMA count (64 bits each)
    0x98 RW  DMA command: bit 0 start, bit 1 direction (0: RAM to the device's buffer,
             1: buffer to RAM), bit 2 raise interrupt 0x100 when done

Time: the factorial and a DMA transfer complete within the register write that starts
them (QEMU runs the factorial on a thread and the DMA on a 100 ms timer; the document
asks drivers to poll the status and command registers, which then read "done" at the
first look). So "computing" and "start" always read 0 again.

DMA ("DMA controller"): the device's 4-KiB buffer sits at device address 0x40000; a
transfer moves `count` bytes between it and a bus address, which is masked to 28 bits
(QEMU's dma_mask default: "the device supports only 28 bits (256 MiB) by default") and
handed to the bus — on a q35 machine with an IOMMU, that is an IOVA (cpu/q35.py). The
device is a bus master only while the Command register's Bus Master bit is set. A
transfer whose buffer side falls outside 0x40000-0x40FFF, or with Bus Master clear, is
not modelled (QEMU logs the first and then copies outside its buffer) and raises
`EduUnsupported`. A transfer the bus refuses part of (an IOMMU fault) moves what the bus
accepted; the device does not notice (edu.c ignores pci_dma_read/write's result).

Interrupts ("IRQ controller"): the interrupt status is the device's interrupt. With MSI
disabled it is INTA#, a level: asserted while the status is non-zero and the Command
register's Interrupt Disable bit is clear (PCI 3.0 6.2.2 "Command Register"); Status
bit 3 shows the status is non-zero. With MSI enabled, INTA# is never asserted (PCI 3.0
6.8 "Message Signaled Interrupts") and every raise that leaves the status non-zero sends
one message: the 64-bit Message Address, and the Message Data as a 32-bit value with its
upper half 0 (6.8.3.3 "Sending Messages"), as edu_raise_irq calls msi_notify.

All mutable state is the configuration space and one `EduState` (checkpoints copy the
device whole).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cpu.devices.pci import (
    CAPABILITIES,
    COMMAND,
    COMMAND_INTX_DISABLE,
    COMMAND_MASTER,
    STATUS,
    STATUS_CAP_LIST,
    STATUS_INTERRUPT,
    MemoryBar,
    PciFunction,
)
from cpu.errors import Unsupported

VENDOR = 0x1234
DEVICE = 0x11E8
REVISION = 0x10
CLASS_CODE = 0x00FF00
BAR_SIZE = 1 << 20

MSI_CAP = 0x40
MSI_CAP_ID = 0x05
MSI_CONTROL = MSI_CAP + 2
MSI_ADDRESS_LO = MSI_CAP + 4
MSI_ADDRESS_HI = MSI_CAP + 8
MSI_DATA = MSI_CAP + 12
MSI_END = MSI_CAP + 16
MSI_ENABLE = 1 << 0
MSI_64BIT = 1 << 7
MSI_CONTROL_WRITABLE = MSI_ENABLE | 0x70  # Enable, Multiple Message Enable

REG_ID = 0x00
REG_ALIVE = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

ID_VALUE = 0x010000ED
STATUS_COMPUTING = 0x01
STATUS_IRQ_FACTORIAL = 0x80
FACTORIAL_IRQ = 0x001
DMA_IRQ = 0x100
DMA_START = 0x01
DMA_TO_RAM = 0x02
DMA_IRQ_WHEN_DONE = 0x04
BUFFER_BASE = 0x40000
BUFFER_SIZE = 4096
DMA_MASK = (1 << 28) - 1

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


class EduUnsupported(Unsupported):
    """An edu behaviour idtlab does not model; the message names it."""


class EduBus(Protocol):
    """What the device does to the machine: bus-master reads and writes at a bus
    address (they return how many bytes the bus accepted), its INTA# level, and MSI
    writes."""

    def dma_read(self, address: int, size: int) -> bytes: ...

    def dma_write(self, address: int, data: bytes) -> int: ...

    def intx(self, asserted: bool) -> None: ...

    def msi(self, address: int, data: int) -> None: ...


@dataclass
class EduState:
    """Everything the device's registers hold."""

    alive: int = 0            # what 0x04 reads (the inverse of the last write)
    factorial: int = 0
    status: int = 0
    irq_status: int = 0
    dma_src: int = 0
    dma_dst: int = 0
    dma_count: int = 0
    dma_cmd: int = 0
    buffer: bytearray = field(default_factory=lambda: bytearray(BUFFER_SIZE))
    intx: bool = False        # the INTA# level last driven


def factorial32(n: int) -> int:
    """n! mod 2^32, as edu_fact_thread computes it in a uint32_t."""
    result = 1
    for k in range(2, (n & U32) + 1):
        result = (result * k) & U32
        if result == 0:
            break  # 34! and up are multiples of 2^32
    return result


class Edu(PciFunction):
    """One edu device (see the module docstring); `bus` carries its DMA and
    interrupts."""

    def __init__(self, bus: EduBus, name: str = "edu") -> None:
        super().__init__(name, bars=(MemoryBar(0, BAR_SIZE),),
                         device_writable=(range(MSI_CONTROL, MSI_END),))
        self.identity(vendor=VENDOR, device=DEVICE, revision=REVISION, class_code=CLASS_CODE,
                      pin=1)
        self.put(STATUS, 2, STATUS_CAP_LIST)
        self.put(CAPABILITIES, 1, MSI_CAP)
        self.put(MSI_CAP, 1, MSI_CAP_ID)
        self.put(MSI_CONTROL, 2, MSI_64BIT)
        self._mask(self.wmask, MSI_CONTROL, 2, MSI_CONTROL_WRITABLE)
        self._mask(self.wmask, MSI_ADDRESS_LO, 4, 0xFFFFFFFC)
        self._mask(self.wmask, MSI_ADDRESS_HI, 4, U32)
        self._mask(self.wmask, MSI_DATA, 2, 0xFFFF)
        self.bus = bus
        self.edu = EduState()

    # ----- configuration space -------------------------------------------------------------

    @property
    def msi_enabled(self) -> bool:
        return bool(self.get(MSI_CONTROL, 2) & MSI_ENABLE)

    def config_written(self, offset: int, size: int) -> None:
        touched = range(offset, offset + size)
        if COMMAND + 1 in touched or MSI_CONTROL in touched:
            self._update_intx()  # Interrupt Disable or MSI Enable changed

    # ----- MMIO (BAR0) ---------------------------------------------------------------------

    def read(self, offset: int, size: int, now: int = 0) -> int:
        """A load of `size` bytes at `offset` in BAR0."""
        del now
        if not self._size_ok(offset, size):
            return (1 << (8 * size)) - 1
        s = self.edu
        value = {REG_ID: ID_VALUE, REG_ALIVE: s.alive, REG_FACTORIAL: s.factorial,
                 REG_STATUS: s.status, REG_IRQ_STATUS: s.irq_status, REG_DMA_SRC: s.dma_src,
                 REG_DMA_DST: s.dma_dst, REG_DMA_COUNT: s.dma_count,
                 REG_DMA_CMD: s.dma_cmd}.get(offset, U64)
        return value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int, now: int = 0) -> None:
        """A store of `size` bytes at `offset` in BAR0."""
        del now
        if not self._size_ok(offset, size):
            return
        s = self.edu
        value &= (1 << (8 * size)) - 1
        if offset == REG_ALIVE:
            s.alive = ~value & U32
        elif offset == REG_FACTORIAL:
            if not s.status & STATUS_COMPUTING:
                s.factorial = factorial32(value)
                if s.status & STATUS_IRQ_FACTORIAL:
                    self._raise(FACTORIAL_IRQ)
        elif offset == REG_STATUS:
            s.status = (s.status & ~STATUS_IRQ_FACTORIAL) | (value & STATUS_IRQ_FACTORIAL)
        elif offset == REG_IRQ_RAISE:
            self._raise(value & U32)
        elif offset == REG_IRQ_ACK:
            s.irq_status &= ~value
            self._update_intx()
        elif offset == REG_DMA_SRC:
            s.dma_src = value
        elif offset == REG_DMA_DST:
            s.dma_dst = value
        elif offset == REG_DMA_COUNT:
            s.dma_count = value
        elif offset == REG_DMA_CMD and value & DMA_START:
            s.dma_cmd = value
            self._dma()

    @staticmethod
    def _size_ok(offset: int, size: int) -> bool:
        return size == 4 if offset < 0x80 else size in (4, 8)

    # ----- DMA -----------------------------------------------------------------------------

    def _dma(self) -> None:
        s = self.edu
        to_ram = bool(s.dma_cmd & DMA_TO_RAM)
        inside, outside = (s.dma_src, s.dma_dst) if to_ram else (s.dma_dst, s.dma_src)
        count = s.dma_count
        if inside < BUFFER_BASE or inside + count > BUFFER_BASE + BUFFER_SIZE:
            raise EduUnsupported(f"edu: DMA of {count:#x} bytes at device address {inside:#x} "
                                 f"leaves the device's buffer ({BUFFER_BASE:#x}-"
                                 f"{BUFFER_BASE + BUFFER_SIZE - 1:#x})")
        if not self.command & COMMAND_MASTER:
            raise EduUnsupported("edu: DMA started with Bus Master clear in the Command "
                                 "register (the device may not master the bus)")
        at = inside - BUFFER_BASE
        address = outside & DMA_MASK
        if to_ram:
            self.bus.dma_write(address, bytes(s.buffer[at:at + count]))
        else:
            data = self.bus.dma_read(address, count)
            s.buffer[at:at + len(data)] = data
        s.dma_cmd &= ~DMA_START
        if s.dma_cmd & DMA_IRQ_WHEN_DONE:
            self._raise(DMA_IRQ)

    # ----- interrupts ----------------------------------------------------------------------

    def _raise(self, value: int) -> None:
        s = self.edu
        s.irq_status |= value
        if s.irq_status and self.msi_enabled:
            address = (self.get(MSI_ADDRESS_HI, 4) << 32) | self.get(MSI_ADDRESS_LO, 4)
            self.bus.msi(address, self.get(MSI_DATA, 2))
        self._update_intx()

    def _update_intx(self) -> None:
        """Drive INTA# and Status bit 3 from the interrupt status (see the module
        docstring)."""
        s = self.edu
        pending = s.irq_status != 0
        status = self.get(STATUS, 2)
        self.put(STATUS, 2, status | STATUS_INTERRUPT if pending else status & ~STATUS_INTERRUPT)
        level = pending and not self.msi_enabled and not self.command & COMMAND_INTX_DISABLE
        if level != s.intx:
            s.intx = level
            self.bus.intx(level)
