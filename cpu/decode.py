"""Instruction decoding with Capstone: interception sites, stack references, disassembly.

IRET and HLT must never run natively (IRET's NMI-unblocking side effect is invisible in
Unicorn, and HLT just stops it, `unicorn.md` facts 8 and 11), so every loaded code range
is decoded linearly when it is loaded and each IRET/HLT gets an address-ranged code hook,
which costs nothing elsewhere. Code the guest writes at run time is not decoded: an IRET
there would run natively (documented limitation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

import capstone
from capstone import x86_const as CX


@cache
def _cs(bits: int = 64) -> capstone.Cs:
    mode = capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = True
    return md


@dataclass(frozen=True)
class Insn:
    address: int
    size: int
    mnemonic: str
    op_str: str
    raw: bytes

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()


def decode(code: bytes, address: int, *, bits: int = 64) -> Iterator[Insn]:
    """Decode linearly; `bits` = 32 for 32-bit protected-mode code (a multiboot image's
    entry code, cpu/multiboot.py)."""
    for i in _cs(bits).disasm(code, address):
        yield Insn(i.address, i.size, i.mnemonic, i.op_str, bytes(i.bytes))


def decode_one(code: bytes, address: int, *, bits: int = 64) -> Insn | None:
    return next(decode(code, address, bits=bits), None)


class SiteKind(StrEnum):
    """Instructions the machine stops at (a *site*: a code hook at that address)."""

    IRET = "iret"  # emulated (cpu/emulated.py): NMI unblocking, the frame pop
    HLT = "hlt"  # emulated: the CPU waits at the next boundary
    RDMSR = "rdmsr"  # emulated against the CPU model's MSR table
    WRMSR = "wrmsr"
    CPUID = "cpuid"  # emulated for the leaves the CPU model declares
    STI = "sti"  # observed: opens an interrupt shadow when it sets IF
    MOV_SS = "mov_ss"  # observed: opens a MOV-SS shadow
    OUT = "out"  # observed: a write to an exit port ends the run exactly after it
    MOV_CR = "mov_cr"  # emulated: MOV to CR0/CR3/CR4/CR8, MOV from CR8 (cpu/control_regs.py)
    RDPMC = "rdpmc"  # emulated: the model has no performance counters (#GP(0))
    XCR = "xcr"  # checked, then native: XSETBV, XGETBV (cpu/checked_sites.py)
    TABLE_LOAD = "table_load"  # checked, then native: LGDT, LIDT, LLDT, LTR
    BASE_WRITE = "base_write"  # checked, then native: WRFSBASE, WRGSBASE
    UMIP = "umip"  # checked, then native: SGDT, SIDT, SLDT, SMSW, STR


SITE_KINDS = {"iretq": SiteKind.IRET, "iretd": SiteKind.IRET, "iret": SiteKind.IRET,
              "hlt": SiteKind.HLT, "sti": SiteKind.STI, "rdmsr": SiteKind.RDMSR,
              "wrmsr": SiteKind.WRMSR, "cpuid": SiteKind.CPUID, "rdpmc": SiteKind.RDPMC,
              "xsetbv": SiteKind.XCR, "xgetbv": SiteKind.XCR,
              "lgdt": SiteKind.TABLE_LOAD, "lidt": SiteKind.TABLE_LOAD,
              "lldt": SiteKind.TABLE_LOAD, "ltr": SiteKind.TABLE_LOAD,
              "wrfsbase": SiteKind.BASE_WRITE, "wrgsbase": SiteKind.BASE_WRITE,
              "sgdt": SiteKind.UMIP, "sidt": SiteKind.UMIP, "sldt": SiteKind.UMIP,
              "smsw": SiteKind.UMIP, "str": SiteKind.UMIP}


def site_kind(insn: Insn) -> SiteKind | None:
    """The `SiteKind` of a decoded instruction, or None (it runs natively, unseen).
    POP SS is #UD in 64-bit mode, so MOV SS is the only SS load that opens a MOV-SS
    shadow here. MOV from CR0/CR2/CR3/CR4 runs natively (the engine holds those
    registers as written); MOV from CR8 reads the local APIC's TPR."""
    kind = SITE_KINDS.get(insn.mnemonic)
    if kind is None and insn.mnemonic == "mov":
        if insn.op_str.startswith("ss,"):
            kind = SiteKind.MOV_SS
        elif control_move(insn) is not None:
            kind = SiteKind.MOV_CR
    if kind is None and insn.mnemonic == "out":
        kind = SiteKind.OUT
    return kind


@dataclass(frozen=True)
class ControlMove:
    """MOV to CRn (`to_cr`) or from CR8, with its general-purpose register."""

    cr: int
    gpr: str
    to_cr: bool


def control_move(insn: Insn) -> ControlMove | None:
    """The control-register move `insn` is, if it is one the machine emulates."""
    if insn.mnemonic != "mov":
        return None
    dst, _, src = insn.op_str.partition(", ")
    if dst.startswith("cr") and dst[2:].isdigit():
        return ControlMove(int(dst[2:]), src, True)
    if src == "cr8":
        return ControlMove(8, dst, False)
    return None


