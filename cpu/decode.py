"""Instruction decoding with Capstone: interception sites, stack references, disassembly.

IRET and HLT must never run natively (Unicorn has no visible NMI-blocking state, so IRET's
NMI-unblocking side effect is lost, and HLT just stops emulation: unicorn-engine/unicorn
issue #1082), so each one gets an address-ranged code hook, which costs nothing elsewhere.
cpu/sites.py finds them in every translation block the engine runs (and, up front, in a
linear decode of loaded code); this module decodes and classifies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache, lru_cache
from typing import Any

import capstone
from capstone import x86_const as CX


@cache
def _cs(bits: int = 64) -> capstone.Cs:
    mode = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}[bits]
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
    entry code, cpu/multiboot.py), 16 for 16-bit code (real-address mode)."""
    for i in _cs(bits).disasm(code, address):
        yield Insn(i.address, i.size, i.mnemonic, i.op_str, bytes(i.bytes))


def decode_one(code: bytes, address: int, *, bits: int = 64) -> Insn | None:
    """The instruction at the start of `code`, or None. Decoded once per (bytes, address,
    mode): the sites a handler passes through (an OUT, a CPUID) are decoded each time."""
    return _decode_one(bytes(code), address, bits)


@lru_cache(maxsize=4096)
def _decode_one(code: bytes, address: int, bits: int) -> Insn | None:
    return next(decode(code, address, bits=bits), None)


class SiteKind(StrEnum):
    """Instructions the machine stops at (a *site*: a code hook at that address)."""

    IRET = "iret"  # emulated (cpu/emulated.py): NMI unblocking, the frame pop
    HLT = "hlt"  # emulated: the CPU waits at the next boundary
    RDMSR = "rdmsr"  # emulated against the CPU model's MSR table
    WRMSR = "wrmsr"
    CPUID = "cpuid"  # emulated for the leaves the CPU model declares
    STI = "sti"  # observed: opens an interrupt shadow when it sets IF
    POPF = "popf"  # observed: may set IF, which an interrupt held by IF = 0 waits for
    MOV_SS = "mov_ss"  # observed: opens a MOV-SS shadow
    OUT = "out"  # checked (I/O permission), and a write to an exit port ends the run after it
    IN = "in"  # checked: the I/O permission bitmap at CPL > IOPL (cpu/io_permission.py)
    MOV_CR = "mov_cr"  # emulated: MOV to CR0/CR3/CR4/CR8, MOV from CR8 (cpu/control_regs.py)
    RDPMC = "rdpmc"  # emulated: the model has no performance counters (#GP(0))
    XCR = "xcr"  # checked, then native: XSETBV, XGETBV (cpu/checked_sites.py)
    TABLE_LOAD = "table_load"  # checked, then native: LGDT, LIDT, LLDT, LTR
    BASE_WRITE = "base_write"  # checked, then native: WRFSBASE, WRGSBASE
    UMIP = "umip"  # checked, then native: SGDT, SIDT, SLDT, SMSW, STR
    UNDECLARED = "undeclared"  # emulated: #UD, an instruction the CPU model does not report
    SYSCALL = "syscall"  # emulated: Unicorn's SYSCALL only calls hooks (no transition)
    SYSRET = "sysret"  # emulated: the CPL change is the machine's to track
    SYSENTER = "sysenter"  # emulated, as SYSCALL: the CPL change is the machine's to track
    SYSEXIT = "sysexit"
    LOCK_UD = "lock_ud"  # a LOCK prefix the SDM forbids here: #UD (the engine may run it)
    INVALID_UD = "invalid_ud"  # an encoding the SDM makes #UD and the engine runs anyway
    RDTSC = "rdtsc"  # emulated: the TSC is the machine's cycle count plus an offset
    RDTSCP = "rdtscp"  # emulated, as RDTSC, with IA32_TSC_AUX in ECX
    SSE_ALIGN = "sse_align"  # checked, then native: a 16/32-byte operand that must be aligned
    MOV_DR = "mov_dr"  # emulated: the debug registers are the machine's (cpu/debug.py)
    ERETS = "erets"  # FRED (cpu/fred.py): F2 0F 01 CA, which capstone calls clac
    ERETU = "eretu"  # FRED: F3 0F 01 CA
    LKGS = "lkgs"  # FRED: F2 0F 00 /6, which capstone does not decode
    SWAPGS = "swapgs"  # observed: #UD while CR4.FRED = 1, else native


# The longest x86 instruction (SDM Vol. 2A, "Instruction Format": an instruction of more
# than 15 bytes raises #GP). An engine's instruction size above it is not a size.
MAX_INSN_LENGTH = 15

