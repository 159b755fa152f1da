"""Unicorn's CPU context blob: where the fields idtlab patches live.

Privilege changes are made by patching the engine's saved context (`uc_context_save`):
the CS/SS segment caches and the CPL bits of `hflags` (a register write in 64-bit mode
sets only the selector). QEMU's stale "exception in flight" field (`old_exception`,
Unicorn issue #1883) must be reset after every exception Python consumed, or the next
contributory fault arrives as #DF. QEMU's error code for instruction-level faults and
whether the event was an INT instruction (`error_code`, `exception_is_int`) are read
from the same blob.

Two registers the engine keeps and its API cannot read are read from the same blob:
PKRU (the page walk needs it when CR4.PKE = 1; RDPKRU, WRPKRU and XRSTOR change it
natively) and XCR0 (CPUID leaf 0DH reports the XSAVE area size for the features it
enables).

The offsets depend on how QEMU's `CPUX86State` was compiled, so they are found once per
process by probing — native IRETQs to CPL0 and CPL3, a #DE twice, a known #GP(0x1238),
an INT 0x80, two WRPKRUs and three XSETBVs — and never hard-coded. With cpu/engine.py,
the only module that imports `unicorn`.

The engine's own CPU model is QEMU's Skylake-Server (`UC_CPU_X86_SKYLAKE_SERVER`), the
oldest Unicorn model whose feature set holds SMAP and PKU: without SMAP QEMU neither
decodes STAC/CLAC nor keeps a separate TLB for supervisor accesses made with
EFLAGS.AC = 1, and without PKU it clears CR4.PKE. What the guest *sees* is the declared
model of cpu/cpu_model.py, never this one: CPUID is always answered from there.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import cache
from typing import Any

from unicorn import (  # type: ignore[attr-defined]  # Uc is not re-exported
    UC_ARCH_X86,
    UC_HOOK_INTR,
    UC_MODE_32,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
)
from unicorn import x86_const as X


@dataclass(frozen=True)
class BlobLayout:
    """Offsets inside Unicorn's CPU context blob (`uc_context_save`), found by probing."""

    hflags: int
    cs: int  # SegmentCache of CS: selector at +0, base +8, limit +16, flags +20
    ss: int
    error_code: int
    is_int: int
    old_exception: int
    pkru: int  # u32
    xcr0: int  # u64


def blob(ctx: Any) -> ctypes.Array[ctypes.c_char]:
    """The raw bytes of a `UcContext`, writable in place (`context_restore` reads them)."""
    ptr = ctypes.cast(ctx.context, ctypes.c_void_p).value
    blob: ctypes.Array[ctypes.c_char] = (ctypes.c_char * ctx.size).from_address(ptr)
    return blob


def _i32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<i", b, off)[0])


def _u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def _u64(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", b, off)[0])


_CR4_OSXSAVE = 1 << 18
_CR4_PKE = 1 << 22


def new_uc(bits: int = 64) -> Any:
    """A 64-bit (or 32-bit) engine. Unicorn's binding is only partly typed, so it is `Any`."""
    uc: Any = Uc(UC_ARCH_X86, UC_MODE_64 if bits == 64 else UC_MODE_32)  # type: ignore[no-untyped-call]
    uc.ctl_set_cpu_model(X.UC_CPU_X86_SKYLAKE_SERVER)  # see the module docstring
    return uc


_PROBE_GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00AFFB000000FFFF, 0x00CFF3000000FFFF)


