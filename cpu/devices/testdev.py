"""QEMU's pc-testdev (`-device pc-testdev`), the ISA test device kvm-unit-tests' x86
runner always adds: its data ports, its interrupt-line ports and its 64-KiB memory
window (QEMU hw/misc/pc-testdev.c; function names below are that file's). A standalone
model: pure, deterministic, no engine.

What the guest sees (testdev_realizefn)
---------------------------------------
    I/O 0xE0-0xE3      a 32-bit data register, byte lanes by port (test_ioport_read/
                       test_ioport_write): an access of N bytes at port 0xE0 + k reads or
                       writes bytes k..k+N-1 of it; bytes past lane 3 are dropped, as
                       QEMU's 32-bit arithmetic drops them
    I/O 0xE4           flush page (test_flush_page_write): handled by the machine
                       (cpu/devices/testports.py FLUSH_PAGE_PORT), not here
    I/O 0xE8-0xEB      the same data register through byte-wide accesses
                       (test_ioport_byte_ops: a wider access is split into bytes, which
                       gives the same result inside the four ports)
    I/O 0x2000-0x2017  interrupt lines (test_irq_line_write): a byte write sets ISA IRQ
                       line (port - 0x2000) to (value != 0); reads return 0
                       (test_irq_line_read). kvm-unit-tests' set_irq_line() drives the
                       IOAPIC this way (lib/x86/apic.c, x86/ioapic.c)
    MMIO 0xFF000000    IORAM: 64 KiB that read back what was written (test_iomem_read/
         +0x10000      test_iomem_write), little-endian at any size and alignment;
                       kvm-unit-tests maps it to test instructions against MMIO
                       (x86/emulator.c: MOV, CMPS, SCAS, BT*, SSE ...; x86/lam.c)

The interrupt lines are ISA lines; `on_irq_line(line, asserted)` receives them and the
machine routes them as the PC does: IRQ 0-15 to the 8259A pair (cpu/devices/pic.py) and
every line to the I/O APIC (cpu/devices/ioapic.py isa_irq_to_pin: IRQ 0 to IOAPIC input
2, the others one to one).

An interrupt-line access wider than a byte is split into byte accesses at consecutive
ports (a 32-bit write of 1 to 0x200B raises line 11 and lowers lines 12-14): QEMU's
test_irq_ops accept only bytes (`valid.max_access_size = 1`), and the port exit of a KVM
guest goes through `address_space_rw`, whose `memory_access_size` cuts an access to that
size. QEMU's TCG `helper_outl` dispatches the 4-byte access as one and the region refuses
it (the write is dropped: measured with QEMU 7.2, the slave 8259A's IRR stays 0 after an
`outl` of 1 to 0x200B and reads 0x08 after an `outb`). kvm-unit-tests' realmode.flat
raises IRQ 11 with `outl`; docs/kvm-unit-tests.md tells what each does with it. Bytes
past line 23 are dropped (no region there).

Not modelled, raising `PcTestdevUnsupported`: IORAM accesses that run past the end of
the window.

All mutable state is in one `PcTestdevState` (checkpoints copy it whole), except IORAM's
contents: IORAM has no side effects, so the machine maps it into the engine as ordinary
memory (`cpu.memory.PhysicalMemory`, given as `iomem`) instead of emulating each access, and
checkpoints revert it page by page as they do RAM. `save`/`restore` copy it for a device
used on its own, into the same buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from cpu.errors import Unsupported
from cpu.memory import PhysicalMemory

IORAM_BASE = 0xFF000000
IORAM_SIZE = 0x10000
DATA_PORT = 0xE0           # 0xE0-0xE3
DATA_BYTE_PORT = 0xE8      # 0xE8-0xEB
IRQ_LINE_PORT = 0x2000     # 0x2000-0x2017
IRQ_LINES = 24
_U32 = 0xFFFFFFFF


class PcTestdevUnsupported(Unsupported):
    """A pc-testdev access idtlab does not model; the message names it."""


@dataclass
class PcTestdevState:
    """Everything about the test device that changes."""

    ioport_data: int = 0                      # the 32-bit data register
    irq_lines: int = 0                        # bit n: ISA line n asserted (last written)


@dataclass(frozen=True)
class PcTestdevSaved:
    """`PcTestdev.save`: the state and a copy of IORAM."""

    state: PcTestdevState
    iomem: bytes


def _no_line(line: int, asserted: bool) -> None:
    del line, asserted


class PcTestdev:
    """pc-testdev. `read`/`write` are IORAM (offset from IORAM_BASE); `port_read`,
    `port_write` and `handles_port` are its I/O ports; `on_irq_line` receives the lines."""

    def __init__(self, *, on_irq_line: Callable[[int, bool], None] = _no_line,
                 iomem: PhysicalMemory | None = None) -> None:
        if iomem is not None and iomem.size != IORAM_SIZE:
            raise ValueError(f"pc-testdev: IORAM is {IORAM_SIZE:#x} bytes, not {iomem.size:#x}")
        self.state = PcTestdevState()
        self.iomem = iomem if iomem is not None else PhysicalMemory(IORAM_SIZE)
        self.on_irq_line = on_irq_line

    # ----- checkpoints -------------------------------------------------------------------

    def save(self) -> PcTestdevSaved:
        return PcTestdevSaved(replace(self.state), self.iomem.read(0, IORAM_SIZE))

    def restore(self, saved: PcTestdevSaved) -> None:
        self.state = replace(saved.state)
        self.iomem.write(0, saved.iomem)  # in place: the buffer is mapped into the engine

    # ----- IORAM -------------------------------------------------------------------------

    def read(self, offset: int, size: int, now: int = 0) -> int:
        """A load of `size` bytes at `offset` in IORAM, little-endian. `now` is unused."""
        del now
        self._check(offset, size, "read")
        return self.iomem.read_uint(offset, size)

    def write(self, offset: int, size: int, value: int, now: int = 0) -> None:
        """A store of `size` bytes at `offset` in IORAM."""
        del now
        self._check(offset, size, "write")
        self.iomem.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    @staticmethod
    def _check(offset: int, size: int, what: str) -> None:
        if size < 1 or offset < 0:
            raise ValueError(f"pc-testdev: {what} of {size} bytes at IORAM offset {offset:#x}")
        if offset + size > IORAM_SIZE:
            raise PcTestdevUnsupported(f"pc-testdev: {size}-byte {what} at IORAM offset {offset:#x} "
                                     f"runs past the end of the {IORAM_SIZE // 1024}-KiB window")

    # ----- I/O ports ---------------------------------------------------------------------

    @staticmethod
    def handles_port(port: int) -> bool:
        """The ports this model answers (0xE4, flush page, is the machine's)."""
        return (DATA_PORT <= port < DATA_PORT + 4 or DATA_BYTE_PORT <= port < DATA_BYTE_PORT + 4
                or IRQ_LINE_PORT <= port < IRQ_LINE_PORT + IRQ_LINES)

    def port_read(self, port: int, size: int) -> int:
        if IRQ_LINE_PORT <= port < IRQ_LINE_PORT + IRQ_LINES:
            return 0  # test_irq_line_read, for every byte
        lane = self._lane(port)
        mask = (((1 << (8 * size)) - 1) << (8 * lane)) & _U32
        return (self.state.ioport_data & mask) >> (8 * lane)

    def port_write(self, port: int, size: int, value: int) -> None:
        if IRQ_LINE_PORT <= port < IRQ_LINE_PORT + IRQ_LINES:
            for i in range(size):  # one byte per line (see the module docstring)
                line, asserted = port + i - IRQ_LINE_PORT, bool((value >> (8 * i)) & 0xFF)
                if line >= IRQ_LINES:
                    break
                bit = 1 << line
                self.state.irq_lines = self.state.irq_lines | bit if asserted else \
                    self.state.irq_lines & ~bit
                self.on_irq_line(line, asserted)
            return
        lane = self._lane(port)
        mask = (((1 << (8 * size)) - 1) << (8 * lane)) & _U32
        s = self.state
        s.ioport_data = (s.ioport_data & ~mask | (value << (8 * lane)) & mask) & _U32

    @staticmethod
    def _lane(port: int) -> int:
        if DATA_PORT <= port < DATA_PORT + 4:
            return port - DATA_PORT
        if DATA_BYTE_PORT <= port < DATA_BYTE_PORT + 4:
            return port - DATA_BYTE_PORT
        raise ValueError(f"pc-testdev: port {port:#x} is not one of its ports")