SITE_KINDS = {"iretq": SiteKind.IRET, "iretd": SiteKind.IRET, "iret": SiteKind.IRET,
              "hlt": SiteKind.HLT, "sti": SiteKind.STI, "rdmsr": SiteKind.RDMSR,
              "wrmsr": SiteKind.WRMSR, "cpuid": SiteKind.CPUID, "rdpmc": SiteKind.RDPMC,
              "rdtsc": SiteKind.RDTSC, "rdtscp": SiteKind.RDTSCP,
              "popf": SiteKind.POPF, "popfq": SiteKind.POPF, "popfw": SiteKind.POPF,
              "xsetbv": SiteKind.XCR, "xgetbv": SiteKind.XCR,
              "lgdt": SiteKind.TABLE_LOAD, "lidt": SiteKind.TABLE_LOAD,
              "lldt": SiteKind.TABLE_LOAD, "ltr": SiteKind.TABLE_LOAD,
              "wrfsbase": SiteKind.BASE_WRITE, "wrgsbase": SiteKind.BASE_WRITE,
              "sgdt": SiteKind.UMIP, "sidt": SiteKind.UMIP, "sldt": SiteKind.UMIP,
              "smsw": SiteKind.UMIP, "str": SiteKind.UMIP, "syscall": SiteKind.SYSCALL,
              "sysret": SiteKind.SYSRET, "sysretq": SiteKind.SYSRET,
              "sysenter": SiteKind.SYSENTER, "sysexit": SiteKind.SYSEXIT,
              "sysexitq": SiteKind.SYSEXIT, "swapgs": SiteKind.SWAPGS, "lkgs": SiteKind.LKGS}


# Instructions the engine's own CPU model executes but the declared one does not report
# (cpu/cpu_model.py): the SDM's #UD "If CPUID ... = 0". RDRAND/RDSEED would also draw
# from the host's random source.
UNDECLARED_INSNS = {"rdrand": "CPUID.01H:ECX.RDRAND", "rdseed": "CPUID.(EAX=07H,ECX=0):EBX.RDSEED",
                    "xsaveopt": "CPUID.(EAX=0DH,ECX=1):EAX.XSAVEOPT",
                    "xsaveopt64": "CPUID.(EAX=0DH,ECX=1):EAX.XSAVEOPT",
                    "xsavec": "CPUID.(EAX=0DH,ECX=1):EAX.XSAVEC",
                    "xsavec64": "CPUID.(EAX=0DH,ECX=1):EAX.XSAVEC",
                    "xsaves": "CPUID.(EAX=0DH,ECX=1):EAX.XSAVES",
                    "xsaves64": "CPUID.(EAX=0DH,ECX=1):EAX.XSAVES",
                    "xrstors": "CPUID.(EAX=0DH,ECX=1):EAX.XSAVES",
                    "xrstors64": "CPUID.(EAX=0DH,ECX=1):EAX.XSAVES",
                    "rdpid": "CPUID.(EAX=07H,ECX=0):ECX.RDPID",
                    "invpcid": "CPUID.(EAX=07H,ECX=0):EBX.INVPCID"}
SITE_KINDS.update(dict.fromkeys(UNDECLARED_INSNS, SiteKind.UNDECLARED))


# SSE alignment (SDM Vol. 1 "Data Alignment for 128-Bit Data": a legacy SSE instruction's
# 128-bit memory operand must be 16-byte aligned, #GP(0) otherwise, except these; VEX
# forms need no alignment except the explicitly aligned moves). The engine (QEMU 5
# under Unicorn) checks none of them; `aligned_operand` says which the machine checks.
UNALIGNED_SSE = frozenset({"movups", "movupd", "movdqu", "lddqu", "pcmpestri", "pcmpestrm",
                           "pcmpistri", "pcmpistrm"})
ALIGNED_VEX = frozenset({"vmovaps", "vmovapd", "vmovdqa", "vmovntps", "vmovntpd", "vmovntdq",
                         "vmovntdqa"})


def aligned_operand(insn: Insn) -> int | None:
    """The alignment (16 or 32) the memory operand of `insn` must have, or None."""
    op = insn.op_str
    if "xmmword ptr" in op:
        size = 16
    elif "ymmword ptr" in op:
        size = 32
    else:
        return None
    name = insn.mnemonic
    if name.startswith("v"):
        return size if name in ALIGNED_VEX else None
    return size if name not in UNALIGNED_SSE else None


