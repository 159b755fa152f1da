"""The q35 machine's PCI side, wired into the machine: the configuration ports, the
devices' memory ranges, DMA through the IOMMU, and interrupts through the IOMMU to the
local APIC (cpu/board.py says when a machine has it).

What is where (as QEMU's q35 with kvm-unit-tests' command line has it)
---------------------------------------------------------------------
* PCI configuration mechanism #1 at 0xCF8-0xCFF, bus 0 (cpu/devices/pci.py): the host
  bridge at 00:00.0 and, with `--device edu`, the edu device at 00:02.0 — the slot QEMU
  gives it on kvm-unit-tests' command line, where pci-testdev (not modelled) takes
  00:01.0. Its requester ID (source-id) is therefore 0x0010.
* The state firmware leaves (SeaBIOS src/fw/pciinit.c, which kvm-unit-tests relies on:
  it reads BARs and the interrupt line, it does not assign them): every function's
  Command register with I/O Space, Memory Space and SERR# Enable set
  (pci_bios_init_device); edu's BAR0 at 0xFEA00000, where SeaBIOS puts the first
  1-MiB BAR below its 0xFEC00000 limit; edu's Interrupt Line 11.
* The VT-d unit's registers at 0xFED90000 (cpu/devices/vtd.py), and edu's BAR0 wherever
  the guest programs it while Memory Space is set: both are device pages
  (cpu/mmio.py).

Interrupt routing
-----------------
edu's INTA# (slot 2) is PIRQC# on the ICH9 (QEMU ich9_cc_init: slot + pin rotates over
PIRQA-D; SeaBIOS mch_pci_slot_get_irq agrees), which QEMU drives onto two I/O APIC
inputs: 18 (PIRQC#'s fixed input, 16 + 2) and 11, the ISA IRQ SeaBIOS routed PIRQC#
to (QEMU ich9_lpc_set_irq: the ISA IRQ goes to the 8259 and to the I/O APIC input of
the same number). kvm-unit-tests programs the I/O APIC entry named by the Interrupt
Line (11), which works on QEMU only because of that second path; idtlab drives both
inputs as QEMU does (docs/sdm-map.md).

Every interrupt request — an I/O APIC entry's message, an MSI — reaches the IOMMU
first when there is one: it passes unchanged, is remapped, or is blocked (a fault)
(cpu/devices/vtd.py). An I/O APIC entry is the request it would put on the bus: address
0xFEE00000 with the entry's bits 63:48 in address bits 19:4 and its destination mode in
bit 2, data with the vector, delivery mode and trigger mode (the VT-d specification's
"Programming in Remappable Format" for I/OxAPIC; QEMU ioapic_entry_parse). Such a
request carries no source-id: QEMU's ioapic_service writes it without a requester ID,
so the IOMMU does not validate it (vtd_mem_ir_write; on hardware it carries the I/O
APIC's source-id from the ACPI DMAR device scope, FF:00.0, which idtlab's DMAR table
declares too and its fault records show). What passes or is remapped goes to
the local APIC as an interrupt message (cpu/interrupts.py `Wires.message`). The
unit's own fault and invalidation events are compatibility-format messages, never
remapped.

A DMA request goes through the IOMMU page by page (or as it is, without one or with
translation off), to guest RAM; a piece outside RAM is not modelled (`unsupported`).
The written pages are marked for checkpoints like every other write from Python; DMA
into code the engine has already translated is not seen by that code (as any write
from Python, cpu/memory.py).

Every configuration write, DMA transfer and IOMMU event is a trace record
(`pci_write`, `dma`, `vtd_command`, `vtd_invalidate`, `vtd_fault`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpu.board import BoardConfig
from cpu.devices.edu import Edu, EduUnsupported
from cpu.devices.ioapic import IoapicMessage
from cpu.devices.pci import (
    BAR0,
    COMMAND,
    COMMAND_IO,
    COMMAND_MEMORY,
    COMMAND_SERR,
    INTERRUPT_LINE,
    HostBridge,
    PciBus,
    PciFunction,
    PciUnsupported,
    devfn,
)
from cpu.devices.vtd import VTD_BASE, IntelIommu, Passed
from cpu.errors import Unsupported

if TYPE_CHECKING:
    from cpu.machine import Machine
    from cpu.mmio import MmioDevice

# The I/O APIC's source-id as the DMAR table's device scope names it (bus 0xFF, 00.0:
# QEMU's Q35_PSEUDO_BUS_PLATFORM, Q35_PSEUDO_DEVFN_IOAPIC; cpu/devices/acpi.py): what a
# fault record of its requests shows. Such requests are not validated (module docstring).
IOAPIC_SOURCE_ID = 0xFF00
EDU_DEVFN = devfn(2)
EDU_SOURCE_ID = EDU_DEVFN            # bus 0
EDU_BAR0 = 0xFEA00000
EDU_INTERRUPT_LINE = 11
EDU_IOAPIC_INPUTS = (EDU_INTERRUPT_LINE, 18)   # the ISA route and PIRQC#'s input
FIRMWARE_COMMAND = COMMAND_IO | COMMAND_MEMORY | COMMAND_SERR
INTERRUPT_RANGE = 0xFEE                         # address bits 31:20 of an interrupt request


@dataclass
class Q35State:
    """The PCI bus and its devices (each keeps its own state; checkpoints copy them)."""

    bus: PciBus
    iommu: IntelIommu | None
    edu: Edu | None


class Q35:
    """The q35 wiring of one machine (see the module docstring); `state` is None on a
    pc machine, which then has none of it."""

    def __init__(self, m: Machine, board: BoardConfig) -> None:
        self.m = m
        self.board = board
        self.state: Q35State | None = None
        if not board.pci:
            return
        functions: dict[int, PciFunction] = {devfn(0): HostBridge()}
        edu = Edu(self) if board.edu else None
        if edu is not None:
            functions[EDU_DEVFN] = edu
            edu.write_config(BAR0, 4, EDU_BAR0)
            edu.write_config(INTERRUPT_LINE, 1, EDU_INTERRUPT_LINE)
        for function in functions.values():
            function.write_config(COMMAND, 2, FIRMWARE_COMMAND)
        st = self.state = Q35State(PciBus(functions), IntelIommu(self) if board.iommu else None,
                                   edu)
        m.state.q35 = st
        m.platform.port_devices.append(self)
        m.mmio.windows.append(self.window)
        if st.iommu is not None:
            m.symbols["vtd"] = VTD_BASE
            m.mmio.add(VTD_BASE, "vtd", lambda: st.iommu)
            m.wires.ioapic_remap = self.ioapic_remap

    # ----- configuration ports (cpu/platform.py) ---------------------------------------------

    def port_in(self, port: int, size: int) -> int | None:
        st = self.state
        if st is None or not st.bus.handles(port):
            return None
        try:
            return st.bus.port_in(port, size)
        except PciUnsupported as exc:
            self.m.platform.device_unsupported(str(exc))
            return (1 << (8 * size)) - 1

    def port_out(self, port: int, size: int, value: int) -> bool:
        st = self.state
        if st is None or not st.bus.handles(port):
            return False
        target = st.bus.selected() if port >= 0xCFC else None
        try:
            done = st.bus.port_out(port, size, value)
        except PciUnsupported as exc:
            self.m.platform.device_unsupported(str(exc))
            return True
        if done and target is not None:
            dfn, offset = target
            self.m.emit("pci_write", device=f"00:{dfn >> 3:02x}.{dfn & 7}",
                        offset=offset | (port - 0xCFC), size=size, value=value)
        return done

    # ----- memory ranges (cpu/mmio.py) -------------------------------------------------------

    def window(self, page: int) -> tuple[str, MmioDevice, int] | None:
        """The PCI device whose BAR decodes physical page `page`: its record name, the
        device and the BAR's base."""
        st = self.state
        if st is None:
            return None
        hit = st.bus.decode(page)
        if hit is None or not isinstance(hit[0], Edu):
            return None
        return "edu", hit[0], hit[2]

    # ----- the devices' side (cpu/devices/edu.py EduBus) --------------------------------------

    def _pieces(self, address: int, size: int, *, write: bool) -> list[tuple[int, int]]:
        st = self.state
        assert st is not None
        if st.iommu is None:
            pieces = [(address, size)]
        else:
            pieces = st.iommu.dma(EDU_SOURCE_ID, address, size, write=write)
        for at, n in pieces:
            if not self.m.phys.contains(at, n):
                raise EduUnsupported(f"edu: DMA {'write' if write else 'read'} of {n} bytes at "
                                     f"{at:#x} (bus address {address:#x}): outside RAM")
        return pieces

    def dma_read(self, address: int, size: int) -> bytes:
        pieces = self._pieces(address, size, write=False)
        data = b"".join(self.m.phys.read(at, n) for at, n in pieces)
        self.m.emit("dma", device="edu", direction="read", address=address, size=size,
                    done=len(data), memory=[at for at, _ in pieces])
        return data

    def dma_write(self, address: int, data: bytes) -> int:
        pieces = self._pieces(address, len(data), write=True)
        done = 0
        for at, n in pieces:
            self.m.phys.write(at, data[done:done + n])
            done += n
        self.m.emit("dma", device="edu", direction="write", address=address, size=len(data),
                    done=done, memory=[at for at, _ in pieces])
        return done

    def intx(self, asserted: bool) -> None:
        ioapic = self.m.state.platform.ioapic
        self.m.emit("pci_intx", device="edu", asserted=asserted)
        if ioapic is not None:
            for pin in EDU_IOAPIC_INPUTS:
                ioapic.set_irq(pin, asserted)

    def msi(self, address: int, data: int) -> None:
        self.interrupt_request(address, data, EDU_SOURCE_ID, source="msi", device="edu")

    # ----- interrupt requests ----------------------------------------------------------------

    def interrupt_request(self, address: int, data: int, source_id: int, *, source: str,
                          **where: Any) -> None:
        """A write of `data` to `address` meant as an interrupt: through the IOMMU (if
        any) to the local APIC."""
        if address >> 20 != INTERRUPT_RANGE:
            raise Unsupported(f"{source}: write of {data:#x} to {address:#x}, outside the "
                              "interrupt address range 0xfee00000-0xfeefffff (a DMA write, "
                              "not modelled)")
        st = self.state
        assert st is not None
        result = st.iommu.interrupt(address, data, source_id) if st.iommu is not None else \
            Passed(address, data)
        if result is None:
            return  # blocked: the fault is recorded
        if isinstance(result, Passed):
            self.compatible(result.address, result.data, source=source, **where)
            return
        self.m.wires.message(result.vector, result.delivery_mode, result.logical,
                             result.destination, result.level, source=source, **where,
                             irte=result.index)

    def compatible(self, address: int, data: int, *, source: str, **where: Any) -> None:
        """A compatibility-format interrupt message (SDM Vol. 3A "Message Signalled
        Interrupts": address bits 19:12 destination, bit 2 destination mode; data bits
        7:0 vector, 10:8 delivery mode, 15 trigger mode)."""
        self.m.wires.message(data & 0xFF, data >> 8 & 7, bool(address >> 2 & 1),
                             address >> 12 & 0xFF, bool(data >> 15 & 1), source=source, **where)

    def ioapic_remap(self, msg: IoapicMessage) -> bool:
        """An I/O APIC message, seen by the IOMMU first: True when remapped or blocked
        here, False when it passes as the I/O APIC sent it."""
        st = self.state
        ioapic = self.m.state.platform.ioapic
        assert st is not None and st.iommu is not None and ioapic is not None
        entry = ioapic.entry(msg.pin)
        address = INTERRUPT_RANGE << 20 | (entry >> 48 & 0xFFFF) << 4 | (entry >> 11 & 1) << 2
        data = (entry & 0xFF) | (entry >> 8 & 7) << 8 | (entry >> 15 & 1) << 15
        result = st.iommu.interrupt(address, data, IOAPIC_SOURCE_ID, validate=False)
        if isinstance(result, Passed):
            return False
        if result is not None:
            self.m.wires.message(result.vector, result.delivery_mode, result.logical,
                                 result.destination, result.level, source="ioapic", pin=msg.pin,
                                 irte=result.index)
        return True

    # ----- the IOMMU's side (cpu/devices/vtd.py VtdHost) -------------------------------------

    def read_memory(self, address: int, size: int) -> bytes | None:
        phys = self.m.phys
        return phys.read(address, size) if phys.contains(address, size) else None

    def write_memory(self, address: int, data: bytes) -> bool:
        if not self.m.phys.contains(address, len(data)):
            return False
        self.m.phys.write(address, data)
        return True

    def event_message(self, kind: str, address: int, data: int) -> None:
        if address >> 20 != INTERRUPT_RANGE:
            raise Unsupported(f"VT-d {kind} event message to {address:#x}, outside the interrupt "
                              "address range 0xfee00000-0xfeefffff")
        self.compatible(address, data, source=f"vtd_{kind}")

    def record(self, kind: str, **fields: Any) -> None:
        self.m.emit(kind, **fields)
