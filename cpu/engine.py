"""The engine adapter: with cpu/engine_blob.py, the only code in idtlab that imports
`unicorn`.

Contract (each point a behaviour of Unicorn 2.1.4 that idtlab depends on, which is why
the version is pinned):

* Unicorn executes guest instructions and nothing else. It never delivers an event:
  exceptions and INT n reach `UC_HOOK_INTR` as a bare vector (no error code, no CR2),
  with RIP at the faulting instruction for faults and after it for INT n/INT3; the hook
  records it and stops the engine, and Python delivers.
* Address translation is Python's (`UC_TLB_VIRTUAL` + `UC_HOOK_TLB_FILL`). A refused
  translation is filled with a *poison* physical page that is not mapped, so the access
  lands in `UC_HOOK_MEM_*_UNMAPPED` with the exact offset in the page (refusing the fill
  itself would stop emulation without the address).
* Privilege is changed by patching the CPU context blob: the CS/SS segment caches and
  the CPL bits of `hflags` (register writes in 64-bit mode only set selectors). QEMU's
  stale "exception in flight" field (`old_exception`; Unicorn issue #1883) is reset to
  -1 after every exception the hook consumed, or the next contributory fault arrives as
  #DF and a third as a triple-fault reset. The offsets are probed (cpu/engine_blob.py).
* HLT stops emulation silently (Unicorn issue #1082), native IRETQ's NMI unblocking is
  invisible, and IN/OUT run at CPL 3 with IOPL 0 without #GP: those instructions are
  sites the machine intercepts (cpu/sites.py).
* A `UC_MODE_32` engine executes a real switch to long mode but its binding will not
  access the 64-bit registers; the state is then moved to a `UC_MODE_64` engine
  (`migrate_from`).
* Instructions are counted by a native UC_HOOK_CODE callback (`cpu/native/counter.c`),
  registered first so it runs before any Python code hook on the same instruction.
* Every translation block the engine generates is reported before it first runs
  (`translated(pc, size)`, from `UC_HOOK_EDGE_GENERATED`, which Unicorn calls right after
  `tb_gen_code` in `tb_find`, and before the block runs: a stop requested there is seen
  by `cpu_exec`'s exit-request check, and the block does not run). This includes a
  block generated again because the guest wrote its code (QEMU invalidates the blocks of
  a written range). Unicorn calls the hook only once some block has run to its end
  (`uc->last_tb`), so each engine first runs a two-byte `jmp` on a private page (`_prime`).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Sequence
from typing import Any

from unicorn import (  # type: ignore[attr-defined]  # Uc/UcError are not re-exported
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_INSN_INVALID,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_EDGE_GENERATED,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ,
    UC_MEM_READ_UNMAPPED,
    UC_MEM_WRITE,
    UC_MEM_WRITE_UNMAPPED,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucpy

from cpu import native
from cpu.decode import decode, decode_one, has_write_intent
from cpu.engine_blob import blob, blob_layout, new_uc
from cpu.memory import PhysicalMemory
from cpu.mmu import Access
from cpu.native_paths import NativePaths

ERR_INSN_INVALID = UC_ERR_INSN_INVALID
PROT_R, PROT_W, PROT_X = UC_PROT_READ, UC_PROT_WRITE, UC_PROT_EXEC
POISON_BASE = 1 << 44  # far above any guest RAM; never mapped
PRIME_PAGE = 1 << 38  # far above any guest RAM; mapped only while `_prime` runs
UNTIL_NEVER = 2**64 - 1
MAX_RESTARTS = 64  # self-modifying-code restarts handled in one `run` before it returns

_LEGACY_PREFIX_BYTES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
_FILL_ACCESS = {UC_MEM_READ: Access.READ, UC_MEM_WRITE: Access.WRITE, UC_MEM_FETCH: Access.FETCH}
_ACCESS_FILL = {v: k for k, v in _FILL_ACCESS.items()}


class Refuse:
    """A TLB-fill answer: refuse the fill outright (`REFUSE`). The engine then stops at
    the accessing instruction before any byte of the access is done, and calls
    `refused(vpage, access)`; the exact address is not known (poisoning gives it, but a
    store that crosses into a poisoned page has written its first page by then: QEMU's
    `store_helper` fills the second page first, then stores byte by byte)."""


REFUSE = Refuse()


class _TlbEntry(ctypes.Structure):
    """uc_tlb_entry."""

    _fields_ = [("paddr", ctypes.c_uint64), ("perms", ctypes.c_int32)]
_UNMAPPED_ACCESS = {UC_MEM_READ_UNMAPPED: Access.READ, UC_MEM_WRITE_UNMAPPED: Access.WRITE,
                    UC_MEM_FETCH_UNMAPPED: Access.FETCH}

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


# int (*)(uc_engine *, void *user_data): UC_HOOK_INSN for CPUID, RDTSC, RDTSCP.
_INSN_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


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


class Engine:
    """A Unicorn x86-64 CPU over a `PhysicalMemory`, with Python callbacks for events.

    Callbacks (set by the machine before `run`):
      fill(vpage, access) -> (ppage, prot), None to poison the page, or REFUSE
      poison(vaddr, access) -> None           an access hit a poisoned translation
      refused(vpage, access) -> None          a fill was refused (REFUSE)
      unmapped(paddr, access) -> None         a translation pointed outside RAM
      interrupt(vector) -> None               UC_HOOK_INTR
      site(address) -> None                   an address registered with `add_site`
      port_in(port, size) -> int, port_out(port, size, value) -> None
    Every callback that wants the engine to stop calls `stop()`.
    """

    def __init__(self, mem: PhysicalMemory, *, block_counting: bool = False, bits: int = 64,
                 windows: Sequence[tuple[int, PhysicalMemory]] = ()) -> None:
        """`bits` = 32: a UC_MODE_32 engine for a multiboot image's 32-bit entry code
        QEMU's own page walk (no TLB-fill hook: nothing is modelled before
        long mode), 32-bit register names, 32-bit decoding for block counting, a block
        callback `block(address)`. Both kinds call `cpuid(leaf, subleaf)` for a CPUID they
        execute. `windows` are more physical memory, each at its base address (pc-testdev's
        IORAM)."""
        if bits not in (32, 64):
            raise ValueError(f"bits must be 32 or 64, not {bits}")
        self.mem = mem
        self.bits = bits
        self.block_counting = block_counting
        # Reads guest code at a linear address (set by the machine); used to count the
        # instructions of a translation block in block-counting mode.
        self.code_reader: Callable[[int, int], bytes | None] = lambda a, n: None
        self._block_starts: dict[tuple[int, int], tuple[int, ...]] = {}
        # address -> (size, instruction starts) of the longest block decoded there
        self._block_decodes: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.layout = blob_layout()
        uc: Any = new_uc(bits)
        if bits == 64:
            uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.mem_map_ptr(0, mem.size, UC_PROT_ALL, mem.host_address)
        self.windows = tuple(windows)
        for base, window in self.windows:
            uc.mem_map_ptr(base, window.size, UC_PROT_ALL, window.host_address)
        # Exits instead of `until`: after every emu_start Unicorn drops the translation
        # of the code before its `until` address, which translates that address first (a
        # TLB fill). With no `until` wanted (UNTIL_NEVER) that was a Python fill of the
        # top page on every run; with an empty exit set there is nothing to drop (`_emu`
        # sets the one exit a bounded run needs).
        uc.ctl_exits_enabled(True)
        # The power-up values QEMU's CPU reset would set and Unicorn's does not (it leaves
        # both 0: every x87 and SIMD exception unmasked). SDM Vol. 3A "Processor State
        # After Reset": x87 FPU control word 0040H, MXCSR 1F80H.
        uc.reg_write(X.UC_X86_REG_FPCW, 0x0040)
        uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F80)
        self.uc: Any = uc
        self._prime()
        self.fill: Callable[[int, Access], tuple[int, int] | Refuse | None] = \
            lambda v, a: (v, UC_PROT_ALL)
        self.poison: Callable[[int, Access], None] = lambda v, a: None
        self.refused: Callable[[int, Access], None] = lambda v, a: None
        self.unmapped: Callable[[int, Access], None] = lambda p, a: None
        self.interrupt: Callable[[int], None] = lambda v: None
        self.site: Callable[[int], None] = lambda a: None
        self.port_in: Callable[[int, int], int] = lambda p, s: (1 << (8 * s)) - 1
        self.port_out: Callable[[int, int, int], None] = lambda p, s, v: None
        self._poison_slots: dict[int, int] = {}
        self._poison_pages: list[int] = []
        self._sites: dict[int, int] = {}
        self._run_count = 0  # the instruction count when `run` started
        self._restart: tuple[int, bool] | None = None  # (pc, machine asked to stop too)
        self._stepping: int | None = None  # the store `_step_restarted` runs alone
        self._uclib: Any = _ucpy.uclib
        self._uch: Any = uc._uch
        self._batches: dict[tuple[str, ...], tuple[Any, Any, Any]] = {}
        self._reg = REG if bits == 64 else REG32
        self.block: Callable[[int], None] = lambda a: None
        # A new translation block (pc, size) is about to run for the first time; True stops
        # the engine before it runs (cpu/sites.py decodes it for sites).
        self.translated: Callable[[int, int], bool] = lambda pc, size: False
        self.cpuid: Callable[[int, int], tuple[int, int, int, int] | None] = lambda leaf, sub: None
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
        # One reused buffer per register for `read_reg` (only that register is ever read
        # into it, so the bytes a narrow register leaves unwritten stay 0).
        self._singles: dict[str, tuple[int, Any, Any]] = {}

        # The native counter first, so it runs before any Python code hook.
        lib = native.load()
        self._lib = lib
        self.counter = native.CounterStruct(
            0, 2**64 - 1, ctypes.cast(_ucpy.uclib.uc_emu_stop, ctypes.c_void_p), 0)
        self.counter.stop_cycle = 2**64 - 1
        self.counter.default_cost = 1
        self.counter.split = native.NO_SPLIT
        self.counter.ac_pass = 2**64 - 1
        self.counter.reg_read = ctypes.cast(_ucpy.uclib.uc_reg_read, ctypes.c_void_p)
        self.counter.rid_eflags = X.UC_X86_REG_EFLAGS
        self._miss_fn: Any = None  # keeps the ctypes callbacks alive
        self._bmiss_fn: Any = None
        self._counter_hook = ctypes.c_size_t()
        if block_counting:
            self._bmiss_fn = native.MissCallback(self._block_miss)
            self.counter.bmiss = ctypes.cast(self._bmiss_fn, ctypes.c_void_p)
            fn = ctypes.cast(lib.idtlab_count_block, ctypes.c_void_p)
            kind = UC_HOOK_BLOCK
        else:
            fn = ctypes.cast(lib.idtlab_count_insn, ctypes.c_void_p)
            kind = UC_HOOK_CODE
        status = _ucpy.uclib.uc_hook_add(uc._uch, ctypes.byref(self._counter_hook), kind,
                                         fn, ctypes.byref(self.counter), ctypes.c_uint64(1),
                                         ctypes.c_uint64(0))
        if status != 0:
            raise RuntimeError(f"uc_hook_add(counter) failed: {status}")

        # The TLB fill: a native front answers from translations Python already computed
        # and validated (tlb.c); everything else comes to `_tlb_miss` -> `fill`.
        self._tlb = native.TlbStruct()
        self._tlb_slots = (ctypes.c_uint8 * (native.TLB_SLOT_SIZE * native.TLB_SLOTS))()
        self._tlb_miss_fn = native.TlbMissCallback(self._tlb_miss)
        self._tlb_hook = ctypes.c_size_t()
        t = self._tlb
        t.reg_read = ctypes.cast(_ucpy.uclib.uc_reg_read, ctypes.c_void_p)
        t.miss = ctypes.cast(self._tlb_miss_fn, ctypes.c_void_p)
        t.mem, t.mem_size = mem.host_address, mem.size
        t.slots = ctypes.cast(self._tlb_slots, ctypes.c_void_p)
        t.mask = native.TLB_SLOTS - 1
        t.rid_cr0, t.rid_cr3, t.rid_cr4 = X.UC_X86_REG_CR0, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4
        t.rid_cs, t.rid_msr = X.UC_X86_REG_CS, X.UC_X86_REG_MSR
        t.rid_rflags = X.UC_X86_REG_RFLAGS
        t.enabled = 1 if bits == 64 else 0
        status = _ucpy.uclib.uc_hook_add(uc._uch, ctypes.byref(self._tlb_hook), UC_HOOK_TLB_FILL,
                                         ctypes.cast(lib.idtlab_tlb_fill, ctypes.c_void_p),
                                         ctypes.byref(self._tlb), ctypes.c_uint64(1),
                                         ctypes.c_uint64(0))
        if status != 0:
            raise RuntimeError(f"uc_hook_add(tlb fill) failed: {status}")
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        # CPUID the engine executes itself answers through `cpuid` (the declared CPU model),
        # never from the engine's own model: in the 32-bit phase, and in 64-bit code the
        # machine did not decode at load time (decoded CPUIDs are sites).
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        # RDTSC/RDTSCP of the 32-bit phase (no sites there) read `tsc()`, the machine's
        # TSC, not the host's clock (Unicorn calls these hooks after its CR4.TSD check).
        # (The binding refuses these two hooks: they are added through the library.)
        self.tsc: Callable[[], int | None] = lambda: None
        self._tsc_fns = [_INSN_FN(self._on_rdtsc), _INSN_FN(self._on_rdtscp)] if bits == 32 else []
        for tsc_fn, insn in zip(self._tsc_fns, (X.UC_X86_INS_RDTSC, X.UC_X86_INS_RDTSCP),
                                strict=False):
            if _ucpy.uclib.uc_hook_add(uc._uch, ctypes.byref(ctypes.c_size_t()), UC_HOOK_INSN, tsc_fn,
                                       None, ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn)):
                raise RuntimeError("uc_hook_add(RDTSC) failed")
        if bits == 32:
            # After the counter: a stop here comes after the block was counted.
            uc.hook_add(UC_HOOK_BLOCK, self._on_block)
        # RDTSC/RDTSCP sites executed natively when Python vouched for them (native_paths).
        self.paths = NativePaths(uc, _ucpy.uclib, self.counter, block_counting=block_counting,
                                 rids=self._reg, site=lambda a: self._on_site(uc, a, 0, None))
        self._paths_state = self.paths.state
        if bits == 64:
            uc.hook_add(UC_HOOK_EDGE_GENERATED, self._on_translated)

    def _prime(self) -> None:
        """Run one block to its end on a private page, before any hook exists: Unicorn
        reports generated blocks (`UC_HOOK_EDGE_GENERATED`) only once `uc->last_tb` is set,
        which happens when a block returns normally to `cpu_exec` (a block stopped by a
        fault or a hook does not). Without this, the first blocks a machine runs — an
        entry that raises #UD, then its handler — would never be reported. (The 32-bit
        engine of a multiboot image's entry phase has no sites to find.)"""
        if self.bits != 64:
            return
        uc = self.uc
        code = b"\xeb\x00"  # jmp to the next instruction: a block that ends normally
        uc.mem_map(PRIME_PAGE, 0x1000, UC_PROT_ALL)
        uc.mem_write(PRIME_PAGE, code)
        before = uc.reg_read(X.UC_X86_REG_RIP)
        uc.ctl_set_exits([PRIME_PAGE + len(code)])  # exits are enabled: `until` is one
        uc.emu_start(PRIME_PAGE, PRIME_PAGE + len(code))
        uc.ctl_set_exits([])
        uc.mem_unmap(PRIME_PAGE, 0x1000)
        uc.reg_write(X.UC_X86_REG_RIP, before)
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    # -- hooks -------------------------------------------------------------------------
    def _tlb_miss(self, uc: Any, vaddr: int, access: int, entry_ptr: int) -> int:
        """The TLB fill the native front could not answer (called from tlb.c)."""
        self._paths_state.armed = 0  # a Python hook: native paths vouched for again
        entry = _TlbEntry.from_address(entry_ptr)
        kind = _FILL_ACCESS.get(access, Access.READ)
        result = self.fill(vaddr, kind)
        if isinstance(result, Refuse):
            self.refused(vaddr, kind)
            return 0  # the engine stops at the accessing instruction, nothing done
        if result is None:
            slot = self._poison_slots.get(vaddr)
            if slot is None:
                slot = len(self._poison_pages)
                self._poison_slots[vaddr] = slot
                self._poison_pages.append(vaddr)
            entry.paddr = POISON_BASE + slot * 4096
            entry.perms = UC_PROT_ALL
        else:
            entry.paddr, entry.perms = result
        return 1

    def remember_fill(self, vaddr: int, access: Access, user: bool,
                      used: Sequence[tuple[int, int]], paddr: int, prot: int) -> None:
        """From inside `fill`: the native front may answer the same fill from now on,
        while the paging-structure entries `used` ((address, value) pairs) hold."""
        n = len(used)
        addrs = (ctypes.c_uint64 * 4)(*(a for a, _v in used))
        vals = (ctypes.c_uint64 * 4)(*(v for _a, v in used))
        self._lib.idtlab_tlb_insert(ctypes.byref(self._tlb), ctypes.c_uint64(vaddr),
                                    ctypes.c_int32(_ACCESS_FILL[access]), ctypes.c_uint64(user),
                                    ctypes.c_uint64(n), addrs, vals, ctypes.c_uint64(paddr),
                                    ctypes.c_uint64(prot))

    def forget_fills(self) -> None:
        """Something a fill depends on changed beyond what the front checks (checkpoint
        tracking, a second stage): drop every remembered translation."""
        self._tlb.generation += 1

    def remember_fills(self, enabled: bool) -> None:
        """Turn the native front on or off (off: every fill asks `fill`)."""
        self._tlb.enabled = 1 if enabled and self.bits == 64 else 0
        self.forget_fills()

    @property
    def fill_counts(self) -> tuple[int, int]:
        """(fills answered natively, fills that asked `fill`)."""
        return int(self._tlb.hits), int(self._tlb.misses)

    def _on_unmapped(self, uc: Any, access: int, addr: int, size: int, value: int,
                     _data: object) -> bool:
        self._paths_state.armed = 0
        kind = _UNMAPPED_ACCESS.get(access, Access.READ)
        if addr >= POISON_BASE:
            slot = (addr - POISON_BASE) >> 12
            if slot < len(self._poison_pages):
                self.poison(self._poison_pages[slot] | (addr & 0xFFF), kind)
                return False
        self.unmapped(addr, kind)
        return False

    def _on_intr(self, uc: Any, vector: int, _data: object) -> None:
        self._paths_state.armed = 0
        self.interrupt(vector)

    def _on_site(self, uc: Any, address: int, size: int, _data: object) -> None:
        self._paths_state.armed = 0
        self.site(address)

    def _on_in(self, uc: Any, port: int, size: int, _data: object) -> int:
        self._paths_state.armed = 0
        return self.port_in(port, size)

    def _on_out(self, uc: Any, port: int, size: int, value: int, _data: object) -> None:
        self._paths_state.armed = 0
        self.port_out(port, size, value)

    def _on_block(self, uc: Any, address: int, size: int, _data: object) -> None:
        self.block(address)

    def _on_translated(self, uc: Any, cur: Any, _prev: Any, _data: object) -> None:
        pc = int(cur.pc)
        try:
            restarted = int(cur.icount) == 1 and self._restarted(pc)
            asked = self.translated(pc, int(cur.size))
        except Exception:  # never let an exception cross the C boundary: the block is
            return  # run as generated (a site in it is found when it is generated again)
        if restarted and pc == self._stepping:
            # The store rewrites its own bytes, so running it alone restarted it too. QEMU
            # never restarts a one-instruction block: this one completes it, counted once.
            restarted = False
        if restarted or asked:
            # Stopped before the block runs: nothing of it was counted, so to the
            # block-counting settle this is a stop between blocks.
            self.counter.block_size = 0
            self.counter.split = native.NO_SPLIT
            uc.emu_stop()
        if restarted:
            self._restart = (pc, asked)

    def _on_cpuid(self, uc: Any, _data: object) -> int:
        self._paths_state.armed = 0
        leaf, subleaf = self.read(("rax", "rcx"))
        regs = self.cpuid(leaf & 0xFFFFFFFF, subleaf & 0xFFFFFFFF)
        if regs is None:
            return 0  # Unicorn's own CPUID
        self.write(dict(zip(("rax", "rbx", "rcx", "rdx"), regs, strict=True)))
        return 1  # skip the native instruction

    def _on_rdtsc(self, _uc: Any, _data: Any, rdtscp: bool = False) -> int:
        try:
            tsc = self.tsc()
            if tsc is None:
                return 0  # Unicorn's own (the host's clock)
            out = {"rax": tsc & 0xFFFFFFFF, "rdx": (tsc >> 32) & 0xFFFFFFFF}
            if rdtscp:
                out["rcx"] = self.read_msr(0xC0000103) & 0xFFFFFFFF  # IA32_TSC_AUX
            self.write(out)
        except Exception:  # never let an exception cross the C boundary
            return 0
        return 1  # skip the native instruction

    def _on_rdtscp(self, uc: Any, data: Any) -> int:
        return self._on_rdtsc(uc, data, rdtscp=True)

    # -- operating mode and the 32 -> 64-bit migration --------------------------------------
    def in_64bit_mode(self) -> bool:
        """IA-32e mode active (EFER.LMA) and CS.L = 1 in the CS descriptor cache."""
        if not self.read_reg("cr0") & CR0_PG or not self.read_msr(MSR_EFER) & EFER_LMA:
            return False
        flags = struct.unpack_from("<I", blob(self._saved_context()), self.layout.cs + 20)[0]
        return bool(flags & DESC_L)

    def migrate_from(self, other: Engine) -> None:
        """Take over `other`'s CPU state (a 32-bit engine whose guest entered 64-bit mode)
        and its instruction and cycle counts. Both engines map the same guest memory."""
        self.version += 1
        self.uc.context_restore(other.uc.context_save())
        self._ctx = None
        self.flush_tlb()
        self.counter.count = other.counter.count
        self.counter.cycles = other.counter.cycles

    # -- control -----------------------------------------------------------------------
    def add_site(self, address: int, rdtsc: tuple[int, bool] | None = None) -> None:
        """Call `site(address)` before the instruction at `address` executes. `rdtsc` =
        (length, is RDTSCP): an RDTSC/RDTSCP site, hooked natively (cpu/native_paths.py),
        which calls `site` for all but the plain case."""
        if address not in self._sites:
            if rdtsc is not None and self.bits == 64:
                self.paths.hook(address, rdtsc[0], rdtscp=rdtsc[1], hook_code=UC_HOOK_CODE)
                self._sites[address] = -1
            else:
                self._sites[address] = self.uc.hook_add(UC_HOOK_CODE, self._on_site, None,
                                                        address, address)
            # A block translated before the hook existed would not call it.
            self.uc.ctl_remove_cache(address, address + 1)

    def remove_site(self, address: int) -> None:
        handle = self._sites.pop(address, None)
        if handle is not None:
            if not self.paths.unhook(address):
                self.uc.hook_del(handle)
            self.uc.ctl_remove_cache(address, address + 1)

    def has_site(self, address: int) -> bool:
        return address in self._sites

    @property
    def site_addresses(self) -> frozenset[int]:
        return frozenset(self._sites)

    # The counter's scalar state (its cost tables are caches keyed by address and stay).
    _COUNTER_STATE = ("count", "stop_at", "stopped", "cycles", "stop_cycle", "last_cost",
                      "block_addr", "block_size", "block_before", "block_cycles_before", "split",
                      "last_addr", "ac_check", "ac_pass", "ac_stopped")

    def save_state(self) -> tuple[Any, tuple[int, ...]]:
        """The CPU state and the counter's, for `restore_state` (cpu.snapshot)."""
        c = self.counter
        return self.uc.context_save(), tuple(int(getattr(c, f)) for f in self._COUNTER_STATE)

    def restore_state(self, state: tuple[Any, tuple[int, ...]]) -> None:
        ctx, counter = state
        self.version += 1
        self.uc.context_restore(ctx)
        c = self.counter
        for f, v in zip(self._COUNTER_STATE, counter, strict=True):
            setattr(c, f, v)
        self.flush_tlb()

    def _emu(self, begin: int, until: int) -> int | None:
        bounded = until != UNTIL_NEVER
        if bounded:
            self.uc.ctl_set_exits([until])
        self.version += 1
        self._running = True
        try:
            self.uc.emu_start(begin, until)
        except UcError as exc:
            return int(exc.errno)
        finally:
            self._running = False
            self.version += 1
            if bounded:
                self.uc.ctl_set_exits([])
        return None

    def run(self, begin: int, until: int = UNTIL_NEVER) -> int | None:
        """Run from `begin` until a callback stops the engine, or until execution reaches
        `until` (nothing at or after `until` runs); return Unicorn's error code.

        Counting contract, the same in both counting modes: when this returns, `icount`
        counts the instructions retired, plus the instruction at RIP if the engine
        stopped *at* it (a fault in it, a code hook before it, the counter's threshold
        before it — `stopped_by_counter`), which the machine takes back (`uncount`).
        """
        c = self.counter
        c.stopped = 0
        c.ac_stopped = 0
        c.split = native.NO_SPLIT
        self.paths.new_run()
        self._run_count = int(c.count)
        if until != UNTIL_NEVER:
            # `until` only takes effect in code translated after it is set: drop the
            # translation of the block that holds it.
            self.uc.ctl_remove_cache(until, until + 1)
        err = self._emu(begin, until)
        if self._restart is not None:
            err = self._step_restarted(err, until)
        if until != UNTIL_NEVER:
            self.uc.ctl_remove_cache(until, until + 1)
        if not self.block_counting:
            return err
        if err is None and c.split != native.NO_SPLIT:
            err = self._split(int(c.split), until)
        else:
            self._settle()
        return err

    # -- block counting (fast mode) -------------------------------------------------------
    def _block_miss(self, address: int, size: int) -> int:
        try:
            return len(self._starts(address, size)) or 1
        except Exception:  # never let an exception cross the C boundary
            return 1

    def _starts(self, address: int, size: int) -> tuple[int, ...]:
        """Start addresses of the instructions of the translation block [address, +size)."""
        key = (address, size)
        starts = self._block_starts.get(key)
        if starts is None:
            # Blocks at one address differ in size (a threshold or a breakpoint splits
            # them): a longer block's decode serves the shorter ones.
            # A shorter block ends where one of the longer block's instructions starts.
            longest = self._block_decodes.get(address)
            if longest is not None and size < longest[0] and address + size in longest[1]:
                starts = tuple(a for a in longest[1] if a < address + size)
            else:
                starts = self._decode_starts(address, size)
            self._block_starts[key] = starts
        return starts

    def _decode_starts(self, address: int, size: int) -> tuple[int, ...]:
        code = self.code_reader(address, size)
        found: list[int] = []
        if code is not None:
            end = address
            for insn in decode(code, address, bits=self.bits):
                found.append(insn.address)
                end = insn.address + insn.size
            if end != address + size:  # undecodable tail: count what QEMU ran anyway
                found.extend(range(end, address + size))
            longest = self._block_decodes.get(address)
            if longest is None or longest[0] < size:
                self._block_decodes[address] = (size, tuple(found))
        return tuple(found)

    def _index(self, rip: int) -> int | None:
        """Instructions of the current block before `rip`, if `rip` starts one of them."""
        c = self.counter
        addr, size = int(c.block_addr), int(c.block_size)
        if not size or not addr <= rip < addr + size:
            return None
        starts = self._starts(addr, size)
        lo, hi = 0, len(starts)
        while lo < hi:  # bisect: starts are sorted
            mid = (lo + hi) // 2
            if starts[mid] < rip:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(starts) and starts[lo] == rip else None

    def _settle(self) -> None:
        """Turn the block count into the counting contract of `run`: a stop inside the
        current block (a fault, a code hook) retired only the instructions before RIP,
        and the one at RIP counts as stopped-at."""
        c = self.counter
        k = self._index(self.read_reg("rip"))
        if k is None:
            return  # stopped between blocks: every counted instruction retired
        ran = int(c.count) - int(c.block_before)  # the block's count, or 0 if its hook stopped it
        extra = int(c.cycles) - int(c.block_cycles_before) - ran * int(c.default_cost)
        c.count = int(c.block_before) + k + 1
        c.cycles = int(c.block_cycles_before) + (k + 1) * int(c.default_cost) + extra
        c.last_cost = c.default_cost

    def last_instruction(self) -> int | None:
        """The address of the last instruction counted: the last one of the last
        translation block in fast mode (a block ends at its first branch), the last one
        the per-instruction counter saw in timed mode. None before any."""
        c = self.counter
        if not self.block_counting:
            return int(c.last_addr) if int(c.count) else None
        if not int(c.block_size):
            return None
        starts = self._starts(int(c.block_addr), int(c.block_size))
        return starts[-1] if starts else None

    def count_at(self, address: int) -> int:
        """In a code hook for `address`: the count with that instruction counted (the
        per-instruction counter's value there)."""
        if not self.block_counting:
            return int(self.counter.count)
        k = self._index(address)
        return int(self.counter.block_before) + (k if k is not None else 0) + 1

    def hook_stamp(self, address: int) -> tuple[int, int]:
        """In a hook of the instruction at `address`, while the engine runs: the instruction
        count and the cycle counter with that instruction counted and none after it. Fast
        mode counts a translation block when it starts, so its raw counters are ahead
        inside the block; timed mode counts per instruction, and they are exact."""
        c = self.counter
        if not self.block_counting:
            return int(c.count), int(c.cycles)
        exact = self.count_at(address)
        ahead = max(0, int(c.count) - exact)
        return exact, int(c.cycles) - ahead * int(c.default_cost)

    def _split(self, k: int, until: int) -> int | None:
        """The threshold falls before instruction `k` of the block at RIP: run exactly
        that far (Unicorn's `until`, after dropping the block's translation)."""
        c = self.counter
        rip = self.read_reg("rip")
        starts = self._starts(int(c.block_addr), int(c.block_size))
        if k == 0 or k >= len(starts):
            c.count += 1  # stopped before the block's first instruction: "counted"
            c.cycles += c.default_cost
            c.last_cost = c.default_cost
            c.stopped = 1
            return None
        target = starts[k]
        stop_at, stop_cycle = int(c.stop_at), int(c.stop_cycle)
        c.stop_at, c.stop_cycle = 2**64 - 1, 2**64 - 1
        c.split = native.NO_SPLIT
        c.stopped = 0
        if until != UNTIL_NEVER and rip <= until < target:
            target = until
        self.uc.ctl_remove_cache(int(c.block_addr), int(c.block_addr) + int(c.block_size))
        full = (int(c.block_addr), int(c.block_addr) + int(c.block_size))
        err = self._emu(rip, target)
        self.uc.ctl_remove_cache(*full)  # the next pass translates the whole block again
        c.stop_at, c.stop_cycle = stop_at, stop_cycle
        if err is None and self.read_reg("rip") == target and not c.stopped and target != until:
            # Reached the threshold boundary: report it as the counter's stop.
            c.count += 1
            c.cycles += c.default_cost
            c.last_cost = c.default_cost
            c.stopped = 1
            return None
        self._settle()
        return err

    def stop(self) -> None:
        self.uc.emu_stop()

    # -- alignment checking (cpu/alignment.py; counter.c `ac_stop`) -------------------------
    def set_alignment_check(self, armed: bool) -> None:
        """Arm (CPL = 3 and CR0.AM = 1) or disarm the counter's look at RFLAGS.AC."""
        self.counter.ac_check = int(armed)

    @property
    def alignment_stopped(self) -> bool:
        """The last run stopped before an instruction because RFLAGS.AC = 1."""
        return bool(self.counter.ac_stopped)

    def pass_alignment_check(self) -> None:
        """Let the next instruction run without the AC stop (the machine checked it)."""
        self.counter.ac_stopped = 0
        self.counter.ac_pass = self.counter.count

    @property
    def icount(self) -> int:
        return int(self.counter.count)

    @icount.setter
    def icount(self, value: int) -> None:
        self.counter.count = value

    def set_stop_at(self, count: int) -> None:
        """Stop before executing the instruction that would be number `count` (1-based)."""
        self.counter.stop_at = count

    @property
    def stopped_by_counter(self) -> bool:
        return bool(self.counter.stopped)

    @property
    def cycles(self) -> int:
        return int(self.counter.cycles)

    @cycles.setter
    def cycles(self, value: int) -> None:
        self.counter.cycles = value

    def set_stop_cycle(self, cycle: int) -> None:
        """Stop at the first boundary where the retired instructions' cycles reach `cycle`."""
        self.counter.stop_cycle = min(max(cycle, 0), 2**64 - 1)

    def uncount(self) -> None:
        """Take back the last counted instruction (it was stopped before it retired)."""
        self.counter.count -= 1
        self.counter.cycles -= self.counter.last_cost

    def recount(self) -> None:
        """Count the last taken-back instruction again (an emulated IRET/HLT retired)."""
        self.counter.count += 1
        self.counter.cycles += self.counter.last_cost

    def set_cost_mode(self, *, timed: bool, default_cost: int,
                      miss: Callable[[int, int], int] | None = None) -> None:
        """Fast mode: every instruction costs `default_cost`. Timed mode: `miss(address,
        size)` gives an instruction's cost once; the native table caches it by address."""
        self._lib.idtlab_table_clear(ctypes.byref(self.counter))
        self.counter.default_cost = default_cost
        self.counter.timed = int(timed)
        if miss is None:
            self._miss_fn = None
            self.counter.miss = None
            return

        def safe(address: int, size: int) -> int:
            try:
                return max(0, min(int(miss(address, size)), 2**32 - 1))
            except Exception:  # never let an exception cross the C boundary
                return default_cost

        self._miss_fn = native.MissCallback(safe)
        self.counter.miss = ctypes.cast(self._miss_fn, ctypes.c_void_p)

    def clear_cost_cache(self) -> None:
        self._lib.idtlab_table_clear(ctypes.byref(self.counter))

    def code_changed(self) -> None:
        """Guest code changed under addresses already run: forget everything cached by
        address (the counter's costs and block sizes, the decoded block starts)."""
        self.clear_cost_cache()
        self._block_starts.clear()
        self._block_decodes.clear()

    def _restarted(self, pc: int) -> bool:
        """A block generated at `pc` while instructions counted in this run did not
        retire: QEMU's precise self-modifying-code path. A store into the block that is
        running drops that block and restarts at the storing instruction, in a block
        generated afresh (`tb_invalidate_phys_page_range`, "current TB modified"), so
        the instructions counted from there on did not retire yet: take them back, and
        stop (`_step_restarted` runs the store alone). True if it was a restart.

        The restart block is told apart by its shape: QEMU generates it with a count of
        one instruction (`cflags_next_tb = 1`), that instruction is a store, and it
        starts inside the block that was running (timed mode: at the instruction just
        counted). A block of one storing instruction does not otherwise start there: a
        loop back into a block starts with a branch target whose block runs to the next
        branch, a REP string instruction (one iteration per block) is excluded. (A store
        whose own bytes are in the same block as a branch, a PUSH or CALL that writes
        its own block, would be counted twice: not modelled.)"""
        c = self.counter
        if int(c.count) <= self._run_count:
            return False
        if self.block_counting:
            k = self._index(pc)
            if k is None or int(c.count) <= int(c.block_before) + k or not self._stores(pc):
                return False
            c.count = int(c.block_before) + k
            c.cycles = int(c.block_cycles_before) + k * int(c.default_cost)
            return True
        if pc != int(c.last_addr) or not self._stores(pc):
            return False
        c.count -= 1
        c.cycles -= c.last_cost
        c.last_addr = 2**64 - 1
        return True

    def _stores(self, pc: int) -> bool:
        """The instruction at `pc` stores to memory and is not a REP string instruction
        (which QEMU runs one iteration per block, jumping back to itself)."""
        code = self.code_reader(pc, 15)
        if not code:
            return False
        prefixes = code[:next((i for i, b in enumerate(code) if b not in _LEGACY_PREFIX_BYTES),
                              len(code))]
        return has_write_intent(code, pc) and not (set(prefixes) & {0xF2, 0xF3})

    def _step_restarted(self, err: int | None, until: int) -> int | None:
        """After `_restarted` stopped the engine: drop QEMU's one-instruction restart
        block (kept, it would run uncounted-for the next time the same store restarts),
        then run the storing instruction alone — in a block that does not hold the
        bytes it writes, so it completes once — and go on to `until`. Returns the
        engine's error code. Left to the machine when something else stopped the run."""
        c = self.counter
        for _ in range(MAX_RESTARTS):
            if self._restart is None:
                return err
            pc, asked = self._restart
            self._restart = None
            self.uc.ctl_remove_cache(pc, pc + 1)
            if asked or err is not None or c.stopped:
                return err
            code = self.code_reader(pc, 15)
            insn = decode_one(code, pc, bits=self.bits) if code else None
            step_end = pc + (insn.size if insn is not None else 1)
            self._stepping = pc
            try:
                err = self._emu(pc, step_end)
            finally:
                self._stepping = None
            # Neither the one-instruction blocks of the step nor `until`'s stop may stay.
            self.uc.ctl_remove_cache(pc, pc + 1)
            self.uc.ctl_remove_cache(step_end, step_end + 1)
            if err is not None or c.stopped or self._restart is not None \
                    or self.read_reg("rip") != step_end:
                continue
            err = self._emu(step_end, until)
        self._restart = None  # a guest rewriting its code at every step: the machine's stop
        return err

    def remove_cache(self, begin: int, end: int) -> None:
        """Drop the translations of [begin, end): they are generated (and reported to
        `translated`) again before they next run."""
        self.uc.ctl_remove_cache(begin, end)

    def __del__(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is not None:
            lib.idtlab_table_clear(ctypes.byref(self.counter))

    def flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

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
        self.version += 1
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
        return state

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
