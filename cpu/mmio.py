"""Memory-mapped device registers, emulated as a hypervisor emulates MMIO.

The device pages (the local APIC at 0xFEE00000, the I/O APIC at 0xFEC00000, the HPET at
0xFED00000) are never mapped in the engine: every access to one is refused at TLB-fill
time and stops the engine *at* the accessing instruction, like a fault. This module
decodes the instruction, performs the access on the device model and retires the
instruction. So the effect of a write — an EOI unmasking a vector, a self-IPI, a timer
starting, a redirection entry unmasked — is seen at the boundary right after the
instruction, in both counting modes.

Emulated: MOV in every form a compiler emits for a register access — to or from a
general register of any width (AL..R15, AH..DH), an immediate store, the moffs forms
(A0-A3, `movabs`) — and MOVZX/MOVSX/MOVSXD loads. The access width is the memory
operand's; what a narrow or unaligned access does to a register is the device model's
business. Any other instruction touching a device page (an RMW `or`, a `cmp` with
memory) ends the run as "unsupported", naming the instruction.

A device that is not there (the local APIC while IA32_APIC_BASE[11] = 0) reads all ones
and drops stores, as a bus with no device does. Each store is a trace record
(`apic_write`, `ioapic_write`, `hpet_write`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from cpu.decode import GPR_SLOTS, decode_one, mmio_move
from cpu.errors import Unsupported
from cpu.mmu import Access
from cpu.outcomes import Outcome, Stop
from idt.state import ArchFault

if TYPE_CHECKING:
    from cpu.machine import Machine


class MmioDevice(Protocol):
    """A device's register page: loads and stores by offset, at cycle `now`."""

    def read(self, offset: int, size: int, now: int) -> int: ...

    def write(self, offset: int, size: int, value: int, now: int) -> None: ...


def _mask(bits: int) -> int:
    return (1 << bits) - 1


class Mmio:
    """The device pages and the emulation of the instructions that touch them."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        # page -> (record name, the device now, or None when it is not there)
        self.pages: dict[int, tuple[str, Callable[[], MmioDevice | None]]] = {}
        # Device ranges that move (PCI BARs, cpu/q35.py): page -> (record name, the
        # device, the range's base), or None.
        self.windows: list[Callable[[int], tuple[str, MmioDevice, int] | None]] = []

    def add(self, page: int, name: str, device: Callable[[], MmioDevice | None]) -> None:
        self.pages[page] = (name, device)

    def claims(self, paddr: int) -> bool:
        """Whether physical page `paddr` is a device page."""
        return paddr in self.pages or any(w(paddr) is not None for w in self.windows)

    def _device(self, page: int) -> tuple[str, MmioDevice | None, int]:
        if page in self.pages:
            name, get_device = self.pages[page]
            return name, get_device(), page
        for w in self.windows:
            hit = w(page)
            if hit is not None:
                return hit
        raise AssertionError(f"no device page at {page:#x}")

    def emulate(self, rip: int, vaddr: int, page: int, access: Access) -> None:
        """The instruction at RIP reads or writes a device page: emulate it (see the
        module docstring)."""
        m = self.m
        e = m.engine
        name, device, base = self._device(page)
        try:
            code = m.read_linear(rip, 15)
        except ArchFault:
            code = m.read_linear(rip, 0x1000 - (rip & 0xFFF))
        mv = mmio_move(code, rip)
        what = decode_one(code, rip)
        if mv is None or (access is Access.WRITE) != mv.store or (
                mv.reg is not None and mv.reg not in GPR_SLOTS):
            raise Stop(Outcome.UNSUPPORTED, f"{_DEVICE_NAMES.get(name, name)} access by "
                       f"'{what.text if what else '??'}' at {rip:#x}: only MOV (and MOVZX/MOVSX "
                       "loads) between a general register or immediate and a device page is "
                       "emulated", rip)
        e.recount()  # the instruction retires here
        rflags = e.read_reg("rflags")  # TF as the instruction found it (single-step)
        e.cycles += m.profile.event("apic_access")  # the access lands at its end (MMIO)
        now = e.cycles
        offset = page - base + (vaddr & 0xFFF)
        try:
            if mv.store:
                if mv.imm is not None:
                    value = mv.imm & _mask(8 * mv.size)
                else:
                    full, shift, _width = GPR_SLOTS[str(mv.reg)]
                    value = (e.read_reg(full) >> shift) & _mask(8 * mv.size)
                m.emit(f"{name}_write", offset=offset, value=value)
                if device is not None:
                    device.write(offset, mv.size, value, now)
                e.write({"rip": rip + mv.length})
            else:
                value = device.read(offset, mv.size, now) if device is not None else \
                    _mask(8 * mv.size)
                full, shift, width = GPR_SLOTS[str(mv.reg)]
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


_DEVICE_NAMES = {"apic": "local APIC", "ioapic": "I/O APIC", "hpet": "HPET", "vtd": "VT-d",
                 "edu": "edu"}
