"""FRED: Flexible Return and Event Delivery, the pure model (Intel SDM Vol. 3A "FRED Event
Delivery" and "FRED Transitions", Vol. 2 ERETS/ERETU/LKGS; the layout is the one the Intel
*Flexible Return and Event Delivery (FRED) Architecture Specification* introduced in
revision 5.0 and that later revisions and the SDM kept).

With CR4.FRED = 1 the processor never reads the IDT, the TSS stack pointers or the IST.
Every event — exception, NMI, external interrupt, INT n, INT1/INT3, SYSCALL/SYSENTER —
goes through one routine, and two new instructions return: ERETS to ring 0, ERETU to
ring 3. This module computes both from an `ArchState` and the FRED MSR values
(`FredMsrs`), through `SystemMemory`, and never touches an engine.

Why it exists: the races of IDT delivery
----------------------------------------
With an IST, every NMI frame is written at the *same* stack top, and *any* IRET unblocks
NMIs. An NMI handler that takes a #PF or #DB therefore reopens NMIs with that handler's
IRET, and the next NMI lands on the IST top and overwrites the live NMI frame
(idt/blocking.py draws it). FRED removes both causes:

    stack level 2 (IA32_FRED_RSP2)          time ->
    +--------------+ <- RSP2 (64-byte aligned)
    | NMI #1 frame |   NMI #1: level 2 > CSL 0: switch to RSP2; NMIs blocked; SS bit 18
    +--------------+
    | red zone     |   #PF in the handler: level max(0, 2) = 2, *no switch*: pushed below
    +--------------+
    | #PF frame    |   ERETS from the #PF frame: bit 18 = 0, NMIs stay blocked
    +--------------+   NMI #2 waits for the ERETS from NMI #1's frame (bit 18 = 1)

1. **No rewind.** The stack is switched only from ring 3 or when the stack level rises;
   an event at the same or a lower level is pushed below the current RSP after the red
   zone (CONFIG[8:6] x 64 bytes) and 64-byte alignment. A live frame is never reused.
2. **The frame, not the instruction, unblocks NMIs.** Only an ERET whose SS slot has bit
   18 set unblocks NMIs, and delivery sets that bit only for an NMI.
3. **Cause registers travel in the frame.** CR2 (#PF) and the DR6 conditions (#DB) are
   copied into slot 6 ("event data"), so a nested #PF cannot destroy the outer one's
   address before the handler reads it.

What remains is shown by the examples (tests/fred/test_side_by_side.py): a #DB or #VE
inside the NMI handler still runs at the NMI's level on the NMI stack, and CR2 itself is
still overwritten by a nested #PF (only the frame's copy survives).

The algorithm (`deliver`), in the order of the SDM's FRED event delivery
-------------------------------------------------------------------------
1. Old context: RIP (the fault or the next instruction), the exact RSP, RFLAGS (RF = 1
   for fault-class exceptions other than #DB), CS, SS; old CSL = 0 from ring 3, else
   CONFIG[1:0].
2. New stack level: 0 from ring 3 unless the event is a nested exception or #DF; else
   CONFIG[10:9] for external interrupts, STKLVLS[2v+1:2v] for NMI and exception types
   (2, 3, 5, 6), 0 for INT n and SYSCALL/SYSENTER; never below the old CSL.
3. Entry RIP = CONFIG[63:12] (+256 from ring 0); non-canonical: #GP(0) before any write.
4. New RSP: IA32_FRED_RSP[new level] from ring 3 or when the level rises; otherwise
   (RSP - red zone) & ~63.
5. The 64-byte frame, written from the top down (reserved, event data, SS, RSP, RFLAGS,
   CS, RIP, error code: Bochs `FRED_EventDelivery`). A fault here is a *nested*
   exception; nothing architectural has changed yet.
6. Commit: RIP, RSP = top - 64, RFLAGS = 2, CPL 0, CSL; from ring 3 CS/SS from
   IA32_STAR[47:32] and a GS swap (the machine does those).

The decisions this model takes where the sources leave room are listed in
docs/sdm-map.md ("FRED"): RFLAGS after delivery (0x2, with IA32_FMASK as an option),
the scope of "nested", #SS(0) for a non-canonical same-level stack, and more.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from idt.deliver import read_descriptor
from idt.double_fault import Combine, combine
from idt.error_codes import selector_code
from idt.state import (
    RFLAGS_IOPL,
    RFLAGS_RF,
    ArchFault,
    ArchState,
    Event,
    Source,
    SystemMemory,
    is_canonical,
)
from idt.vectors import Vector

# -- enabling (SDM Vol. 3A "Control Registers"; the FRED MSRs) -------------------------------
CR4_FRED = 1 << 32
MSR_FRED_RSP0 = 0x1CC  # RSP1..RSP3 follow at 0x1CD..0x1CF
MSR_FRED_STKLVLS = 0x1D0
MSR_FRED_SSP1 = 0x1D1  # SSP2, SSP3 at 0x1D2, 0x1D3 (SSP0 is IA32_PL0_SSP)
MSR_FRED_CONFIG = 0x1D4

CONFIG_CSL = 0x3  # bits 1:0: the current stack level lives here
CONFIG_SHADOW_STACK_SPACE = 1 << 3
CONFIG_RED_ZONE = 0x1C0  # bits 8:6, in units of 64 bytes: `config & 0x1C0` bytes
CONFIG_INT_LEVEL_SHIFT = 9  # bits 10:9: stack level of external interrupts
CONFIG_RESERVED = 0x834  # bits 2, 4, 5, 11
CONFIG_ENTRY = ~0xFFF & (2**64 - 1)  # bits 63:12: the entry page
KERNEL_ENTRY_OFFSET = 256  # events from ring 0 enter 256 bytes after the ring-3 entry

FRAME_SIZE = 64
FRAME_ALIGN = 64
RFLAGS_AFTER_DELIVERY = 0x2

# -- the augmented CS and SS slots ------------------------------------------------------------
CS_SL_SHIFT = 16  # bits 17:16: the CSL at the time of the event
CS_WFE = 1 << 18  # CET-IBT WAIT_FOR_ENDBRANCH (always 0: CET is not modelled)
SS_STI = 1 << 16  # blocking by STI was in effect
SS_SW_EVENT = 1 << 17  # SYSCALL, SYSENTER or INT n
SS_NMI = 1 << 18  # the event is an NMI: ERET with this bit unblocks NMIs
SS_VECTOR_SHIFT = 32
SS_TYPE_SHIFT = 48
SS_64BIT = 1 << 57  # the CPU was in 64-bit mode
SS_NESTED = 1 << 58  # an exception nested on the delivery of another event
SS_LENGTH_SHIFT = 60

# ERET's checks (SDM Vol. 2 ERETS/ERETU "Operation"): the bits that must be zero.
ERETS_CS_MASK = 0xFFFF_FFFF_FFF8_FFFF  # masked CS slot must equal the current CS
ERETS_RFLAGS_MASK = 0xFFFF_FFFF_FFC2_802A  # masked RFLAGS must be exactly 2
ERETS_SS_MASK = 0xFFF8_FFFF  # masked SS slot must equal the current SS (63:32 unchecked)
ERETU_CS_MASK = 0xFFFF_FFFF_FFFF_0003  # masked CS slot must be 3 (RPL 3, bits 63:16 zero)
ERETU_RFLAGS_MASK = 0xFFFF_FFFF_FFC2_B02A  # as ERETS, and IOPL must be 0
ERETU_SS_MASK = 0xFFF8_0003  # masked SS slot must be 3

# Hidden parts of the flat segments FRED loads (high dword of a descriptor as cached).
CS64_DPL0, SS_DPL0 = 0x00AF9B00, 0x00CF9300
CS64_DPL3, CS32_DPL3, SS_DPL3 = 0x00AFFB00, 0x00CFFB00, 0x00CFF300

DB_EVENT_DATA_BITS = 0xF | (1 << 11) | (1 << 13) | (1 << 14) | (1 << 15) | (1 << 16)
DR6_ACTIVE_LOW = 0xFFFF0FF0  # DR6 bits that read 1 when clear (KVM: data = DR6 ^ this)


class EventType(IntEnum):
    """SS slot bits 51:48 (SDM "FRED Event Delivery"; Linux asm/trapnr.h EVENT_TYPE_*)."""

    EXTINT = 0
    NMI = 2
    HWEXC = 3
    SWINT = 4  # INT n, any n
    PRIV_SWEXC = 5  # INT1 (ICEBP)
    SWEXC = 6  # INT3, INTO
    OTHER = 7  # vector 1 = SYSCALL, 2 = SYSENTER


SYSCALL_VECTOR, SYSENTER_VECTOR = 1, 2


@dataclass(frozen=True)
class FredMsrs:
    """The FRED MSRs delivery and ERET read (IA32_FRED_CONFIG holds the CSL)."""

    config: int
    rsp: tuple[int, int, int, int]
    stklvls: int

    @property
    def csl(self) -> int:
        return self.config & CONFIG_CSL

    @property
    def entry(self) -> int:
        return self.config & CONFIG_ENTRY

    @property
    def red_zone(self) -> int:
        return self.config & CONFIG_RED_ZONE

    @property
    def interrupt_level(self) -> int:
        return (self.config >> CONFIG_INT_LEVEL_SHIFT) & 3

    def level_of(self, vector: int) -> int:
        """IA32_FRED_STKLVLS: two bits per vector 0-31 (higher vectors: level 0)."""
        return (self.stklvls >> (2 * vector)) & 3 if vector < 32 else 0


@dataclass(frozen=True)
class FredEvent:
    """An event record, computed before delivery starts: type, vector, error code (0 when
    none), event data, instruction length (types 4-7), nested, and the RIPs (`return_rip`
    is saved; a fault while delivering restarts at `insn_rip`)."""

    type: EventType
    vector: int
    return_rip: int
    insn_rip: int
    error_code: int = 0
    event_data: int = 0
    insn_len: int = 0
    nested: bool = False
    set_rf: bool = False  # a fault-class exception other than #DB: saved RFLAGS.RF = 1
    source: Source = Source.EXCEPTION  # for the #DF class table (idt.double_fault)

    @property
    def name(self) -> str:
        if self.type is EventType.OTHER:
            return {SYSCALL_VECTOR: "SYSCALL", SYSENTER_VECTOR: "SYSENTER"}.get(
                self.vector, f"other {self.vector}")
        return Event(self.vector, self.source, 0, 0).name

    def as_event(self) -> Event:
        """The IDT-model event of the same class (for `idt.double_fault.combine`)."""
        return Event(self.vector, self.source, self.return_rip, self.insn_rip)


def event_type(ev: Event) -> EventType:
    """The FRED event type of an IDT-model `Event` (SDM Vol. 2 INT n/INTO/INT3/INT1:
    "event type 4 ... 5 ... 6")."""
    if ev.source is Source.EXCEPTION:
        return EventType.HWEXC
    if ev.source is Source.NMI:
        return EventType.NMI
    if ev.source is Source.INTERRUPT:
        return EventType.EXTINT
    if ev.source is Source.PRIV_SOFTWARE:
        return EventType.PRIV_SWEXC
    # INT3 (CC) and INTO (CE) are one byte long; INT n (CD nn) is two, even CD 03.
    one_byte = ev.return_rip - ev.insn_rip == 1
    return EventType.SWEXC if one_byte and ev.vector in (3, 4) else EventType.SWINT


def fred_event(ev: Event, *, event_data: int = 0, nested: bool = False) -> FredEvent:
    """The FRED event record for an IDT-model event (`event_data` from the caller: CR2 for
    #PF is taken from `ev.cr2`)."""
    t = event_type(ev)
    if ev.source is Source.EXCEPTION and ev.vector == Vector.PF and ev.cr2 is not None:
        event_data = ev.cr2
    length = ev.return_rip - ev.insn_rip if t in (EventType.SWINT, EventType.PRIV_SWEXC,
                                                  EventType.SWEXC) else 0
    return FredEvent(type=t, vector=int(ev.vector), return_rip=ev.return_rip,
                     insn_rip=ev.insn_rip,
                     error_code=ev.error_code or 0 if t is EventType.HWEXC else 0,
                     event_data=event_data, insn_len=length, nested=nested,
                     set_rf=ev.is_fault_class and ev.vector != Vector.DB, source=ev.source)


def debug_event_data(dr6: int) -> int:
    """#DB event data: the DR6 conditions with positive polarity (B0-B3, BLD, BD, BS, BT,
    RTM), as KVM derives it (`DR6 ^ DR6_ACTIVE_LOW`)."""
    return (dr6 ^ DR6_ACTIVE_LOW) & DB_EVENT_DATA_BITS


def event_level(ev: FredEvent, msrs: FredMsrs, old_cpl: int) -> int:
    """The stack level of the event itself, before the max with the old CSL (step 2).
    A nested exception or #DF from ring 3 takes its level by the ring-0 rule (FRED
    specification appendix B as KVM paraphrases it; Xen: "follow the Ring0 CSL rules")."""
    ring0_rule = ev.type is EventType.HWEXC and (ev.nested or ev.vector == Vector.DF)
    if old_cpl == 3 and not ring0_rule:
        return 0
    if ev.type is EventType.EXTINT:
        return msrs.interrupt_level
    if ev.type in (EventType.NMI, EventType.HWEXC, EventType.PRIV_SWEXC, EventType.SWEXC):
        return msrs.level_of(ev.vector)
    return 0  # INT n, SYSCALL, SYSENTER


@dataclass(frozen=True)
class FredFrame:
    """The 64-byte FRED frame, slot 0 (lowest address) to slot 7."""

    error_code: int
    rip: int
    cs: int  # augmented: selector | SL << 16 | WFE << 18
    rflags: int
    rsp: int
    ss: int  # augmented: selector | flags 18:16 | vector, type, 64-bit, nested, length
    event_data: int
    reserved: int = 0

    SLOT_NAMES = ("error_code", "rip", "cs", "rflags", "rsp", "ss", "event_data", "reserved")

    def words(self) -> tuple[int, ...]:
        return (self.error_code, self.rip, self.cs, self.rflags, self.rsp, self.ss,
                self.event_data, self.reserved)

    def slots(self) -> list[tuple[str, int]]:
        return list(zip(self.SLOT_NAMES, self.words(), strict=True))


def augmented_ss(selector: int, ev: FredEvent, *, sti: bool, long_mode: bool) -> int:
    """SS slot (step 3)."""
    ss = selector & 0xFFFF
    if sti:
        ss |= SS_STI
    if ev.type is EventType.SWINT or ev.type is EventType.OTHER:
        ss |= SS_SW_EVENT
    if ev.type is EventType.NMI:
        ss |= SS_NMI
    ss |= (ev.vector & 0xFF) << SS_VECTOR_SHIFT | int(ev.type) << SS_TYPE_SHIFT
    if long_mode:
        ss |= SS_64BIT
    if ev.nested and ev.vector != Vector.DF:
        ss |= SS_NESTED
    return ss | (ev.insn_len & 0xF) << SS_LENGTH_SHIFT


@dataclass(frozen=True)
class FredDelivery:
    """A successful FRED delivery: the frame, where it went, and the new state. From
    ring 3 (`from_user`) the caller also loads CS/SS from IA32_STAR[47:32] and swaps GS."""

    event: FredEvent
    frame: FredFrame
    old_csl: int
    new_csl: int
    switched: bool  # the stack came from IA32_FRED_RSP[new_csl]
    new_rip: int
    new_rsp: int
    new_rflags: int
    from_user: bool

    @property
    def stack(self) -> str:
        return f"rsp{self.new_csl}" if self.switched else "current"


def deliver(mem: SystemMemory, st: ArchState, ev: FredEvent, msrs: FredMsrs, *,
            sti: bool = False, long_mode: bool = True, fmask: int | None = None) -> FredDelivery:
    """Deliver `ev` through FRED, writing the frame to guest memory (see the module
    docstring for the steps). Raises `ArchFault` on a frame write or a non-canonical
    entry point; guest memory may then hold part of the frame. `fmask`: IA32_FMASK to
    apply to RFLAGS instead of loading 0x2 (an unverified reading; docs/sdm-map.md)."""
    old_cpl = st.cpl
    old_csl = 0 if old_cpl == 3 else msrs.csl
    new_csl = max(event_level(ev, msrs, old_cpl), old_csl)

    entry = msrs.entry + (KERNEL_ENTRY_OFFSET if old_cpl == 0 else 0)
    if not is_canonical(entry):
        raise ArchFault(Vector.GP, 0, why=f"FRED entry point {entry:#x} non-canonical")

    switched = old_cpl == 3 or new_csl > old_csl
    # A switch loads IA32_FRED_RSP[new level] (WRMSR keeps it 64-byte aligned); otherwise
    # the frame goes below the current RSP, after the red zone, 64-byte aligned.
    same_level_top = ((st.rsp - msrs.red_zone) & ~(FRAME_ALIGN - 1)) & (2**64 - 1)
    top = msrs.rsp[new_csl] if switched else same_level_top

    rflags = st.rflags | (RFLAGS_RF if ev.set_rf else 0)
    frame = FredFrame(
        error_code=ev.error_code & (2**64 - 1), rip=ev.return_rip,
        cs=(st.cs & 0xFFFF) | old_csl << CS_SL_SHIFT, rflags=rflags, rsp=st.rsp,
        ss=augmented_ss(st.ss, ev, sti=sti, long_mode=long_mode), event_data=ev.event_data)
    sp = top
    for value in reversed(frame.words()):  # reserved first, error code last (Bochs)
        sp = (sp - 8) & (2**64 - 1)
        mem.write(sp, struct.pack("<Q", value & (2**64 - 1)), stack=True)

    new_rflags = RFLAGS_AFTER_DELIVERY if fmask is None else (st.rflags & ~fmask & ~RFLAGS_RF) | 2
    return FredDelivery(event=ev, frame=frame, old_csl=old_csl, new_csl=new_csl,
                        switched=switched, new_rip=entry, new_rsp=sp, new_rflags=new_rflags,
                        from_user=old_cpl == 3)


# -- nested exceptions and #DF ----------------------------------------------------------------
@dataclass(frozen=True)
class FredNestedFault:
    during: FredEvent
    fault: ArchFault
    action: str  # "serial" | "double-fault" | "shutdown" (idt.double_fault.Combine values)


@dataclass
class FredOutcome:
    delivery: FredDelivery | None
    nested: list[FredNestedFault]
    double_fault_of: tuple[int, int] | None = None
    shutdown_reason: str | None = None


def deliver_event(mem: SystemMemory, st: ArchState, ev: FredEvent, msrs: FredMsrs, *,
                  sti: bool = False, long_mode: bool = True, fmask: int | None = None,
                  nested_after_any_event: bool = True) -> FredOutcome:
    """Deliver `ev`; a fault during delivery becomes a nested exception (SS bit 58, the
    ring-0 level rule) or #DF by the unchanged class table (idt.double_fault.combine), and
    a fault while delivering #DF shuts down. The original interrupted context is what
    every retry saves. `st.cr2` is updated by a #PF (also one raised during delivery);
    `st.nmi_blocked` is set as an NMI's delivery starts, as in IDT delivery.
    `nested_after_any_event`: an exception raised while delivering any event is nested
    (KVM); False: only one raised while delivering an exception (Bochs)."""
    out = FredOutcome(delivery=None, nested=[])
    if ev.type is EventType.NMI:
        st.nmi_blocked = True
    if ev.type is EventType.HWEXC and ev.vector == Vector.PF:
        st.cr2 = ev.event_data
    current = ev
    while True:
        try:
            out.delivery = deliver(mem, st, current, msrs, sti=sti, long_mode=long_mode,
                                   fmask=fmask)
            return out
        except ArchFault as fault:
            if fault.cr2 is not None:
                st.cr2 = fault.cr2
            action = combine(current.as_event(), fault.vector)
            out.nested.append(FredNestedFault(current, fault, action.value))
            if action is Combine.SHUTDOWN:
                out.shutdown_reason = f"triple fault: {fault} while delivering #DF"
                return out
            if action is Combine.DOUBLE_FAULT:
                out.double_fault_of = (current.vector, fault.vector)
                current = FredEvent(EventType.HWEXC, Vector.DF, current.insn_rip,
                                    current.insn_rip, error_code=0, event_data=0,
                                    nested=False, source=Source.EXCEPTION)
            else:
                data = fault.cr2 if fault.vector == Vector.PF and fault.cr2 is not None else 0
                nested = nested_after_any_event or current.type is EventType.HWEXC
                current = FredEvent(EventType.HWEXC, fault.vector, current.insn_rip,
                                    current.insn_rip, error_code=fault.error_code or 0,
                                    event_data=data, nested=nested,
                                    set_rf=fault.vector != Vector.DB, source=Source.EXCEPTION)


# -- ERETS and ERETU --------------------------------------------------------------------------
@dataclass(frozen=True)
class EretResult:
    """What an ERET loads. `sti_shadow`: establish STI blocking (ERETS only);
    `single_step`: pend a single-step #DB after the ERET; `unblock_nmi`: SS bit 18.
    ERETU: `cs_flags`/`ss_flags` are the hidden parts to load (None: load CS/SS from the
    GDT, which `deliver`'s caller does with the checks already passed here)."""

    rip: int
    rflags: int
    rsp: int
    cs: int
    ss: int
    new_csl: int
    unblock_nmi: bool
    sti_shadow: bool
    single_step: bool
    cs_flags: int | None = None
    ss_flags: int | None = None
    compat: bool = False


def _pop_return_state(mem: SystemMemory, st: ArchState) -> tuple[int, int, int, int, int]:
    """RSP += 8 (the error code), then RIP, CS, RFLAGS, RSP, SS: ordinary stack reads."""
    raw = mem.read((st.rsp + 8) & (2**64 - 1), 40, stack=True)
    rip, cs, rflags, rsp, ss = struct.unpack("<5Q", raw)
    return rip, cs, rflags, rsp, ss


def erets(mem: SystemMemory, st: ArchState, msrs: FredMsrs, *, fred: bool,
          sti_blocking: bool = False) -> EretResult:
    """ERETS (SDM Vol. 2 ERETS "Operation"). Raises `ArchFault`: #UD without CR4.FRED or
    at CPL > 0, #GP(0) for a bad slot; a faulting ERETS changes nothing (NMI blocking
    included: the unblock is part of the commit)."""
    if not fred or st.cpl != 0:
        raise ArchFault(Vector.UD, why="ERETS with CR4.FRED = 0" if not fred else
                        f"ERETS at CPL{st.cpl}")
    rip, cs, rflags, rsp, ss = _pop_return_state(mem, st)
    if not is_canonical(rip):
        raise ArchFault(Vector.GP, 0, why=f"ERETS to non-canonical RIP {rip:#x}")
    if cs & ERETS_CS_MASK != st.cs & 0xFFFF:
        raise ArchFault(Vector.GP, 0, why=f"ERETS CS slot {cs:#x} is not CS {st.cs:#x}")
    if rflags & ERETS_RFLAGS_MASK != 2:
        raise ArchFault(Vector.GP, 0, why=f"ERETS RFLAGS slot {rflags:#x} has reserved bits")
    if ss & ERETS_SS_MASK != st.ss & 0xFFFF:
        raise ArchFault(Vector.GP, 0, why=f"ERETS SS slot {ss:#x} is not SS {st.ss:#x}")
    new_csl = min(msrs.csl, (cs >> CS_SL_SHIFT) & 3)  # ERETS never raises the level
    return EretResult(
        rip=rip, rflags=rflags, rsp=rsp, cs=st.cs, ss=st.ss, new_csl=new_csl,
        unblock_nmi=bool(ss & SS_NMI),
        sti_shadow=bool(ss & SS_STI) and bool(rflags & (1 << 9)) and not sti_blocking,
        single_step=bool(ss & SS_SW_EVENT) and bool(rflags & (1 << 8)))


def eretu(mem: SystemMemory, st: ArchState, msrs: FredMsrs, *, fred: bool, star: int,
          long_mode: bool = True) -> EretResult:
    """ERETU (SDM Vol. 2 ERETU "Operation"). #UD without CR4.FRED, at CPL > 0 or outside
    64-bit mode; #GP(0) at a stack level above 0 (before any read) and for a bad slot;
    IRET-style #GP/#NP/#SS(selector) for a CS/SS that is not IA32_STAR's standard pair."""
    if not fred or st.cpl != 0 or not long_mode:
        raise ArchFault(Vector.UD, why="ERETU with CR4.FRED = 0" if not fred else
                        f"ERETU at CPL{st.cpl}" if st.cpl else "ERETU outside 64-bit mode")
    if msrs.csl != 0:
        raise ArchFault(Vector.GP, 0, why=f"ERETU at stack level {msrs.csl}")
    rip, cs, rflags, rsp, ss = _pop_return_state(mem, st)
    if cs & ERETU_CS_MASK != 3:
        raise ArchFault(Vector.GP, 0, why=f"ERETU CS slot {cs:#x}: not RPL 3 or bits 63:16 set")
    if rflags & ERETU_RFLAGS_MASK != 2:
        why = "IOPL > 0" if rflags & RFLAGS_IOPL else "reserved bits"
        raise ArchFault(Vector.GP, 0, why=f"ERETU RFLAGS slot {rflags:#x}: {why}")
    if ss & ERETU_SS_MASK != 3:
        raise ArchFault(Vector.GP, 0, why=f"ERETU SS slot {ss:#x}: not RPL 3 or bits 31:19 set")
    cs_sel, ss_sel = cs & 0xFFFF, ss & 0xFFFF
    base = (star >> 48) & 0xFFFF
    cs_flags: int | None
    ss_flags: int | None
    if cs_sel == (base + 16) & 0xFFFF and ss_sel == (base + 8) & 0xFFFF:
        cs_flags, ss_flags, compat = CS64_DPL3, SS_DPL3, False  # standard, no GDT read
    elif cs_sel == base and ss_sel == (base + 8) & 0xFFFF:
        cs_flags, ss_flags, compat = CS32_DPL3, SS_DPL3, True
    else:
        cs_flags = ss_flags = None
        compat, limit = _gdt_return_segments(mem, st, cs_sel, ss_sel)
        if compat and rip & 0xFFFF_FFFF > limit:
            raise ArchFault(Vector.GP, 0, why=f"ERETU to RIP {rip:#x} beyond the CS limit")
    if compat:
        rip &= 0xFFFF_FFFF
        rsp &= 0xFFFF_FFFF
    elif not is_canonical(rip):
        raise ArchFault(Vector.GP, 0, why=f"ERETU to non-canonical RIP {rip:#x}")
    return EretResult(
        rip=rip, rflags=rflags, rsp=rsp, cs=cs_sel, ss=ss_sel, new_csl=0,
        unblock_nmi=bool(ss & SS_NMI), sti_shadow=False,  # bit 16 is ignored by ERETU
        single_step=bool(ss & SS_SW_EVENT) and bool(rflags & (1 << 8)),
        cs_flags=cs_flags, ss_flags=ss_flags, compat=compat)


def _gdt_return_segments(mem: SystemMemory, st: ArchState, cs: int, ss: int) -> tuple[bool, int]:
    """ERETU's IRET-style path: CS and SS from the GDT with IRET's checks and fault codes
    (SDM Vol. 2 IRET, PROTECTED-MODE-RETURN, to CPL 3). Returns whether the code segment
    is a compatibility-mode one (L = 0, D = 1), and its limit in bytes."""
    if cs & 0xFFFC == 0:
        raise ArchFault(Vector.GP, 0, why="ERETU to a null CS")
    cs_desc = read_descriptor(mem, st, cs, ext=False)
    if not cs_desc.is_code or (cs_desc.dpl != 3 and not cs_desc.conforming):
        raise ArchFault(Vector.GP, selector_code(cs, ext=False),
                        why=f"ERETU CS {cs:#x} is not a DPL-3 code segment")
    if not cs_desc.present:
        raise ArchFault(Vector.NP, selector_code(cs, ext=False), why=f"ERETU CS {cs:#x} not present")
    if not cs_desc.is_64bit_code and not (cs_desc.db and not cs_desc.l):
        raise ArchFault(Vector.GP, selector_code(cs, ext=False),
                        why=f"ERETU CS {cs:#x} is a 16-bit code segment (not modelled)")
    if ss & 0xFFFC == 0:
        raise ArchFault(Vector.GP, 0, why="ERETU to CPL 3 with a null SS")
    ss_desc = read_descriptor(mem, st, ss, ext=False)
    if not ss_desc.writable or ss_desc.dpl != 3:
        raise ArchFault(Vector.GP, selector_code(ss, ext=False),
                        why=f"ERETU SS {ss:#x} is not a writable DPL-3 data segment")
    if not ss_desc.present:
        raise ArchFault(Vector.SS, selector_code(ss, ext=False), why=f"ERETU SS {ss:#x} not present")
    limit = (cs_desc.limit << 12) | 0xFFF if cs_desc.g else cs_desc.limit
    return not cs_desc.is_64bit_code, limit


# -- LKGS ------------------------------------------------------------------------------------
def lkgs_base(mem: SystemMemory, st: ArchState, selector: int, *, fred_lkgs: bool) -> int:
    """LKGS r/m16 (SDM Vol. 2 LKGS): the value IA32_KERNEL_GS_BASE receives — the 32-bit
    base of the descriptor MOV GS would load, or 0 for a null selector. #UD at CPL > 0 or
    without the LKGS feature; #GP(sel)/#NP(sel) as MOV GS."""
    if not fred_lkgs or st.cpl != 0:
        raise ArchFault(Vector.UD, why="LKGS at CPL > 0" if fred_lkgs else
                        "LKGS: CPUID.(EAX=07H,ECX=1):EAX.LKGS = 0")
    selector &= 0xFFFF
    if selector & 0xFFFC == 0:
        return 0
    desc = read_descriptor(mem, st, selector, ext=False)
    readable_code = desc.is_code and bool(desc.type & 0x2)
    if not (desc.s and (not desc.is_code or readable_code)):
        raise ArchFault(Vector.GP, selector_code(selector, ext=False),
                        why=f"LKGS {selector:#x}: not a data or readable code segment")
    if (not desc.is_code or not desc.conforming) and max(selector & 3, st.cpl) > desc.dpl:
        raise ArchFault(Vector.GP, selector_code(selector, ext=False),
                        why=f"LKGS {selector:#x}: RPL/CPL above DPL {desc.dpl}")
    if not desc.present:
        raise ArchFault(Vector.NP, selector_code(selector, ext=False),
                        why=f"LKGS {selector:#x} not present")
    return desc.base & 0xFFFF_FFFF