# General-purpose register names of every width -> (64-bit register, shift, width).
def _gpr_names() -> dict[str, tuple[str, int, int]]:
    names: dict[str, tuple[str, int, int]] = {}
    for r in ("ax", "bx", "cx", "dx"):
        full = "r" + r
        names.update({full: (full, 0, 64), "e" + r: (full, 0, 32), r: (full, 0, 16),
                      r[0] + "l": (full, 0, 8), r[0] + "h": (full, 8, 8)})
    for r in ("si", "di", "bp", "sp"):
        full = "r" + r
        names.update({full: (full, 0, 64), "e" + r: (full, 0, 32), r: (full, 0, 16),
                      r + "l": (full, 0, 8)})
    for i in range(8, 16):
        full = f"r{i}"
        names.update({full: (full, 0, 64), full + "d": (full, 0, 32), full + "w": (full, 0, 16),
                      full + "b": (full, 0, 8)})
    return names


GPR_SLOTS = _gpr_names()


def out_port(insn_text: str) -> int | None:
    """The port of `out imm8, reg` (None for `out dx, reg`: the port is in DX)."""
    port = insn_text.split(",")[0].split()[-1]
    return None if port == "dx" else int(port, 0)


def find_sites(code: bytes, address: int) -> dict[int, SiteKind]:
    """Addresses of IRET/HLT/STI/MOV SS instructions in a linear decode of `code`."""
    out: dict[int, SiteKind] = {}
    for i in decode(code, address):
        kind = site_kind(i)
        if kind is not None:
            out[i.address] = kind
    return out


_STACK_MNEMONICS = {"push", "pop", "pushfq", "popfq", "call", "ret", "enter", "leave",
                    "pushf", "popf", "iretq", "iret"}


def is_stack_reference(code: bytes, address: int) -> bool:
    """True when the instruction's memory access is SS-relative (push/pop/call/ret or a
    memory operand based on RSP/RBP): such accesses raise #SS, not #GP, when non-canonical."""
    insns = list(_cs().disasm(code, address, 1))
    if not insns:
        return False
    insn = insns[0]
    if insn.mnemonic in _STACK_MNEMONICS:
        return True
    for op in insn.operands:
        if op.type == CX.X86_OP_MEM and op.mem.base in (CX.X86_REG_RSP, CX.X86_REG_RBP,
                                                         CX.X86_REG_ESP, CX.X86_REG_EBP):
            return True
    return False


@dataclass(frozen=True)
class MemOperand:
    """An explicit memory operand: [segment: base + index*scale + disp], `size` bytes."""

    base: str | None
    index: str | None
    scale: int
    disp: int
    size: int
    segment: str | None


def memory_operands(code: bytes, address: int) -> tuple[int, list[MemOperand]]:
    """(length, explicit memory operands) of the instruction at `address`; (0, []) if
    `code` does not start with a whole instruction. Implicit accesses (PUSH, CALL...)
    are not listed; string instructions list [rdi]/[rsi]."""
    insns = list(_cs().disasm(code, address, 1))
    if not insns:
        return 0, []
    insn = insns[0]

    def name(reg: int) -> str | None:
        return None if reg == CX.X86_REG_INVALID else str(insn.reg_name(reg))

    return insn.size, [MemOperand(name(op.mem.base), name(op.mem.index), int(op.mem.scale),
                                  int(op.mem.disp), int(op.size), name(op.mem.segment))
                       for op in insn.operands if op.type == CX.X86_OP_MEM]


@dataclass(frozen=True)
class MmioMove:
    """A MOV between a register or immediate and memory (how drivers touch device
    registers), decoded for emulation: `store` (to memory) or load, operand `size`,
    the source register or immediate of a store, the destination register of a load."""

    length: int
    text: str
    store: bool
    size: int
    reg: str | None = None
    imm: int | None = None


def mmio_move(code: bytes, address: int) -> MmioMove | None:
    """The instruction at `address` if it is `mov mem, reg|imm` or `mov reg, mem`."""
    insns = list(_cs().disasm(code, address, 1))
    if not insns or insns[0].mnemonic != "mov" or len(insns[0].operands) != 2:
        return None
    insn = insns[0]
    dst, src = insn.operands
    text = f"{insn.mnemonic} {insn.op_str}"
    if dst.type == CX.X86_OP_MEM:
        if src.type == CX.X86_OP_REG:
            return MmioMove(insn.size, text, True, int(dst.size), reg=str(insn.reg_name(src.reg)))
        if src.type == CX.X86_OP_IMM:
            return MmioMove(insn.size, text, True, int(dst.size), imm=int(src.imm))
    elif src.type == CX.X86_OP_MEM and dst.type == CX.X86_OP_REG:
        return MmioMove(insn.size, text, False, int(src.size), reg=str(insn.reg_name(dst.reg)))
    return None
