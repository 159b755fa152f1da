"""The HPET: a High Precision Event Timer block at 0xFED00000 (Intel, "IA-PC HPET (High
Precision Event Timers) Specification", revision 1.0a, October 2004; section titles
below are its own). A standalone model: pure, deterministic, no engine, no host clock.

What the guest sees ("Register Set Area Summary")
-------------------------------------------------
    0x000  General Capabilities and ID   RO: REV_ID 1, NUM_TIM_CAP (timers - 1), a 64-bit
                                         counter (COUNT_SIZE_CAP), LegacyReplacement
                                         Route capable, vendor 0x8086, and in bits 63:32
                                         the counter period, 10 000 000 fs (100 MHz)
    0x010  General Configuration         ENABLE_CNF (bit 0), LEG_RT_CNF (bit 1)
    0x020  General Interrupt Status      bit n: timer n's level interrupt is active;
                                         writing 1 clears it
    0x0F0  Main Counter Value
    0x100 + 0x20 n   Timer n Configuration and Capability
    0x108 + 0x20 n   Timer n Comparator Value
    0x110 + 0x20 n   Timer n FSB Interrupt Route
These are what QEMU's pc machine offers (hw/timer/hpet.c hpet_init/hpet_reset: three
timers, the same capability word, 10 ns). Every register is 64 bits wide and may be
read or written as a whole or as aligned 32-bit halves ("Register Space Access").

Time
----
The main counter counts at 1e15 / period ticks per second. The machine's time is its
cycle counter `now` and its clock `cpu_mhz`; the counter advances by
floor(cycles * 1e15 / (period * cpu_hz)) over an interval of cycles, all in integers,
so a run replays to the tick (at 2.4 GHz and 10 ns: one tick every 24 cycles). While
ENABLE_CNF is 0 the counter holds its value ("General Configuration Register": 0 halts
the main counter and disables all timer interrupts); writing it is allowed only then
("Main Counter Value Register": writes "should only be done while the counter is
halted"), and a write while it runs raises instead of guessing.

Timers ("Timer N Configuration and Capabilities Register", "Timer N Comparator Value
Register")
--------------------------------------------------------------------------------------
* A timer fires when the running main counter reaches its comparator ("equals", and
  the counter passes every value). A comparator already behind the counter does not
  fire until the counter wraps (QEMU fires such a timer at once, hw/timer/hpet.c
  hpet_calculate_diff; Linux's hpet_clkevt_set_next_event checks for that race
  because hardware does not).
* Periodic mode (Tn_TYPE_CNF): after each match the comparator advances by the period.
  A comparator write sets the period; with Tn_VAL_SET_CNF set it also sets the
  comparator, and Tn_VAL_SET_CNF clears itself (QEMU's reading of the specification,
  and the sequence Linux's hpet_set_periodic writes).
* A firing timer with Tn_INT_ENB_CNF set interrupts on its route: IOAPIC input 2 for
  timer 0 and 8 for timer 1 under LegacyReplacement Route ("LegacyReplacement
  Route"), else Tn_INT_ROUTE_CNF, which may name only an input Tn_INT_ROUTE_CAP allows
  (input 2, as QEMU advertises); writing another leaves the field as it was, so it
  reads back different ("software must only write valid values"). Edge mode pulses the
  input; level mode sets the timer's status bit and holds the input asserted until
  software writes 1 to that bit. A level-mode timer with Tn_INT_ENB_CNF clear still
  sets its status bit ("the timer will still operate and generate appropriate status
  bits, but will not cause an interrupt"; QEMU sets nothing).
* Halting the counter, or clearing a timer's Tn_INT_ENB_CNF, releases the inputs it
  holds and clears its status bits (QEMU update_irq with set = 0).
* `tick(now)` processes every match up to cycle `now`; several matches of one periodic
  timer inside one call are one pulse (the receiving interrupt controller would merge
  them) reported with their count. `next_deadline()` is the exact cycle of the next
  interrupting match, for the machine to stop at. Register accesses call `tick` first,
  so a match that happened before the access is seen first.

Not modelled, raising `HpetUnsupported`: 32-bit timer mode (Tn_32MODE_CNF), FSB (MSI)
delivery (no timer offers it: Tn_FSB_INT_DEL_CAP reads 0), accesses other than aligned
32- or 64-bit ones, offsets that are no register, a counter write while it runs, and a
timer that fires with a route Tn_INT_ROUTE_CAP does not allow.

All mutable state is in one `HpetState` (checkpoints copy it whole).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cpu.errors import Unsupported

HPET_BASE = 0xFED00000
HPET_SIZE = 0x400

REG_CAPABILITIES = 0x000
REG_CONFIG = 0x010
REG_STATUS = 0x020
REG_COUNTER = 0x0F0
TIMER_BASE = 0x100
TIMER_STRIDE = 0x20
TN_CONFIG = 0x00
TN_COMPARATOR = 0x08
TN_FSB_ROUTE = 0x10

PERIOD_FS = 10_000_000          # 10 ns: a 100 MHz counter (QEMU HPET_CLK_PERIOD)
FS_PER_SECOND = 10 ** 15
VENDOR_ID = 0x8086
REV_ID = 0x01
DEFAULT_TIMERS = 3              # the specification's minimum; QEMU's default
MAX_TIMERS = 32

CAP_COUNT_SIZE = 1 << 13        # 64-bit main counter
CAP_LEGACY_ROUTE = 1 << 15
CFG_ENABLE = 1 << 0
CFG_LEGACY = 1 << 1
CFG_WRITABLE = CFG_ENABLE | CFG_LEGACY

TN_LEVEL = 1 << 1               # Tn_INT_TYPE_CNF
TN_INT_ENABLE = 1 << 2          # Tn_INT_ENB_CNF
TN_PERIODIC = 1 << 3            # Tn_TYPE_CNF
TN_PERIODIC_CAP = 1 << 4        # Tn_PER_INT_CAP (RO)
TN_SIZE_CAP = 1 << 5            # Tn_SIZE_CAP (RO): 64-bit comparator
TN_VAL_SET = 1 << 6             # Tn_VAL_SET_CNF
TN_32BIT = 1 << 8               # Tn_32MODE_CNF
TN_ROUTE_SHIFT = 9              # Tn_INT_ROUTE_CNF, bits 13:9
TN_ROUTE_MASK = 0x1F << TN_ROUTE_SHIFT
TN_FSB_ENABLE = 1 << 14         # Tn_FSB_EN_CNF
TN_FSB_CAP = 1 << 15            # Tn_FSB_INT_DEL_CAP (RO, 0 here)
TN_WRITABLE = TN_LEVEL | TN_INT_ENABLE | TN_PERIODIC | TN_VAL_SET | TN_ROUTE_MASK
ROUTE_CAP = 1 << 2              # Tn_INT_ROUTE_CAP: IOAPIC input 2 (QEMU hpet_reset)
LEGACY_PINS = (2, 8)            # timer 0 -> IOAPIC input 2, timer 1 -> input 8

U64 = (1 << 64) - 1
U32 = 0xFFFFFFFF


class HpetUnsupported(Unsupported):
    """An HPET mechanism or access idtlab does not model; the message names it."""


@dataclass
class HpetTimerState:
    """One comparator."""

    config: int = 0           # the writable bits of Timer N Configuration
    comparator: int = U64     # the specification's reset value: all ones
    period: int = 0           # periodic mode: the last value written to the comparator


@dataclass
class HpetState:
    """Everything about the HPET that changes."""

    config: int = 0           # General Configuration (ENABLE_CNF, LEG_RT_CNF)
    status: int = 0           # General Interrupt Status
    counter: int = 0          # the main counter at `counter_cycle` (its value while halted)
    counter_cycle: int = 0
    seen: int = 0             # matches are processed for counter values up to this one
    now: int = 0              # the latest cycle seen; time never goes back
    asserted: int = 0         # bit n: this HPET holds IOAPIC input n asserted
    timers: list[HpetTimerState] = field(default_factory=list)


def _no_irq(pin: int, asserted: bool) -> None:
    del pin, asserted


class Hpet:
    """One HPET block. `read`/`write` are its MMIO registers (offset from HPET_BASE);
    `tick`/`next_deadline` are the machine's side; `on_irq(pin, asserted)` drives IOAPIC
    inputs; `on_event(kind, **fields)` reports "hpet_fire" (timer, cycle, pin, matches)."""

    def __init__(self, *, cpu_mhz: int, timers: int = DEFAULT_TIMERS,
                 on_irq: Callable[[int, bool], None] = _no_irq,
                 on_event: Callable[..., None] | None = None) -> None:
        if cpu_mhz < 1:
            raise ValueError(f"cpu_mhz must be a positive clock in MHz, not {cpu_mhz}")
        if not DEFAULT_TIMERS <= timers <= MAX_TIMERS:
            raise ValueError(f"an HPET block has {DEFAULT_TIMERS} to {MAX_TIMERS} timers, not {timers}")
        self.cpu_mhz = cpu_mhz
        self.on_irq = on_irq
        self.on_event = on_event
        self.state = HpetState(timers=[HpetTimerState() for _ in range(timers)])
        # ticks = cycles * _num // _den, cycles = ceil(ticks * _den / _num)
        self._num = FS_PER_SECOND
        self._den = PERIOD_FS * cpu_mhz * 10 ** 6

    @property
    def capabilities(self) -> int:
        timers = len(self.state.timers)
        return ((PERIOD_FS << 32) | (VENDOR_ID << 16) | CAP_LEGACY_ROUTE | CAP_COUNT_SIZE
                | ((timers - 1) << 8) | REV_ID)

    def timer_config(self, n: int) -> int:
        """Timer n's Configuration and Capability register, as the guest reads it."""
        return ((ROUTE_CAP << 32) | TN_SIZE_CAP | TN_PERIODIC_CAP
                | self.state.timers[n].config)

    # ----- checkpoints -------------------------------------------------------------------

    def save(self) -> HpetState:
        return copy.deepcopy(self.state)

    def restore(self, saved: HpetState) -> None:
        self.state = copy.deepcopy(saved)

    # ----- time --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self.state.config & CFG_ENABLE)

    def counter(self, now: int) -> int:
        """The main counter at cycle `now`."""
        s = self.state
        if not self.running:
            return s.counter
        return (s.counter + (max(now, s.counter_cycle) - s.counter_cycle) * self._num
                // self._den) & U64

    def _cycle_of(self, value: int) -> int:
        """The first cycle at which the running counter reaches `value` (> its base)."""
        s = self.state
        return s.counter_cycle + -(-(value - s.counter) * self._den // self._num)

    def tick(self, now: int) -> None:
        """Process every comparator match up to cycle `now`, in timer order."""
        s = self.state
        s.now = max(s.now, now)
        if not self.running:
            return
        new = self.counter(s.now)
        for n, t in enumerate(s.timers):
            if not s.seen < t.comparator <= new:
                continue
            matches = 1
            first = t.comparator
            if t.config & TN_PERIODIC and t.period:
                matches += (new - t.comparator) // t.period
                t.comparator = (t.comparator + matches * t.period) & U64
            self._fire(n, first, matches)
        s.seen = new

    def next_deadline(self) -> int | None:
        """The cycle of the next match that will interrupt, None if there is none."""
        s = self.state
        if not self.running:
            return None
        cycles = [self._cycle_of(t.comparator) for t in s.timers
                  if t.config & TN_INT_ENABLE and t.comparator > s.seen]
        return min(cycles, default=None)

    def _fire(self, n: int, first: int, matches: int) -> None:
        s = self.state
        t = s.timers[n]
        level = bool(t.config & TN_LEVEL)
        if level:
            s.status |= 1 << n
        pin = None
        if t.config & TN_INT_ENABLE:
            pin = self._route(n)
            if pin is None:
                raise HpetUnsupported(
                    f"HPET: timer {n} fires with interrupt route "
                    f"{(t.config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT}, which Tn_INT_ROUTE_CAP "
                    f"({ROUTE_CAP:#x}) does not allow")
            if level:
                self._assert(pin)
            else:
                self.on_irq(pin, True)
                self.on_irq(pin, False)
        if self.on_event is not None:
            self._emit("hpet_fire", timer=n, cycle=self._cycle_of(first), pin=pin, level=level,
                       matches=matches)

    def _route(self, n: int) -> int | None:
        """The IOAPIC input timer n interrupts on; None for a route the timer cannot use
        (reset leaves Tn_INT_ROUTE_CNF at 0, which ROUTE_CAP does not include)."""
        s = self.state
        if s.config & CFG_LEGACY and n < len(LEGACY_PINS):
            return LEGACY_PINS[n]
        pin = (s.timers[n].config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT
        return pin if ROUTE_CAP >> pin & 1 else None

    def _assert(self, pin: int) -> None:
        s = self.state
        if not s.asserted >> pin & 1:
            s.asserted |= 1 << pin
            self.on_irq(pin, True)

    def _release(self, n: int) -> None:
        """Timer n stops interrupting: clear its status bit, release its level input
        unless another active timer holds the same one."""
        s = self.state
        s.status &= ~(1 << n)
        t = s.timers[n]
        if not t.config & TN_LEVEL or not t.config & TN_INT_ENABLE:
            return
        pin = self._route(n)
        if pin is None:
            return
        holders = [m for m, u in enumerate(s.timers) if m != n and s.status >> m & 1
                   and u.config & TN_LEVEL and u.config & TN_INT_ENABLE and self._route(m) == pin]
        if not holders and s.asserted >> pin & 1:
            s.asserted &= ~(1 << pin)
            self.on_irq(pin, False)

    # ----- MMIO --------------------------------------------------------------------------

    def read(self, offset: int, size: int, now: int) -> int:
        """A load of `size` bytes (4 or 8, aligned) at `offset` in the register block."""
        self._check(offset, size, "read")
        self.tick(now)
        base = offset & ~7
        value = self._read64(base, self.state.now)
        if size == 8:
            return value
        return (value >> 32) if offset & 4 else value & U32

    def write(self, offset: int, size: int, value: int, now: int) -> None:
        """A store of `size` bytes (4 or 8, aligned) at `offset` in the register block."""
        self._check(offset, size, "write")
        self.tick(now)
        now = self.state.now
        base = offset & ~7
        if size == 8:
            mask, value = U64, value & U64
        elif offset & 4:
            mask, value = U32 << 32, (value & U32) << 32
        else:
            mask, value = U32, value & U32
        self._write64(base, value, mask, now)

    def _check(self, offset: int, size: int, what: str) -> None:
        if size not in (4, 8) or offset % size:
            raise HpetUnsupported(f"HPET: {size}-byte {what} at offset {offset:#x} (only aligned "
                                  "32- and 64-bit accesses are defined)")
        if self._register(offset & ~7) is None:
            raise HpetUnsupported(f"HPET: {what} at offset {offset:#x}: no register there")

    def _register(self, base: int) -> tuple[str, int] | None:
        """("general", offset) or ("timer", n) for a 64-bit register offset."""
        if base in (REG_CAPABILITIES, REG_CONFIG, REG_STATUS, REG_COUNTER):
            return "general", base
        n, reg = divmod(base - TIMER_BASE, TIMER_STRIDE)
        if base >= TIMER_BASE and n < len(self.state.timers) and reg in (
                TN_CONFIG, TN_COMPARATOR, TN_FSB_ROUTE):
            return "timer", n
        return None

    def _read64(self, base: int, now: int) -> int:
        s = self.state
        if base == REG_CAPABILITIES:
            return self.capabilities
        if base == REG_CONFIG:
            return s.config
        if base == REG_STATUS:
            return s.status
        if base == REG_COUNTER:
            return self.counter(now)
        n, reg = divmod(base - TIMER_BASE, TIMER_STRIDE)
        if reg == TN_CONFIG:
            return self.timer_config(n)
        if reg == TN_COMPARATOR:
            return s.timers[n].comparator
        return 0  # FSB route: no timer can deliver through the FSB

    def _write64(self, base: int, value: int, mask: int, now: int) -> None:
        s = self.state
        if base == REG_CAPABILITIES:
            return  # read-only
        if base == REG_CONFIG:
            self._write_config((s.config & ~mask | value & mask) & CFG_WRITABLE, now)
        elif base == REG_STATUS:
            for n in range(len(s.timers)):
                if (value & mask) >> n & 1 and s.status >> n & 1:
                    self._release(n)
        elif base == REG_COUNTER:
            if self.running:
                raise HpetUnsupported("HPET: main counter written while it runs (ENABLE_CNF = 1); "
                                      "the specification allows writes only while it is halted")
            s.counter = (s.counter & ~mask | value & mask) & U64
            s.seen = s.counter
        else:
            n, reg = divmod(base - TIMER_BASE, TIMER_STRIDE)
            if reg == TN_CONFIG:
                self._write_timer_config(n, value, mask)
            elif reg == TN_COMPARATOR:
                self._write_comparator(n, value, mask)
            elif value & mask:
                raise HpetUnsupported(f"HPET: timer {n} FSB route written: FSB (MSI) delivery is "
                                      "not modelled (Tn_FSB_INT_DEL_CAP reads 0)")

    def _write_config(self, new: int, now: int) -> None:
        s = self.state
        old = s.config
        if new & CFG_LEGACY != old & CFG_LEGACY:
            for n in range(len(s.timers)):  # the routes change: let go of the old ones
                self._release(n)
        if not new & CFG_ENABLE and old & CFG_ENABLE:
            s.counter = self.counter(now)  # halt: the counter keeps its value
            for n in range(len(s.timers)):
                self._release(n)
        s.config = new
        if new & CFG_ENABLE and not old & CFG_ENABLE:
            s.counter_cycle = now  # run: count from here
            s.seen = s.counter

    def _write_timer_config(self, n: int, value: int, mask: int) -> None:
        s = self.state
        t = s.timers[n]
        asked = value & mask & U32
        if asked & TN_32BIT:
            raise HpetUnsupported(f"HPET: timer {n} set to 32-bit mode (Tn_32MODE_CNF): not "
                                  "modelled")
        if asked & TN_FSB_ENABLE:
            raise HpetUnsupported(f"HPET: timer {n} set to FSB delivery (Tn_FSB_EN_CNF): not "
                                  "modelled (Tn_FSB_INT_DEL_CAP reads 0)")
        if not mask & U32:
            return  # the high half is Tn_INT_ROUTE_CAP: read-only
        new = t.config & ~TN_WRITABLE | asked & TN_WRITABLE
        route = (new & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT
        if not ROUTE_CAP >> route & 1:
            new = new & ~TN_ROUTE_MASK | t.config & TN_ROUTE_MASK  # not allowed: unchanged
        stops = (t.config & TN_INT_ENABLE and not new & TN_INT_ENABLE) or (
            (t.config ^ new) & (TN_LEVEL | TN_ROUTE_MASK))
        if stops:
            self._release(n)
        t.config = new

    def _write_comparator(self, n: int, value: int, mask: int) -> None:
        t = self.state.timers[n]
        merged = (t.comparator & ~mask | value & mask) & U64
        if t.config & TN_PERIODIC:
            t.period = (t.period & ~mask | value & mask) & U64
            if t.config & TN_VAL_SET:
                t.comparator = merged
        else:
            t.comparator = merged
        t.config &= ~TN_VAL_SET

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, **fields)