ILLEGAL_LOCK = "(lock)"  # the mnemonic `decode_loaded` gives an illegal LOCK form
INVALID_ENCODING = "(invalid)"  # ... and an encoding `invalid_encoding` names


def invalid_encoding(code: bytes) -> tuple[int, str] | None:
    """(length, what) of an encoding at the start of `code` that the SDM makes #UD but
    the engine executes, or None. Capstone refuses these too. One so far: MOVBE with a
    register operand (0F 38 F0/F1 with ModRM.mod = 11; SDM Vol. 2 MOVBE lists only
    memory forms; kvm-unit-tests x86/emulator.c test_illegal_movbe). With an F2 prefix
    the same opcode is CRC32, whose register form is valid."""
    prefixes, _ = legacy_prefixes(code)
    at = opcode_offset(code)
    if 0xF2 in prefixes or code[at:at + 3] not in (b"\x0f\x38\xf0", b"\x0f\x38\xf1"):
        return None
    if len(code) <= at + 3 or code[at + 3] >> 6 != 3:
        return None
    return at + 4, "MOVBE with a register operand"


def decode_loaded(code: bytes, address: int) -> Iterator[Insn]:
    """The linear decode of loaded code (cpu/sites.py): `decode`, except that an
    instruction carrying a LOCK prefix the SDM forbids (Vol. 2 LOCK: `lock_is_legal`)
    comes out as mnemonic ILLEGAL_LOCK — capstone refuses most of them, which would end
    its decode there and hide every site after — and the decode resumes after it. Its
    length is that of the instruction without its LOCK bytes, plus those bytes."""
    at = 0
    while at < len(code):
        last = at
        for insn in decode(code[at:], address + at):
            last = insn.address + insn.size - address
            if LOCK_PREFIX in legacy_prefixes(insn.raw)[0] and not lock_is_legal(insn.raw, insn.address):
                yield Insn(insn.address, insn.size, ILLEGAL_LOCK, insn.text, insn.raw)
            else:
                yield insn
        at = last
        if at >= len(code):
            return
        lkgs = lkgs_length(code[at:at + 15], address + at)
        if lkgs is not None:
            yield Insn(address + at, lkgs, "lkgs", "", code[at:at + lkgs])
            at += lkgs
            continue
        bad = _illegal_lock_length(code[at:at + 15], address + at)
        if bad is not None:
            yield Insn(address + at, bad, ILLEGAL_LOCK, "", code[at:at + bad])
            at += bad
            continue
        invalid = invalid_encoding(code[at:at + 15])
        if invalid is None:
            return  # not an instruction: the decode ends here, as capstone's does
        yield Insn(address + at, invalid[0], INVALID_ENCODING, invalid[1],
                   code[at:at + invalid[0]])
        at += invalid[0]


def lkgs_length(code: bytes, address: int) -> int | None:
    """The length of an LKGS (F2 [REX] 0F 00 /6, SDM Vol. 2 LKGS) at the start of `code`,
    or None. Capstone 5 does not know LKGS; its ModRM/SIB/displacement are those of
    LLDT (0F 00 /2), so LLDT with the same operand gives the length."""
    prefixes, rest = legacy_prefixes(code)
    if 0xF2 not in prefixes:
        return None
    rex = rest
    while rex < len(code) and 0x40 <= code[rex] <= 0x4F:
        rex += 1
    if code[rex:rex + 2] != b"\x0f\x00" or rex + 2 >= len(code):
        return None
    modrm = code[rex + 2]
    if (modrm >> 3) & 7 != 6:
        return None
    lldt = bytes(b for b in prefixes if b != 0xF2) + code[rest:rex + 2] + \
        bytes([modrm & ~0x38 | 0x10]) + code[rex + 3:]
    insn = _one(lldt, address)
    return None if insn is None else int(insn.size) + 1


def _illegal_lock_length(code: bytes, address: int) -> int | None:
    """The length of an illegal LOCK form capstone refuses at the start of `code`, or
    None if `code` does not start with one."""
    prefixes, rest = legacy_prefixes(code)
    if LOCK_PREFIX not in prefixes or lock_is_legal(code, address):
        return None
    kept = bytes(b for b in prefixes if b != LOCK_PREFIX)
    insn = _one(kept + code[rest:], address)
    if insn is None:
        return None
    return int(insn.size) + len(prefixes) - len(kept)


