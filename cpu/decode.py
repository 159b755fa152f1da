"""Instruction decoding with Capstone: interception sites, stack references, disassembly.

IRET and HLT must never run natively (Unicorn has no visible NMI-blocking state, so IRET's
NMI-unblocking side effect is lost, and HLT just stops emulation: unicorn-engine/unicorn
issue #1082), so every loaded code range is decoded linearly when it is loaded and each
IRET/HLT gets an address-ranged code hook, which costs nothing elsewhere. Code the guest
writes at run time is not decoded: an IRET there would run natively (documented limitation).
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
    SYSCALL = "syscall"  # emulated: Unicorn's SYSCALL only calls hooks (no transition)
    SYSRET = "sysret"  # emulated: the CPL change is the machine's to track


SITE_KINDS = {"iretq": SiteKind.IRET, "iretd": SiteKind.IRET, "iret": SiteKind.IRET,
              "hlt": SiteKind.HLT, "sti": SiteKind.STI, "rdmsr": SiteKind.RDMSR,
              "wrmsr": SiteKind.WRMSR, "cpuid": SiteKind.CPUID, "syscall": SiteKind.SYSCALL,
              "sysret": SiteKind.SYSRET, "sysretq": SiteKind.SYSRET}


def site_kind(insn: Insn) -> SiteKind | None:
    """"iret"/"hlt"/"rdmsr"/"wrmsr" (intercepted and emulated), "cpuid" (emulated for
    the hypervisor leaves), "sti"/"mov_ss" (observed: they open an interrupt shadow),
    "out" (observed: a write to the exit port ends the run exactly there), or None.
    POP SS is #UD in 64-bit mode, so MOV SS is the only SS load that opens a MOV-SS
    shadow here."""
    kind = SITE_KINDS.get(insn.mnemonic)
    if kind is None and insn.mnemonic == "mov" and insn.op_str.startswith("ss,"):
        kind = SiteKind.MOV_SS
    if kind is None and insn.mnemonic == "out":
        kind = SiteKind.OUT
    return kind


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
    """A move between a register or immediate and memory (how drivers touch device
    registers), decoded for emulation: `store` (to memory) or load, the memory operand's
    `size`, the source register or immediate of a store, the destination register of a
    load and how a narrower load fills it (`extend`: "zero" for MOVZX, "sign" for MOVSX
    and MOVSXD, None for MOV)."""

    length: int
    text: str
    store: bool
    size: int
    reg: str | None = None
    imm: int | None = None
    extend: str | None = None


_MMIO_LOADS = {"mov": None, "movabs": None, "movzx": "zero", "movsx": "sign", "movsxd": "sign"}


def mmio_move(code: bytes, address: int) -> MmioMove | None:
    """The instruction at `address` if it is a store `mov mem, reg|imm` (including the
    moffs form `movabs [imm64], al/ax/eax/rax`, opcodes A2/A3) or a load `mov reg, mem`
    (A0/A1), `movzx`, `movsx` or `movsxd` from memory; None for anything else."""
    insns = list(_cs().disasm(code, address, 1))
    if not insns or insns[0].mnemonic not in _MMIO_LOADS or len(insns[0].operands) != 2:
        return None
    insn = insns[0]
    dst, src = insn.operands
    text = f"{insn.mnemonic} {insn.op_str}"
    if dst.type == CX.X86_OP_MEM and insn.mnemonic in ("mov", "movabs"):
        if src.type == CX.X86_OP_REG:
            return MmioMove(insn.size, text, True, int(dst.size), reg=str(insn.reg_name(src.reg)))
        if src.type == CX.X86_OP_IMM:
            return MmioMove(insn.size, text, True, int(dst.size), imm=int(src.imm))
    elif src.type == CX.X86_OP_MEM and dst.type == CX.X86_OP_REG:
        return MmioMove(insn.size, text, False, int(src.size), reg=str(insn.reg_name(dst.reg)),
                        extend=_MMIO_LOADS[insn.mnemonic])
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
