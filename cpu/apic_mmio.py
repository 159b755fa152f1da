"""Local APIC register accesses, emulated as a hypervisor emulates MMIO.

The APIC page (0xFEE00000) is never mapped in the engine: every access to it is refused
at TLB-fill time and stops the engine *at* the accessing instruction, like a fault. This
module decodes the instruction, performs the access on the APIC model
(cpu/devices/apic.py) and retires the instruction. So the effect of a write — an EOI
unmasking a vector, a self-IPI, a TPR change, the timer starting — is seen at the
boundary right after the instruction, in both counting modes.

Emulated: MOV in every form a compiler emits for a register access — to or from a
general register of any width (AL..R15, AH..DH), an immediate store, the moffs forms
(A0-A3, `movabs`) — and MOVZX/MOVSX/MOVSXD loads. The access width is the memory
operand's; what a narrow or unaligned access does to a register is the APIC model's
business (cpu/devices/apic.py). Any other instruction touching the page (an RMW `or`, a
`cmp` with memory) ends the run as "unsupported", naming the instruction.

While the APIC is globally disabled (IA32_APIC_BASE[11] = 0) the page is not there:
loads read all ones and stores are dropped, as on a bus with no device.

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

def _register_parts() -> dict[str, tuple[str, int, int]]:
    """Every general-purpose register name -> (its 64-bit register, bit offset, width)."""
    legacy = {"rax": "a", "rbx": "b", "rcx": "c", "rdx": "d"}
    index = {"rsi": "si", "rdi": "di", "rbp": "bp", "rsp": "sp"}
    parts: dict[str, tuple[str, int, int]] = {}
    for r in GPRS:
        parts[r] = (r, 0, 64)
        if r in legacy:
            x = legacy[r]
            parts.update({f"e{x}x": (r, 0, 32), f"{x}x": (r, 0, 16), f"{x}l": (r, 0, 8),
                          f"{x}h": (r, 8, 8)})
        elif r in index:
            x = index[r]
            parts.update({f"e{x}": (r, 0, 32), x: (r, 0, 16), f"{x}l": (r, 0, 8)})
        else:
            parts.update({f"{r}d": (r, 0, 32), f"{r}w": (r, 0, 16), f"{r}b": (r, 0, 8)})
    return parts


_PARTS = _register_parts()


def _mask(bits: int) -> int:
    return (1 << bits) - 1


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
        if mv is None or (access is Access.WRITE) != mv.store or (
                mv.reg is not None and mv.reg not in _PARTS):
            raise Stop(Outcome.UNSUPPORTED, f"local APIC access by "
                       f"'{what.text if what else '??'}' at {rip:#x}: only MOV (and MOVZX/MOVSX "
                       "loads) between a general register or immediate and the APIC page is "
                       "emulated", rip)
        e.recount()  # the instruction retires here
        rflags = e.read_reg("rflags")  # TF as the instruction found it (single-step)
        e.cycles += m.profile.event("apic_access")  # the access lands at its end
        now = e.cycles
        offset = vaddr & 0xFFF
        try:
            if mv.store:
                if mv.imm is not None:
                    value = mv.imm & _mask(8 * mv.size)
                else:
                    full, shift, _width = _PARTS[str(mv.reg)]
                    value = (e.read_reg(full) >> shift) & _mask(8 * mv.size)
                m.emit("apic_write", offset=offset, value=value)
                if apic.enabled:
                    apic.write(offset, mv.size, value, now)
                e.write({"rip": rip + mv.length})
            else:
                value = apic.read(offset, mv.size, now) if apic.enabled else \
                    _mask(8 * mv.size)
                full, shift, width = _PARTS[str(mv.reg)]
                if mv.extend == "sign" and value >> (8 * mv.size - 1):
                    value |= _mask(width) & ~_mask(8 * mv.size)
                if width == 32:
                    new = value  # a 32-bit destination is zero-extended (SDM MOV, 64-bit mode)
                elif width == 64:
                    new = value & _mask(64)
                else:
                    old = e.read_reg(full)
                    new = (old & ~(_mask(width) << shift)) | ((value & _mask(width)) << shift)
                e.write({full: new, "rip": rip + mv.length})
        except Unsupported as exc:
            e.cycles -= m.profile.event("apic_access")
            e.uncount()
            raise Stop(Outcome.UNSUPPORTED, str(exc), rip) from None
        m.emulated.single_step(rflags)
