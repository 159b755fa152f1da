"""Local APIC register accesses, emulated as a hypervisor emulates MMIO.

The APIC page (0xFEE00000) is never mapped in the engine: every access to it is refused
at TLB-fill time and stops the engine *at* the accessing instruction, like a fault. This
module decodes the instruction, performs the access on the APIC model
(cpu/devices/apic.py) and retires the instruction. So the effect of a write — an EOI
unmasking a vector, a self-IPI, a TPR change, the timer starting — is seen at the
boundary right after the instruction, in both counting modes.

Emulated: MOV between a register or an immediate and a 32-bit APIC register. Any other
form ends the run as "unsupported", naming the instruction.

The APIC's own notifications (an NMI through LINT/ICR, timer expiries, EOIs, IPIs) come
back through `on_nmi` and `on_event` and become trace records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cpu.decode import decode_one, mmio_move
from cpu.devices.apic import APIC_BASE
from cpu.engine import GPRS
from cpu.errors import Unsupported
from cpu.mmu import Access
from cpu.outcomes import Outcome, Stop
from idt.state import ArchFault

if TYPE_CHECKING:
    from cpu.machine import Machine

# 32- and 64-bit GPR names -> the 64-bit register (a 32-bit write zero-extends).
_GPR64 = {**{r: r for r in GPRS},
          **{"e" + r[1:]: r for r in GPRS if not r[1:].isdigit() and len(r) == 3},
          **{r + "d": r for r in GPRS if r[1:].isdigit()}}


class ApicMmio:
    """The bridge between the engine's stops on the APIC page and the APIC model."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def claims(self, paddr: int) -> bool:
        """Whether physical page `paddr` is the (present) local APIC's."""
        return self.m.apic is not None and paddr == APIC_BASE

    def on_nmi(self) -> None:
        """The APIC delivers an NMI to the CPU (LINT1, or an ICR self-NMI)."""
        self.m.boundary.nmi_arrives("apic")

    def on_event(self, kind: str, **fields: Any) -> None:
        # The APIC stamps timer events with the exact expiry cycle; the record's own
        # `cycle` is the boundary where the machine saw it.
        if "cycle" in fields:
            fields["expiry"] = fields.pop("cycle")
        if kind == "timer" and not fields.get("masked"):
            fields.pop("masked", None)
            self.m.emit("interrupt_pending", source="apic_timer", **fields)
        else:
            self.m.emit(kind if kind.startswith("apic") else f"apic_{kind}", **fields)

    def emulate(self, rip: int, vaddr: int, access: Access) -> None:
        """The instruction at RIP reads or writes the local APIC page: emulate it (see
        the module docstring)."""
        m = self.m
        e = m.engine
        apic = m.apic
        assert apic is not None
        try:
            code = m.read_linear(rip, 15)
        except ArchFault:
            code = m.read_linear(rip, 0x1000 - (rip & 0xFFF))
        mv = mmio_move(code, rip)
        what = decode_one(code, rip)
        if mv is None or (access is Access.WRITE) != mv.store:
            raise Stop(Outcome.UNSUPPORTED, f"local APIC access by "
                       f"'{what.text if what else '??'}' at {rip:#x}: only MOV between a "
                       "register or immediate and a 32-bit APIC register is emulated", rip)
        e.recount()  # the instruction retires here
        e.cycles += m.profile.event("apic_access")  # the access lands at its end
        now = e.cycles
        offset = vaddr & 0xFFF
        try:
            if mv.store:
                value = mv.imm if mv.imm is not None else e.read_reg(_GPR64[str(mv.reg)])
                value &= (1 << (8 * mv.size)) - 1
                m.emit("apic_write", offset=offset, value=value)
                apic.write(offset, mv.size, value, now)
                e.write({"rip": rip + mv.length})
            else:
                value = apic.read(offset, mv.size, now)
                reg = str(mv.reg)
                if reg not in _GPR64 or mv.size != 4:
                    raise Unsupported(f"APIC read into {reg} ({mv.size} bytes)")
                # A 32-bit destination is zero-extended (SDM MOV, 64-bit mode).
                e.write({_GPR64[reg]: value, "rip": rip + mv.length})
        except Unsupported as exc:
            e.cycles -= m.profile.event("apic_access")
            e.uncount()
            raise Stop(Outcome.UNSUPPORTED, str(exc), rip) from None
