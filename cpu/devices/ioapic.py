"""The I/O APIC: an Intel 82093AA at 0xFEC00000, 24 inputs (Intel, "82093AA I/O Advanced
Programmable Interrupt Controller (IOAPIC)" datasheet, order number 290566-001, May 1996;
section titles below are its own). A standalone model: pure, deterministic, no engine.

What the guest sees
-------------------
Two 32-bit windows in a 4-KiB page ("Memory Mapped Registers for Accessing IOAPIC
Registers"): IOREGSEL at offset 0x00 selects a register by its 8-bit index, IOWIN at
offset 0x10 reads or writes the selected one. Behind them ("IOAPIC Registers"):

    0x00        IOAPICID   bits 27:24 the ID (R/W), everything else reads 0
    0x01        IOAPICVER  bits 7:0 the version (0x11), bits 23:16 the highest
                           redirection entry (23 for 24 inputs); read-only
    0x02        IOAPICARB  bits 27:24 the arbitration ID; read-only, and loaded with
                           the ID whenever IOAPICID is written
    0x10-0x3F   IOREDTBL   24 redirection entries of 64 bits, low half at 0x10 + 2n,
                           high half at 0x11 + 2n

A redirection entry ("I/O Redirection Table Registers"): vector 7:0, delivery mode 10:8,
destination mode 11, delivery status 12 (RO), input polarity 13, remote IRR 14 (RO),
trigger mode 15 (1 = level), mask 16, destination 63:56. Out of reset every entry is
masked and everything else is 0, as QEMU's ioapic_reset_common leaves it (the datasheet
gives only the mask bit).

The rules
---------
* An input pin is a level: `set_irq(pin, asserted)`. The pins carry the logical
  assertion, as QEMU's ISA bus does; the polarity bit describes the electrical wire
  this model does not have, so it is stored and read back but never applied.
* Edge-triggered entries send one interrupt message per rising edge of an unmasked
  pin. An edge on a masked pin is lost ("Interrupt Mask": "... edge-sensitive
  interrupts signaled on a masked interrupt pin are ignored (i.e., not delivered or
  held pending)"). A pin asserted again while already asserted is not an edge (QEMU's
  ioapic_set_irq treats every assertion as one; kvm-unit-tests toggles its lines).
* Level-triggered entries send a message while the pin is asserted, the entry unmasked
  and remote IRR clear, and set remote IRR ("Remote IRR": set when the local APIC
  accepts the level interrupt). An EOI for the entry's vector (`eoi`, the local APIC's
  EOI broadcast for a level-triggered vector) clears remote IRR; if the pin is still
  asserted and unmasked, the interrupt is sent again at once. So a level interrupt
  raised twice while in service is delivered once (coalesced), and one still asserted
  after its EOI is delivered again.
* Writing a redirection entry keeps the read-only delivery-status and remote-IRR bits,
  clears remote IRR when the entry is now edge-triggered (what Linux's
  __eoi_ioapic_pin relies on, and QEMU's ioapic_fix_edge_remote_irr and KVM's
  ioapic_write_indirect do), then re-evaluates every level input: an unmasked,
  asserted one with remote IRR clear is sent. That is how unmasking a pending level
  interrupt delivers it.
* Delivery is instant: the machine hands the message to the local APIC in the same
  step, so the delivery-status bit ("Delivery Status": 1 while the message waits for
  the bus or the APIC) always reads 0.
* Messages (`IoapicMessage`) carry vector, delivery mode, destination mode, destination
  and trigger mode as the entry says. What the receiving side does with a delivery mode
  or a destination (one CPU, APIC ID 0) is the machine's decision, not this model's.
  Inputs are scanned in pin order, so messages sent by one register write come out in
  that order.

Not modelled, raising `IoapicUnsupported`: IOWIN accesses other than aligned 32-bit
ones (the datasheet defines only dword access to IOWIN), IOWIN with a register index
the datasheet reserves, offsets other than IOREGSEL and IOWIN (QEMU aliases every 256
bytes; the version 0x20 EOI register at 0x40 does not exist in an 82093AA), and pins
outside 0-23.

All mutable state is in one `IoapicState` (checkpoints copy it whole).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from cpu.errors import Unsupported

IOAPIC_BASE = 0xFEC00000
IOAPIC_SIZE = 0x1000
PINS = 24

# "Memory Mapped Registers for Accessing IOAPIC Registers".
IOREGSEL = 0x00
IOWIN = 0x10

# "IOAPIC Registers" (indexes written to IOREGSEL).
REG_ID = 0x00
REG_VERSION = 0x01
REG_ARBITRATION = 0x02
REG_REDIRECTION = 0x10  # 0x10 + 2n: entry n, low half; 0x11 + 2n: high half

VERSION = 0x11
VERSION_VALUE = ((PINS - 1) << 16) | VERSION
ID_SHIFT = 24
ID_MASK = 0xF  # bits 27:24

# "I/O Redirection Table Registers".
RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE_SHIFT = 8
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_DEST_SHIFT = 56
RTE_READ_ONLY = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR
RTE_RESET = RTE_MASKED

DELIVERY_MODES = {0b000: "fixed", 0b001: "lowest priority", 0b010: "SMI", 0b011: "reserved",
                  0b100: "NMI", 0b101: "INIT", 0b110: "reserved", 0b111: "ExtINT"}

# The PC's ISA interrupt lines reach the IOAPIC one to one, except IRQ 0 (the PIT), which
# reaches input 2 (QEMU ioapic_set_irq; the MADT says so with an interrupt source
# override, cpu/devices/acpi.py).
ISA_IRQ0_GSI = 2


def isa_irq_to_pin(irq: int) -> int:
    """The IOAPIC input an ISA IRQ line drives on a PC."""
    return ISA_IRQ0_GSI if irq == 0 else irq


class IoapicUnsupported(Unsupported):
    """An IOAPIC access idtlab does not model; the message names it."""


@dataclass(frozen=True)
class IoapicMessage:
    """The interrupt message an entry sends (the 82093AA's APIC-bus message, or the
    system-bus MSI write later chipsets use)."""

    pin: int
    vector: int
    delivery_mode: int        # 3 bits, DELIVERY_MODES
    logical: bool             # destination mode
    destination: int          # 8 bits
    level: bool               # trigger mode

    @property
    def mode_name(self) -> str:
        return DELIVERY_MODES[self.delivery_mode]


@dataclass
class IoapicState:
    """Everything about the IOAPIC that changes."""

    id: int = 0               # 4 bits
    arbitration: int = 0      # 4 bits, loaded from `id` on every ID write
    ioregsel: int = 0         # 8 bits
    redirection: list[int] = field(default_factory=lambda: [RTE_RESET] * PINS)
    pins: int = 0             # bit n: input n asserted


def _ignore(message: IoapicMessage) -> None:
    del message


class Ioapic:
    """One 82093AA. `read`/`write` are the MMIO page (offset from IOAPIC_BASE);
    `set_irq` and `eoi` are the machine's side; `on_message` receives what it sends."""

    def __init__(self, *, ioapic_id: int = 0,
                 on_message: Callable[[IoapicMessage], None] = _ignore) -> None:
        if not 0 <= ioapic_id <= ID_MASK:
            raise ValueError(f"IOAPIC ID {ioapic_id:#x} does not fit bits 27:24")
        self.state = IoapicState(id=ioapic_id, arbitration=ioapic_id)
        self.on_message = on_message

    # ----- checkpoints -------------------------------------------------------------------

    def save(self) -> IoapicState:
        return copy.deepcopy(self.state)

    def restore(self, saved: IoapicState) -> None:
        self.state = copy.deepcopy(saved)

    # ----- MMIO --------------------------------------------------------------------------

    def read(self, offset: int, size: int, now: int = 0) -> int:
        """A load of `size` bytes at `offset` in the IOAPIC page. `now` (the machine's
        cycle) is unused: nothing in an IOAPIC depends on time."""
        del now
        if offset == IOREGSEL and size in (1, 2, 4):
            return self.state.ioregsel & ((1 << (8 * size)) - 1)
        self._check_window(offset, size, "read")
        return self._read_register(self.state.ioregsel)

    def write(self, offset: int, size: int, value: int, now: int = 0) -> None:
        """A store of `size` bytes at `offset` in the IOAPIC page."""
        del now
        if offset == IOREGSEL and size in (1, 2, 4):
            self.state.ioregsel = value & 0xFF  # bits 31:8 are reserved
            return
        self._check_window(offset, size, "write")
        self._write_register(self.state.ioregsel, value & 0xFFFFFFFF)

    def _check_window(self, offset: int, size: int, what: str) -> None:
        if offset == IOWIN and size == 4:
            return
        if offset == IOWIN:
            raise IoapicUnsupported(f"IOAPIC: {size}-byte {what} of IOWIN (only 32-bit accesses "
                                    "to IOWIN are defined)")
        if 0 <= offset < IOAPIC_SIZE:
            raise IoapicUnsupported(f"IOAPIC: {what} at offset {offset:#x} ({size} bytes): only "
                                    "IOREGSEL (0x00) and IOWIN (0x10) exist")
        raise ValueError(f"IOAPIC: offset {offset:#x} is outside the IOAPIC page")

    def _read_register(self, index: int) -> int:
        s = self.state
        if index == REG_ID:
            return s.id << ID_SHIFT
        if index == REG_VERSION:
            return VERSION_VALUE
        if index == REG_ARBITRATION:
            return s.arbitration << ID_SHIFT
        pin, high = self._entry(index, "read")
        entry = s.redirection[pin]
        return entry >> 32 if high else entry & 0xFFFFFFFF

    def _write_register(self, index: int, value: int) -> None:
        s = self.state
        if index == REG_ID:
            s.id = (value >> ID_SHIFT) & ID_MASK
            s.arbitration = s.id  # "IOAPICARB": loaded whenever IOAPICID is written
            return
        if index in (REG_VERSION, REG_ARBITRATION):
            return  # read-only
        pin, high = self._entry(index, "write")
        old = s.redirection[pin]
        new = (old & 0xFFFFFFFF) | (value << 32) if high else (old & ~0xFFFFFFFF) | value
        new = (new & ~RTE_READ_ONLY) | (old & RTE_READ_ONLY)
        if not new & RTE_LEVEL:
            new &= ~RTE_REMOTE_IRR  # edge-triggered: remote IRR is cleared
        s.redirection[pin] = new
        self._service()

    @staticmethod
    def _entry(index: int, what: str) -> tuple[int, bool]:
        if REG_REDIRECTION <= index < REG_REDIRECTION + 2 * PINS:
            return (index - REG_REDIRECTION) >> 1, bool(index & 1)
        raise IoapicUnsupported(f"IOAPIC: {what} of register {index:#04x} through IOWIN (reserved: "
                                "the registers are 0x00-0x02 and 0x10-0x3f)")

    # ----- the machine's side ------------------------------------------------------------

    def set_irq(self, pin: int, asserted: bool) -> None:
        """Input `pin` changes to `asserted` (or stays there)."""
        if not 0 <= pin < PINS:
            raise IoapicUnsupported(f"IOAPIC: input {pin} does not exist (inputs 0-{PINS - 1})")
        s = self.state
        bit = 1 << pin
        was = bool(s.pins & bit)
        s.pins = s.pins | bit if asserted else s.pins & ~bit
        entry = s.redirection[pin]
        if entry & RTE_LEVEL:
            if asserted:
                self._service()
        elif asserted and not was and not entry & RTE_MASKED:
            self._send(pin, entry)

    def eoi(self, vector: int) -> None:
        """The local APIC's EOI broadcast for a level-triggered `vector`: clear remote IRR
        of every level entry with that vector, and send again what is still asserted."""
        s = self.state
        for pin, entry in enumerate(s.redirection):
            if entry & RTE_LEVEL and entry & RTE_VECTOR == vector:
                s.redirection[pin] = entry & ~RTE_REMOTE_IRR
        self._service()

    def entry(self, pin: int) -> int:
        """Redirection entry `pin`, 64 bits, as IOWIN would read it."""
        return self.state.redirection[pin]

    def _service(self) -> None:
        """Send every level interrupt that is asserted, unmasked and not in service."""
        s = self.state
        for pin in range(PINS):
            entry = s.redirection[pin]
            if entry & RTE_LEVEL and s.pins >> pin & 1 and not entry & (RTE_MASKED | RTE_REMOTE_IRR):
                s.redirection[pin] = entry | RTE_REMOTE_IRR
                self._send(pin, entry)

    def _send(self, pin: int, entry: int) -> None:
        self.on_message(IoapicMessage(
            pin=pin, vector=entry & RTE_VECTOR,
            delivery_mode=(entry >> RTE_DELIVERY_MODE_SHIFT) & 0b111,
            logical=bool(entry & RTE_DEST_LOGICAL), destination=(entry >> RTE_DEST_SHIFT) & 0xFF,
            level=bool(entry & RTE_LEVEL)))