@cache
def blob_layout() -> BlobLayout:
    """Locate the fields idtlab patches in the context blob (once per process)."""
    uc: Any = new_uc()  # Unicorn's binding is only partly typed
    uc.mem_map(0, 0x100000, UC_PROT_ALL)
    for i, d in enumerate(_PROBE_GDT):
        uc.mem_write(0x1000 + 8 * i, struct.pack("<Q", d))
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x1000, 8 * len(_PROBE_GDT) - 1, 0))
    uc.mem_write(0x2000, b"\x48\xcf")  # iretq
    uc.mem_write(0x3000, b"\x90\x90")

    def iret_to(cs: int, ss: int) -> bytes:
        uc.mem_write(0x8000 - 40, struct.pack("<5Q", 0x3000, cs, 2, 0x7000, ss))
        uc.reg_write(X.UC_X86_REG_RSP, 0x8000 - 40)
        uc.emu_start(0x2000, 0x3000)
        return bytes(blob(uc.context_save()))

    a, b = iret_to(0x08, 0x10), iret_to(0x1B, 0x23)
    n = len(a) - 4
    hflags = next(o for o in range(0, n, 4)
                  if _i32(a, o) & 3 == 0 and _i32(b, o) == _i32(a, o) | 3 and _i32(a, o) != 0)
    cs = next(o for o in range(0, n, 4) if (_i32(a, o), _i32(b, o)) == (0x08, 0x1B))
    ss = next(o for o in range(0, n, 4) if (_i32(a, o), _i32(b, o)) == (0x10, 0x23))

    # Exception-state probes on a fresh engine (CPL0, no GDT: nothing else can fault).
    uc = new_uc()
    uc.mem_map(0, 0x100000, UC_PROT_ALL)
    uc.reg_write(X.UC_X86_REG_RSP, 0x7000)
    fresh = bytes(blob(uc.context_save()))
    seen: list[bytes] = []

    def on_intr(u: Any, vector: int, _data: object) -> None:
        seen.append(bytes(blob(u.context_save())))
        u.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)

    def trap(code: bytes) -> bytes:
        seen.clear()
        uc.mem_write(0x4000, code)
        uc.emu_start(0x4000, 0x4000 + len(code))
        return seen[-1]

    div0 = b"\x31\xc9\xf7\xf1"  # xor ecx, ecx; div ecx
    de1 = trap(div0)
    de2 = trap(div0)
    old_exception = next(o for o in range(0, n, 4)
                         if (_i32(fresh, o), _i32(de1, o), _i32(de2, o)) == (-1, 0, 8))
    ctx = uc.context_save()
    struct.pack_into("<i", blob(ctx), old_exception, -1)
    uc.context_restore(ctx)
    gp = trap(b"\x66\xbb\x38\x12\x8e\xdb")  # mov bx, 0x1238; mov ds, bx  -> #GP(0x1238)
    int80 = trap(b"\xcd\x80")
    error_code = next(o for o in range(ss, n, 4)
                      if _i32(gp, o) == 0x1238 and _i32(gp, o + 4) == 0 and _i32(int80, o + 4) == 1)

    # PKRU and XCR0: written by WRPKRU / XSETBV from RAX, which is then cleared so that
    # only the register itself holds the values.
    cr4 = uc.reg_read(X.UC_X86_REG_CR4)
    uc.reg_write(X.UC_X86_REG_CR4, cr4 | _CR4_OSXSAVE | _CR4_PKE)

    def write_with(insn: bytes, value: int) -> bytes:
        uc.reg_write(X.UC_X86_REG_RAX, value)
        uc.reg_write(X.UC_X86_REG_RCX, 0)
        uc.reg_write(X.UC_X86_REG_RDX, 0)
        code = insn + b"\x31\xc0"  # ...; xor eax, eax
        uc.mem_write(0x5000, code)
        uc.emu_start(0x5000, 0x5000 + len(code))
        return bytes(blob(uc.context_save()))

    wrpkru, xsetbv = b"\x0f\x01\xef", b"\x0f\x01\xd1"
    p1, p2 = write_with(wrpkru, 0x5A5A1234), write_with(wrpkru, 0x0F0F00CC)
    pkru = next(o for o in range(0, n, 4)
                if (_u32(p1, o), _u32(p2, o)) == (0x5A5A1234, 0x0F0F00CC))
    x1, x2, x3 = (write_with(xsetbv, v) for v in (3, 0x203, 1))
    xcr0 = next(o for o in range(0, n - 4, 4)
                if (_u64(x1, o), _u64(x2, o), _u64(x3, o)) == (3, 0x203, 1))
    return BlobLayout(hflags, cs, ss, error_code, error_code + 4, old_exception, pkru, xcr0)
