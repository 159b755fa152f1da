"""The platform around the CPU: I/O ports and the devices behind them.

The devices test kernels use (cpu/devices/): a 16550 UART at 0x3F8 (its output is the
`serial` trace record, one per line), QEMU's fw_cfg at 0x510/0x511, pc-testdev's data
register (0xE0, 0xE8) and ISA interrupt lines (0x2000-0x2017), the 8259A pair at 0x20/0x21,
0xA0/0xA1 and its ELCR at 0x4D0/0x4D1 (cpu/devices/pic.py; its accesses are also traced
as `port` records, as they were before it was modelled), the I/O APIC and the HPET
(their registers are memory-mapped: cpu/mmio.py; their interrupts: cpu/interrupts.py),
and the ways a test
kernel ends its run — isa-debug-exit at 0xF4 (QEMU `-device isa-debug-exit`), Bochs'
"Shutdown" string on port 0x8900 — and pc-testdev's flush-page port 0xE4 (QEMU
hw/misc/pc-testdev.c), which drops the engine's translations and is an injection point.
A port with no device reads all ones, like an undriven ISA bus, and its accesses appear
in the trace as `port` records.

IN/OUT/INS/OUTS at CPL > IOPL consult the TSS's I/O permission bitmap first (`io_check`,
at their sites: the engine itself lets CPL 3 touch every port).

An exit ends the run exactly after the OUT that wrote it: an OUT to an exit port is a
site (cpu/sites.py), emulated at the boundary in both counting modes; a write that
reaches the port hook anyway (code not decoded at load) ends the run at the next
boundary the counter sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cpu.decode import decode_one, out_port, port_access
from cpu.devices.fwcfg import FW_CFG_PORT_DATA, FW_CFG_PORT_SEL, FwCfg
from cpu.devices.hpet import Hpet
from cpu.devices.ioapic import Ioapic
from cpu.devices.pic import Pic8259Pair
from cpu.devices.testdev import IRQ_LINE_PORT, IRQ_LINES, PcTestdev
from cpu.devices.testports import BOCHS_SHUTDOWN_PORT, FLUSH_PAGE_PORT, BochsShutdown
from cpu.devices.uart import Uart16550
from cpu.io_permission import io_permission
from cpu.outcomes import Outcome, Stop
from idt.state import RFLAGS_IOPL, ArchFault
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine


class PortDevice(Protocol):
    """A board's I/O-port device: None / False for a port it does not answer."""

    def port_in(self, port: int, size: int) -> int | None: ...

    def port_out(self, port: int, size: int, value: int) -> bool: ...

EXIT_PORT = 0xF4
SERIAL_PORT = 0x3F8
SHUTDOWN_DETAIL = 'Bochs shutdown port 0x8900: "Shutdown"'


@dataclass
class PlatformState:
    """The devices' state and what the guest asked of the exit ports."""

    uart: Uart16550
    fwcfg: FwCfg
    testdev: PcTestdev
    ioapic: Ioapic | None  # with the local APIC only
    hpet: Hpet | None
    pic: Pic8259Pair
    bochs_shutdown: BochsShutdown = field(default_factory=BochsShutdown)
    exit_code: int | None = None  # written to the exit port, not yet acted on
    shutdown_requested: bool = False  # Bochs' "Shutdown" completed
    unsupported: str | None = None  # a port device met what it does not model (ends the run)


