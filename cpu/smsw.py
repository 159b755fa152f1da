"""SMSW to a 32-bit register before long mode: all of CR0's low doubleword.

SMSW stores the machine status word, CR0[15:0]. For a 32-bit register destination outside
64-bit mode the SDM (Vol. 2B "SMSW—Store Machine Status Word") says the low 16 bits of
CR0 go to the low 16 bits of the register and "the upper 16 bits of the register are
undefined"; what processors do (and Bochs `SMSW_EdR`, QEMU 7.2 `gen_op_mov_reg_v` with
the operand size) is store CR0[31:0]. kvm-unit-tests' realmode.flat checks that
(`test_smsw`: `smsw %eax` after setting CR0 bits above 15). Unicorn 2.1.4 (QEMU 5's
`smsw` with `MO_16` unless `CODE64`) stores 16 bits and keeps the register's upper half.
idtlab follows the processors (docs/sdm-map.md).

How: the 32-bit phase (cpu/boot32.py) has a Python callback at the start of every
translation block. A block whose bytes hold `0F 01` is decoded (16- or 32-bit code, from
CS.D); each SMSW with a register destination and a 32-bit operand size found gets a code
hook (`Engine.add_site`), and the block is run again with it. The hook executes the SMSW:
the register gets CR0[31:0], EIP moves past the instruction (the per-instruction counter
has counted it already). A hook whose bytes are no longer such an SMSW does nothing. In
64-bit mode SMSW runs natively with the right result (CODE64: the full operand size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpu.decode import decode, legacy_prefixes

if TYPE_CHECKING:
    from cpu.engine import Engine
    from cpu.memory import PhysicalMemory

# The 32-bit engine's names of the eight 32-bit registers, by ModRM.rm.
_REG32 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
DESC_DB = 1 << 22  # CS.D: 32-bit default operand size


def smsw_r32(code: bytes, *, default32: bool) -> tuple[int, int] | None:
    """(length, ModRM.rm) if `code` starts with SMSW to a register with a 32-bit operand
    size (`default32`: CS.D = 1), else None."""
    prefixes, i = legacy_prefixes(code)
    size32 = default32 != (0x66 in prefixes)  # an operand-size prefix: the other size
    if code[i:i + 2] != b"\x0f\x01" or len(code) < i + 3:
        return None
    modrm = code[i + 2]
    if modrm >> 6 != 3 or (modrm >> 3) & 7 != 4 or not size32:
        return None
    return i + 3, modrm & 7


class Smsw32:
    """The SMSW sites of a 32-bit phase (on its engine `e`)."""

    def __init__(self, e: Engine, phys: PhysicalMemory) -> None:
        self.e = e
        self.phys = phys
        self.sites: set[int] = set()
        e.site = self.site

    def _default32(self) -> bool:
        return bool(self.e.segment_cache("cs")[3] & DESC_DB)

    def scan(self, address: int, size: int) -> bool:
        """At the start of the block [address, address + size) (linear = physical before
        paging): hook its SMSW r32 instructions. True if a new one was hooked (the block
        must run again: stop the engine before it runs)."""
        if size <= 0 or not self.phys.contains(address, size):
            return False
        code = self.phys.read(address, size)
        if b"\x0f\x01" not in code:
            return False
        default32 = self._default32()
        fresh = False
        for insn in decode(code, address, bits=32 if default32 else 16):
            if insn.address in self.sites:
                continue
            if smsw_r32(insn.raw, default32=default32) is not None:
                self.sites.add(insn.address)
                self.e.add_site(insn.address)
                fresh = True
        return fresh

    def site(self, address: int) -> None:
        """The code hook before the instruction at linear `address`: execute it if it is
        (still) SMSW to a 32-bit register."""
        e = self.e
        if not self.phys.contains(address, 15):
            return
        found = smsw_r32(self.phys.read(address, 15), default32=self._default32())
        if found is None:
            return
        length, rm = found
        cr0, eip = e.read(("cr0", "rip"))
        e.redirect((eip + length) & 0xFFFFFFFF, {_REG32[rm]: cr0 & 0xFFFFFFFF})
