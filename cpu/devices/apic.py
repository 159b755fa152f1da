"""The local APIC of the one CPU, in xAPIC mode (Intel SDM Vol. 3A, chapter "Advanced
Programmable Interrupt Controller (APIC)"). Section titles below are that chapter's.

What is modelled
----------------
The 4-KiB register page at `APIC_BASE`, as the guest sees it through MMIO: every register
at its architectural offset, accessed as an aligned 32-bit load or store at a 16-byte
aligned offset ("Local APIC Register Address Map"). Behind the registers sit the three
256-bit vector sets (IRR, ISR, TMR), the task priority, the interrupt command register,
the six LVT entries (plus CMCI) and the timer. The model is pure and deterministic: no
engine, no host clock. Time is the machine's cycle counter, passed in as `now`, and all
timer arithmetic is on integers, so a run replays to the cycle.

The rules
---------
* Priorities ("Task and Processor Priorities"): PPR = TPR when TPR[7:4] >= ISRV[7:4],
  else ISRV[7:4]:0, ISRV being the highest in-service vector (0 if none). When the two
  classes are equal the SDM leaves PPR[3:0] model-specific; idtlab takes TPR[3:0].
* Acceptance and dispatch ("Interrupt Acceptance for Fixed Interrupts"): a fixed,
  edge-triggered interrupt sets its IRR bit; one already pending merges with it, so a
  vector is held at most twice (once in IRR, once in ISR). The highest IRR vector is
  dispatched when its priority class is above PPR[7:4]; the CPU's INTA moves it from
  IRR to ISR (`acknowledge`). Vectors 0-15 are illegal for fixed interrupts ("Valid
  Interrupt Vectors").
* Completion ("Signaling Interrupt Servicing Completion"): any write to EOI clears the
  highest ISR bit, which lets nested, lower-class in-service vectors surface again.
  A level-triggered interrupt (an IOAPIC message) sets its TMR bit; its EOI is broadcast
  to the IOAPIC (`on_eoi`), which then clears Remote IRR.
* IPIs ("Issuing Interprocessor Interrupts"): a write to the low ICR half sends. Fixed
  and NMI delivery, physical destination mode, the four shorthands; the machine has one
  CPU, so an IPI reaches this APIC or no one. Delivery is instant: the delivery status
  bit always reads 0. Combinations the SDM table "Valid Combinations for the Pentium 4
  and Intel Xeon Processors' Local xAPIC Interrupt Command Register" marks invalid (NMI
  with the self or all-including-self shorthand) raise rather than guess.
* The timer ("APIC Timer"): the divide configuration gives the divisor (1..128); the
  current count drops by one every `divisor * timer_ratio` cycles from the cycle the
  initial count was written. It expires when the count reaches 0: one-shot mode stops
  there (the current count then reads 0), periodic mode reloads the initial count. An
  expiry sets the IRR bit of the LVT timer vector unless the entry is masked. `tick`
  replays every expiry up to `now` in order, each reported with its exact cycle, and
  `next_deadline` tells the machine the exact cycle of the next one, so HLT can sleep to
  it and the run can stop on it.
* Software enable ("Spurious-Interrupt Vector Register", "Local APIC State After It Has
  Been Software Disabled"): SVR bit 8. The APIC comes out of reset software-disabled
  (SVR = 0xFF). Clearing the bit sets every LVT mask bit, and while it is clear an LVT
  write cannot clear one (the bits stay set after re-enabling until software clears
  them). IRR and ISR are held across the disable, and still dispatch.
* The spurious vector ("Spurious Interrupt") is stored in SVR[7:0] but never dispatched:
  the machine acknowledges the vector `pending_vector` just returned, in the same
  instant, so the window in which raising the TPR masks an interrupt between INTR and
  INTA, which the spurious vector exists for, does not occur.

Accesses ("Local APIC Register Address Map"): registers are 32 bits at 16-byte aligned
offsets. A narrower or unaligned load reads the bytes it covers (bytes 4-15 of a slot,
reserved offsets and the write-only EOI read 0); a store that is not an aligned 32-bit
one, or to a reserved offset, is dropped and reported — what KVM (`kvm_lapic_reg_read`,
`apic_mmio_write`) and QEMU (`apic_mem_read`/`apic_mem_write`) do.

The global enable (IA32_APIC_BASE[11], "Enabling or Disabling the Local APIC"): while it
is clear the APIC takes no interrupt and dispatches none; setting it again brings the
APIC back in its power-up state.

IPIs to CPUs this machine does not have (a physical destination that is not this APIC,
the all-excluding-self shorthand) reach no one, whatever their delivery mode: this is
what INIT, INIT de-assert and start-up IPIs to the other CPUs do here.

What is not modelled, and raises `ApicUnsupported`
--------------------------------------------------
x2APIC, moving the APIC page (IA32_APIC_BASE base), level-triggered interrupts
(LINT0/LINT1 level mode unmasked), the TSC-deadline timer mode unmasked, a timer LVT
with a delivery mode other than fixed, IPIs in logical destination mode, with the
lowest-priority or SMI delivery mode, INIT or start-up IPIs to this CPU, illegal vectors
(0-15) where the hardware would record them in the ESR ("Error Handling"). Each message
names the register and the mode.

Stored but inert: LDR and DFR (only logical-mode IPIs would use them), the LVT entries
of LINT0, LINT1, thermal, performance-counter, CMCI and error (nothing in the machine
drives those pins or sources), ESR (no error is ever recorded: it reads 0). Writes to
read-only registers are ignored, as on hardware, and reported as an
"apic_ignored_write" event.

Events (through `on_event(kind, **fields)`): "ipi" (mode, vector, shorthand,
destination, delivered), "timer" (vector, cycle, masked; a long run of periodic
expiries inside one `tick` is reported one by one up to `MAX_REPORTED_EXPIRIES` and the
rest as one event with `repeats` and `first_cycle`), "apic_ignored_write" (offset,
register, value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cpu.errors import Unsupported

APIC_BASE = 0xFEE00000
APIC_SIZE = 0x1000

# Register offsets ("Local APIC Register Address Map").
REG_ID = 0x020
REG_VERSION = 0x030
REG_TPR = 0x080
REG_APR = 0x090
REG_PPR = 0x0A0
REG_EOI = 0x0B0
REG_RRD = 0x0C0
REG_LDR = 0x0D0
REG_DFR = 0x0E0
REG_SVR = 0x0F0
REG_ISR = 0x100  # 8 registers, 0x100-0x170
REG_TMR = 0x180  # 8 registers, 0x180-0x1F0
REG_IRR = 0x200  # 8 registers, 0x200-0x270
REG_ESR = 0x280
REG_LVT_CMCI = 0x2F0
REG_ICR_LOW = 0x300
REG_ICR_HIGH = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0

# "Local APIC Version Register": version 0x14 (integrated xAPIC), Max LVT Entry 5 (the six
# entries of the Pentium 4 and Intel Xeon), no EOI-broadcast suppression (bit 24 = 0).
VERSION_VALUE = 0x00050014

# "Local APIC State After Power-Up or Reset".
SVR_RESET = 0x000000FF
DFR_RESET = 0xFFFFFFFF
LVT_RESET = 0x00010000

SVR_ENABLE = 1 << 8
LVT_MASKED = 1 << 16
LVT_LEVEL = 1 << 15  # trigger mode, LINT0/LINT1 only
TIMER_MODE_SHIFT = 17
TIMER_ONE_SHOT = 0b00
TIMER_PERIODIC = 0b01
TIMER_TSC_DEADLINE = 0b10

# Bits software can write ("Local Vector Table", Figure "Local Vector Table (LVT)"): vector
# 7:0, delivery mode 10:8, pin polarity 13, trigger mode 15, mask 16, timer mode 18:17.
# Delivery status (12) and remote IRR (14) are read-only and always 0 here.
_LVT_TIMER_BITS = 0x000600FF | LVT_MASKED
_LVT_DELIVERY_BITS = 0x000007FF | LVT_MASKED  # CMCI, thermal, performance counters
_LVT_LINT_BITS = 0x0000A7FF | LVT_MASKED
_LVT_ERROR_BITS = 0x000000FF | LVT_MASKED

_LVT: dict[int, tuple[str, int]] = {
    REG_LVT_CMCI: ("LVT CMCI", _LVT_DELIVERY_BITS),
    REG_LVT_TIMER: ("LVT timer", _LVT_TIMER_BITS),
    REG_LVT_THERMAL: ("LVT thermal", _LVT_DELIVERY_BITS),
    REG_LVT_PERF: ("LVT performance counter", _LVT_DELIVERY_BITS),
    REG_LVT_LINT0: ("LVT LINT0", _LVT_LINT_BITS),
    REG_LVT_LINT1: ("LVT LINT1", _LVT_LINT_BITS),
    REG_LVT_ERROR: ("LVT error", _LVT_ERROR_BITS),
}

# ICR fields ("Interrupt Command Register (ICR)"): vector 7:0, delivery mode 10:8,
# destination mode 11, delivery status 12 (read-only), level 14, trigger mode 15,
# destination shorthand 19:18; high half: destination 31:24.
_ICR_LOW_BITS = 0x000CCFFF
_ICR_HIGH_BITS = 0xFF000000
ICR_LOGICAL = 1 << 11
DELIVERY_FIXED = 0b000
DELIVERY_NMI = 0b100
DELIVERY_INIT = 0b101
DELIVERY_STARTUP = 0b110
_DELIVERY_NAMES = {
    0b000: "fixed", 0b001: "lowest priority", 0b010: "SMI", 0b011: "reserved",
    0b100: "NMI", 0b101: "INIT", 0b110: "start-up", 0b111: "reserved",
}
SHORTHAND_NONE = 0b00
SHORTHAND_SELF = 0b01
SHORTHAND_ALL_INCLUDING_SELF = 0b10
SHORTHAND_ALL_EXCLUDING_SELF = 0b11
_SHORTHAND_NAMES = {
    SHORTHAND_NONE: "none", SHORTHAND_SELF: "self",
    SHORTHAND_ALL_INCLUDING_SELF: "all-including-self",
    SHORTHAND_ALL_EXCLUDING_SELF: "all-excluding-self",
}
BROADCAST_ID = 0xFF
NMI_VECTOR = 2

# Divide Configuration Register bits 3,1,0 -> divisor ("APIC Timer").
_DIVISORS = (2, 4, 8, 16, 32, 64, 128, 1)
_DIVIDE_BITS = 0b1011

_READ_ONLY_NAMES = {
    REG_ID: "ID", REG_VERSION: "version", REG_APR: "APR", REG_PPR: "PPR", REG_RRD: "RRD",
    REG_TIMER_CURRENT: "timer current count",
}

FIRST_LEGAL_VECTOR = 16
MAX_REPORTED_EXPIRIES = 16
_U32 = 0xFFFFFFFF


class ApicUnsupported(Unsupported):
    """A local-APIC mechanism idtlab does not model. The message names register and mode."""


def _no_nmi_sink() -> None:
    raise ApicUnsupported("APIC: an NMI IPI was sent but the machine wired no NMI sink (on_nmi)")


def _bits(mode: int, width: int) -> str:
    return f"{mode:0{width}b}b"


class LocalApic:
    """One xAPIC. `read`/`write` are the MMIO page; `set_irr`, `pending_vector`,
    `acknowledge`, `tick` and `next_deadline` are the machine's side of the wires."""

    def __init__(self, *, apic_id: int = 0, timer_ratio: int = 1,
                 on_nmi: Callable[[], None] = _no_nmi_sink,
                 on_event: Callable[..., None] | None = None,
                 on_eoi: Callable[[int], None] | None = None) -> None:
        if not 0 <= apic_id <= 0xFF:
            raise ValueError(f"APIC ID {apic_id:#x} does not fit the xAPIC's 8-bit ID field")
        if timer_ratio < 1:
            raise ValueError(f"timer_ratio must be a positive number of cycles, not {timer_ratio}")
        self.apic_id = apic_id
        self.timer_ratio = timer_ratio
        self._on_nmi = on_nmi
        self._on_event = on_event
        self._on_eoi = on_eoi  # EOI broadcast of a level-triggered vector (to the IOAPIC)
        self._now = 0  # latest cycle seen; time never goes back
        self._reset()

    def _reset(self) -> None:
        """"Local APIC State After Power-Up or Reset" (the APIC ID is kept)."""
        self.enabled = True  # IA32_APIC_BASE[11], the global enable
        self._irr = 0  # 256-bit sets: bit v = vector v
        self._isr = 0
        self._tmr = 0
        self._tpr = 0
        self._ldr = 0
        self._dfr = DFR_RESET
        self._svr = SVR_RESET
        self._icr_low = 0
        self._icr_high = 0
        self._lvt: dict[int, int] = dict.fromkeys(_LVT, LVT_RESET)
        self._divide = 0
        self._initial = 0
        # The timer: while armed, the current count is `_base_count` at `_base_cycle` and
        # drops by one every `_tick_cycles()` cycles; it expires where it reaches 0.
        self._armed = False
        self._base_cycle = 0
        self._base_count = 0

    def set_global_enable(self, enabled: bool) -> None:
        """IA32_APIC_BASE[11] ("Enabling or Disabling the Local APIC"). Clearing it makes
        the processor behave as one without an on-chip APIC: the register page is gone,
        nothing is dispatched, arriving interrupts are lost. Setting it again brings the
        APIC back in its power-up reset state (the transition "disabled → xAPIC" of the
        SDM's "Local x2APIC State Transitions" figure; KVM `kvm_lapic_set_base`)."""
        if enabled and not self.enabled:
            self._reset()
        elif not enabled and self.enabled:
            self._reset()
            self.enabled = False

    # ----- the machine's side ------------------------------------------------------------

    def set_irr(self, vector: int, *, level: bool = False) -> None:
        """A fixed interrupt arrives: set its IRR bit, and its TMR bit when it is
        level-triggered (an IOAPIC message). A vector already pending merges ("Interrupt
        Acceptance for Fixed Interrupts"). Vectors 0-15 are illegal ("Valid Interrupt
        Vectors") and raise ValueError."""
        if not FIRST_LEGAL_VECTOR <= vector <= 0xFF:
            raise ValueError(f"APIC: vector {vector:#04x} is illegal for a fixed interrupt (legal: "
                             f"0x10-0xff; 0x00-0x0f are reserved, SDM 'Valid Interrupt Vectors')")
        if self.enabled:
            self._irr |= 1 << vector
            if level:
                self._tmr |= 1 << vector
            else:
                self._tmr &= ~(1 << vector)

    def pending_vector(self) -> int | None:
        """The highest IRR vector if its priority class is above PPR[7:4], else None
        ("Interrupt Acceptance for Fixed Interrupts", "Task and Processor Priorities").
        Only the highest needs looking at: if it is held back, every lower one is too.
        RFLAGS.IF and the interrupt shadow are the CPU's business, not the APIC's."""
        if not self._irr:
            return None
        vector = self._irr.bit_length() - 1
        return vector if vector >> 4 > self.ppr >> 4 else None

    def acknowledge(self, vector: int) -> None:
        """INTA: the CPU takes `vector`, which must be the one `pending_vector` returns;
        its IRR bit moves to the ISR ("Interrupt Acceptance for Fixed Interrupts").

        Anything else is a bug in the caller, not a spurious interrupt: the machine calls
        this in the same instant as `pending_vector`, so the SDM's "Spurious Interrupt"
        window (TPR raised between INTR and INTA) cannot open."""
        if vector != self.pending_vector():
            raise ValueError(f"APIC: acknowledge({vector:#x}) but the deliverable vector is "
                             f"{self._fmt(self.pending_vector())} (IRR {self._fmt_set(self._irr)}, "
                             f"PPR {self.ppr:#04x})")
        self._irr &= ~(1 << vector)
        self._isr |= 1 << vector

    def tick(self, now: int) -> None:
        """Advance the timer to cycle `now`: every expiry at a cycle <= now happens, in
        order ("APIC Timer"). A masked expiry sets nothing but is still reported."""
        now = self._advance_clock(now)
        if not self._armed:
            return
        period = self._tick_cycles()
        first = self._base_cycle + self._base_count * period
        if first > now:
            return
        if self._timer_mode() == TIMER_PERIODIC:
            # Periodic: reload the initial count at every expiry and count down again.
            reload = self._initial * period
            count = (now - first) // reload + 1
            self._base_cycle, self._base_count = first + (count - 1) * reload, self._initial
        else:
            # One-shot: a single expiry; the current count then stays 0.
            count, reload = 1, 0
            self._armed = False
        self._expire(first, reload, count)

    def next_deadline(self) -> int | None:
        """Cycle of the next timer expiry that will set an IRR bit: None when the timer is
        stopped or its LVT entry is masked (the machine need not stop for it)."""
        if self._lvt[REG_LVT_TIMER] & LVT_MASKED:
            return None
        return self.next_expiry()

    def next_expiry(self) -> int | None:
        """Cycle of the next timer expiry, masked or not; None when the timer is stopped."""
        if not self._armed:
            return None
        return self._base_cycle + self._base_count * self._tick_cycles()

    def can_ever_interrupt(self) -> bool:
        """True if something could still raise an interrupt without the guest doing
        anything: a vector in the IRR (perhaps held back by PPR until an EOI), or a
        running timer whose LVT entry is unmasked."""
        return bool(self._irr) or self.next_deadline() is not None

    @property
    def ppr(self) -> int:
        """Processor priority ("Task and Processor Priorities")."""
        isrv = self._isr.bit_length() - 1 if self._isr else 0
        if self._tpr >> 4 >= isrv >> 4:
            return self._tpr  # equal classes: PPR[3:0] is model-specific; TPR[3:0] here
        return isrv & 0xF0

    @property
    def tpr(self) -> int:
        return self._tpr

    @tpr.setter
    def tpr(self, value: int) -> None:
        """The TPR from outside the MMIO page (MOV to CR8 writes TPR[7:4] = CR8[3:0])."""
        if not 0 <= value <= 0xFF:
            raise ValueError(f"APIC: TPR value {value:#x} does not fit bits 7:0")
        self._tpr = value

    @property
    def isr(self) -> list[int]:
        """In-service vectors, ascending."""
        return _members(self._isr)

    @property
    def irr(self) -> list[int]:
        """Requested vectors, ascending."""
        return _members(self._irr)

    @property
    def logical_id(self) -> int:
        """LDR[31:24], the logical APIC ID ("Logical Destination Register")."""
        return self._ldr >> 24

    @property
    def software_enabled(self) -> bool:
        """SVR bit 8 ("Spurious-Interrupt Vector Register")."""
        return bool(self._svr & SVR_ENABLE)

    # ----- MMIO --------------------------------------------------------------------------

    def read(self, offset: int, size: int, now: int) -> int:
        """A guest load of `size` (1, 2, 4 or 8) bytes at `offset` in the page, at cycle
        `now`. Registers are 32 bits at 16-byte aligned offsets ("Local APIC Register
        Address Map"); a narrower or unaligned load reads the bytes it covers (bytes 4-15
        of each 16-byte slot read as 0), as KVM's `kvm_lapic_reg_read` and QEMU's
        `apic_mem_read` do. Reserved offsets read 0 (QEMU: an illegal-register ESR error,
        not modelled)."""
        if not 0 <= offset < APIC_SIZE or offset + size > APIC_SIZE:
            raise ApicUnsupported(f"APIC: read at offset {offset:#x} is outside the 4-KiB APIC page")
        value = 0
        for i in range(size):
            byte = offset + i
            slot, within = byte & ~0xF, byte & 0xF
            if within < 4:
                value |= ((self._read_register(slot, now) >> (8 * within)) & 0xFF) << (8 * i)
        return value

    def _read_register(self, offset: int, now: int) -> int:
        self.tick(now)
        if offset in _LVT:
            return self._lvt[offset]
        if REG_ISR <= offset < REG_ISR + 0x80:
            return (self._isr >> (32 * ((offset - REG_ISR) >> 4))) & _U32
        if REG_TMR <= offset < REG_TMR + 0x80:
            return (self._tmr >> (32 * ((offset - REG_TMR) >> 4))) & _U32
        if REG_IRR <= offset < REG_IRR + 0x80:
            return (self._irr >> (32 * ((offset - REG_IRR) >> 4))) & _U32
        match offset:
            case 0x020:  # REG_ID
                return self.apic_id << 24
            case 0x030:  # REG_VERSION
                return VERSION_VALUE
            case 0x080:  # REG_TPR
                return self._tpr
            case 0x090 | 0x0C0:  # REG_APR, REG_RRD: no arbitration, no remote reads
                return 0
            case 0x0A0:  # REG_PPR
                return self.ppr
            case 0x0B0:  # REG_EOI: write-only; reads 0 (KVM, QEMU)
                return 0
            case 0x0D0:  # REG_LDR
                return self._ldr
            case 0x0E0:  # REG_DFR
                return self._dfr
            case 0x0F0:  # REG_SVR
                return self._svr
            case 0x280:  # REG_ESR: no error is ever recorded ("Error Handling")
                return 0
            case 0x300:  # REG_ICR_LOW: delivery status (bit 12) is always idle
                return self._icr_low
            case 0x310:  # REG_ICR_HIGH
                return self._icr_high
            case 0x380:  # REG_TIMER_INITIAL
                return self._initial
            case 0x390:  # REG_TIMER_CURRENT
                return self._current_count(self._now)
            case 0x3E0:  # REG_TIMER_DIVIDE
                return self._divide
        return 0  # a reserved offset

    def write(self, offset: int, size: int, value: int, now: int) -> None:
        """A guest store of `size` bytes of `value` at `offset` in the page, at cycle `now`.
        Only aligned 32-bit stores reach a register; any other store is dropped and
        reported as "apic_ignored_write" (KVM `apic_mmio_write`: "len != 4 || offset &
        0xf" is ignored; QEMU drops stores narrower than 32 bits)."""
        if not 0 <= offset < APIC_SIZE or offset + size > APIC_SIZE:
            raise ApicUnsupported(f"APIC: write at offset {offset:#x} is outside the 4-KiB APIC page")
        if size != 4 or offset & 0xF:
            self._emit("apic_ignored_write", offset=offset, register=f"{size}-byte store",
                       value=value)
            return
        value &= _U32
        self.tick(now)
        now = self._now
        if offset in _LVT:
            self._write_lvt(offset, value, now)
            return
        if offset in _READ_ONLY_NAMES:
            self._ignored(offset, _READ_ONLY_NAMES[offset], value)
            return
        for base, name in ((REG_ISR, "ISR"), (REG_TMR, "TMR"), (REG_IRR, "IRR")):
            if base <= offset < base + 0x80:
                self._ignored(offset, f"{name}{(offset - base) >> 4}", value)
                return
        match offset:
            case 0x080:  # REG_TPR: bits 7:0 ("Task Priority Register (TPR)")
                self._tpr = value & 0xFF
            case 0x0B0:  # REG_EOI
                self._eoi()
            case 0x0D0:  # REG_LDR: logical APIC ID, bits 31:24
                self._ldr = value & 0xFF000000
            case 0x0E0:  # REG_DFR: model, bits 31:28; 27:0 read as 1s
                self._dfr = (value & 0xF0000000) | 0x0FFFFFFF
            case 0x0F0:  # REG_SVR
                self._write_svr(value)
            case 0x280:  # REG_ESR: the write latches errors; there never are any
                pass
            case 0x300:  # REG_ICR_LOW
                self._send_ipi(value)
            case 0x310:  # REG_ICR_HIGH
                self._icr_high = value & _ICR_HIGH_BITS
            case 0x380:  # REG_TIMER_INITIAL
                self._write_initial_count(value, now)
            case 0x3E0:  # REG_TIMER_DIVIDE
                self._write_divide(value, now)
            case _:
                self._ignored(offset, "reserved", value)

    # ----- registers ---------------------------------------------------------------------

    def _ignored(self, offset: int, name: str, value: int) -> None:
        self._emit("apic_ignored_write", offset=offset, register=name, value=value)

    def _eoi(self) -> None:
        """"Signaling Interrupt Servicing Completion": the EOI (whatever value is written)
        retires the highest-priority in-service vector. Nothing in service: no effect. A
        level-triggered vector (TMR set) is broadcast to the I/O APICs ("EOI Register":
        the IOAPIC clears its Remote IRR)."""
        if self._isr:
            vector = self._isr.bit_length() - 1
            self._isr &= ~(1 << vector)
            # "Trigger Mode Register": the bit stays as acceptance left it; the EOI of a
            # vector whose bit is set is sent to every I/O APIC.
            if self._tmr & (1 << vector) and self._on_eoi is not None:
                self._on_eoi(vector)

    def _write_svr(self, value: int) -> None:
        """"Spurious-Interrupt Vector Register": vector 7:0, software enable 8. Focus
        checking (9) and EOI-broadcast suppression (12) are not offered, so reserved.
        Disabling sets every LVT mask bit ("Local APIC State After It Has Been Software
        Disabled"); IRR and ISR are held."""
        self._svr = value & 0x1FF
        if not self._svr & SVR_ENABLE:
            for reg in self._lvt:
                self._lvt[reg] |= LVT_MASKED

    def _write_lvt(self, offset: int, value: int, now: int) -> None:
        """"Local Vector Table": store the writable bits; while software-disabled the mask
        bit cannot be cleared. Only the timer ever fires, so only what would change what a
        firing entry does is checked; the other entries are stored as written."""
        name, writable = _LVT[offset]
        entry = value & writable
        if not self._svr & SVR_ENABLE:
            entry |= LVT_MASKED
        unmasked = not entry & LVT_MASKED
        if offset == REG_LVT_TIMER:
            mode = (entry >> TIMER_MODE_SHIFT) & 0b11
            if mode == 0b11:
                raise ApicUnsupported(f"APIC: LVT timer mode 11b (reserved) written ({value:#010x})")
            if unmasked and mode == TIMER_TSC_DEADLINE:
                raise ApicUnsupported("APIC: LVT timer mode TSC-deadline (10b) is not modelled "
                                      "(supported: one-shot 00b, periodic 01b)")
            if unmasked and (value >> 8) & 0b111:
                delivery = (value >> 8) & 0b111
                raise ApicUnsupported(f"APIC: LVT timer delivery mode {_DELIVERY_NAMES[delivery]} "
                                      f"({_bits(delivery, 3)}) is not modelled (supported: fixed)")
            if unmasked and (entry & 0xFF) < FIRST_LEGAL_VECTOR:
                raise ApicUnsupported(f"APIC: LVT timer vector {entry & 0xFF:#04x} is illegal "
                                      f"(0x00-0x0f); the ESR error it causes is not modelled")
            # "TSC-Deadline Mode": switching to or from it disarms the timer.
            old_mode = (self._lvt[offset] >> TIMER_MODE_SHIFT) & 0b11
            if (old_mode == TIMER_TSC_DEADLINE) != (mode == TIMER_TSC_DEADLINE):
                self._armed = False
        elif unmasked and entry & LVT_LEVEL:
            raise ApicUnsupported(f"APIC: {name} level-triggered mode is not modelled "
                                  f"(supported: edge)")
        self._lvt[offset] = entry

    def _send_ipi(self, value: int) -> None:
        """"Issuing Interprocessor Interrupts": the low-half write sends; delivery is
        instant, so the delivery status bit (12) reads 0 at once."""
        vector = value & 0xFF
        delivery = (value >> 8) & 0b111
        shorthand = (value >> 18) & 0b11
        destination = self._icr_high >> 24
        shorthand_name = _SHORTHAND_NAMES[shorthand]
        if delivery not in (DELIVERY_FIXED, DELIVERY_NMI, DELIVERY_INIT, DELIVERY_STARTUP):
            raise ApicUnsupported(f"APIC: ICR delivery mode {_DELIVERY_NAMES[delivery]} "
                                  f"({_bits(delivery, 3)}) is not modelled (supported: fixed, NMI, "
                                  "INIT and start-up to other CPUs)")
        mode = {DELIVERY_FIXED: "fixed", DELIVERY_NMI: "nmi", DELIVERY_INIT: "init",
                DELIVERY_STARTUP: "startup"}[delivery]
        if shorthand == SHORTHAND_NONE:
            if value & ICR_LOGICAL:
                raise ApicUnsupported("APIC: ICR logical destination mode (bit 11) is not modelled "
                                      "(supported: physical)")
            # A physical destination that is not this APIC names a CPU this machine does
            # not have: no one accepts the IPI ("Issuing Interprocessor Interrupts").
            delivered = destination in (self.apic_id, BROADCAST_ID)
        elif shorthand == SHORTHAND_ALL_EXCLUDING_SELF:
            delivered = False  # every other CPU: there is none
        elif delivery == DELIVERY_NMI:
            # Table "Valid Combinations for the Pentium 4 and Intel Xeon Processors' Local
            # xAPIC Interrupt Command Register": self and all-including-self are fixed only.
            raise ApicUnsupported(f"APIC: ICR delivery mode NMI with destination shorthand "
                                  f"{shorthand_name} ({_bits(shorthand, 2)}) is invalid (SDM table "
                                  f"'Valid Combinations ... Interrupt Command Register'); use no "
                                  f"shorthand or all-excluding-self")
        else:
            delivered = True  # self, or all including self: this CPU is all
        if delivered and mode in ("init", "startup"):
            # INIT resets the receiving CPU and a start-up IPI starts a CPU in wait-for-SIPI:
            # this machine models neither for its only CPU.
            raise ApicUnsupported(f"APIC: ICR {_DELIVERY_NAMES[delivery]} IPI to this CPU "
                                  f"(shorthand {shorthand_name}, destination {destination:#04x}) "
                                  "is not modelled (an INIT or start-up IPI to other CPUs reaches "
                                  "no one here)")
        if delivered and mode == "fixed" and vector < FIRST_LEGAL_VECTOR:
            raise ApicUnsupported(f"APIC: ICR fixed IPI with illegal vector {vector:#04x} (0x00-0x0f); "
                                  f"the ESR 'Send Illegal Vector' error is not modelled")
        self._icr_low = value & _ICR_LOW_BITS
        self._emit("ipi", mode=mode, vector=NMI_VECTOR if mode == "nmi" else vector,
                   shorthand=shorthand_name, destination=destination, delivered=delivered)
        if delivered:
            if mode == "fixed":
                self.set_irr(vector)
            else:
                self._on_nmi()

    # ----- timer ("APIC Timer") ----------------------------------------------------------

    def _timer_mode(self) -> int:
        return (self._lvt[REG_LVT_TIMER] >> TIMER_MODE_SHIFT) & 0b11

    def _tick_cycles(self) -> int:
        """Cycles per decrement: the divisor of the divide configuration register (bits 3,
        1, 0) times the machine's cycles per bus-clock tick."""
        index = (self._divide & 0b11) | ((self._divide >> 1) & 0b100)
        return _DIVISORS[index] * self.timer_ratio

    def _current_count(self, now: int) -> int:
        if not self._armed:
            return 0  # stopped, or one-shot after its expiry
        return self._base_count - (now - self._base_cycle) // self._tick_cycles()

    def _write_initial_count(self, value: int, now: int) -> None:
        """Writing the initial count (re)starts the countdown at `now`; 0 stops it. In
        TSC-deadline mode the register is ignored ("TSC-Deadline Mode")."""
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            self._ignored(REG_TIMER_INITIAL, "timer initial count (TSC-deadline mode)", value)
            return
        self._initial = value
        self._armed = value != 0
        self._base_cycle, self._base_count = now, value

    def _write_divide(self, value: int, now: int) -> None:
        """A new divisor while the timer runs: the current count keeps its value and counts
        on at the new rate from `now` (the partial tick is dropped; the SDM does not say)."""
        if self._armed:
            self._base_count, self._base_cycle = self._current_count(now), now
        self._divide = value & _DIVIDE_BITS

    def _expire(self, first: int, reload: int, count: int) -> None:
        """`count` expiries at `first`, `first + reload`, ...: set the vector's IRR bit once
        (repeats merge) unless the LVT entry is masked, and report each expiry."""
        entry = self._lvt[REG_LVT_TIMER]
        vector = entry & 0xFF
        masked = bool(entry & LVT_MASKED)
        if not masked:
            self.set_irr(vector)
        shown = min(count, MAX_REPORTED_EXPIRIES)
        for i in range(shown):
            self._emit("timer", vector=vector, cycle=first + i * reload, masked=masked)
        if count > shown:
            self._emit("timer", vector=vector, cycle=first + (count - 1) * reload, masked=masked,
                       first_cycle=first + shown * reload, repeats=count - shown)

    # ----- helpers -----------------------------------------------------------------------

    def _advance_clock(self, now: int) -> int:
        """Time never goes back: an earlier `now` is read as the latest one seen."""
        if now > self._now:
            self._now = now
        return self._now

    def _emit(self, kind: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(kind, **fields)

    @staticmethod
    def _fmt(vector: int | None) -> str:
        return "none" if vector is None else f"{vector:#04x}"

    @staticmethod
    def _fmt_set(bits: int) -> str:
        return "{" + ", ".join(f"{v:#04x}" for v in _members(bits)) + "}"


def _members(bits: int) -> list[int]:
    return [v for v in range(bits.bit_length()) if bits >> v & 1]
