"""The native parts of the engine adapter, built on first use with the system C compiler into
one library cached under `$IDTLAB_CACHE` (default `~/.cache/idtlab`): the instruction and
cycle counter (`counter.c`), the validated TLB-fill front (`tlb.c`) and the native
RDTSC/RDTSCP site hooks (`paths.c`, cpu/native_paths.py)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cpu.errors import Unsupported

_SOURCES = (Path(__file__).with_name("counter.c"), Path(__file__).with_name("tlb.c"),
            Path(__file__).with_name("paths.c"))


class CounterStruct(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint64),
        ("stop_at", ctypes.c_uint64),
        ("stop", ctypes.c_void_p),
        ("stopped", ctypes.c_uint64),
        ("cycles", ctypes.c_uint64),
        ("stop_cycle", ctypes.c_uint64),
        ("last_cost", ctypes.c_uint64),
        ("default_cost", ctypes.c_uint64),
        ("timed", ctypes.c_uint64),
        ("keys", ctypes.c_void_p),
        ("vals", ctypes.c_void_p),
        ("mask", ctypes.c_uint64),
        ("used", ctypes.c_uint64),
        ("miss", ctypes.c_void_p),
        ("block_addr", ctypes.c_uint64),
        ("block_size", ctypes.c_uint64),
        ("block_before", ctypes.c_uint64),
        ("block_cycles_before", ctypes.c_uint64),
        ("split", ctypes.c_uint64),
        ("bkeys", ctypes.c_void_p),
        ("bvals", ctypes.c_void_p),
        ("bmask", ctypes.c_uint64),
        ("bused", ctypes.c_uint64),
        ("bmiss", ctypes.c_void_p),
        ("last_addr", ctypes.c_uint64),
        ("ac_check", ctypes.c_uint64),
        ("ac_pass", ctypes.c_uint64),
        ("ac_stopped", ctypes.c_uint64),
        ("reg_read", ctypes.c_void_p),
        ("rid_eflags", ctypes.c_int32),
        ("block_n", ctypes.c_uint64),
    ]


NO_SPLIT = 2**64 - 1


class TlbStruct(ctypes.Structure):
    """`struct idtlab_tlb` of tlb.c."""

    _fields_ = [
        ("reg_read", ctypes.c_void_p),
        ("miss", ctypes.c_void_p),
        ("mem", ctypes.c_void_p),
        ("mem_size", ctypes.c_uint64),
        ("enabled", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("slots", ctypes.c_void_p),
        ("mask", ctypes.c_uint64),
        ("hits", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("rid_cr0", ctypes.c_int32),
        ("rid_cr3", ctypes.c_int32),
        ("rid_cr4", ctypes.c_int32),
        ("rid_cs", ctypes.c_int32),
        ("rid_msr", ctypes.c_int32),
        ("rid_rflags", ctypes.c_int32),
        ("cr0", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("user", ctypes.c_uint64),
        ("ac", ctypes.c_uint64),
        ("write_generation", ctypes.c_uint64),
    ]


# sizeof(struct tlb_slot): tag, cr0, cr3, cr4, efer, generation, write_generation, user,
# ac, n, addr[4], val[4], paddr, perms.
TLB_SLOT_SIZE = 8 * (10 + 4 + 4 + 2)
TLB_SLOTS = 1 << 16

# int miss(void *uc, uint64_t vaddr, int32_t type, void *entry): Python's TLB fill.
TlbMissCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int32,
                                   ctypes.c_void_p)


# uint32_t miss(uint64_t address, uint32_t size): the timed-mode cost of one instruction.
MissCallback = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32)


def _cache_dir() -> Path:
    root = os.environ.get("IDTLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "idtlab")
    return Path(root)


def library_path() -> Path:
    """Build (once) and return the shared library's path."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:16]
    out = _cache_dir() / f"counter-{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unsupported("idtlab needs a C compiler (cc or gcc) to build its instruction counter")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp_out),
                               *map(str, _SOURCES)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise Unsupported(f"building the native engine parts failed: {proc.stderr.strip()}")
        os.replace(tmp_out, out)  # atomic: parallel test workers may race here
    return out


_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(str(library_path()))
    return _lib
