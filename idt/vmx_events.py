"""Events meeting VMX: the exit and entry information fields, the exception bitmap, the
VM-entry injection checks and the host's Table 6-5 reflection. Pure arithmetic, no
engine, no machine.

The fields (SDM Vol. 3C "Information for VM Exits Due to Vectored Events", table "Format
of the VM-Exit Interruption-Information Field"; "Information for VM Exits That Occur
During Event Delivery", table "Format of the IDT-Vectoring Information Field";
"VM-Entry Controls for Event Injection", table "Format of the VM-Entry
Interruption-Information Field") share one layout::

    31      30 .. 13   12            11          10:8   7:0
    valid   reserved   NMI unblock   error code  type   vector
                       due to IRET   valid
                       (exit II only; undefined in IDTV; reserved in EII)

    type: 0 external interrupt, 2 NMI, 3 hardware exception, 4 software interrupt
          (INT n), 5 privileged software exception (INT1), 6 software exception
          (INT3, INTO); 1 and 7 not used here (7 is "other event": MTF / FRED).

So #PF reads 0x80000B0E, #GP 0x80000B0D, #DF 0x80000B08, NMI 0x80000202, INT3 0x80000603,
`INT 0x21` 0x80000421, an external interrupt 0x30 0x80000030.

Which exceptions exit (SDM Vol. 3C "Exception Bitmap", "Other Causes of VM Exits"): the
exception bitmap has one bit per vector 0-31; #PF consults the error code as well: the
bit is obeyed when ``(PFEC & PFEC_MASK) == PFEC_MATCH`` and inverted otherwise (KVM
`nested_vmx_is_page_fault_vmexit`, Bochs `VMexit_Event` compute the same XOR). `INT n`
(type 4) is never subject to the bitmap, whatever n is; INT3/INTO (type 6) and INT1
(type 5, Bochs `VMexit_Event`) are. An event *injected* by VM entry is never checked
(SDM Vol. 3C "VM Exits During Event Injection").

The checks of a VM entry that injects (SDM Vol. 3C "VM-Entry Control Fields", "Checks on
Guest Non-Register State", "VM-Entry Failures During or After Loading Guest State") come
in two strengths: a broken control field fails the VMLAUNCH/VMRESUME itself
(VMfailValid, VM-instruction error 7: the guest never runs), a guest state that does
not admit the event fails the entry after loading it (exit reason 0x80000021, "VM-entry
failure due to invalid guest state"). `check_entry` returns which.

What a host does with an exception it intercepted while the guest was vectoring
another event (SDM Vol. 3C "Reflecting Exceptions to Guest Software", 2016 edition
31.7.1.1) is Table 6-5 again, one level up: `reflect`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from idt.state import Event, Source
from idt.vectors import DFClass, Vector, df_class, vector_name

VALID = 1 << 31
NMI_UNBLOCKING = 1 << 12  # exit II bit 12; undefined in IDTV; reserved in EII
ERROR_CODE_VALID = 1 << 11
RESERVED_ENTRY_BITS = 0x7FFFF000  # bits 30:12 of the entry field (no FRED)


class EventType(IntEnum):
    """Bits 10:8 of the interruption-information fields."""

    EXTERNAL_INTERRUPT = 0
    NMI = 2
    HARDWARE_EXCEPTION = 3
    SOFTWARE_INTERRUPT = 4
    PRIVILEGED_SOFTWARE_EXCEPTION = 5
    SOFTWARE_EXCEPTION = 6
    OTHER = 7


TYPE_NAMES = {0: "external interrupt", 1: "reserved type 1", 2: "NMI",
              3: "hardware exception", 4: "software interrupt",
              5: "privileged software exception", 6: "software exception",
              7: "other event"}


class ExitReason(IntEnum):
    """Basic exit reasons (SDM Vol. 3C Appendix C "VMX Basic Exit Reasons")."""

    EXCEPTION_OR_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    VMCALL = 18
    INVALID_GUEST_STATE = 33
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49


EXIT_NAMES = {0: "exception or NMI", 1: "external interrupt", 2: "triple fault",
              7: "interrupt window", 8: "NMI window", 18: "VMCALL",
              33: "VM-entry failure: invalid guest state", 48: "EPT violation",
              49: "EPT misconfiguration"}
ENTRY_FAILURE = 1 << 31  # bit 31 of the exit reason: "VM-entry failure"
INVALID_GUEST_STATE_EXIT = ENTRY_FAILURE | ExitReason.INVALID_GUEST_STATE  # 0x80000021

# Guest interruptibility state (SDM Vol. 3C "Guest Non-Register State", table "Format of
# Interruptibility State").
IS_STI = 1 << 0
IS_MOV_SS = 1 << 1
IS_SMI = 1 << 2
IS_NMI = 1 << 3

# VM-instruction error numbers (SDM Vol. 3C "VM Instruction Error Numbers").
VMERR_ENTRY_INVALID_CONTROL = 7
VMERR_ENTRY_MOV_SS = 26

# Vectors whose hardware exceptions deliver an error code (the VM-entry check's list;
# #CP 21 is added on CET parts, not modelled).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17})
MAX_INSTRUCTION_LENGTH = 15


@dataclass(frozen=True)
class EventInfo:
    """One interruption-information word, decoded.

        >>> EventInfo(14, EventType.HARDWARE_EXCEPTION, error_code_valid=True).raw
        2147486478
        >>> hex(EventInfo.decode(0x80001B0E).raw), EventInfo.decode(0x80001B0E).nmi_unblocking
        ('0x80001b0e', True)
    """

    vector: int
    type: int
    error_code_valid: bool = False
    nmi_unblocking: bool = False
    valid: bool = True
    reserved: int = 0  # bits 30:13, kept so a bad entry field round-trips

    @property
    def raw(self) -> int:
        return ((VALID if self.valid else 0) | self.reserved
                | (NMI_UNBLOCKING if self.nmi_unblocking else 0)
                | (ERROR_CODE_VALID if self.error_code_valid else 0)
                | (self.type & 7) << 8 | (self.vector & 0xFF))

    @staticmethod
    def decode(raw: int) -> EventInfo:
        return EventInfo(vector=raw & 0xFF, type=(raw >> 8) & 7,
                         error_code_valid=bool(raw & ERROR_CODE_VALID),
                         nmi_unblocking=bool(raw & NMI_UNBLOCKING), valid=bool(raw & VALID),
                         reserved=raw & 0x7FFFE000)

    def text(self) -> str:
        """Readable: "#PF(14) hardware exception, error code", "invalid"."""
        if not self.valid:
            return "invalid"
        name = vector_name(self.vector) if self.type in (2, 3, 5, 6) else f"vector {self.vector:#x}"
        extra = (", error code" if self.error_code_valid else "") + (
            ", NMI unblocked by IRET" if self.nmi_unblocking else "")
        return f"{name} {TYPE_NAMES[self.type]}{extra}"


INVALID = EventInfo(0, 0, valid=False)


def event_type(ev: Event) -> EventType:
    """The interruption type of an event the delivery model knows. INT3 (CC) and INTO
    are software *exceptions* (type 6); INT n, including CD 03, is a software interrupt
    (type 4); INT1 (F1) is a privileged software exception (type 5)."""
    if ev.source is Source.NMI:
        return EventType.NMI
    if ev.source is Source.INTERRUPT:
        return EventType.EXTERNAL_INTERRUPT
    if ev.source is Source.PRIV_SOFTWARE:
        return EventType.PRIVILEGED_SOFTWARE_EXCEPTION
    if ev.source is Source.SOFTWARE:
        one_byte = ev.return_rip - ev.insn_rip == 1
        if ev.vector in (Vector.BP, Vector.OF) and one_byte:
            return EventType.SOFTWARE_EXCEPTION
        return EventType.SOFTWARE_INTERRUPT
    return EventType.HARDWARE_EXCEPTION


def info_of(ev: Event) -> EventInfo:
    """The II/IDTV word that describes `ev` (error code valid iff it pushes one)."""
    return EventInfo(ev.vector, event_type(ev), error_code_valid=ev.error_code is not None)


def is_software(t: int) -> bool:
    """Types whose pushed RIP is the entry RIP + the instruction length (4, 5, 6)."""
    return t in (EventType.SOFTWARE_INTERRUPT, EventType.PRIVILEGED_SOFTWARE_EXCEPTION,
                 EventType.SOFTWARE_EXCEPTION)


# -- the exception bitmap ---------------------------------------------------------------
@dataclass(frozen=True)
class ExceptionBitmap:
    """The exception bitmap and the #PF error-code mask/match (VMCS 0x4004/0x4006/0x4008).

        >>> eb = ExceptionBitmap(1 << 14, pfec_mask=0x4, pfec_match=0)
        >>> eb.exits(14, 0x2), eb.exits(14, 0x4)
        (True, False)
    """

    bitmap: int = 0
    pfec_mask: int = 0
    pfec_match: int = 0

    def exits(self, vector: int, error_code: int | None = None) -> bool:
        """Whether an exception with `vector` (and, for #PF, `error_code`) exits."""
        if not 0 <= vector <= 31:
            return False
        bit = bool(self.bitmap >> vector & 1)
        if vector == Vector.PF:
            # Intel reports only bits 15:0 of a #PF error code; KVM compares them as u16.
            pfec = (error_code or 0) & 0xFFFF
            return bit ^ ((pfec & self.pfec_mask) != self.pfec_match)
        return bit

    def event_exits(self, ev: Event) -> bool:
        """Whether `ev`, raised in the guest (not injected), exits: exceptions of types
        3, 5 and 6; never INT n, NMIs or external interrupts."""
        t = event_type(ev)
        if t not in (EventType.HARDWARE_EXCEPTION, EventType.PRIVILEGED_SOFTWARE_EXCEPTION,
                     EventType.SOFTWARE_EXCEPTION):
            return False
        return self.exits(ev.vector, ev.error_code)


def bitmap_of(vectors: list[int] | tuple[int, ...] | frozenset[int]) -> int:
    out = 0
    for v in vectors:
        if not 0 <= v <= 31:
            raise ValueError(f"exception-bitmap vector {v} outside 0..31")
        out |= 1 << v
    return out


# -- VM-entry injection checks ------------------------------------------------------------
@dataclass(frozen=True)
class EntryCheck:
    """The verdict on a VM entry: `ok`, or VMfailValid with `vm_instruction_error`, or a
    VM-entry failure (`exit_reason` 0x80000021); `why` names the rule."""

    ok: bool
    vm_instruction_error: int | None = None
    exit_reason: int | None = None
    why: str = ""


ENTRY_OK = EntryCheck(True)


@dataclass(frozen=True)
class GuestEntryState:
    """What the guest-state checks of an injecting entry look at."""

    rflags_if: bool
    interruptibility: int
    virtual_nmis: bool = False
    activity: str = "active"  # "active", "hlt", "shutdown", "wait-for-sipi"
    protected_mode: bool = True
    unrestricted_guest: bool = False
    in_mov_ss_shadow: bool = False  # the VMLAUNCH/VMRESUME itself (host side)


def _control_failure(why: str) -> EntryCheck:
    return EntryCheck(False, vm_instruction_error=VMERR_ENTRY_INVALID_CONTROL, why=why)


def _state_failure(why: str) -> EntryCheck:
    return EntryCheck(False, exit_reason=INVALID_GUEST_STATE_EXIT, why=why)


ACTIVITY_ADMITS: dict[str, set[tuple[int, int | None]]] = {
    # SDM Vol. 3C "Checks on Guest Non-Register State": the events an injecting entry
    # may deliver in each activity state (vectors; None = any vector of that type).
    "hlt": {(EventType.EXTERNAL_INTERRUPT, None), (EventType.NMI, None),
            (EventType.HARDWARE_EXCEPTION, 1), (EventType.HARDWARE_EXCEPTION, 18),
            (EventType.PRIVILEGED_SOFTWARE_EXCEPTION, 1), (EventType.OTHER, 0)},
    "shutdown": {(EventType.NMI, None), (EventType.HARDWARE_EXCEPTION, 18)},
    "wait-for-sipi": set(),
}


def check_entry(eii: int, error_code: int, length: int, guest: GuestEntryState) -> EntryCheck:
    """The VM-entry checks that concern event injection, in the order the SDM lists
    them: the control-field checks (VMfailValid, error 7), then the guest-state ones
    (exit reason 0x80000021). A VMLAUNCH/VMRESUME in a MOV-SS shadow fails first of all
    (error 26). `eii` without bit 31 injects nothing and passes."""
    if guest.in_mov_ss_shadow:
        return EntryCheck(False, vm_instruction_error=VMERR_ENTRY_MOV_SS,
                          why="VM entry with events blocked by MOV SS")
    if not eii & VALID:
        return ENTRY_OK
    info = EventInfo.decode(eii)
    t, v = info.type, info.vector
    if t == 1:
        return _control_failure("interruption type 1 is reserved")
    if t == EventType.OTHER and v != 0:
        return _control_failure(f"type 7 (other event) with vector {v} (only 0, MTF, without FRED)")
    if t == EventType.NMI and v != Vector.NMI:
        return _control_failure(f"NMI type with vector {v} (must be 2)")
    if t == EventType.HARDWARE_EXCEPTION and v > 31:
        return _control_failure(f"hardware exception with vector {v} > 31")
    wants_code = ((not guest.unrestricted_guest or guest.protected_mode)
                  and t == EventType.HARDWARE_EXCEPTION and v in ERROR_CODE_VECTORS)
    if info.error_code_valid != wants_code:
        return _control_failure(
            f"deliver-error-code bit is {int(info.error_code_valid)} for {vector_name(v)} "
            f"{TYPE_NAMES[t]} (must be {int(wants_code)})")
    if eii & RESERVED_ENTRY_BITS:
        return _control_failure(f"reserved bits 30:12 set ({eii & RESERVED_ENTRY_BITS:#x}); "
                                "bit 12 of an exit field must not be copied")
    if info.error_code_valid and error_code >> 16:
        # The 2016 text says bits 31:15; KVM, Bochs and kvm-unit-tests check 31:16
        # (docs/sdm-map.md, "VM-entry error-code check").
        return _control_failure(f"error code {error_code:#x} has bits 31:16 set")
    if is_software(t) and not 1 <= length <= MAX_INSTRUCTION_LENGTH:
        return _control_failure(f"instruction length {length} for a {TYPE_NAMES[t]} "
                                "(must be 1..15; 0 needs IA32_VMX_MISC[30])")
    is_ = guest.interruptibility
    if t == EventType.EXTERNAL_INTERRUPT:
        if not guest.rflags_if:
            return _state_failure("external interrupt injected with RFLAGS.IF = 0")
        if is_ & (IS_STI | IS_MOV_SS):
            return _state_failure("external interrupt injected with STI or MOV-SS blocking")
    if t == EventType.NMI:
        if is_ & IS_MOV_SS:
            return _state_failure("NMI injected with MOV-SS blocking")
        if is_ & IS_STI:
            # Implementation-specific; Bochs and KVM reject it (docs/sdm-map.md).
            return _state_failure("NMI injected with STI blocking")
        if guest.virtual_nmis and is_ & IS_NMI:
            return _state_failure("NMI injected with virtual NMIs while virtual-NMI "
                                  "blocking (interruptibility bit 3) is set")
    if guest.activity != "active":
        admits = ACTIVITY_ADMITS.get(guest.activity, set())
        if (t, v) not in admits and (t, None) not in admits:
            return _state_failure(f"{vector_name(v)} {TYPE_NAMES[t]} cannot be injected "
                                  f"in activity state {guest.activity}")
    return ENTRY_OK


# -- reflecting an intercepted exception ---------------------------------------------------
@dataclass(frozen=True)
class Reflection:
    """What a host injects when it reflects exception `ii` that interrupted the delivery
    of `idtv`: `inject` (the EII, error code and whether CR2 must be written) or a
    triple fault (`shutdown`)."""

    inject: EventInfo | None
    error_code: int = 0
    double_fault: bool = False
    shutdown: bool = False


def _benign(t: int, vector: int) -> bool:
    return t != EventType.HARDWARE_EXCEPTION or df_class(vector) is DFClass.BENIGN


def reflect(idtv: EventInfo, ii: EventInfo, iiec: int) -> Reflection:
    """SDM Vol. 3C "Reflecting Exceptions to Guest Software" (2016 31.7.1.1): emulate
    Table 6-5 with E1 = the IDT-vectoring event and E2 = the intercepted exception.
    Bit 12 of II is never copied (reserved in the entry field)."""
    e2 = EventInfo(ii.vector, ii.type, ii.error_code_valid)
    if not idtv.valid:
        return Reflection(e2, iiec)
    if idtv.type == EventType.HARDWARE_EXCEPTION and idtv.vector == Vector.DF:
        return Reflection(None, shutdown=True)
    if _benign(idtv.type, idtv.vector) or _benign(ii.type, ii.vector):
        return Reflection(e2, iiec)
    a, b = df_class(idtv.vector), df_class(ii.vector)
    if a is DFClass.CONTRIBUTORY and b is DFClass.PAGE_FAULT:
        return Reflection(e2, iiec)
    return Reflection(EventInfo(Vector.DF, EventType.HARDWARE_EXCEPTION, True), 0,
                      double_fault=True)


def merge_then_check(idtv: EventInfo, ii: EventInfo, iiec: int) -> Reflection:
    """The same merge, as KVM before Linux 6.1 performed it in `kvm_multiple_exception`
    (arch/x86/kvm/x86.c) when it re-queued the vectoring event as *injected* and then
    queued the intercepted one: #DF when the pair calls for it, otherwise the new one
    replaces the old ("in a hope that instruction re-execution will regenerate lost
    exception"). Only the order differs from a correct host: the caller asks the inner
    hypervisor's bitmap *after* this (the seed's bug)."""
    return reflect(idtv, ii, iiec)


# -- the exit as the host reads it ------------------------------------------------------
@dataclass(frozen=True)
class ExitInfo:
    """The VMCS exit-information fields of one VM exit, raw (SDM Vol. 3C "Basic VM-Exit
    Information", "Information for VM Exits Due to Vectored Events", "Information for VM
    Exits That Occur During Event Delivery"), plus the guest RIP and interruptibility
    state saved with it ("Saving RIP, RSP, and RFLAGS", "Saving Non-Register State")."""

    reason: int  # the exit-reason field: basic reason in 15:0, bit 31 entry failure
    qualification: int = 0
    interruption_info: int = 0
    interruption_error_code: int = 0
    idt_vectoring_info: int = 0
    idt_vectoring_error_code: int = 0
    interruptibility: int = 0
    instruction_length: int = 0
    rip: int = 0
    gpa: int | None = None
    gla: int | None = None
    why: str = ""

    @property
    def basic_reason(self) -> int:
        return self.reason & 0xFFFF

    @property
    def ii(self) -> EventInfo:
        return EventInfo.decode(self.interruption_info)

    @property
    def idtv(self) -> EventInfo:
        return EventInfo.decode(self.idt_vectoring_info)

    @property
    def name(self) -> str:
        return EXIT_NAMES.get(self.basic_reason, f"reason {self.basic_reason}")

    def fields(self) -> dict[str, int | None]:
        """The raw fields, named as in the trace's `vmexit` record."""
        return {"exit_reason": self.reason, "qualification": self.qualification,
                "interruption_info": self.interruption_info,
                "interruption_error_code": self.interruption_error_code,
                "idt_vectoring_info": self.idt_vectoring_info,
                "idt_vectoring_error_code": self.idt_vectoring_error_code,
                "interruptibility": self.interruptibility,
                "instruction_length": self.instruction_length}

    def decoded(self) -> dict[str, str]:
        """The same fields in words (trace `vmexit` record, `decoded`)."""
        is_ = self.interruptibility
        blocking = [n for b, n in ((IS_STI, "STI"), (IS_MOV_SS, "MOV SS"), (IS_SMI, "SMI"),
                                   (IS_NMI, "NMI")) if is_ & b]
        return {"exit": self.name, "interruption": self.ii.text(),
                "idt_vectoring": self.idtv.text(),
                "blocking": ", ".join(blocking) or "none"}
