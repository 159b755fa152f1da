"""Native fast paths for emulated instructions (`cpu/native/paths.c`): RDTSC and RDTSCP
executed in a native code hook at their sites, without a Python call.

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
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
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


class NativePaths:
    """The native RDTSC/RDTSCP site hooks of one engine."""

    def __init__(self, uc: Any, uclib: Any, counter: ctypes.Structure, *, block_counting: bool,
                 rids: dict[str, int], site: Callable[[int], None]) -> None:
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

    def unhook(self, address: int) -> bool:
        """Remove the native hook at `address` (False: there is none)."""
        entry = self._sites.pop(address, None)
        if entry is None:
            return False
        self._uclib.uc_hook_del(self._uch, ctypes.c_size_t(entry[1]))
        return True

    def new_run(self) -> None:
        """A run starts: every site must be vouched for again."""
        p = self.state
        p.armed = 0
        p.generation += 1

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