class Platform:
    """Port reads and writes, and the exit devices."""

    # Append-only, checkpointed by length like the trace (cpu/snapshot.py).
    LOGS = frozenset({"serial"})

    def __init__(self, m: Machine, memory: int, *, apic: bool) -> None:
        self.m = m
        w = m.wires
        self.state = PlatformState(
            uart=Uart16550(SERIAL_PORT, on_byte=self.serial_byte), fwcfg=FwCfg(ram_size=memory),
            testdev=PcTestdev(on_irq_line=w.isa_line, iomem=m.ioram),
            ioapic=Ioapic(on_message=w.ioapic_message) if apic else None,
            hpet=Hpet(cpu_mhz=m.profile.frequency_mhz, on_irq=w.ioapic_input) if apic else None,
            pic=Pic8259Pair(on_intr=w.pic_intr))
        self.serial = bytearray()  # what the UART transmitted (checkpointed by length)
        self.on_serial_line: list[Callable[[str], None]] = []  # each completed line
        # Port devices of the board (cpu/q35.py: PCI configuration): port_in returns None,
        # port_out False, for a port that is not theirs.
        self.port_devices: list[PortDevice] = []

    def port_in(self, port: int, size: int) -> int:
        st = self.state
        if st.uart.handles(port):
            # A 16550's registers are bytes: a wider access reads consecutive ones.
            return sum((st.uart.read(port + i) if st.uart.handles(port + i) else 0xFF) << 8 * i
                       for i in range(size))
        if port == FW_CFG_PORT_DATA and size == 1:
            return st.fwcfg.read_data()
        if st.testdev.handles_port(port):
            return st.testdev.port_read(port, size)
        for device in self.port_devices:
            value = device.port_in(port, size)
            if value is not None:
                return value
        if st.pic.handles_port(port):
            self.m.emit("port", direction="in", port=port, size=size)
            return st.pic.port_read(port, size)
        # No device: all ones, like an undriven ISA bus.
        self.m.emit("port", direction="in", port=port, size=size)
        return (1 << (8 * size)) - 1

    def port_out(self, port: int, size: int, value: int) -> None:
        st = self.state
        if st.uart.handles(port):
            for i in range(size):
                if st.uart.handles(port + i):
                    st.uart.write(port + i, value >> 8 * i)
        elif port == FW_CFG_PORT_SEL and size == 2:
            st.fwcfg.select(value)
        elif port == FLUSH_PAGE_PORT:
            self.flush_page(value, in_hook=True)
        elif st.testdev.handles_port(port):
            st.testdev.port_write(port, size, value)
        elif port == BOCHS_SHUTDOWN_PORT and size == 1:
            if st.bochs_shutdown.write(value):
                # Ends the run at the next boundary (exactly after the OUT when the OUT was
                # decoded at load: exit_write).
                st.shutdown_requested = True
                self.m.boundary.request_boundary()
        elif st.pic.handles_port(port):
            self.m.emit("port", direction="out", port=port, size=size, value=value)
            st.pic.port_write(port, size, value)
        elif port == EXIT_PORT:
            # Ends the run at the boundary after the OUT (the counter stops there exactly).
            st.exit_code = value
            self.m.boundary.request_boundary()
        elif not any(device.port_out(port, size, value) for device in self.port_devices):
            self.m.emit("port", direction="out", port=port, size=size, value=value)

    def serial_byte(self, byte: int) -> None:
        """A byte the UART transmitted."""
        self.serial.append(byte)
        if byte == 0x0A:
            # One record per line, so the output appears in the timeline where it was
            # written.
            start = self.serial.rfind(b"\n", 0, len(self.serial) - 1) + 1
            text = self.serial[start:-1].decode("latin-1")
            self.m.emit("serial", text=text)
            for cb in self.on_serial_line:
                cb(text)

    def flush_page(self, address: int, *, in_hook: bool) -> None:
        """pc-testdev's flush-page port: drop the engine's translations, so the next
        access to the page goes through the TLB-fill hook and guest paging again; then
        the `at_port = "flush_page"` injections of this write arrive (pending at the
        boundary right after the OUT)."""
        m = self.m
        m.engine.flush_tlb()
        due = m.injections.port_written("flush_page", address)
        if due and in_hook:
            m.boundary.request_boundary()

    def device_unsupported(self, reason: str) -> None:
        """A port device met an access it does not model (inside the engine's port hook):
        the engine stops as soon as it can — Unicorn's emu_stop from an I/O hook may let
        the next instruction of the translation block run — and the run ends with
        `unsupported` naming the access (through `check_exit`, which the 32-bit phase
        also calls after every engine run)."""
        self.state.unsupported = reason
        self.m.stops.pending = self.check_exit
        self.m.engine.stop()

    def check_exit(self) -> None:
        """At a boundary the counter stopped at: end the run if the guest asked to (or a
        port device could not go on)."""
        st = self.state
        if st.unsupported is not None:
            reason, st.unsupported = st.unsupported, None
            raise Stop(Outcome.UNSUPPORTED, reason, self.m.engine.read_reg("rip"))
        if st.exit_code is not None:
            code, st.exit_code = st.exit_code, None
            rip = self.m.engine.read_reg("rip")
            raise Stop(Outcome.EXIT, f"exit device: {code:#x}", rip, exit_code=code)
        if st.shutdown_requested:
            raise Stop(Outcome.EXIT, SHUTDOWN_DETAIL, self.m.engine.read_reg("rip"))

    def io_check(self, address: int) -> bool:
        """At an IN/OUT/INS/OUTS site, before it runs: the I/O permission check (SDM
        Vol. 1 "I/O Permission Bit Map"; cpu/io_permission.py). At CPL <= IOPL every port
        is allowed; otherwise the TSS's bitmap decides, read at TR.base as the processor
        reads it (supervisor accesses through guest paging). Denied: the instruction
        does nothing (an IN leaves RAX alone) and raises #GP(0) — returns True, with
        the #GP pending; allowed: False (it runs natively and reaches the port hooks)."""
        m = self.m
        cpl = m.regs.state.cpl
        if cpl == 0:
            return False
        iopl = (m.engine.read_reg("rflags") & RFLAGS_IOPL) >> 12
        if cpl <= iopl:
            return False
        insn = decode_one(m.stops.insn_bytes(address) or b"", address)
        if insn is None:
            return False
        port, size = port_access(insn)
        if port is None:
            port = m.engine.read_reg("rdx") & 0xFFFF
        _sel, base, limit = m.regs.table("tr")
        try:
            check = io_permission(cpl=cpl, iopl=iopl, port=port, size=size, tss_limit=limit,
                                  read_tss=lambda offset, n: m.sysmem.read(base + offset, n))
        except ArchFault as fault:
            failed = fault  # reading the TSS faulted (#PF, ...): that fault, at the instruction
            m.stops.pending = lambda: m.stops.fault_at(address, failed)
            return True
        if check.allowed:
            return False
        m.stops.pending = lambda: m.stops.fault_at(
            address, ArchFault(Vector.GP, 0, why=f"{insn.text}: {check.why}"))
        return True

    def exit_write(self, address: int) -> bool:
        """An OUT about to write the exit port, the last byte of Bochs' "Shutdown", the
        flush-page port while injections wait for it, or a pc-testdev interrupt line:
        emulate it and end the run (or fire the injections, or take the interrupt) right
        after it (exact in both counting modes; the port hook alone
        would stop only at the next block boundary in fast mode). Returns False for other
        ports (the instruction then runs natively and reaches the port hook)."""
        m = self.m
        insn = decode_one(m.code_bytes(address, 2) or b"", address)
        if insn is None or insn.mnemonic != "out":
            return False
        port = out_port(insn.op_str)
        if port is None:
            port = m.engine.read_reg("rdx") & 0xFFFF
        irq_line = IRQ_LINE_PORT <= port < IRQ_LINE_PORT + IRQ_LINES
        if port not in (EXIT_PORT, BOCHS_SHUTDOWN_PORT, FLUSH_PAGE_PORT) and not irq_line:
            return False
        width = {"al": 1, "ax": 2, "eax": 4}.get(insn.op_str.split(",")[-1].strip(), 1)
        value = m.engine.read_reg("rax") & ((1 << (8 * width)) - 1)
        after = address + insn.size
        if port == BOCHS_SHUTDOWN_PORT and width == 1 and self.state.bochs_shutdown.completes(value):
            def shutdown() -> None:
                self.state.bochs_shutdown.write(value)
                m.engine.write({"rip": after})  # the OUT retires
                raise Stop(Outcome.EXIT, SHUTDOWN_DETAIL, after)

            m.stops.pending = shutdown
            return True
        if irq_line:
            # pc-testdev's interrupt lines: the interrupt an OUT raises is taken at the
            # boundary right after it (what the guest tests: an edge, then `nop`).
            def line() -> None:
                m.engine.write({"rip": after})
                self.port_out(port, width, value)

            m.stops.pending = line
            return True
        if port == FLUSH_PAGE_PORT and m.injections.waits_for_port("flush_page"):
            def flush() -> None:
                rflags = m.engine.read_reg("rflags")
                m.engine.write({"rip": after})  # the OUT retires, then the flush happens
                self.flush_page(value, in_hook=False)
                m.emulated.single_step(rflags)

            m.stops.pending = flush
            return True
        if port != EXIT_PORT:
            return False

        def stop() -> None:
            # The OUT retires (it was counted when the engine stopped before it).
            m.engine.write({"rip": after})
            raise Stop(Outcome.EXIT, f"exit device: {value:#x}", after, exit_code=value)

        m.stops.pending = stop
        return True