def site_kind(insn: Insn) -> SiteKind | None:
    """The `SiteKind` of a decoded instruction, or None (it runs natively, unseen).
    POP SS is #UD in 64-bit mode, so MOV SS is the only SS load that opens a MOV-SS
    shadow here. MOV from CR0/CR2/CR3/CR4 runs natively (the engine holds those
    registers as written); MOV from CR8 reads the local APIC's TPR."""
    if insn.mnemonic == ILLEGAL_LOCK:
        return SiteKind.LOCK_UD
    if insn.mnemonic == INVALID_ENCODING:
        return SiteKind.INVALID_UD
    if insn.mnemonic == "clac":
        # ERETS/ERETU share CLAC's opcode; the last F2/F3 prefix selects them (capstone
        # and Unicorn 2.1.4 both treat them as CLAC).
        rep = [b for b in legacy_prefixes(insn.raw)[0] if b in (0xF2, 0xF3)]
        if rep:
            return SiteKind.ERETS if rep[-1] == 0xF2 else SiteKind.ERETU
    kind = SITE_KINDS.get(insn.mnemonic)
    if kind is None and insn.mnemonic == "mov":
        if insn.op_str.startswith("ss,"):
            kind = SiteKind.MOV_SS
        elif control_move(insn) is not None:
            kind = SiteKind.MOV_CR
        elif insn.op_str.startswith("dr") or insn.op_str.split(", ")[-1].startswith("dr"):
            kind = SiteKind.MOV_DR
    if kind is None and insn.mnemonic.startswith("out"):
        kind = SiteKind.OUT  # OUT, OUTSB/OUTSW/OUTSD
    if kind is None and insn.mnemonic in ("in", "insb", "insw", "insd"):
        kind = SiteKind.IN
    if kind is None and aligned_operand(insn) is not None:
        kind = SiteKind.SSE_ALIGN
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


_PORT_WIDTHS = {"al": 1, "ax": 2, "eax": 4, "b": 1, "w": 2, "d": 4}


def port_access(insn: Insn) -> tuple[int | None, int]:
    """(port, size in bytes) of IN/OUT/INS/OUTS: the port is the immediate of `in al,
    imm8` / `out imm8, al`, None when it is in DX; the size is the register's (AL, AX,
    EAX) or the string form's (B, W, D)."""
    if insn.mnemonic in ("in", "out"):
        ops = [o.strip() for o in insn.op_str.split(",")]
        port, reg = (ops[1], ops[0]) if insn.mnemonic == "in" else (ops[0], ops[1])
        return (None if port == "dx" else int(port, 0)), _PORT_WIDTHS[reg]
    return None, _PORT_WIDTHS[insn.mnemonic[-1]]


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


@dataclass(frozen=True)
class MemOperand:
    """An explicit memory operand: [segment: base + index*scale + disp], `size` bytes."""

    base: str | None
    index: str | None
    scale: int
    disp: int
    size: int
    segment: str | None


def memory_operands(code: bytes, address: int) -> tuple[int, tuple[MemOperand, ...]]:
    """(length, explicit memory operands) of the instruction at `address`; (0, ()) if
    `code` does not start with a whole instruction. Implicit accesses (PUSH, CALL...)
    are not listed; string instructions list [rdi]/[rsi]. Decoded once per (bytes,
    address): a fault handler's instruction faults again and again."""
    d = decoded_accesses(code, address)
    if d is None:
        return 0, ()
    return d.length, d.operands


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


# -- SDM corners (docs/sdm-map.md): decoding what the SDM's instruction rules need -----
#
# The functions below are pure (bytes and register values in, a verdict out): the machine
# calls them at the sites docs/sdm-map.md names. Capstone does the decoding; what it gets
# wrong for these purposes is corrected here (it rejects an illegal LOCK form outright,
# and it reports CMPXCHG's destination as read-only).

LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66,
                              0x67})
LOCK_PREFIX = 0xF0
# SDM Vol. 2 LOCK: the instructions that may be locked, only with a memory destination.
LOCKABLE = frozenset({"add", "adc", "and", "btc", "btr", "bts", "cmpxchg", "cmpxchg8b",
                      "cmpxchg16b", "dec", "inc", "neg", "not", "or", "sbb", "sub", "xor",
                      "xadd", "xchg"})
# Instructions that read and write their (first) operand: the lockable ones plus the
# shifts and rotates. With a memory destination the access has write intent from its
# first (read) part on (Bochs read_RMW_virtual_*: the page is checked for writing).
READ_MODIFY_WRITE = LOCKABLE | frozenset({"rol", "ror", "rcl", "rcr", "shl", "sal", "shr",
                                          "sar", "shld", "shrd"})


