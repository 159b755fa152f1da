"""The wires into the CPU's interrupt inputs, and between the interrupt controllers.

A PC routes device interrupts through the I/O APIC to the local APIC ("Advanced
Programmable Interrupt Controller", SDM Vol. 3A; the 82093AA datasheet): an ISA line
(pc-testdev's IRQ ports, the HPET's timers) drives an IOAPIC input, the IOAPIC sends a
message for its redirection entry, the local APIC accepts it into the IRR (with the TMR
bit set for a level-triggered one), and the EOI of a level-triggered vector is broadcast
back to the IOAPIC, which clears Remote IRR and sends again what is still asserted. The
local APIC's own NMI (LINT1, an ICR self-NMI) and the IOAPIC's NMI messages go to the
CPU's NMI input (cpu/boundary.py). Every arrival is a trace record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cpu.devices.apic import LVT_MASKED, REG_LVT_LINT0
from cpu.devices.ioapic import DELIVERY_MODES, IoapicMessage, IoapicUnsupported, isa_irq_to_pin
from cpu.outcomes import Outcome, Stop

if TYPE_CHECKING:
    from cpu.machine import Machine

_BROADCAST = 0xFF
_FIXED, _LOWEST, _NMI, _EXTINT = 0b000, 0b001, 0b100, 0b111


class Wires:
    """The connections between the devices, the APICs and the CPU."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        # A q35 machine with an IOMMU sees the I/O APIC's messages first (cpu/q35.py):
        # returns True when it took the message (remapped or blocked it).
        self.ioapic_remap: Callable[[IoapicMessage], bool] | None = None

    # -- the local APIC ----------------------------------------------------------------
    def apic_nmi(self) -> None:
        """The APIC delivers an NMI to the CPU (LINT1, or an ICR self-NMI)."""
        self.m.boundary.nmi_arrives("apic")

    def apic_event(self, kind: str, **fields: Any) -> None:
        # The APIC stamps timer events with the exact expiry cycle; the record's own
        # `cycle` is the boundary where the machine saw it.
        if "cycle" in fields:
            fields["expiry"] = fields.pop("cycle")
        if kind == "timer" and not fields.get("masked"):
            fields.pop("masked", None)
            self.m.emit("interrupt_pending", source="apic_timer", **fields)
        else:
            self.m.emit(kind if kind.startswith("apic") else f"apic_{kind}", **fields)

    def apic_eoi(self, vector: int) -> None:
        """The EOI of a level-triggered vector, broadcast to the I/O APIC."""
        ioapic = self.m.state.platform.ioapic
        if ioapic is not None:
            ioapic.eoi(vector)

    # -- the I/O APIC ------------------------------------------------------------------
    def ioapic_message(self, msg: IoapicMessage) -> None:
        """A message from an IOAPIC redirection entry (82093AA "Redirection Table")."""
        if self.ioapic_remap is not None and self.ioapic_remap(msg):
            return
        self.message(msg.vector, msg.delivery_mode, msg.logical, msg.destination, msg.level,
                     source="ioapic", pin=msg.pin)

    def message(self, vector: int, delivery_mode: int, logical: bool, destination: int,
                level: bool, *, source: str, **where: Any) -> None:
        """An interrupt message on the system bus (an IOAPIC entry's, an MSI, a remapped
        one) reaches the local APIC: NMI to the CPU's NMI input, fixed and lowest
        priority to the IRR if this CPU is a destination."""
        m = self.m
        apic = m.apic
        if delivery_mode == _NMI:
            m.boundary.nmi_arrives(source, where)
            return
        if delivery_mode not in (_FIXED, _LOWEST):
            what = "IOAPIC" if source == "ioapic" else f"interrupt message ({source})"
            raise IoapicUnsupported(f"{what}: delivery mode {DELIVERY_MODES[delivery_mode]} "
                                    f"({', '.join(f'{k} {v}' for k, v in where.items())}) is not "
                                    "modelled (supported: fixed, lowest priority, NMI)")
        if apic is None or not apic.enabled:
            return  # no local APIC to accept it
        if logical:
            # Flat logical model: the destination is a bit mask over logical APIC IDs.
            accepted = destination == _BROADCAST or bool(destination & apic.logical_id)
        else:
            accepted = destination in (apic.apic_id, _BROADCAST)
        if not accepted:
            return  # addressed to a CPU this machine does not have
        apic.set_irr(vector, level=level)
        m.emit("interrupt_pending", vector=vector, source=source, **where, level=level)

    def isa_line(self, line: int, asserted: bool) -> None:
        """An ISA interrupt line (pc-testdev's IRQ ports) changes level: it drives the
        8259A pair (IRQ 0-15) and the I/O APIC, as on a PC (QEMU wires every ISA IRQ to
        both, hw/i386/pc.c `gsi_handler`)."""
        if line < 16:
            self.m.state.platform.pic.set_irq(line, asserted)
        ioapic = self.m.state.platform.ioapic
        if ioapic is not None:
            ioapic.set_irq(isa_irq_to_pin(line), asserted)

    # -- the 8259A pair ------------------------------------------------------------------
    def pic_reaches_cpu(self) -> bool:
        """Whether the master 8259A's INT output drives the CPU's INTR input now
        (docs/sdm-map.md, "The 8259A pair after firmware"). Before the switch to long mode
        (a multiboot image's 32-bit phase) the machine is in the MP specification's PIC
        mode, as a PC firmware hands it over: INTR goes straight to the CPU. From then
        on it would reach the CPU only with no local APIC, with the APIC globally disabled
        (LINT0 is then the INTR pin: SDM Vol. 3A "Enabling or Disabling the Local APIC"),
        or through LVT LINT0 unmasked with delivery mode ExtINT (virtual wire), which
        idtlab does not model in long mode: `pic_intr` ends the run then."""
        boot = self.m.state.boot
        return boot is not None and not boot.done

    def _virtual_wire(self) -> str | None:
        """In long mode: how the 8259A's INTR would reach the CPU, or None (LINT0 masked
        or not ExtINT: the request stays in the PIC, as on hardware)."""
        apic = self.m.apic
        if apic is None:
            return "no local APIC: the INTR pin"
        if not apic.enabled:
            return "the local APIC globally disabled: LINT0 is the INTR pin"
        lint0 = apic.read(REG_LVT_LINT0, 4, self.m.engine.cycles)
        if not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == _EXTINT:
            return f"LVT LINT0 = {lint0:#x} (ExtINT, unmasked)"
        return None

    def pic_intr(self, level: bool) -> None:
        """The master 8259A's INT output changes. A rising one that reaches the CPU is
        recorded and looked at the next instruction boundary (the engine stops there)."""
        m = self.m
        if not level:
            return
        vector = m.state.platform.pic.pending_vector()
        if self.pic_reaches_cpu():
            m.emit("interrupt_pending", vector=vector, source="pic")
            m.boundary.request_boundary()
            return
        path = self._virtual_wire()
        if path is not None:
            raise Stop(Outcome.UNSUPPORTED, f"an 8259A interrupt (vector {vector:#x}) reaches "
                       f"the CPU in long mode ({path}): ExtINT delivery is modelled only "
                       "before long mode", m.engine.read_reg("rip"))

    def ioapic_input(self, pin: int, asserted: bool) -> None:
        """An IOAPIC input driven directly (the HPET's routed timers)."""
        ioapic = self.m.state.platform.ioapic
        if ioapic is not None:
            ioapic.set_irq(pin, asserted)
