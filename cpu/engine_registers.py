"""Register access for the engine adapter (cpu/engine.py): general-purpose, control
and segment registers, the descriptor-table registers, MSRs, and the fields of the CPU
state that Unicorn's API does not expose (PKRU, XCR0, the segment caches, QEMU's
exception bookkeeping), which are read from and patched into its saved context blob
(offsets probed by cpu/engine_blob.py).

Why this is more than `uc.reg_read`: the binding's per-register call costs ~3 us, most of
it in its register-class lookup, and delivery plus IRET used to make about twenty. So
registers are read and written through the library directly (ctypes), with a buffer
prepared once per register list (`read`, `write`), and everything an event needs comes
in one `uc_reg_read_batch` (`read_event_state`), cached until the next register write or
run (`version`).

Privilege changes go through the blob (`patch_context`): in 64-bit mode a register write
of CS or SS sets only the selector, so the CS/SS descriptor caches and the CPL bits of
QEMU's `hflags` are written directly, and QEMU's stale "exception in flight" field
(`old_exception`, Unicorn issue #1883) is reset after every exception the machine
consumed.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any

from unicorn import UcError  # type: ignore[attr-defined]  # not re-exported
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucpy

from cpu.engine_blob import BlobLayout, blob

REG = {
    "rax": X.UC_X86_REG_RAX, "rbx": X.UC_X86_REG_RBX, "rcx": X.UC_X86_REG_RCX,
    "rdx": X.UC_X86_REG_RDX, "rsi": X.UC_X86_REG_RSI, "rdi": X.UC_X86_REG_RDI,
    "rbp": X.UC_X86_REG_RBP, "rsp": X.UC_X86_REG_RSP, "r8": X.UC_X86_REG_R8,
    "r9": X.UC_X86_REG_R9, "r10": X.UC_X86_REG_R10, "r11": X.UC_X86_REG_R11,
    "r12": X.UC_X86_REG_R12, "r13": X.UC_X86_REG_R13, "r14": X.UC_X86_REG_R14,
    "r15": X.UC_X86_REG_R15, "rip": X.UC_X86_REG_RIP, "rflags": X.UC_X86_REG_RFLAGS,
    "cs": X.UC_X86_REG_CS, "ss": X.UC_X86_REG_SS, "ds": X.UC_X86_REG_DS,
    "es": X.UC_X86_REG_ES, "fs": X.UC_X86_REG_FS, "gs": X.UC_X86_REG_GS,
    "cr0": X.UC_X86_REG_CR0, "cr2": X.UC_X86_REG_CR2, "cr3": X.UC_X86_REG_CR3,
    "cr4": X.UC_X86_REG_CR4, "cr8": X.UC_X86_REG_CR8,
    "dr0": X.UC_X86_REG_DR0, "dr1": X.UC_X86_REG_DR1, "dr2": X.UC_X86_REG_DR2,
    "dr3": X.UC_X86_REG_DR3, "dr6": X.UC_X86_REG_DR6, "dr7": X.UC_X86_REG_DR7,
}
_TABLE_REGS = {"idtr": X.UC_X86_REG_IDTR, "gdtr": X.UC_X86_REG_GDTR, "tr": X.UC_X86_REG_TR,
               "ldtr": X.UC_X86_REG_LDTR}
_SEGMENT_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")  # QEMU's R_ES .. R_GS
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")
MSR_EFER = 0xC0000080
EFER_LMA = 1 << 10
CR0_PG = 1 << 31
DESC_L = 1 << 21  # the L (64-bit code) bit of a code descriptor's high dword
DESC_DB = 1 << 22  # D/B: 32-bit code (CS) or a 32-bit stack (SS)
# QEMU's hflags bits (target/i386/cpu.h): HF_CS32 4, HF_SS32 5, HF_CS64 15.
_HF_CS32, _HF_SS32, _HF_CS64 = 1 << 4, 1 << 5, 1 << 15
_HF_CODE_SIZE = _HF_CS32 | _HF_SS32 | _HF_CS64
# A UC_MODE_32 engine refuses the 64-bit registers (see `migrate_from`): its names
# map the 64-bit ones to their 32-bit halves (R8-R15 do not exist there).
REG32 = {**{k: REG[k] for k in ("cs", "ss", "ds", "es", "fs", "gs", "cr0", "cr2", "cr3", "cr4")},
         "rax": X.UC_X86_REG_EAX, "rbx": X.UC_X86_REG_EBX, "rcx": X.UC_X86_REG_ECX,
         "rdx": X.UC_X86_REG_EDX, "rsi": X.UC_X86_REG_ESI, "rdi": X.UC_X86_REG_EDI,
         "rbp": X.UC_X86_REG_EBP, "rsp": X.UC_X86_REG_ESP, "rip": X.UC_X86_REG_EIP,
         "rflags": X.UC_X86_REG_EFLAGS}


class _Mmr(ctypes.Structure):
    """uc_x86_mmr: a descriptor-table register (IDTR, GDTR, LDTR, TR)."""

    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _Msr(ctypes.Structure):
    """uc_x86_msr."""

    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


# Everything an event reads from the engine, in one `uc_reg_read_batch` call (each call
# through the binding costs ~3 us, and delivery plus IRET used to make about twenty):
# nine 64-bit registers, IDTR, GDTR and TR (`uc_x86_mmr`), and IA32_EFER (`uc_x86_msr`,
# whose `rid` the call reads). `EventState` is the layout of the buffer.
EVENT_REGS = ("rip", "rsp", "rflags", "cs", "ss", "cr2", "cr0", "cr3", "cr4")
EVENT_TABLES = ("idtr", "gdtr", "tr")
_EVENT_LAYOUT = struct.Struct("<9Q" + "H6xQII" * 3 + "I4xQ")
_EVENT_INDEX = {name: i for i, name in enumerate(EVENT_REGS)}
# What a delivery or an IRET writes: no control register, table register or MSR.
_FRAME_REGISTERS = frozenset({"rip", "rsp", "rflags"})


class RegisterAccess:
    """The engine's registers (a base class of `cpu.engine.Engine`, which sets `uc`,
    `bits` and `layout` and calls `_init_registers`)."""

    uc: Any
    bits: int
    layout: BlobLayout

    def _init_registers(self) -> None:
        uc = self.uc
        self._uclib: Any = _ucpy.uclib
        self._uch: Any = uc._uch
        self._batches: dict[tuple[str, ...], tuple[Any, Any, Any]] = {}
        self._reg = REG if self.bits == 64 else REG32
        self._mmr = _Mmr()
        self._msr = _Msr()
        self._ctx: Any = None
        self._event_buf, self._event_ids, self._event_ptrs = self._event_batch()
        # `version` changes with every register write and every run: between runs, the
        # event state read at one version is the engine's state (`read_event_state`).
        self.version = 0
        self._running = False
        self._event_state: tuple[int, ...] = ()
        self._event_version = -1
        # CR0, CR3, CR4, EFER and the GDT base (`control_scope`), at `_scope_version`: a
        # write of RIP, RSP and RFLAGS only (a delivery, an IRET) leaves them as they are.
        self._scope: tuple[int, ...] = ()
        self._scope_version = -1
        # One reused buffer per register for `read_reg` (only that register is ever read
        # into it, so the bytes a narrow register leaves unwritten stay 0).
        self._singles: dict[str, tuple[int, Any, Any]] = {}

    # -- registers ---------------------------------------------------------------------
    # The binding's reg_read/reg_read_batch cost ~3 us per register (most of it
    # in its register-class lookup). Delivery and IRET read and write a handful of
    # registers per event, so these call the library directly through ctypes with
    # buffers prepared once per register list.
    def _batch(self, names: tuple[str, ...]) -> tuple[Any, Any, Any]:
        b = self._batches.get(names)
        if b is None:
            n = len(names)
            ids = (ctypes.c_int * n)(*[self._reg[x] for x in names])
            vals = (ctypes.c_uint64 * n)()
            base = ctypes.addressof(vals)
            ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
            b = self._batches[names] = (ids, vals, ptrs)
        return b

    def read(self, names: Sequence[str]) -> list[int]:
        key = tuple(names)
        ids, vals, ptrs = self._batch(key)
        ctypes.memset(vals, 0, 8 * len(key))  # segment registers fill only 2 bytes
        status = self._uclib.uc_reg_read_batch(self._uch, ids, ptrs, len(key))
        if status != 0:
            raise UcError(status)  # type: ignore[no-untyped-call]
        return list(vals)

    def write(self, values: dict[str, int]) -> None:
        keep_scope = self._scope_version == self.version and _FRAME_REGISTERS.issuperset(values)
        self.version += 1
        if keep_scope:
            self._scope_version = self.version
        key = tuple(values)
        ids, vals, ptrs = self._batch(key)
        for i, v in enumerate(values.values()):
            vals[i] = v & 0xFFFFFFFFFFFFFFFF
        status = self._uclib.uc_reg_write_batch(self._uch, ids, ptrs, len(key))
        if status != 0:
            raise UcError(status)  # type: ignore[no-untyped-call]

    def redirect(self, rip: int, values: dict[str, int]) -> None:
        """From a hook while the engine runs: write `values`, then RIP, and continue there.
        Only a single-register write of RIP makes Unicorn 2.1.4 leave the current
        translation block (its batch write sets RIP but runs on, in the old block)."""
        self.write(values)
        rid, buf, ref = self._single("rip")
        buf.value = rip & 0xFFFFFFFFFFFFFFFF
        status = self._uclib.uc_reg_write(self._uch, rid, ref)
        if status != 0:
            raise UcError(status)  # type: ignore[no-untyped-call]

    def _single(self, name: str) -> tuple[int, Any, Any]:
        one = self._singles.get(name)
        if one is None:
            buf = ctypes.c_uint64(0)
            one = self._singles[name] = (self._reg[name], buf, ctypes.byref(buf))
        return one

    def has_register(self, name: str) -> bool:
        """`read_reg(name)` works on this engine (the 32-bit one has no R8-R15)."""
        return name in self._reg

    def read_reg(self, name: str) -> int:
        if self._event_version == self.version and not self._running:
            i = _EVENT_INDEX.get(name)
            if i is not None:
                return self._event_state[i]
        rid, buf, ref = self._single(name)
        status = self._uclib.uc_reg_read(self._uch, rid, ref)
        if status != 0:
            raise UcError(status)  # type: ignore[no-untyped-call]
        return int(buf.value)

    def _event_batch(self) -> tuple[Any, Any, Any]:
        n = len(EVENT_REGS) + len(EVENT_TABLES) + 1
        buf = (ctypes.c_uint8 * _EVENT_LAYOUT.size)()
        base = ctypes.addressof(buf)
        offsets = [8 * i for i in range(len(EVENT_REGS))]
        offsets += [8 * len(EVENT_REGS) + 24 * i for i in range(len(EVENT_TABLES))]
        offsets.append(_EVENT_LAYOUT.size - 16)
        ids = (ctypes.c_int * n)(*[self._reg.get(x, 0) for x in EVENT_REGS],
                                 *[_TABLE_REGS[x] for x in EVENT_TABLES], X.UC_X86_REG_MSR)
        ptrs = (ctypes.c_void_p * n)(*[base + o for o in offsets])
        struct.pack_into("<I", buf, offsets[-1], MSR_EFER)  # the MSR the last slot reads
        return buf, ids, ptrs

    def read_event_state(self) -> tuple[int, ...]:
        """RIP, RSP, RFLAGS, CS, SS, CR2, CR0, CR3, CR4; (selector, base, limit, flags) of
        IDTR, GDTR and TR; IA32_EFER — in one call (64-bit engines only)."""
        if self.bits != 64:
            raise RuntimeError("read_event_state needs the 64-bit engine")
        if self._event_version == self.version and not self._running:
            return self._event_state
        status = self._uclib.uc_reg_read_batch(self._uch, self._event_ids, self._event_ptrs,
                                               len(self._event_ids))
        if status != 0:
            raise UcError(status)  # type: ignore[no-untyped-call]
        v = _EVENT_LAYOUT.unpack_from(self._event_buf)
        # CS and SS fill 2 bytes of their slots (the rest stays 0); the MSR slot's
        # first field is the MSR number, kept for the next call.
        state = (*v[:3], v[3] & 0xFFFF, v[4] & 0xFFFF, *v[5:21], v[22])
        if not self._running:
            self._event_state, self._event_version = state, self.version
            self._scope, self._scope_version = (state[6], state[7], state[8], state[21],
                                                state[14]), self.version
        return state

    def control_scope(self) -> tuple[int, ...]:
        """CR0, CR3, CR4, EFER and the GDT base, in one call at most (what a native
        IRETQ vouch is made under, cpu/native_paths.py)."""
        if self._scope_version == self.version and not self._running:
            return self._scope
        v = self.read_event_state()
        return (v[6], v[7], v[8], v[21], v[14])

    def read_table(self, which: str) -> tuple[int, int, int]:
        """(selector, base, limit) of IDTR, GDTR, LDTR or TR."""
        reg = _TABLE_REGS[which]
        mmr = self._mmr
        status = self._uclib.uc_reg_read(self._uch, reg, ctypes.byref(mmr))
        if status != 0:
            raise UcError(status)  # type: ignore[no-untyped-call]
        return int(mmr.selector), int(mmr.base), int(mmr.limit)

    def write_table(self, which: str, selector: int, base: int, limit: int, flags: int = 0) -> None:
        reg = _TABLE_REGS[which]
        self.version += 1
        self.uc.reg_write(reg, (selector, base, limit, flags))

    def read_msr(self, msr: int) -> int:
        m = self._msr
        m.rid = msr
        status = self._uclib.uc_reg_read(self._uch, X.UC_X86_REG_MSR, ctypes.byref(m))
        if status != 0:
            raise UcError(status)  # type: ignore[no-untyped-call]
        return int(m.value)

    def write_msr(self, msr: int, value: int) -> None:
        self.version += 1
        self.uc.reg_write(X.UC_X86_REG_MSR, (msr, value))

    # -- context-blob patches ------------------------------------------------------------
    def _saved_context(self) -> Any:
        """The engine's CPU state in one reused context object (saving into an existing
        context avoids allocating one per event)."""
        if self._ctx is None:
            self._ctx = self.uc.context_save()
        else:
            self.uc.context_update(self._ctx)
        return self._ctx

    def pkru(self) -> int:
        """PKRU (protection keys for user-mode pages): RDPKRU, WRPKRU and XRSTOR change
        it natively, and the engine's API has no register for it."""
        return int(struct.unpack_from("<I", blob(self._saved_context()), self.layout.pkru)[0])

    def xcr0(self) -> int:
        """XCR0 (XSETBV changes it natively; the engine's API has no register for it)."""
        return int(struct.unpack_from("<Q", blob(self._saved_context()), self.layout.xcr0)[0])

    def segment_caches(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(selector, descriptor flags) of segment registers ("es", "cs", "ss", "ds",
        "fs", "gs") as QEMU caches them: the flags are the descriptor's high dword
        (DPL in bits 13-14, S in bit 12, the type in bits 8-11). QEMU's `segs[]` array
        holds ES, CS, SS, DS, FS, GS in that order, one `SegmentCache` apart."""
        b = blob(self._saved_context())
        lay = self.layout
        stride = lay.ss - lay.cs
        out: dict[str, tuple[int, int]] = {}
        for name in names:
            off = lay.cs + (_SEGMENT_ORDER.index(name) - 1) * stride
            selector, flags = struct.unpack_from("<I", b, off)[0], struct.unpack_from("<I", b, off + 20)[0]
            out[name] = (int(selector) & 0xFFFF, int(flags))
        return out

    def segment_cache(self, name: str) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of a segment register's descriptor cache."""
        b = blob(self._saved_context())
        off = self.layout.cs + (_SEGMENT_ORDER.index(name) - 1) * (self.layout.ss - self.layout.cs)
        selector, _pad, base, limit, flags = struct.unpack_from("<IIQII", b, off)
        return int(selector) & 0xFFFF, int(base), int(limit), int(flags)

    def load_real_segment(self, name: str, selector: int) -> None:
        """A real-mode segment load: selector and base = selector * 16; the limit and the
        attributes stay (QEMU `do_interrupt_real`, Bochs `load_seg_reg` in real mode)."""
        ctx = self._saved_context()
        off = self.layout.cs + (_SEGMENT_ORDER.index(name) - 1) * (self.layout.ss - self.layout.cs)
        struct.pack_into("<IIQ", blob(ctx), off, selector & 0xFFFF, 0, (selector & 0xFFFF) << 4)
        self.version += 1
        self.uc.context_restore(ctx)

    def exception_info(self) -> tuple[int, bool]:
        """QEMU's error code and INT-instruction flag for the exception just hooked."""
        view = memoryview(blob(self._saved_context())).cast("B")
        error_code, is_int = struct.unpack_from("<Ii", view, self.layout.error_code)
        assert self.layout.is_int == self.layout.error_code + 4
        return int(error_code), bool(is_int)

    def patch_context(self, *, segments: tuple[int, int, int, int, int] | None = None,
                      clear_stale_exception: bool = False) -> None:
        """Apply privilege/segment state and/or reset QEMU's stale exception state.

        `segments` = (cs_selector, cs_flags, ss_selector, ss_flags, cpl), where *_flags is
        the descriptor's high dword as QEMU caches it (0 for a null SS).
        """
        ctx = self._saved_context()
        b = blob(ctx)
        lay = self.layout
        if clear_stale_exception:
            struct.pack_into("<i", b, lay.old_exception, -1)
        if segments is not None:
            cs, cs_flags, ss, ss_flags, cpl = segments
            struct.pack_into("<IIQII", b, lay.cs, cs, 0, 0, 0xFFFFFFFF, cs_flags)
            struct.pack_into("<IIQII", b, lay.ss, ss, 0, 0, 0xFFFFFFFF if ss & 0xFFFC else 0,
                             ss_flags)
            h = struct.unpack_from("<I", b, lay.hflags)[0] & ~(3 | _HF_CODE_SIZE)
            # QEMU's cached code/stack size (cpu_x86_load_seg_cache): 64-bit code sets
            # CS64, CS32 and SS32; compatibility-mode code takes CS32 from CS.D and SS32
            # from SS.B.
            if cs_flags & DESC_L:
                h |= _HF_CODE_SIZE
            else:
                h |= (_HF_CS32 if cs_flags & DESC_DB else 0) | (_HF_SS32 if ss_flags & DESC_DB else 0)
            struct.pack_into("<I", b, lay.hflags, h | cpl)
        self.version += 1
        self.uc.context_restore(ctx)