def legacy_prefixes(code: bytes) -> tuple[bytes, int]:
    """The legacy prefix bytes at the start of `code`, and where the rest (REX, opcode)
    starts."""
    i = 0
    while i < len(code) and i < 14 and code[i] in LEGACY_PREFIXES:
        i += 1
    return code[:i], i


def opcode_offset(code: bytes) -> int:
    """Where the opcode of the instruction at the start of `code` is: after its legacy
    prefixes and a REX prefix."""
    _, at = legacy_prefixes(code)
    if at < len(code) and 0x40 <= code[at] <= 0x4F:
        at += 1
    return at


def _one(code: bytes, address: int) -> capstone.CsInsn | None:
    return next(_cs().disasm(code, address, 1), None)


def _base_mnemonic(insn: capstone.CsInsn) -> str:
    words = str(insn.mnemonic).split()
    return words[-1] if words else ""


def lock_is_legal(code: bytes, address: int) -> bool:
    """False when the instruction at `address` carries a LOCK prefix the SDM forbids
    (Vol. 2 LOCK: #UD unless the instruction is in LOCKABLE *and* its destination is a
    memory operand), True otherwise (no LOCK, or a legal one, or not an instruction at
    all: that is another fault's business). Capstone refuses to decode an illegal LOCK
    form, so an instruction it decodes only once the LOCK bytes are dropped is illegal."""
    prefixes, rest = legacy_prefixes(code)
    if LOCK_PREFIX not in prefixes:
        return True
    insn = _one(code, address)
    if insn is None:
        unlocked = bytes(b for b in prefixes if b != LOCK_PREFIX) + code[rest:]
        return _one(unlocked, address) is None
    ops = list(insn.operands)
    return _base_mnemonic(insn) in LOCKABLE and bool(ops) and ops[0].type == CX.X86_OP_MEM


def _memory_writes(insn: capstone.CsInsn) -> tuple[bool, bool]:
    """(written, read and written) for the explicit memory operands of `insn`."""
    ops = list(insn.operands)
    mem = [op for op in ops if op.type == CX.X86_OP_MEM]
    if not mem:
        return False, False
    written = any(op.access & capstone.CS_AC_WRITE for op in mem)
    rmw = any(op.access & capstone.CS_AC_READ and op.access & capstone.CS_AC_WRITE for op in mem)
    if ops[0].type == CX.X86_OP_MEM and _base_mnemonic(insn) in READ_MODIFY_WRITE:
        written = rmw = True  # capstone marks CMPXCHG's destination read-only
    return written, rmw


def has_write_intent(code: bytes, address: int) -> bool:
    """The instruction writes an explicit memory operand (a store, or a read-modify-write
    whose read comes first): a #PF on that operand, even on its read part, has W = 1 in
    the error code (SDM Vol. 3A "Page-Fault Exceptions", W/R), and an EPT violation's
    qualification says write (Vol. 3C "Exit Qualification for EPT Violations")."""
    insn = _one(code, address)
    return insn is not None and _memory_writes(insn)[0]


def is_read_modify_write(code: bytes, address: int) -> bool:
    """The instruction reads and writes the same explicit memory operand (ADD [m], r,
    INC [m], XCHG [m], r, CMPXCHG [m], r, any LOCKed form, shifts of [m])."""
    insn = _one(code, address)
    return insn is not None and _memory_writes(insn)[1]


# -- segments: #SS or #GP ---------------------------------------------------------------

_STACK_BASES = frozenset({CX.X86_REG_RSP, CX.X86_REG_RBP, CX.X86_REG_ESP, CX.X86_REG_EBP})
_IMPLICIT_STACK = frozenset({"push", "pop", "pushfq", "popfq", "pushf", "popf", "call",
                             "ret", "enter", "leave", "iretq", "iret", "iretd"})
_ES_DESTINATION = ("stos", "movs", "scas", "ins", "cmps")


def _operand_segment(insn: capstone.CsInsn, op: Any) -> str:
    seg = op.mem.segment
    if seg == CX.X86_REG_FS:
        return "fs"
    if seg == CX.X86_REG_GS:
        return "gs"
    # CS/DS/ES/SS overrides are ignored in 64-bit mode (SDM Vol. 1 "Canonical
    # Addressing"): the default segment decides.
    if op.mem.base in (CX.X86_REG_RDI, CX.X86_REG_EDI) and \
            _base_mnemonic(insn).startswith(_ES_DESTINATION) and op.mem.index == 0:
        return "es"
    return "ss" if op.mem.base in _STACK_BASES else "ds"


