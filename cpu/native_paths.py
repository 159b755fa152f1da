"""Native fast paths for emulated instructions (`cpu/native/paths.c`): RDTSC, RDTSCP and
the plain IRETQ executed in a native code hook at their sites, without a Python call.

Why: kvm-unit-tests' `delay()` spins on `pause; rdtsc` until a million TSC cycles have
passed, about 166 000 RDTSCs per call. Stopping the engine at each one costs ~40 us, and
executing it inside the Python code hook (`Emulated.rdtsc_in_hook`) ~10 us; this path
costs a native call.

How it stays exact: Python decides, the C code only repeats. At each RDTSC/RDTSCP site
the native hook replaces the Python site hook (`hook`); it calls the Python site hook
(`fallback`) unless Python has vouched for the plain case in this run (`learn`, called by
`rdtsc_in_hook` after it executed the same instruction itself): the boundary after it
holds nothing, no injection point or breakpoint is at it or after it, and the TSC counts
the machine's cycles (or an interrupt is pending and IF = 0, which the C code checks
too). Python withdraws that (the engine clears `state.armed`) whenever any Python
hook of the engine runs, and at the start of every run (`new_run`: every site must be
vouched for again); what changes natively (RFLAGS.TF, the counter's thresholds and split runs, the
block being run) the C code checks itself. See paths.c for the count settling in fast
mode, which is `Engine.hook_stamp`'s.

IRETQ follows the same pattern (`hook_iret`, `learn_iret` from `iret_in_hook`), with one
addition: an IRET leaves trace records and bookkeeping (frame depth, the no-progress
signature) that only Python keeps, so the C code logs each IRET it executes and the
engine hands the log to the machine (`drain_irets`) at every Python hook and when it
stops — before anything else is recorded — which makes exactly what `iret_in_hook`
would have made, in the same order. An IRET chain (a frame clobbered by a nested NMI,
returning into a return) then costs a native call per IRET and a few Python operations
per record. Two more differences: the memory an IRET reads is vouched for as physical
words the C code re-reads (the frame page's paging-structure entries, the CS and SS
descriptors; `words_failed` tells Python one changed), so a vouch outlives its run —
`rearm_iret` arms the sites vouched for before as a later run starts at a quiet
boundary (a handler's IRETQ after a delivery made between runs); and an IRETQ that
unblocks NMIs is the C code's too (logged, and Python clears the blocking).

Three things keep the IRETQ native on the paths real handlers take (the race explorer's
schedules go through an NMI handler on an IST and a #PF handler on the interrupted
stack, at the same IRETQ sites):

- *A table of vouches*, IRET_CONTEXTS of them, one per (CS, SS, frame page, frame SS),
  each live only under the CR0, CR3, CR4, EFER and GDT base it was vouched under (a
  later run under other paging controls leaves it unused). A frame SS other than SS (the
  IST handler's null SS returning to a selector) is loaded natively with the descriptor
  vouched for, as `Registers.load_segments` loads it.
- *Any block ending at the IRETQ*: IRETQ ends its translation block, so when the block
  running ends there, the counter's whole-block count is the count after it, wherever
  the block began (a run may enter a handler at any instruction).
- *Hooks that only observe* leave the native paths armed (`Engine._python_hook` keeps
  `armed_before`): a TLB fill Python answers, an arrival counted at an injection point
  with nothing due, a recorded CR2 read. Every other Python hook disarms them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cpu import native

# void fallback(uint64_t address): the Python site hook.
FallbackCallback = ctypes.CFUNCTYPE(None, ctypes.c_uint64)


class PathsStruct(ctypes.Structure):
    """`struct idtlab_paths` of paths.c."""

    _fields_ = [
        ("counter", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("fallback", ctypes.c_void_p),
        ("armed", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("block_counting", ctypes.c_uint64),
        ("tsc_offset", ctypes.c_uint64),
        ("tsc_aux", ctypes.c_uint64),
        ("hits", ctypes.c_uint64),
        ("if_clear", ctypes.c_uint64),
        ("rid_rax", ctypes.c_int32),
        ("rid_rcx", ctypes.c_int32),
        ("rid_rdx", ctypes.c_int32),
        ("rid_rip", ctypes.c_int32),
        ("rid_rflags", ctypes.c_int32),
    ]


class RdtscSiteStruct(ctypes.Structure):
    """`struct idtlab_rdtsc_site` of paths.c."""

    _fields_ = [
        ("paths", ctypes.c_void_p),
        ("length", ctypes.c_uint64),
        ("rdtscp", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("block_addr", ctypes.c_uint64),
        ("block_size", ctypes.c_uint64),
        ("index", ctypes.c_uint64),
    ]


IRET_LOG = 64
IRET_WORDS = 16
IRET_CONTEXTS = 4


class IretRecord(ctypes.Structure):
    """`struct idtlab_iret_record` of paths.c: one IRETQ executed natively."""

    _fields_ = [(name, ctypes.c_uint64)
                for name in ("address", "icount", "cycles", "rip", "rsp", "rflags",
                             "nmi_unblocked")]


class IretContextStruct(ctypes.Structure):
    """`struct idtlab_iret_context` of paths.c: one vouched (CS, SS, frame page)."""

    _fields_ = [
        ("live", ctypes.c_uint64),
        ("cs", ctypes.c_uint64),
        ("ss", ctypes.c_uint64),
        ("cpl", ctypes.c_uint64),
        ("stack_page", ctypes.c_uint64),
        ("stack_paddr", ctypes.c_uint64),
        ("nwords", ctypes.c_uint64),
        ("addr", ctypes.c_uint64 * IRET_WORDS),
        ("val", ctypes.c_uint64 * IRET_WORDS),
        ("frame_ss", ctypes.c_uint64),
        ("frame_ss_flags", ctypes.c_uint64),
    ]


class IretStruct(ctypes.Structure):
    """`struct idtlab_iret` of paths.c."""

    _fields_ = [
        ("counter", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("fallback", ctypes.c_void_p),
        ("mem", ctypes.c_void_p),
        ("mem_size", ctypes.c_uint64),
        ("armed", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("block_counting", ctypes.c_uint64),
        ("ctx", IretContextStruct * IRET_CONTEXTS),
        ("cost", ctypes.c_uint64),
        ("nmi_blocked", ctypes.c_uint64),
        ("words_failed", ctypes.c_uint64),
        ("last_address", ctypes.c_uint64),
        ("last_rip", ctypes.c_uint64),
        ("last_rsp", ctypes.c_uint64),
        ("last_rflags", ctypes.c_uint64),
        ("last_delta", ctypes.c_uint64),
        ("last_icount", ctypes.c_uint64),
        ("have_regs", ctypes.c_uint64),
        ("repeats", ctypes.c_uint64),
        ("repeat_limit", ctypes.c_uint64),
        ("regs", ctypes.c_uint64 * 15),
        ("hits", ctypes.c_uint64),
        ("logged", ctypes.c_uint64),
        ("log", IretRecord * IRET_LOG),
        ("rid_rsp", ctypes.c_int32),
        ("rid_rflags", ctypes.c_int32),
        ("rid_rip", ctypes.c_int32),
        ("rid_cs", ctypes.c_int32),
        ("rid_ss", ctypes.c_int32),
        ("rid_gpr", ctypes.c_int32 * 15),
        ("ctx_save", ctypes.c_void_p),
        ("ctx_restore", ctypes.c_void_p),
        ("cpu_ctx", ctypes.c_void_p),
        ("off_ss", ctypes.c_uint64),
        ("off_hflags", ctypes.c_uint64),
        ("off_old_exception", ctypes.c_uint64),
    ]


class IretSiteStruct(ctypes.Structure):
    """`struct idtlab_iret_site` of paths.c."""

    _fields_ = [
        ("iret", ctypes.c_void_p),
        ("generation", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class IretVouch:
    """What Python vouches for when it arms the native IRETQ (`NativePaths.learn_iret`)."""

    cs: int
    ss: int
    cpl: int
    stack_page: int  # the linear page of the frame, and its physical page
    stack_paddr: int
    frame_ss: int  # the SS in the frame: `ss`, or another one loaded with ...
    frame_ss_flags: int  # ... this descriptor high dword (as `Registers.load_segments`)
    words: tuple[tuple[int, int], ...]  # (physical address, value) that must still hold
    scope: tuple[int, ...]  # CR0, CR3, CR4, EFER and the GDT base the vouch was made under
    cost: int  # cycles of a same-level IRET
    progress: ProgressView  # cpu/progress.py's state


@dataclass(frozen=True)
class ProgressView:
    """cpu/progress.py's no-progress state as the native IRETQ keeps it while it runs."""

    last: tuple[int, int, int, int, int]  # address, RIP, RSP, RFLAGS, instructions since
    icount: int  # the count at the last IRET
    registers: tuple[int, ...] | None  # the general registers of a candidate loop
    repeats: int
    limit: int  # NO_PROGRESS_IRETS


