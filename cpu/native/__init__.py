"""The native instruction and cycle counter (`counter.c`), built on first use with the system C
compiler and cached under `$IDTLAB_CACHE` (default `~/.cache/idtlab`)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cpu.errors import Unsupported

_SOURCE = Path(__file__).with_name("counter.c")


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
    ]


NO_SPLIT = 2**64 - 1


# uint32_t miss(uint64_t address, uint32_t size): the timed-mode cost of one instruction.
MissCallback = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32)


def _cache_dir() -> Path:
    root = os.environ.get("IDTLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "idtlab")
    return Path(root)


def library_path() -> Path:
    """Build (once) and return the shared library's path."""
    src = _SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    out = _cache_dir() / f"counter-{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unsupported("idtlab needs a C compiler (cc or gcc) to build its instruction counter")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp_out), str(_SOURCE)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise Unsupported(f"building {_SOURCE.name} failed: {proc.stderr.strip()}")
        os.replace(tmp_out, out)  # atomic: parallel test workers may race here
    return out


_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(str(library_path()))
    return _lib
