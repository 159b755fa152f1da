"""Which asynchronous event may be delivered at an instruction boundary: NMI blocking,
the one-deep NMI latch, IF, the STI and MOV SS shadows, and the priority between NMI and
maskable interrupts.

The hazard this module exists for
---------------------------------
An NMI handler runs on an IST stack, so every NMI frame is written at the *same* top of
that stack. The CPU protects the frame by blocking further NMIs from the delivery of
one NMI until the next IRET (SDM Vol. 3A "Handling Multiple NMIs"). But the rule is
"the next IRET", not "the NMI handler's IRET":

    NMI stack (IST)                       time ->
    +-----------+  <- IST top
    | SS        |   NMI #1 pushes its frame here
    | RSP       |   handler: INT3 (or a #PF, a #DB)   -> #BP handler ... IRETQ
    | RFLAGS    |                                        ^ unblocks NMIs
    | CS        |   NMI #2 (latched while blocked) is delivered right after that IRET,
    | RIP       |   on the same IST, and overwrites NMI #1's frame: SS/RSP/RFLAGS/CS/RIP
    +-----------+   now describe the middle of the NMI handler, not the interrupted code.

The rules, each one a field or a branch below:

* Delivering an NMI sets NMI blocking (`idt.double_fault.deliver_event` sets it when the
  delivery *starts*, SDM "NMI Handling"). `INT 2` is not an NMI and sets nothing.
* While NMIs are blocked, one more NMI is remembered and the rest are lost: the latch is
  a single bit ("the latch is binary", Linux arch/x86/kernel/nmi.c). `nmi_arrives`
  returns which of the three things happened so the trace can say it.
* Any IRET clears blocking, first thing, even if it then faults (`idt.iret`). A latched
  NMI is therefore delivered at the boundary right after the IRET, with the IRET's
  target as its saved RIP.
* NMIs ignore IF. Maskable interrupts need IF = 1 (and an APIC priority above PPR, which
  the APIC model decides before it offers a vector).
* Shadows (SDM-3C "Interruptibility State", bits 0 and 1): STI that *sets* IF (IF was 0)
  inhibits maskable interrupts at the next boundary; MOV SS / POP SS inhibits maskable
  interrupts, #DB and NMI at the next boundary. Whether the STI shadow also holds NMIs is
  model-specific (the SDM's STI entry says NMIs "may be inhibited"); `sti_blocks_nmi`
  chooses, default True as in Bochs and KVM's `vmx_nmi_blocked`. A shadow lasts one
  boundary and ends early when any event is delivered.
* Chains of shadow-opening instructions (`shadow_after`): the SDM guarantees only the
  first one's shadow ("only the first instruction in the sequence is guaranteed to delay
  the interrupt, but subsequent interrupt-delaying instructions may not", Vol. 2 STI;
  "only the first is guaranteed to inhibit or suppress events", Vol. 3A "Masking
  Exceptions and Interrupts When Switching Stacks" for consecutive SS loads), so both
  outcomes are architectural for the second one. idtlab applies each instruction's own
  rule (STI with IF = 0 before it opens an STI shadow, even right after a MOV SS; MOV SS
  opens a MOV-SS shadow, even right after an STI), except that a MOV SS right after a
  MOV SS opens none: what Bochs does (`BX_CPU_C::inhibit_interrupts`, which re-arms
  unless a MOV-SS inhibit is already in force) and KVM's instruction emulator
  (`toggle_interruptibility`: only a shadow of the same kind cancels the new one).
  QEMU 7.2 TCG keeps only the first shadow of any chain. docs/sdm-map.md, "Chained
  shadows", has the argument.
* Priority (SDM Vol. 3A Table 6-2 "Priority Among Simultaneous Exceptions and
  Interrupts"): NMI (class 5) before maskable interrupts (class 6). A held maskable
  interrupt stays pending; the arbiter never drops it.

What is not here: the IRR/ISR/TPR arithmetic (cpu/devices/apic.py) and how an event is
delivered once chosen (idt/deliver.py). This module only answers "which one, or why
not".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntFlag


class Shadow(IntFlag):
    """The interruptibility-state bits this model uses (SDM-3C encoding)."""

    NONE = 0
    STI = 1 << 0
    MOV_SS = 1 << 1


def shadow_after(current: Shadow, opening: Shadow, *, if_before: bool) -> Shadow:
    """The shadow at the boundary after a shadow-opening instruction (`opening`: STI or
    MOV_SS) that ran at a boundary where `current` was in force, with IF = `if_before`
    when it started. The old shadow covered only the boundary before the instruction.

    STI opens an STI shadow only when it sets IF (Vol. 2 STI), whatever came before;
    MOV SS opens a MOV-SS shadow, except right after another MOV SS (not re-armed: the
    SDM guarantees only the first of consecutive SS loads; Bochs, KVM)."""
    if opening is Shadow.STI:
        return Shadow.NONE if if_before else Shadow.STI
    if opening is Shadow.MOV_SS:
        return Shadow.NONE if current & Shadow.MOV_SS else Shadow.MOV_SS
    raise ValueError(f"not a shadow-opening instruction: {opening!r}")


class NmiArrival(Enum):
    PENDING = "nmi_pending"  # nothing was pending: it will be delivered when allowed
    LATCHED = "nmi_latched"  # NMIs are blocked: remembered in the one-deep latch
    DROPPED = "nmi_dropped"  # one is already pending/latched: this one is lost


class Held(Enum):
    """Why a pending event is not delivered at this boundary."""

    NMI_BLOCKED = "nmi_blocked"  # until the next IRET
    MOV_SS_SHADOW = "mov_ss_shadow"  # for one instruction
    STI_SHADOW = "sti_shadow"  # for one instruction
    IF_CLEAR = "if_clear"  # until IF is set (STI, POPF, IRET)

    @property
    def lasts_one_instruction(self) -> bool:
        return self in (Held.MOV_SS_SHADOW, Held.STI_SHADOW)


@dataclass
class Interruptibility:
    """The emulator's own interruptibility/NMI state word."""

    nmi_blocked: bool = False
    nmi_pending: bool = False  # the latch: set by an arriving NMI, cleared by delivery
    shadow: Shadow = Shadow.NONE
    sti_blocks_nmi: bool = True

    def nmi_arrives(self) -> NmiArrival:
        if self.nmi_pending:
            return NmiArrival.DROPPED
        self.nmi_pending = True
        return NmiArrival.LATCHED if self.nmi_blocked else NmiArrival.PENDING