class NativePaths:
    """The native RDTSC/RDTSCP site hooks of one engine."""

    def __init__(self, uc: Any, uclib: Any, counter: ctypes.Structure, *, block_counting: bool,
                 rids: dict[str, int], site: Callable[[int], None], mem: int = 0,
                 mem_size: int = 0, gprs: tuple[str, ...] = (),
                 context: tuple[Any, int, int, int] | None = None) -> None:
        """`context`: (a saved CPU context of the engine, the offsets of the SS cache,
        hflags and the stale exception in it), for IRETQs that load another SS."""
        self._uc = uc
        self._uclib = uclib
        self._uch = uc._uch
        self._site = site
        self._lib = native.load()
        p = self.state = PathsStruct()
        p.counter = ctypes.addressof(counter)
        p.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p)
        p.reg_write = ctypes.cast(uclib.uc_reg_write, ctypes.c_void_p)
        self._fallback = FallbackCallback(self._call_site)  # kept alive with the engine
        p.fallback = ctypes.cast(self._fallback, ctypes.c_void_p)
        p.block_counting = int(block_counting)
        p.rid_rax, p.rid_rcx, p.rid_rdx = rids["rax"], rids["rcx"], rids["rdx"]
        p.rid_rip, p.rid_rflags = rids["rip"], rids["rflags"]
        self._sites: dict[int, tuple[RdtscSiteStruct, int]] = {}
        i = self.iret = IretStruct()
        i.counter, i.reg_read, i.reg_write = p.counter, p.reg_read, p.reg_write
        i.fallback = p.fallback
        i.mem, i.mem_size = mem, mem_size
        i.block_counting = p.block_counting
        i.rid_rsp, i.rid_rflags, i.rid_rip = rids["rsp"], rids["rflags"], rids["rip"]
        i.rid_cs, i.rid_ss = rids["cs"], rids["ss"]
        if len(gprs) == 15:
            for k, name in enumerate(gprs):
                i.rid_gpr[k] = rids[name]
        self._context = context  # kept alive with the engine
        if context is not None:
            i.ctx_save = ctypes.cast(uclib.uc_context_save, ctypes.c_void_p)
            i.ctx_restore = ctypes.cast(uclib.uc_context_restore, ctypes.c_void_p)
            i.cpu_ctx = ctypes.cast(context[0].context, ctypes.c_void_p)
            i.off_ss, i.off_hflags, i.off_old_exception = context[1:]
        self._iret_sites: dict[int, tuple[IretSiteStruct, int]] = {}
        self._vouched: set[int] = set()  # IRETQ sites learned since they were hooked
        # What each slot of `iret.ctx` was vouched for: (CS, SS, CPL, frame page, frame
        # SS, scope).
        self._contexts: list[tuple[int, int, int, int, int, tuple[int, ...]] | None] = \
            [None] * IRET_CONTEXTS
        self._next_context = 0  # the slot a new context replaces (round robin)
        self._scope: tuple[tuple[int, ...], int] | None = None  # the last entered, and live
        # False: IRETQ always takes Python's path (tests compare the two).
        self.iret_enabled = True

    def _call_site(self, address: int) -> None:
        """The Python site hook, with the binding's contract for exceptions: the first
        one is kept and re-raised by `emu_start`, and the engine stops."""
        try:
            self._site(address)
        except BaseException as exc:  # never let an exception cross the C boundary
            if self._uc._hook_exception is None:
                self._uc._hook_exception = exc
            self._uc.emu_stop()

    def hook(self, address: int, length: int, *, rdtscp: bool, hook_code: int) -> None:
        """Register the native hook at the RDTSC/RDTSCP at `address` (`length` bytes)."""
        s = RdtscSiteStruct(ctypes.addressof(self.state), length, int(rdtscp), 0, 0, 0, 0)
        handle = ctypes.c_size_t()
        fn = ctypes.cast(self._lib.idtlab_rdtsc_site, ctypes.c_void_p)
        status = self._uclib.uc_hook_add(self._uch, ctypes.byref(handle), hook_code, fn,
                                         ctypes.byref(s), ctypes.c_uint64(address),
                                         ctypes.c_uint64(address))
        if status != 0:
            raise RuntimeError(f"uc_hook_add(rdtsc site) failed: {status}")
        self._sites[address] = (s, int(handle.value))

    def hook_iret(self, address: int, *, hook_code: int) -> None:
        """Register the native hook at the IRETQ at `address`."""
        s = IretSiteStruct(ctypes.addressof(self.iret), 0)
        handle = ctypes.c_size_t()
        fn = ctypes.cast(self._lib.idtlab_iret_site, ctypes.c_void_p)
        status = self._uclib.uc_hook_add(self._uch, ctypes.byref(handle), hook_code, fn,
                                         ctypes.byref(s), ctypes.c_uint64(address),
                                         ctypes.c_uint64(address))
        if status != 0:
            raise RuntimeError(f"uc_hook_add(iret site) failed: {status}")
        self._iret_sites[address] = (s, int(handle.value))

    def unhook(self, address: int) -> bool:
        """Remove the native hook at `address` (False: there is none)."""
        entry = self._sites.pop(address, None) or self._iret_sites.pop(address, None)
        self._vouched.discard(address)
        if entry is None:
            return False
        self._uclib.uc_hook_del(self._uch, ctypes.c_size_t(entry[1]))
        return True

    def new_run(self) -> None:
        """A run starts: every site must be vouched for again."""
        p = self.state
        p.armed = 0
        p.generation += 1
        self.iret.armed = 0
        self.iret.generation = p.generation

    def learn_iret(self, address: int, vouch: IretVouch, *, nmi_blocked: bool = False) -> bool:
        """From `iret_in_hook`, which just executed the IRETQ at `address` in its hook:
        the native hook may execute IRETQs from now on in this run, under `vouch`.
        False when it cannot (no native hook there, too much to vouch for)."""
        entry = self._iret_sites.get(address)
        if entry is None or not self.iret_enabled or len(vouch.words) > IRET_WORDS:
            return False
        i = self.iret
        entry[0].generation = i.generation
        key = (vouch.cs, vouch.ss, vouch.cpl, vouch.stack_page, vouch.frame_ss, vouch.scope)
        if key in self._contexts:
            slot = self._contexts.index(key)
        else:
            slot = self._next_context
            self._next_context = (slot + 1) % IRET_CONTEXTS
            self._contexts[slot] = key
        self._scope = None  # a context changed: `live` is computed again
        x = i.ctx[slot]
        x.cs, x.ss, x.cpl = vouch.cs, vouch.ss, vouch.cpl
        x.stack_page, x.stack_paddr = vouch.stack_page, vouch.stack_paddr
        x.frame_ss, x.frame_ss_flags = vouch.frame_ss, vouch.frame_ss_flags
        x.nwords = len(vouch.words)
        for k, (a, v) in enumerate(vouch.words):
            x.addr[k], x.val[k] = a, v
        self._enter_scope(vouch.scope)
        i.cost = vouch.cost
        self._set_progress(vouch.progress)
        i.nmi_blocked = int(nmi_blocked)
        i.armed = 1
        self._vouched.add(address)
        return True

    def _enter_scope(self, scope: tuple[int, ...]) -> int:
        """Mark live the contexts vouched for under `scope` (CR0, CR3, CR4, EFER and the
        GDT base in force now), and only those; returns how many are."""
        if self._scope is not None and self._scope[0] == scope:
            return self._scope[1]
        live = 0
        for slot, key in enumerate(self._contexts):
            ok = key is not None and key[5] == scope
            self.iret.ctx[slot].live = int(ok)
            live += ok
        self._scope = (scope, live)
        return live

    def rearm_iret(self, *, progress: ProgressView | None,
                   site_ok: Callable[[int], bool], nmi_blocked: bool,
                   scope: tuple[int, ...]) -> bool:
        """As a run starts (the boundary there is quiet, the caller checked): arm the IRETQ
        sites vouched for earlier (`learn_iret`) again, under the memory, selectors and
        cost vouched for then (the C code re-checks the memory and the selectors), and
        the no-progress state `progress` (None: the next IRET's signature cannot match
        the last one, an event came in between). Sites
        `site_ok` refuses (an injection point or a breakpoint there now) stay Python's."""
        i = self.iret
        if not self._vouched or not self.iret_enabled:
            return False
        if not self._enter_scope(scope):
            return False  # CR3, CR0, CR4, EFER or GDTR changed since every vouch
        armed = False
        for address in self._vouched:
            if site_ok(address):
                self._iret_sites[address][0].generation = i.generation
                armed = True
        if not armed:
            return False
        if progress is None:
            i.last_address = 0xFFFFFFFFFFFFFFFF  # not an address an IRET is at
            i.have_regs = i.repeats = 0
        else:
            self._set_progress(progress)
        i.nmi_blocked = int(nmi_blocked)
        i.armed = 1
        return True

    def _set_progress(self, pv: ProgressView) -> None:
        i = self.iret
        (i.last_address, i.last_rip, i.last_rsp, i.last_rflags,
         i.last_delta) = (x & 0xFFFFFFFFFFFFFFFF for x in pv.last)
        i.last_icount = pv.icount
        i.have_regs = int(pv.registers is not None)
        for k, v in enumerate(pv.registers or ()):
            i.regs[k] = v
        i.repeats, i.repeat_limit = pv.repeats, pv.limit

    def progress_state(self) -> tuple[tuple[int, int, int, int, int], int,
                                      tuple[int, ...] | None, int]:
        """The no-progress state as the native IRETQ left it (after `learn_iret`): the last
        signature, the count at it, the registers of a candidate loop, and the repeats."""
        i = self.iret
        return ((i.last_address, i.last_rip, i.last_rsp, i.last_rflags, i.last_delta),
                i.last_icount, tuple(i.regs) if i.have_regs else None, i.repeats)

    def drain_irets(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """The IRETQs executed natively since the last drain, in order: (address, icount,
        cycles, RIP, RSP, RFLAGS, NMIs unblocked) each. Empties the log."""
        i = self.iret
        n = int(i.logged)
        out = [(r.address, r.icount, r.cycles, r.rip, r.rsp, r.rflags, r.nmi_unblocked)
               for r in i.log[:n]]
        i.logged = 0
        return out

    def words_failed(self) -> bool:
        """A word vouched for no longer held at an IRETQ since the last call (the memory
        changed: vouch for it afresh)."""
        failed = bool(self.iret.words_failed)
        self.iret.words_failed = 0
        return failed

    @property
    def has_vouched_irets(self) -> bool:
        """Some IRETQ site was vouched for (`learn_iret`) and is still hooked."""
        return bool(self._vouched) and self.iret_enabled

    @property
    def iret_hits(self) -> int:
        """IRETQs executed natively."""
        return int(self.iret.hits)

    def learn(self, address: int, block: tuple[int, int, int], *, tsc_offset: int,
              tsc_aux: int, if_clear: bool) -> None:
        """From `rdtsc_in_hook`, which just executed the RDTSC at `address` in its hook
        (the plain case held): the native hook may execute it from now on in this run,
        in the translation block (address, size) at position `index` of `block`.
        `if_clear`: the case was plain only because IF = 0 (an interrupt is pending):
        the native hook requires IF = 0 too."""
        entry = self._sites.get(address)
        if entry is None:
            return
        s = entry[0]
        p = self.state
        s.block_addr, s.block_size, s.index = block
        s.generation = p.generation
        p.tsc_offset = tsc_offset & 0xFFFFFFFFFFFFFFFF
        p.tsc_aux = tsc_aux
        p.if_clear = int(if_clear)
        p.armed = 1

    @property
    def hits(self) -> int:
        """RDTSCs executed natively."""
        return int(self.state.hits)