def memory_operand_segment(code: bytes, address: int) -> str | None:
    """The segment ("ss", "ds", "es", "fs", "gs") of the first explicit memory operand of
    the instruction at `address`, None if it has none. SS when the *base* register is
    RSP or RBP and no FS/GS override applies; an RBP or RSP index does not count; CS, DS,
    ES and SS override prefixes are ignored in 64-bit mode (SDM Vol. 1 "Canonical
    Addressing": "In 64-bit mode, only FS and GS segment-overrides are applicable in this
    situation. Other segment override prefixes (CS, DS, ES and SS) are ignored")."""
    insn = _one(code, address)
    if insn is None:
        return None
    mem = [op for op in insn.operands if op.type == CX.X86_OP_MEM]
    return _operand_segment(insn, mem[0]) if mem else None


def _reg(regs: Mapping[str, int], name: str) -> int:
    """A register value from `regs` (64-bit names; a 32-bit name reads the low half)."""
    if name in regs:
        return regs[name]
    wide = "r" + name[1:] if name.startswith("e") else name
    return regs[wide] & 0xFFFFFFFF


def operand_address(insn: capstone.CsInsn, op: Any, regs: Mapping[str, int]) -> int:
    """The linear address of memory operand `op` of `insn` (FS/GS bases from
    regs["fs_base"], regs["gs_base"]; other segment bases are 0 in 64-bit mode)."""
    return ref_address(_mem_ref(insn, op, write=False), regs)


def faulting_segment(code: bytes, address: int, linear: int, regs: Mapping[str, int]) -> str:
    """The segment of the access of the instruction at `address` that touches `linear`
    (a non-canonical address the engine reported): an explicit memory operand whose bytes
    include it gives that operand's segment; otherwise the access is the instruction's
    implicit stack access (PUSH, POP, CALL, RET, ...): "ss". #SS(0) for "ss", #GP(0) for
    the others (SDM Vol. 2, "64-Bit Mode Exceptions")."""
    insn = _one(code, address)
    if insn is None:
        return "ds"
    for op in insn.operands:
        if op.type != CX.X86_OP_MEM:
            continue
        start = operand_address(insn, op, regs)
        if start <= linear < start + max(1, int(op.size)):
            return _operand_segment(insn, op)
    if _base_mnemonic(insn) in _IMPLICIT_STACK:
        return "ss"
    mem = [op for op in insn.operands if op.type == CX.X86_OP_MEM]
    return _operand_segment(insn, mem[0]) if mem else "ds"


@dataclass(frozen=True)
class AccessRange:
    """One memory access of an instruction: `size` bytes at linear `start` through
    `segment`, a write or not; `implicit` for the stack access of PUSH/POP/CALL/RET."""

    start: int
    size: int
    segment: str
    write: bool
    implicit: bool = False


_PUSHES = frozenset({"push", "pushfq", "pushf", "call"})
_POPS = frozenset({"pop", "popfq", "popf", "ret", "leave"})


@dataclass(frozen=True)
class MemRef:
    """An explicit memory operand as far as it does not depend on registers: its linear
    address is `disp` (plus the next instruction's address for RIP-relative, `base` =
    "rip") + base + index * scale, cut to 32 bits when a register is 32-bit (`narrow`),
    plus the FS/GS base of an override."""

    disp: int
    base: str | None
    index: str | None
    scale: int
    size: int
    segment: str  # the access's segment ("ss", "ds", "es", "fs", "gs"): `_operand_segment`
    override: str | None  # "fs" or "gs" (whose base is added), else None
    narrow: bool
    write: bool  # a store, or the destination of a read-modify-write


@dataclass(frozen=True)
class DecodedAccesses:
    """What `access_ranges` and `memory_operands` need of one instruction, decoded once."""

    length: int
    mnemonic: str  # without prefixes (`_base_mnemonic`)
    refs: tuple[MemRef, ...]  # explicit memory operands (none for LEA)
    operands: tuple[MemOperand, ...]  # the same, as `memory_operands` gives them
    stack: str | None  # "push", "pop" or "leave": the implicit stack slot


