"""Sites: the instructions in guest code that the machine must see before they execute.

Unicorn executes IRET, HLT, RDMSR/WRMSR, CPUID, MOV to control registers and RDPMC with
QEMU's semantics, which skip what idtlab models (NMI unblocking by IRET, the HLT wait,
the CPU model's MSRs and CPUID leaves, the control-register checks, the local APIC's
TPR as CR8). So each such instruction gets a code hook (a *site*): the engine stops
there and Python executes the instruction instead (cpu/emulated.py). XSETBV/XGETBV,
LGDT/LIDT/LLDT/LTR, WRFSBASE/WRGSBASE and SGDT/SIDT/SLDT/SMSW/STR are *checked* sites:
Python stops the engine only when the instruction must fault (cpu/checked_sites.py), and
otherwise it runs natively. STI and MOV SS sites are observed (they open an interrupt
shadow; cpu/boundary.py) and OUT sites are looked at for the exit ports
(cpu/platform.py); those then run natively. An instruction with a LOCK prefix the SDM
forbids is a site that raises #UD (the engine, like QEMU, runs some of them).
RDTSC/RDTSCP sites are hooked natively (cpu/native_paths.py): the plain case runs
without Python.

Where sites come from
---------------------

A site missed is silently wrong: an IRETQ the engine runs natively leaves NMIs blocked
for ever and emits no `iret` record. A linear decode of the code as it is loaded cannot
be trusted to find them all: it loses its place at the first byte that is not an
instruction (a `.byte 0x06` #UD test, a string, a jump table) and never sees code the
guest writes at run time. So sites follow *execution*:

* Every translation block the engine generates is decoded before it first runs
  (`translated`, called by the engine from Unicorn's block-generation hook). A block is
  straight-line code from an address execution actually reached, exactly the
  instructions the engine is about to run, so data between functions, undecodable bytes
  and instructions that overlap other instructions cannot hide a site in it. A site not
  hooked yet stops the engine before the block runs (a boundary: nothing of the block
  has executed or been counted); the hook is added there and the block is generated
  again, now calling it.
* Self-modifying code: QEMU drops the blocks of code the guest writes and generates them
  again before they run, so they are decoded again. The bytes each decoded block held
  are kept; when a block's bytes differ from what was decoded there before (or from an
  overlapping block's), the code changed: a site whose instruction is no longer there is
  dropped (an IRET overwritten with NOPs runs as NOPs; a HLT overwritten with a NOP does
  not stop), a new one is hooked, and everything cached by address (instruction costs,
  block sizes) is forgotten.
* Code loaded at load time is still decoded linearly up front (`add_code`): the sites it
  finds are hooked before the first run, which saves the stop for each at run time. A
  byte sequence that the linear decode takes for a site but that is never an instruction
  start costs nothing: a code hook fires only where an instruction starts.

The table of kinds is a function of the code bytes, not of a run: a rollback
(cpu/snapshot.py) keeps it, and re-checks the decoded blocks only when code changed
since the checkpoint (`changed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpu.decode import (
    ILLEGAL_LOCK,
    INVALID_ENCODING,
    MAX_INSN_LENGTH,
    Insn,
    SiteKind,
    decode_loaded,
    decode_one,
    site_kind,
)

if TYPE_CHECKING:
    from cpu.machine import Machine

_RDTSC = frozenset({SiteKind.RDTSC, SiteKind.RDTSCP})
# Instructions `decode_loaded` decodes past where Capstone stops.
_BEYOND_CAPSTONE = frozenset({ILLEGAL_LOCK, INVALID_ENCODING, "lkgs"})
PAGE = 0x1000
LOAD_DECODE_PIECE = 0x10000


class SiteTable:
    """Sites by address: from the translation blocks the engine runs, and from a linear
    decode of code loaded before the run."""

    # Derived from the guest's code bytes, not from a run's state: a rollback keeps them
    # and re-checks what a schedule changed (`recheck`); see the module docstring.
    CACHES = frozenset({"kinds", "lengths", "iretq", "cr2_reads", "blocks", "pages", "fresh",
                        "changed", "starts", "decoded_pages"})

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.kinds: dict[int, SiteKind] = {}
        self.lengths: dict[int, int] = {}
        self.iretq: frozenset[int] = frozenset()  # IRET sites with REX.W (the form modelled)
        self.cr2_reads: frozenset[int] = frozenset()  # MOV reg, CR2 (Frames.observe_cr2_reads)
        # pc -> the bytes of the longest translation block decoded there
        self.blocks: dict[int, bytes] = {}
        # linear page -> the pcs of decoded blocks with bytes on it
        self.pages: dict[int, set[int]] = {}
        # pc -> the instruction starts of the block decoded there, when its decode reached
        # the block's end
        self.starts: dict[int, frozenset[int]] = {}
        # linear page -> the pcs in `starts` with bytes on it (the blocks that can hold a
        # tail: most kept blocks are tails, which never do)
        self.decoded_pages: dict[int, set[int]] = {}
        # Sites found inside the engine, hooked at the stop that follows.
        self.fresh: list[int] = []
        # Code changed under a decoded block since the last checkpoint (cpu/snapshot.py).
        self.changed = False

    # -- load time ----------------------------------------------------------------------
    def add_code(self, addr: int, data: bytes) -> None:
        """Decode `data` (guest code at linear `addr`) and hook its sites now."""
        # In pieces, each picking up where the last instruction of the one before ended:
        # Capstone decodes a whole buffer at once, with details, which for megabytes of
        # code is gigabytes of memory.
        at = 0
        while at < len(data):
            end = at
            fresh: list[int] = []
            piece = data[at:at + LOAD_DECODE_PIECE + MAX_INSN_LENGTH]
            for insn in decode_loaded(piece, addr + at):
                if insn.address - addr >= at + LOAD_DECODE_PIECE:
                    break
                end = insn.address + insn.size - addr
                if self._note(insn):
                    fresh.append(insn.address)
            self._hook(fresh)
            if end == at or end < min(at + LOAD_DECODE_PIECE, len(data)):
                break  # not an instruction: the linear decode ends here
            at = end
        if data:
            # Code loaded over code the engine may have translated (a machine reused
            # between runs): its blocks are generated, and decoded, again.
            self.m.engine.remove_cache(addr, addr + len(data))
        self.m.engine.clear_cost_cache()

    # -- run time -------------------------------------------------------------------------
    def translated(self, pc: int, size: int) -> bool:
        """The engine generated a block [pc, pc + size) and is about to run it (called
        inside the engine). Returns True to stop the engine before it runs: it holds a
        site not hooked yet (`hook_fresh` hooks it at that stop)."""
        if size <= 0:
            return False
        code = self.m.code_bytes(pc, size)
        if code is None:
            return False  # not readable as the supervisor: the fetch faults anyway
        old = self.blocks.get(pc)
        if old is not None and len(old) >= size and old[:size] == code:
            return False  # decoded before, unchanged
        q = self._decoded_around(pc, pc + size)
        if q is not None and self.blocks[q][pc - q:pc - q + size] == code:
            # The tail of a block decoded before, from one of its instructions, unchanged
            # (a run stopped mid-block: an injection point, a fault): its sites are
            # noted. The kept blocks agree wherever they overlap (a change drops those on
            # its pages), so this agrees with all of them.
            self._keep(pc, code)
            return False
        if self._differs(pc, code):
            self._code_changed(pc, size)
        self._keep(pc, code)  # new, longer than before, or changed
        fresh = self._scan(pc, code)
        if not fresh:
            return False
        self.fresh.extend(fresh)
        self.m.stops.pending = self.hook_fresh
        return True

    def hook_fresh(self) -> None:
        """At the stop `translated` asked for: hook the sites it found. The engine drops
        the blocks holding them, and the next run generates them again with the hooks."""
        fresh, self.fresh = self.fresh, []
        self._hook(fresh)

    def starts_within(self, pc: int, size: int) -> tuple[int, ...] | None:
        """The instruction starts of the block [pc, pc + size) the engine generated, from
        a decode made before (the block's own, or one of a block it is the tail of), or
        None (`Engine._starts` then decodes it)."""
        code = self.blocks.get(pc)
        if code is None or len(code) != size:
            return None
        q = self._decoded_around(pc, pc + size)
        if q is None:
            return None
        return tuple(sorted(a for a in self.starts[q] if pc <= a < pc + size))

    def _keep(self, pc: int, code: bytes) -> None:
        self.blocks[pc] = code
        for page in range(pc & ~(PAGE - 1), pc + len(code), PAGE):
            self.pages.setdefault(page, set()).add(pc)

    def _decoded_around(self, pc: int, end: int) -> int | None:
        """The start of a block decoded before that holds [pc, end), whose decode reached
        its end and has an instruction at `pc` (whose bytes are the caller's to check:
        `_differs`), or None."""
        for q in self.decoded_pages.get(pc & ~(PAGE - 1), ()):
            other = self.blocks.get(q)
            if (other is not None and q <= pc and end <= q + len(other)
                    and pc in self.starts.get(q, ())):
                return q
        return None

    def _differs(self, pc: int, code: bytes) -> bool:
        """`code` (now at pc) differs from a block decoded before where they overlap."""
        end = pc + len(code)
        seen: set[int] = set()
        for page in range(pc & ~(PAGE - 1), end, PAGE):
            for q in self.pages.get(page, ()):
                if q in seen:
                    continue
                seen.add(q)
                other = self.blocks.get(q)
                if other is None:
                    continue
                lo, hi = max(pc, q), min(end, q + len(other))
                if lo < hi and other[lo - q:hi - q] != code[lo - pc:hi - pc]:
                    return True
        return False

    def _code_changed(self, pc: int, size: int) -> None:
        """The guest changed code the engine ran (or remapped it): forget the decoded
        blocks on its pages (each is decoded again when it next runs) and everything the
        engine cached by address."""
        for page in range(pc & ~(PAGE - 1), pc + size, PAGE):
            self.decoded_pages.pop(page, None)
            for q in self.pages.pop(page, set()):
                self.blocks.pop(q, None)
                self.starts.pop(q, None)
        self.m.engine.code_changed()
        self.changed = True

    def _scan(self, pc: int, code: bytes) -> list[int]:
        """Note every instruction of the block at pc; the sites that need a hook. Where
        the decoder gives up before the block's end (an instruction Capstone does not
        know but the engine ran), every later byte offset is tried as an instruction
        start, so nothing after it can hide a site (a hook at an offset that is not an
        instruction start never fires)."""
        fresh: list[int] = []
        end = pc
        starts: list[int] = []
        plain = True  # Capstone's own decode throughout (what `Engine._starts` would make)
        for insn in decode_loaded(code, pc):
            end = insn.address + insn.size
            starts.append(insn.address)
            plain = plain and insn.mnemonic not in _BEYOND_CAPSTONE
            if self._note(insn):
                fresh.append(insn.address)
        if end == pc + len(code) and plain:
            self.starts[pc] = frozenset(starts)  # a complete decode (`_decoded_around`)
            for page in range(pc & ~(PAGE - 1), pc + len(code), PAGE):
                self.decoded_pages.setdefault(page, set()).add(pc)
        for at in range(end, pc + len(code)):
            guess = decode_one(code[at - pc:at - pc + MAX_INSN_LENGTH], at)
            if guess is not None and site_kind(guess) is not None and self._note(guess):
                fresh.append(at)
        return fresh

    # -- the table ----------------------------------------------------------------------
    def _note(self, insn: Insn) -> bool:
        """Record what the instruction at its address is (a site kind, a CR2 read, or
        neither: a site that was there is dropped). True if it needs a hook it lacks."""
        addr = insn.address
        kind = site_kind(insn)
        is_iretq = insn.mnemonic == "iretq"
        is_cr2_read = kind is None and insn.mnemonic == "mov" and insn.op_str.endswith(", cr2")
        if (addr in self.iretq) != is_iretq:
            if not is_iretq:
                # A native IRETQ hook would run IRETQ whatever the bytes now are: drop it
                # (a new hook is added below if the instruction is a site).
                self.m.engine.remove_site(addr)
            self.iretq = self.iretq ^ {addr}
        if (addr in self.cr2_reads) != is_cr2_read:
            self.cr2_reads = self.cr2_reads ^ {addr}
        was = self.kinds.get(addr)
        if was in _RDTSC and (kind is not was or self.lengths.get(addr) != insn.size):
            # A native RDTSC hook would run RDTSC whatever the bytes now are: drop it (a
            # new hook is added below if the instruction is a site).
            self.m.engine.remove_site(addr)
        if kind is None:
            if addr in self.kinds:
                # The code changed: the hook stays (harmless: nothing is done there).
                del self.kinds[addr]
                self.lengths.pop(addr, None)
            return is_cr2_read and self.m.frames.observe_cr2 and \
                not self.m.engine.has_site(addr)
        self.kinds[addr] = kind
        self.lengths[addr] = insn.size
        return not self.m.engine.has_site(addr)

    def _hook(self, addresses: list[int]) -> None:
        for address in addresses:
            kind = self.kinds.get(address)
            native = (self.lengths[address], kind is SiteKind.RDTSCP) if kind in _RDTSC else None
            self.m.engine.add_site(address, native, iret=address in self.iretq)

    def keeps(self, address: int) -> bool:
        """The engine hook at `address` is this table's (a rollback keeps it)."""
        return address in self.kinds or (self.m.frames.observe_cr2 and address in self.cr2_reads)

    def recheck(self) -> None:
        """After a rollback that put back guest memory (cpu/snapshot.py): if code changed
        since the checkpoint, the engine may hold blocks of code that is no longer there
        (the rollback wrote memory behind its back); drop those, so they are generated
        and decoded again."""
        if not self.changed:
            return
        self.changed = False
        stale = [pc for pc, code in self.blocks.items()
                 if self.m.code_bytes(pc, len(code)) != code]
        for pc in stale:
            size = len(self.blocks[pc])
            self.m.engine.remove_cache(pc, pc + size)
            self._code_changed(pc, size)
        self.changed = False
