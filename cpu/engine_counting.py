"""Instruction counting and the engine's run primitive, for the engine adapter
(cpu/engine.py).

Every figure idtlab prints (icount, cycles, the instruction limit, a boundary's number)
comes from a native counter (cpu/native/counter.c) registered as the engine's first hook:
per instruction in timed mode (UC_HOOK_CODE, costs from the profile), per translation
block in fast mode (UC_HOOK_BLOCK: a block is counted whole when it starts, which keeps
the per-instruction path free of any callback). Fast mode pays for that with this
module's bookkeeping whenever a run stops *inside* a block — a fault, a code hook, the
threshold: the block's instruction starts (decoded once per block and cached) say how
many of its instructions retired (`_settle`), and a threshold that falls inside a block
is reached by running exactly to it (`_split`). The contract `run` keeps is the same in
both modes, so traces are byte-identical whichever counted them.

QEMU's precise self-modifying-code path is the other thing counting has to know about:
a store into the running block restarts at the store in a fresh one-instruction block,
so what was counted from there did not retire (`_restarted`, `_step_restarted`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from unicorn import UcError  # type: ignore[attr-defined]  # not re-exported

from cpu import native
from cpu.decode import LEGACY_PREFIXES, decode, decode_one, has_write_intent
from cpu.engine_registers import RegisterAccess
from cpu.native_paths import NativePaths

UNTIL_NEVER = 2**64 - 1
MAX_RESTARTS = 64  # self-modifying-code restarts handled in one `run` before it returns



class InstructionCounting(RegisterAccess):
    """Runs and their counts (a base class of `cpu.engine.Engine`, which creates the
    native `counter`, `paths` and the block caches)."""

    counter: Any
    paths: NativePaths
    block_counting: bool
    code_reader: Callable[[int, int], bytes | None]
    # The instruction starts of a block, if a decode made elsewhere knows them (the
    # machine's site table, cpu/sites.py), else None.
    starts_hint: Callable[[int, int], tuple[int, ...] | None]
    _lib: Any
    _block_starts: dict[tuple[int, int], tuple[int, ...]]
    _block_decodes: dict[int, tuple[int, tuple[int, ...]]]
    _run_count: int
    _restart: tuple[int, bool] | None
    _stepping: int | None
    _miss_fn: Any
    # Called as each run starts, once the counter is set (the machine re-arms native paths).
    on_run_start: Callable[[], None]

    def drain_native(self) -> None:
        """Hand over what native paths did that Python keeps track of (cpu/engine.py)."""

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
            self.drain_native()
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
        self.on_run_start()
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
        known = self.starts_hint(address, size)
        if known is not None:
            return known
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
        starts = self._starts(int(c.block_addr), int(c.block_size)) if k else ()
        if k == 0 or k >= len(starts):
            c.count += 1  # stopped before the block's first instruction: "counted"
            c.cycles += c.default_cost
            c.last_cost = c.default_cost
            c.stopped = 1
            return None
        target = starts[k]
        rip = self.read_reg("rip")
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
        prefixes = code[:next((i for i, b in enumerate(code) if b not in LEGACY_PREFIXES),
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