@dataclass(frozen=True)
class Choice:
    """The arbiter's answer: what to deliver now ("nmi", "intr" or None), and what is
    held back and why. A shadow ends after one instruction, whatever it is: the machine
    runs that one instruction alone (`needs_stepping`). IF = 0 ends only at an
    instruction that sets IF (STI, POPF, IRET, SYSRET), which the machine stops at
    (`waits_for_if`); it does not step the code in between."""

    deliver: str | None
    held: tuple[tuple[str, Held], ...] = ()

    @property
    def needs_stepping(self) -> bool:
        return any(h.lasts_one_instruction for _, h in self.held)

    @property
    def waits_for_if(self) -> bool:
        return any(h is Held.IF_CLEAR for _, h in self.held)


def arbitrate(st: Interruptibility, *, if_flag: bool, intr_pending: bool) -> Choice:
    """The event to deliver at this boundary, in SDM Table 6-2 order (NMI, then INTR).

    `intr_pending` means the APIC offers a vector (its priority is above PPR)."""
    held: list[tuple[str, Held]] = []
    shadow = st.shadow
    shadowed = shadow is not Shadow.NONE  # (the usual case, without Flag arithmetic)
    if st.nmi_pending:
        if st.nmi_blocked:
            held.append(("nmi", Held.NMI_BLOCKED))
        elif shadowed and shadow & Shadow.MOV_SS:
            held.append(("nmi", Held.MOV_SS_SHADOW))
        elif shadowed and shadow & Shadow.STI and st.sti_blocks_nmi:
            held.append(("nmi", Held.STI_SHADOW))
        else:
            return Choice("nmi")
    if intr_pending:
        if not if_flag:
            held.append(("intr", Held.IF_CLEAR))
        elif shadowed and shadow & Shadow.MOV_SS:
            held.append(("intr", Held.MOV_SS_SHADOW))
        elif shadowed and shadow & Shadow.STI:
            held.append(("intr", Held.STI_SHADOW))
        else:
            return Choice("intr", tuple(held))
    return Choice(None, tuple(held))
