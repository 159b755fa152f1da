"""Unicorn's CPU context blob: where the fields idtlab patches live.

Privilege changes are made by patching the engine's saved context (`uc_context_save`):
the CS/SS segment caches and the CPL bits of `hflags` (a register write in 64-bit mode
sets only the selector). QEMU's stale "exception in flight" field (`old_exception`,
Unicorn issue #1883) must be reset after every exception Python consumed, or the next
contributory fault arrives as #DF. QEMU's error code for instruction-level faults and
whether the event was an INT instruction (`error_code`, `exception_is_int`) are read
from the same blob.

The offsets depend on how QEMU's `CPUX86State` was compiled, so they are found once per
process by probing — native IRETQs to CPL0 and CPL3, a #DE twice, a known #GP(0x1238),
an INT 0x80 — and never hard-coded. With cpu/engine.py, the only module that imports
`unicorn`.
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


def blob(ctx: Any) -> ctypes.Array[ctypes.c_char]:
    """The raw bytes of a `UcContext`, writable in place (`context_restore` reads them)."""
    ptr = ctypes.cast(ctx.context, ctypes.c_void_p).value
    blob: ctypes.Array[ctypes.c_char] = (ctypes.c_char * ctx.size).from_address(ptr)
    return blob


def _i32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<i", b, off)[0])


def new_uc(bits: int = 64) -> Any:
    """A 64-bit (or 32-bit) engine. Unicorn's binding is only partly typed, so it is `Any`."""
    return Uc(UC_ARCH_X86, UC_MODE_64 if bits == 64 else UC_MODE_32)  # type: ignore[no-untyped-call]


@cache
def native_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX of Unicorn's own CPUID (its default x86-64 CPU model), for the
    machine to adjust where the model differs from it (cpu/machine.py `_cpuid_leaf`)."""
    uc: Any = new_uc()
    uc.mem_map(0, 0x1000, UC_PROT_ALL)
    uc.mem_write(0, b"\x0f\xa2")  # cpuid
    uc.reg_write(X.UC_X86_REG_RAX, leaf)
    uc.reg_write(X.UC_X86_REG_RCX, subleaf)
    uc.emu_start(0, 2)
    eax, ebx, ecx, edx = (int(uc.reg_read(r)) for r in (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX,
                                                         X.UC_X86_REG_ECX, X.UC_X86_REG_EDX))
    return eax, ebx, ecx, edx


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
    return BlobLayout(hflags, cs, ss, error_code, error_code + 4, old_exception)