@lru_cache(maxsize=4096)
def decoded_accesses(code: bytes, address: int) -> DecodedAccesses | None:
    """The instruction at `address` decoded for its memory accesses, or None if `code`
    does not start with a whole instruction. Capstone's decode and its operand objects
    cost about 10 us; the answer is a pure function of the bytes and the address."""
    insn = _one(code, address)
    if insn is None:
        return None
    name = _base_mnemonic(insn)

    refs: list[MemRef] = []
    operands: list[MemOperand] = []
    for i, op in enumerate(insn.operands):
        if op.type != CX.X86_OP_MEM:
            continue
        operands.append(MemOperand(_reg_name(insn, op.mem.base), _reg_name(insn, op.mem.index),
                                   int(op.mem.scale), int(op.mem.disp), int(op.size),
                                   _reg_name(insn, op.mem.segment)))
        if name == "lea":
            continue
        write = bool(op.access & capstone.CS_AC_WRITE) or (i == 0 and name in READ_MODIFY_WRITE)
        refs.append(_mem_ref(insn, op, write=write))
    stack = "leave" if name == "leave" else "push" if name in _PUSHES else \
        "pop" if name in _POPS else None
    return DecodedAccesses(int(insn.size), name, tuple(refs), tuple(operands), stack)


def _reg_name(insn: capstone.CsInsn, reg: int) -> str | None:
    return None if reg == CX.X86_REG_INVALID else str(insn.reg_name(reg))


def _mem_ref(insn: capstone.CsInsn, op: Any, *, write: bool) -> MemRef:
    """Memory operand `op` of `insn` as a `MemRef`."""
    base, index = _reg_name(insn, op.mem.base), _reg_name(insn, op.mem.index)
    disp = int(op.mem.disp)
    if base == "rip":
        disp += insn.address + insn.size
    narrow = any(r is not None and r.startswith("e") for r in (base, index))
    override = {CX.X86_REG_FS: "fs", CX.X86_REG_GS: "gs"}.get(op.mem.segment)
    return MemRef(disp, base, index, int(op.mem.scale), max(1, int(op.size)),
                  _operand_segment(insn, op), override, narrow, write)


def ref_address(ref: MemRef, regs: Mapping[str, int]) -> int:
    """The linear address of `ref` with the registers `regs`."""
    ea = ref.disp
    if ref.base is not None and ref.base != "rip":
        ea += _reg(regs, ref.base)
    if ref.index is not None:
        ea += _reg(regs, ref.index) * ref.scale
    ea &= 0xFFFFFFFF if ref.narrow else 2**64 - 1
    if ref.override is not None:
        ea += regs.get(f"{ref.override}_base", 0)
    return ea & (2**64 - 1)


def access_ranges(code: bytes, address: int, regs: Mapping[str, int]) -> list[AccessRange]:
    """The data accesses of the instruction at `address` with the registers before it:
    its explicit memory operands, then the stack slot a PUSH/CALL writes ([RSP - 8, RSP))
    or a POP/RET reads ([RSP, RSP + 8); LEAVE reads at RBP). For the canonical check of
    every byte before paging (`idt.state.is_canonical_range`) and for finding the page a
    store starts on. LEA has no access."""
    d = decoded_accesses(code, address)
    if d is None:
        return []
    out = [AccessRange(ref_address(r, regs), r.size, r.segment, r.write) for r in d.refs]
    mask = 2**64 - 1
    if d.stack == "push":
        out.append(AccessRange((regs["rsp"] - 8) & mask, 8, "ss", True, True))
    elif d.stack is not None:
        top = regs["rbp"] if d.stack == "leave" else regs["rsp"]
        out.append(AccessRange(top & mask, 8, "ss", False, True))
    return out


# -- branches: the target before the branch executes --------------------------------------

RFLAGS_BITS = {"cf": 0, "pf": 2, "zf": 6, "sf": 7, "of": 11}
_JCC: dict[str, Callable[[Mapping[str, bool]], bool]] = {
    "jo": lambda f: f["of"], "jno": lambda f: not f["of"],
    "jb": lambda f: f["cf"], "jae": lambda f: not f["cf"],
    "je": lambda f: f["zf"], "jne": lambda f: not f["zf"],
    "jbe": lambda f: f["cf"] or f["zf"], "ja": lambda f: not (f["cf"] or f["zf"]),
    "js": lambda f: f["sf"], "jns": lambda f: not f["sf"],
    "jp": lambda f: f["pf"], "jnp": lambda f: not f["pf"],
    "jl": lambda f: f["sf"] != f["of"], "jge": lambda f: f["sf"] == f["of"],
    "jle": lambda f: f["zf"] or f["sf"] != f["of"], "jg": lambda f: not f["zf"] and f["sf"] == f["of"],
}


@dataclass(frozen=True)
class Branch:
    """A near branch decoded before it executes: its kind ("jmp", "call", "ret", "jcc",
    "loop", "jrcxz"), whether it is taken with the given registers, the target it would
    load into RIP, its length, and the RET's immediate (bytes released after the pop)."""

    kind: str
    taken: bool
    target: int
    length: int
    release: int = 0


