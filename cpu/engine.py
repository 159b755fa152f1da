"""The engine adapter: with its parts — cpu/engine_registers.py (register access and
the context blob), cpu/engine_counting.py (runs and instruction counting) and
cpu/engine_blob.py (the blob's probed layout) — the only code in idtlab that imports
`unicorn`. This module creates the Unicorn instance and its hooks, answers TLB fills,
keeps the site hooks, and moves a 32-bit phase's state to a 64-bit engine.

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
import mmap
import struct
from collections.abc import Callable, Sequence
from typing import Any

from unicorn import (
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
)
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucpy

from cpu import native
from cpu.engine_blob import blob, blob_layout, new_uc
from cpu.engine_counting import UNTIL_NEVER, InstructionCounting
from cpu.engine_registers import (
    CR0_PG,
    DESC_L,
    EFER_LMA,
    GPRS,
    MSR_EFER,
)
from cpu.memory import PhysicalMemory
from cpu.mmu import Access
from cpu.native_paths import NativePaths

__all__ = ["ERR_INSN_INVALID", "GPRS", "PROT_R", "PROT_W", "PROT_X", "REFUSE", "UNTIL_NEVER",
           "Engine", "Refuse"]

ERR_INSN_INVALID = UC_ERR_INSN_INVALID
PROT_R, PROT_W, PROT_X = UC_PROT_READ, UC_PROT_WRITE, UC_PROT_EXEC
POISON_BASE = 1 << 44  # far above any guest RAM; never mapped
PRIME_PAGE = 1 << 38  # far above any guest RAM; mapped only while `_prime` runs
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


# int (*)(uc_engine *, void *user_data): UC_HOOK_INSN for CPUID, RDTSC, RDTSCP.
_INSN_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class Engine(InstructionCounting):
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
        self.starts_hint: Callable[[int, int], tuple[int, ...] | None] = lambda a, n: None
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
        self.uc = uc
        self._init_registers()
        self._prime()
        self.fill: Callable[[int, Access], tuple[int, int] | Refuse | None] = \
            lambda v, a: (v, UC_PROT_ALL)
        self.poison: Callable[[int, Access], None] = lambda v, a: None
        self.refused: Callable[[int, Access], None] = lambda v, a: None
        self.unmapped: Callable[[int, Access], None] = lambda p, a: None
        self.interrupt: Callable[[int], None] = lambda v: None
        # A code hook's action; True when it only observed (recorded something and
        # changed nothing a native path was vouched for: those stay armed).
        self.site: Callable[[int], bool | None] = lambda a: None
        self.port_in: Callable[[int, int], int] = lambda p, s: (1 << (8 * s)) - 1
        self.port_out: Callable[[int, int, int], None] = lambda p, s, v: None
        self._poison_slots: dict[int, int] = {}
        self._poison_pages: list[int] = []
        self._sites: dict[int, int] = {}
        self._run_count = 0  # the instruction count when `run` started
        self._restart: tuple[int, bool] | None = None  # (pc, machine asked to stop too)
        self._stepping: int | None = None  # the store `_step_restarted` runs alone
        self.block: Callable[[int, int], None] = lambda a, size: None
        # A new translation block (pc, size) is about to run for the first time; True stops
        # the engine before it runs (cpu/sites.py decodes it for sites).
        self.translated: Callable[[int, int], bool] = lambda pc, size: False
        self.cpuid: Callable[[int, int], tuple[int, int, int, int] | None] = lambda leaf, sub: None

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
        # Anonymous mapped memory: zero, and resident only where slots are used (a guest
        # touching a few pages costs a few pages, not the table's 10 MiB).
        self._tlb_map = mmap.mmap(-1, native.TLB_SLOT_SIZE * native.TLB_SLOTS)
        self._tlb_slots = (ctypes.c_uint8 * (native.TLB_SLOT_SIZE * native.TLB_SLOTS)
                           ).from_buffer(self._tlb_map)
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
        # RDTSC/RDTSCP and plain IRETQ sites executed natively when Python vouched for them
        # (native_paths); the IRETQs done natively reach `irets_done` in order.
        self.paths = NativePaths(uc, _ucpy.uclib, self.counter, block_counting=block_counting,
                                 rids=self._reg, site=lambda a: self._on_site(uc, a, 0, None),
                                 mem=mem.host_address, mem_size=mem.size,
                                 gprs=tuple(r for r in GPRS if r != "rsp") if bits == 64 else (),
                                 context=(uc.context_save(), self.layout.ss, self.layout.hflags,
                                          self.layout.old_exception))
        self._paths_state = self.paths.state
        self._iret_state = self.paths.iret
        self.armed_before = (0, 0)  # see `_python_hook`
        self.irets_done: Callable[[list[tuple[int, int, int, int, int, int, int]]], None] = \
            lambda records: None
        # Called as each run starts, after the counter is set (cpu/emulated.py re-arms the
        # native IRETQ there).
        self.on_run_start: Callable[[], None] = lambda: None
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
    def _python_hook(self) -> None:
        """A Python hook runs: native paths must be vouched for again (anything may
        change now), and the IRETQs they executed are handed over first. Whether they
        were armed is kept in `armed_before` (IRETQ, RDTSC): a hook that changes nothing
        they were vouched for arms them again."""
        self.armed_before = (int(self._iret_state.armed), int(self._paths_state.armed))
        self._paths_state.armed = 0
        self._iret_state.armed = 0
        if self._iret_state.logged:
            self.irets_done(self.paths.drain_irets())

    def drain_native(self) -> None:
        """Hand the natively executed IRETQs over (the engine stopped)."""
        if self._iret_state.logged:
            self.irets_done(self.paths.drain_irets())

    def _tlb_miss(self, uc: Any, vaddr: int, access: int, entry_ptr: int) -> int:
        """The TLB fill the native front could not answer (called from tlb.c). A fill
        changes nothing the native paths were vouched for (the paging-structure entries
        whose A/D bits it sets are re-read natively): they stay armed after one that
        succeeds."""
        self._python_hook()
        entry = _TlbEntry.from_address(entry_ptr)
        kind = _FILL_ACCESS.get(access, Access.READ)
        result = self.fill(vaddr, kind)
        if isinstance(result, Refuse):
            self.refused(vaddr, kind)
            return 0  # the engine stops at the accessing instruction, nothing done
        if result is not None:
            self._iret_state.armed, self._paths_state.armed = self.armed_before
            entry.paddr, entry.perms = result
        else:
            slot = self._poison_slots.get(vaddr)
            if slot is None:
                slot = len(self._poison_pages)
                self._poison_slots[vaddr] = slot
                self._poison_pages.append(vaddr)
            entry.paddr = POISON_BASE + slot * 4096
            entry.perms = UC_PROT_ALL
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

    def forget_write_fills(self) -> None:
        """A checkpoint rollback: drop the remembered translations that grant write
        access (a write fill marks its page for copy-on-write, so it must reach `fill`
        again). Read and fetch fills stay: the front re-validates their paging-structure
        entries against memory, which the rollback put back."""
        self._tlb.write_generation += 1

    @property
    def fills_generation(self) -> int:
        """Bumped by every `forget_fills`."""
        return int(self._tlb.generation)

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
        self._python_hook()
        kind = _UNMAPPED_ACCESS.get(access, Access.READ)
        if addr >= POISON_BASE:
            slot = (addr - POISON_BASE) >> 12
            if slot < len(self._poison_pages):
                self.poison(self._poison_pages[slot] | (addr & 0xFFF), kind)
                return False
        self.unmapped(addr, kind)
        return False

    def _on_intr(self, uc: Any, vector: int, _data: object) -> None:
        self._python_hook()
        self.interrupt(vector)

    def _on_site(self, uc: Any, address: int, size: int, _data: object) -> None:
        self._python_hook()
        if self.site(address) is True and not self.counter.stopped:
            self._iret_state.armed, self._paths_state.armed = self.armed_before  # observed

    def _on_in(self, uc: Any, port: int, size: int, _data: object) -> int:
        self._python_hook()
        return self.port_in(port, size)

    def _on_out(self, uc: Any, port: int, size: int, value: int, _data: object) -> None:
        self._python_hook()
        self.port_out(port, size, value)

    def _on_block(self, uc: Any, address: int, size: int, _data: object) -> None:
        self.block(address, size)

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
        self._python_hook()
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
    def add_site(self, address: int, rdtsc: tuple[int, bool] | None = None, *,
                 iret: bool = False) -> None:
        """Call `site(address)` before the instruction at `address` executes. `rdtsc` =
        (length, is RDTSCP): an RDTSC/RDTSCP site, `iret`: an IRETQ site, hooked natively
        (cpu/native_paths.py), which calls `site` for all but the plain case."""
        if address not in self._sites:
            if rdtsc is not None and self.bits == 64:
                self.paths.hook(address, rdtsc[0], rdtscp=rdtsc[1], hook_code=UC_HOOK_CODE)
                self._sites[address] = -1
            elif iret and self.bits == 64:
                self.paths.hook_iret(address, hook_code=UC_HOOK_CODE)
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

    def stop(self) -> None:
        self.uc.emu_stop()

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

