"""Guest physical memory: one host buffer shared with the engine (`mem_map_ptr`).

Python reads and writes it directly through a memoryview, so page walks and frame pushes
cost no engine calls. Writes from Python do not invalidate translated code: idtlab
writes only data (frames, A/D bits, loaded images before the run).
"""

from __future__ import annotations

import ctypes
import mmap
import struct

PAGE = 4096


class PhysicalAccessError(Exception):
    """An access to guest-physical memory outside RAM."""

    def __init__(self, paddr: int, size: int, memsize: int) -> None:
        self.paddr = paddr
        super().__init__(f"physical access {paddr:#x}+{size} outside guest memory (0..{memsize:#x})")


class PhysicalMemory:
    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest memory size {size:#x} must be a positive multiple of 4 KiB")
        self.size = size
        # Anonymous memory: zero pages come from the OS on first touch, so a machine with
        # large RAM costs nothing until the guest uses it.
        self._map = mmap.mmap(-1, size)
        self._buf = (ctypes.c_ubyte * size).from_buffer(self._map)
        self.view = memoryview(self._map).cast("B")
        # Checkpoint support (cpu.snapshot), copy-on-write: while tracking, `dirty` maps
        # each page written since the checkpoint to its contents at the checkpoint,
        # saved just before its first write. Writers outside this class (the engine,
        # through TLB entries) call `mark` before they can write.
        self.dirty: dict[int, bytes] | None = None

    @property
    def host_address(self) -> int:
        return ctypes.addressof(self._buf)

    def _check(self, paddr: int, size: int) -> None:
        if paddr < 0 or paddr + size > self.size:
            raise PhysicalAccessError(paddr, size, self.size)

    def contains(self, paddr: int, size: int = 1) -> bool:
        return paddr >= 0 and paddr + size <= self.size

    def read(self, paddr: int, size: int) -> bytes:
        self._check(paddr, size)
        return bytes(self.view[paddr : paddr + size])

    def write(self, paddr: int, data: bytes) -> None:
        self._check(paddr, len(data))
        if self.dirty is not None:
            self.mark(paddr, len(data))
        self.view[paddr : paddr + len(data)] = data

    def read_u64(self, paddr: int) -> int:
        self._check(paddr, 8)
        return int(struct.unpack_from("<Q", self.view, paddr)[0])

    def write_u64(self, paddr: int, value: int) -> None:
        self._check(paddr, 8)
        if self.dirty is not None:
            self.mark(paddr, 8)
        struct.pack_into("<Q", self.view, paddr, value & (2**64 - 1))

    def read_uint(self, paddr: int, size: int) -> int:
        return int.from_bytes(self.read(paddr, size), "little")

    # -- checkpoints ---------------------------------------------------------------------
    def mark(self, paddr: int, size: int = 1) -> None:
        """Pages [paddr, paddr + size) are about to be written: keep their checkpoint
        contents (no-op unless tracking, or already kept)."""
        dirty = self.dirty
        if dirty is None:
            return
        view = self.view
        for page in range(paddr >> 12, ((paddr + max(size, 1) - 1) >> 12) + 1):
            if page not in dirty and page < self.size >> 12:
                lo = page << 12
                dirty[page] = bytes(view[lo : lo + PAGE])

    @property
    def tracking(self) -> bool:
        return self.dirty is not None

    def commit(self) -> None:
        """Make the current contents the checkpoint (and start tracking writes)."""
        self.dirty = {}

    def revert(self) -> None:
        """Put back the contents of the last `commit` (only the pages written since)."""
        if self.dirty is None:
            raise RuntimeError("no checkpoint to revert to (commit first)")
        view = self.view
        for page, data in self.dirty.items():
            lo = page << 12
            view[lo : lo + PAGE] = data
        self.dirty.clear()

    def untrack(self) -> None:
        """Stop tracking writes (the checkpoint is gone)."""
        self.dirty = None