def branch_target(code: bytes, address: int, regs: Mapping[str, int],
                  read_u64: Callable[[int], int]) -> Branch | None:
    """The near JMP/CALL/RET/Jcc/LOOP/JRCXZ at `address` (direct or indirect through a
    register or memory) with the registers as they are *before* it executes (`regs`:
    64-bit GPRs, "rip", "rflags", optionally "fs_base"/"gs_base"); `read_u64` reads the
    memory an indirect branch or RET takes its target from. None for anything else (far
    branches, IRET). The SDM faults a taken branch whose target is not canonical on the
    branch itself (Vol. 2 JMP/CALL/RET/Jcc/LOOP, "#GP(0) If the target offset is
    non-canonical"): the machine checks `is_canonical(branch.target)` when `taken`."""
    insn = _one(code, address)
    if insn is None:
        return None
    name = _base_mnemonic(insn)
    ops = list(insn.operands)
    flags = {k: bool(regs.get("rflags", 0) >> bit & 1) for k, bit in RFLAGS_BITS.items()}
    if name in ("ret", "retq"):
        release = int(ops[0].imm) if ops else 0
        return Branch("ret", True, read_u64(regs["rsp"]), insn.size, release)
    if name not in ("jmp", "call", "loop", "loope", "loopne", "jrcxz", "jecxz") and name not in _JCC:
        return None
    if not ops:
        return None
    op = ops[0]
    if op.type == CX.X86_OP_IMM:
        target = int(op.imm) & (2**64 - 1)
    elif op.type == CX.X86_OP_REG:
        target = _reg(regs, str(insn.reg_name(op.reg)))
    elif op.type == CX.X86_OP_MEM:
        target = read_u64(operand_address(insn, op, regs))
    else:
        return None
    if name in ("jmp", "call"):
        return Branch(name, True, target, insn.size)
    if name in _JCC:
        return Branch("jcc", _JCC[name](flags), target, insn.size)
    rcx = regs["rcx"]
    if name in ("jrcxz", "jecxz"):
        count = rcx if name == "jrcxz" else rcx & 0xFFFFFFFF
        return Branch("jrcxz", count == 0, target, insn.size)
    left = (rcx - 1) & (2**64 - 1)
    taken = left != 0 and (name == "loop" or flags["zf"] == (name == "loope"))
    return Branch("loop", taken, target, insn.size)


def state_before_branch(code: bytes, address: int, regs_after: Mapping[str, int]) -> dict[str, int]:
    """The registers to restore when a branch at `address` already executed (as the
    engine does: it jumps, then faults fetching the non-canonical target) but must
    instead fault on itself: RIP = the branch, RSP before a CALL's push or a RET's pop
    (and its immediate), RCX before a LOOP's decrement. Empty if `address` holds no near
    branch. (A CALL's return address already written below RSP is not architectural
    state: Bochs writes it too before its canonical check.)"""
    insn = _one(code, address)
    if insn is None:
        return {}
    name = _base_mnemonic(insn)
    ops = list(insn.operands)
    out = {"rip": address}
    if name == "call":
        out["rsp"] = (regs_after["rsp"] + 8) & (2**64 - 1)
    elif name in ("ret", "retq"):
        release = int(ops[0].imm) if ops else 0
        out["rsp"] = (regs_after["rsp"] - 8 - release) & (2**64 - 1)
    elif name in ("loop", "loope", "loopne"):
        out["rcx"] = (regs_after["rcx"] + 1) & (2**64 - 1)
    elif name not in ("jmp", "jrcxz", "jecxz") and name not in _JCC:
        return {}
    return out


# -- #AC ------------------------------------------------------------------------------------

def alignment_check_faults(*, cpl: int, cr0_am: bool, rflags_ac: bool, linear: int,
                           size: int, implicit_supervisor: bool = False) -> bool:
    """#AC(0) for a data or stack access of `size` bytes at `linear` (SDM Vol. 3A
    "Interrupt 17—Alignment Check Exception (#AC)"): alignment checking is on when CR0.AM
    = 1, RFLAGS.AC = 1 and CPL = 3, and it faults an access not aligned to its size
    (word 2, doubleword 4, quadword 8, 16-byte 16; bytes never). Implicit supervisor
    accesses (descriptor tables, the TSS, an event's frame) are never checked."""
    if implicit_supervisor or not (cr0_am and rflags_ac and cpl == 3):
        return False
    return size in (2, 4, 8, 16) and linear % size != 0
