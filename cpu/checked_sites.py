"""Checked sites: instructions the engine executes natively once Python has checked what
the engine does not.

QEMU's TCG executes XSETBV/XGETBV, LGDT/LIDT/LLDT/LTR, WRFSBASE/WRGSBASE and
SGDT/SIDT/SLDT/SMSW/STR correctly except for a few architectural checks: it accepts any
XCR0 its own CPU model supports (not the declared model's), reads XCR1 when its model
has XGETBV1, never checks a loaded base for canonicality, and has no UMIP. Each such
instruction is a site (cpu/sites.py); its code hook looks at the operands and the state
*before* the instruction runs and either lets the engine go on — the instruction then
executes natively, with the engine's own checks and effects, at no further cost — or
stops the engine to raise the fault with the instruction's RIP (a fault: it does not
retire). The rules are in cpu/control_regs.py (XCR0, UMIP) and cpu/canonical.py (bases).

Faults the engine raises itself take precedence and are left to it: #UD (CR4.OSXSAVE =
0, CR4.FSGSBASE = 0, a LOCK prefix), #GP(0) for CPL > 0 on the privileged loads, a #PF
on reading the operand or the descriptor — when Python cannot read what the
instruction would read, it does not decide, and the engine faults as the SDM says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cpu.canonical import (
    CanonicalFault,
    check_base_write,
    check_system_descriptor,
    check_table_base,
)
from cpu.control_regs import (
    CR4_FSGSBASE,
    CR4_OSXSAVE,
    ControlFault,
    check_xgetbv,
    check_xsetbv,
    umip_blocks,
)
from cpu.decode import (
    GPR_SLOTS,
    Insn,
    MemOperand,
    aligned_operand,
    decode_one,
    memory_operands,
)
from cpu.ept import EptMisconfig, EptViolation
from cpu.mmu import Access
from cpu.translation import physical_read
from idt.state import ArchFault, Event
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine

MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
_DESC_TYPE_LDT = 0x2
CR0_EM, CR0_TS = 1 << 2, 1 << 3
CR4_OSFXSR = 1 << 9
_DESC_TYPE_TSS_AVAILABLE = 0x9


class CheckedSites:
    """The code-hook actions of the checked sites: True stops the engine (a fault)."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    # -- helpers ---------------------------------------------------------------------------
    def _insn(self, address: int) -> Insn | None:
        code = self.m.code_bytes(address, 15)
        return decode_one(code, address) if code is not None else None

    def _gp(self, address: int, error_code: int, why: str) -> bool:
        m = self.m

        def fault() -> None:
            m.engine.uncount()  # a fault: the instruction does not retire
            m.deliver(Event.exception(Vector.GP, address, error_code), why=why)

        m.stops.pending = fault
        return True

    def gpr(self, name: str) -> int:
        reg, shift, width = GPR_SLOTS[name]
        return (self.m.engine.read_reg(reg) >> shift) & ((1 << width) - 1)

    def effective_address(self, op: MemOperand, address: int, length: int) -> int | None:
        """The linear address of a memory operand of the instruction at `address`."""
        e = self.m.engine
        ea = op.disp
        width = 64
        for reg, scale in ((op.base, 1), (op.index, op.scale)):
            if reg is None:
                continue
            if reg == "rip":
                ea += address + length
                continue
            slot = GPR_SLOTS.get(reg)
            if slot is None:
                return None
            width = min(width, slot[2])
            ea += self.gpr(reg) * scale
        ea &= (1 << width) - 1
        if op.segment == "fs":
            ea += e.read_msr(MSR_FS_BASE)
        elif op.segment == "gs":
            ea += e.read_msr(MSR_GS_BASE)
        return ea & (2**64 - 1)

    def read_operand(self, linear: int, size: int) -> bytes | None:
        """Read `size` bytes as the instruction's own data access would (the current
        CPL, SMAP with EFLAGS.AC, protection keys); None if that access would fault."""
        m = self.m
        out = bytearray()
        addr = linear
        while len(out) < size:
            n = min(size - len(out), 0x1000 - (addr & 0xFFF))
            try:
                t = m.translator.guest_walk(m.regs.paging(), addr, Access.READ)
            except (ArchFault, EptViolation, EptMisconfig):
                return None
            data = physical_read(m, t.paddr | (addr & 0xFFF), n)  # RAM, or pc-testdev's IORAM
            if data is None:
                return None
            out += data
            addr += n
        return bytes(out)

    def _selector(self, address: int, length: int, ops: Sequence[MemOperand],
                  register: str) -> int | None:
        """The 16-bit selector a segment load at `address` loads: from its memory operand
        (`ops`, as `memory_operands` gives them), else from `register` (the operand's
        text). None when Python cannot read it (the read would fault, or the operand is
        not a general-purpose register): the engine then decides."""
        if ops:
            ea = self.effective_address(ops[0], address, length)
            raw = self.read_operand(ea, 2) if ea is not None else None
            return None if raw is None else int.from_bytes(raw, "little")
        if register not in GPR_SLOTS:
            return None
        return self.gpr(register) & 0xFFFF

    # -- site actions ----------------------------------------------------------------------
    def xcr(self, address: int) -> bool:
        """XSETBV / XGETBV (cpu/control_regs.py)."""
        m = self.m
        e = m.engine
        insn = self._insn(address)
        if insn is None or not e.read_reg("cr4") & CR4_OSXSAVE:
            return False  # #UD: the engine's
        rax, rcx, rdx = e.read(("rax", "rcx", "rdx"))
        try:
            if insn.mnemonic == "xsetbv":
                if m.regs.state.cpl != 0:
                    return False  # #GP(0): the engine's
                check_xsetbv(rcx, ((rdx & 0xFFFFFFFF) << 32) | (rax & 0xFFFFFFFF))
            else:
                check_xgetbv(rcx)
        except ControlFault as fault:
            return self._gp(address, 0, f"{insn.mnemonic.upper()}: {fault}")
        return False

    def mov_ss(self, address: int) -> bool:
        """MOV SS of a null selector in 64-bit mode: allowed only at CPL < 3 with RPL =
        CPL, #GP(0) otherwise (SDM Vol. 2 "MOV—Move", 64-bit mode: "IF segment selector
        is NULL and (CPL = 3 or RPL ≠ CPL) THEN #GP(0)"). QEMU 7.2 TCG, like the engine,
        checks only the CPL (`load_seg`); kvm-unit-tests x86/emulator64.c test_sreg
        loads selector 3 at CPL 0. A non-null selector is the engine's to check (RPL ≠
        CPL, DPL ≠ CPL: #GP(selector))."""
        m = self.m
        code = m.code_bytes(address, 15)
        insn = decode_one(code, address) if code is not None else None
        if code is None or insn is None:
            return False
        length, ops = memory_operands(code, address)
        selector = self._selector(address, length, ops, insn.op_str.partition(",")[2].strip())
        if selector is None:
            return False  # the access faults, or an operand Python does not read: the engine's
        cpl = m.regs.state.cpl
        if selector & ~3 == 0 and cpl < 3 and selector & 3 != cpl:
            return self._gp(address, 0, f"MOV SS of null selector {selector:#x} with RPL "
                            f"{selector & 3} at CPL{cpl}")
        return False

    def table_load(self, address: int) -> bool:
        """LGDT/LIDT (the base in the operand), LLDT/LTR (the base in the descriptor)."""
        m = self.m
        if m.regs.state.cpl != 0:
            return False  # #GP(0): the engine's
        code = m.code_bytes(address, 15)
        insn = decode_one(code, address) if code is not None else None
        if code is None or insn is None:
            return False
        length, ops = memory_operands(code, address)
        what = insn.mnemonic.upper()
        try:
            if insn.mnemonic in ("lgdt", "lidt"):
                ea = self.effective_address(ops[0], address, length) if ops else None
                operand = self.read_operand(ea, 10) if ea is not None else None
                if operand is not None:
                    check_table_base(operand, what)
                return False
            selector = self._selector(address, length, ops, insn.op_str)
            if selector is None:
                return False
            desc = self._system_descriptor(selector)
            wanted = _DESC_TYPE_LDT if insn.mnemonic == "lldt" else _DESC_TYPE_TSS_AVAILABLE
            if desc is None or (desc[5] & 0x9F) != (0x80 | wanted):
                return False  # null, out of the GDT, not present, wrong type: the engine's
            check_system_descriptor(desc, selector, what)
        except CanonicalFault as fault:
            return self._gp(address, fault.error_code, str(fault))
        return False

    def _system_descriptor(self, selector: int) -> bytes | None:
        """The 16 bytes of the GDT descriptor `selector` names (None: null, in the LDT,
        beyond the GDT limit, or unreadable)."""
        m = self.m
        if selector & 0xFFFC == 0 or selector & 4:
            return None
        _, base, limit = m.engine.read_table("gdtr")
        offset = selector & ~7
        if offset + 15 > limit:
            return None
        try:
            return m.inspect.read(base + offset, 16)
        except ArchFault:
            return None

    def base_write(self, address: int) -> bool:
        """WRFSBASE / WRGSBASE (cpu/canonical.py)."""
        m = self.m
        if not m.engine.read_reg("cr4") & CR4_FSGSBASE:
            return False  # #UD: the engine's
        insn = self._insn(address)
        if insn is None or insn.op_str not in GPR_SLOTS:
            return False
        try:
            check_base_write(self.gpr(insn.op_str), insn.mnemonic.upper())
        except CanonicalFault as fault:
            return self._gp(address, 0, str(fault))
        return False

    def sse_align(self, address: int) -> bool:
        """A legacy SSE instruction's 128-bit memory operand, or an aligned VEX move's,
        that is not aligned: #GP(0) (SDM Vol. 1 "Data Alignment for 128-Bit Data"; Vol. 2
        MOVAPS "#GP(0) If a memory operand is not aligned on a 16-byte boundary"). #UD
        (CR0.EM, CR4.OSFXSR = 0) and #NM (CR0.TS) come first and are the engine's."""
        m = self.m
        e = m.engine
        if e.read_reg("cr0") & (CR0_EM | CR0_TS) or not e.read_reg("cr4") & CR4_OSFXSR:
            return False
        code = m.code_bytes(address, 15)
        insn = decode_one(code, address) if code is not None else None
        if code is None or insn is None:
            return False
        align = aligned_operand(insn)
        length, ops = memory_operands(code, address)
        if align is None or not ops:
            return False
        ea = self.effective_address(ops[0], address, length)
        if ea is None or ea % align == 0:
            return False
        return self._gp(address, 0, f"{insn.mnemonic.upper()} of a memory operand at "
                        f"{ea:#x}, not {align}-byte aligned")

    def umip(self, address: int) -> bool:
        """SGDT / SIDT / SLDT / SMSW / STR with CR4.UMIP = 1 at CPL > 0."""
        m = self.m
        if not umip_blocks(m.engine.read_reg("cr4"), m.regs.state.cpl):
            return False
        insn = self._insn(address)
        name = insn.mnemonic.upper() if insn is not None else "the instruction"
        return self._gp(address, 0, f"UMIP: {name} at CPL{m.regs.state.cpl}")
