"""VM exits on events, and the VM entries that answer them.

With `[hypervisor]` the guest runs in VMX non-root operation under a host
(cpu/vmx_host.py). Events that the VM-execution controls claim leave the guest instead
of being delivered through its IDT (SDM Vol. 3C "Other Causes of VM Exits"):

* an exception whose bit is set in the exception bitmap (#PF filtered by the error-code
  mask/match) — raised by an instruction (a *direct* exit: #PF does not load CR2, the
  address is the exit qualification), or raised while delivering another event (the
  bitmap is asked with the second exception's vector *before* Table 6-5 could turn the
  pair into #DF; the first event is saved in the IDT-vectoring information);
* a #DF the bitmap claims (bit 8) — no IDT-vectoring information, it was not
  "during delivery" — and a triple fault (always an exit, reason 2);
* an NMI with "NMI exiting", an external interrupt with "external-interrupt exiting"
  (whatever RFLAGS.IF says; with "acknowledge interrupt on exit" the vector is
  acknowledged and reported, otherwise it stays pending in the APIC);
* the interrupt window (RFLAGS.IF = 1, no STI/MOV-SS blocking) and the NMI window (no
  NMI blocking, no MOV-SS blocking; STI blocking holds it too, as KVM and Bochs treat it)
  when their controls are set, ahead of NMIs and interrupts respectively;
* an EPT violation the #VE rules did not convert (cpu/vmx.py decides; this module
  reports it with the same fields).

Each exit becomes one `vmexit` record with the raw fields (`idt.vmx_events.ExitInfo`)
and their decodings, then the host answers. Its answer is a VM entry: with an injected
event it first passes the VM-entry checks (`idt.vmx_events.check_entry`: a control
field the SDM forbids is VMfailValid error 7, the guest never resumes; a guest state
that does not admit the event is a VM-entry failure, exit reason 0x80000021, which the
host sees as another exit), then the event is delivered through the guest IDT as if
generated normally, except that it is never checked against the bitmap itself. An
exception during that delivery goes through the same bitmap question with the injected
event as the IDT-vectoring information (SDM Vol. 3C "VM Exits During Event Injection").

Guest state at an exit (SDM Vol. 3C "Architectural State Before a VM Exit", "Saving
Non-Register State"):

    direct exit (the event itself)         exit during delivery of E1 (indirect)
    RIP = the event's return pointer;      RIP, RSP, RFLAGS as before E1 (its
          INT3/INTO/INT1: the instruction        instruction for INT n / INT3: the
    CR2 untouched (#PF)                    CR2 loaded if E1 is a #PF
    interruptibility: STI/MOV SS as now,   interruptibility: STI/MOV SS 0, bit 3 set
      bit 3 as now                           if E1 is an NMI (blocking starts as its
                                             delivery does)

"NMI unblocking due to IRET": an IRET unblocks NMIs (or virtual NMIs) even when it
faults, so an exit from that IRET saves bit 3 = 0; bit 12 of the exit interruption
information (or of an EPT violation's qualification) says blocking was in force before
it. Only the host restores it (`SdmHost.resume_after_fix`); the machine does not.

With virtual NMIs the machine's one NMI-blocking flag stands for *virtual*-NMI
blocking: NMI exiting is required, so real NMIs exit whatever it says, and IRET,
injected NMIs and interruptibility bit 3 act on it exactly as on virtual-NMI blocking.

A host that re-enters without the guest retiring an instruction 64 times in a row
(re-injecting an event whose delivery keeps exiting, say) ends the run with outcome
"vmexit": KVM would exit to user space there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cpu.outcomes import Outcome, Stop
from cpu.vmx_host import Halt, Host, Inject, Resume, Vcpu
from idt.blocking import Shadow
from idt.double_fault import DeliveryOutcome
from idt.state import RFLAGS_IF, Event, Source
from idt.vectors import Vector
from idt.vmx_events import (
    IS_MOV_SS,
    IS_NMI,
    IS_STI,
    NMI_UNBLOCKING,
    EventInfo,
    EventType,
    ExceptionBitmap,
    ExitInfo,
    ExitReason,
    GuestEntryState,
    check_entry,
    event_type,
    info_of,
    is_software,
)

if TYPE_CHECKING:
    from cpu.machine import Machine

MAX_REENTRIES = 64
PENDING_BS = 1 << 14  # pending debug exceptions / #DB exit qualification: single step
PENDING_ENABLED_BP = 1 << 12


@dataclass(frozen=True)
class VmxControls:
    """The VM-execution controls for events (SDM Vol. 3C "Pin-Based VM-Execution
    Controls", "Processor-Based VM-Execution Controls", "Exception Bitmap"; VM-exit
    control "acknowledge interrupt on exit")."""

    exception_bitmap: int = 0
    pfec_mask: int = 0
    pfec_match: int = 0
    nmi_exiting: bool = False
    virtual_nmis: bool = False
    external_interrupt_exiting: bool = False
    ack_interrupt_on_exit: bool = True
    interrupt_window_exiting: bool = False
    nmi_window_exiting: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.exception_bitmap <= 0xFFFFFFFF:
            raise ValueError(f"exception bitmap {self.exception_bitmap:#x} is 32 bits")
        for name in ("pfec_mask", "pfec_match"):
            if not 0 <= getattr(self, name) <= 0xFFFFFFFF:
                raise ValueError(f"{name} {getattr(self, name):#x} is 32 bits")
        # SDM Vol. 3C "VM-Execution Control Fields" (checks): virtual NMIs need NMI
        # exiting; NMI-window exiting needs virtual NMIs.
        if self.virtual_nmis and not self.nmi_exiting:
            raise ValueError("virtual_nmis needs nmi_exiting (VM entry fails otherwise)")
        if self.nmi_window_exiting and not self.virtual_nmis:
            raise ValueError("nmi_window_exiting needs virtual_nmis (VM entry fails otherwise)")

    @property
    def bitmap(self) -> ExceptionBitmap:
        return ExceptionBitmap(self.exception_bitmap, self.pfec_mask, self.pfec_match)


@dataclass
class HyperState:
    """The hypervisor model's mutable state."""

    controls: VmxControls | None = None  # None: the guest does not run under a host model
    host: Host | None = None
    host_pages: frozenset[int] = frozenset()  # guest pages whose PTE the host owns
    # The event the current VM entry injected, while it is being delivered:
    # (interruption information, error code, instruction length).
    injected: tuple[int, int, int] | None = None
    injected_event: Event | None = None
    iret_unblocked: bool = False  # the exception being delivered was raised by such an IRET
    owed: list[tuple[int, int, int]] = field(default_factory=list)  # host's queue
    launch: Inject | Resume | None = None  # the first entry (VMLAUNCH)
    reentries: int = 0  # consecutive exits without a retired guest instruction
    last_icount: int = -1


class VmExits:
    """Exits on events and the entries that answer them (see the module docstring)."""

    def __init__(self, m: Machine, state: HyperState) -> None:
        self.m = m
        self.state = state
        self.vcpu = Vcpu(m)

    @property
    def enabled(self) -> bool:
        return self.state.controls is not None

    def enable(self, controls: VmxControls, host: Host, *, host_pages: frozenset[int] = frozenset()
               ) -> None:
        m = self.m
        if m.ept is None:
            m.enable_ept()
        self.state.controls = controls
        self.state.host = host
        self.state.host_pages = frozenset(p & ~0xFFF for p in host_pages)

    def set_controls(self, **changes: bool) -> None:
        c = self.state.controls
        assert c is not None
        self.state.controls = replace(c, **changes)

    # -- the exception bitmap -----------------------------------------------------------
    def intercept(self, vector: int, error_code: int | None) -> bool:
        """The bitmap, for exceptions raised during delivery (`idt.double_fault`)."""
        c = self.state.controls
        return c is not None and c.bitmap.exits(vector, error_code)

    def intercept_fn(self) -> Any:
        return self.intercept if self.enabled else None

    def note_iret_fault(self, unblocked: bool) -> None:
        """An IRET that had unblocked NMIs faulted: the exception it raises reports it."""
        if self.state.controls is not None:
            self.state.iret_unblocked = unblocked

    def direct(self, ev: Event) -> bool:
        """At the start of a delivery: does `ev` itself exit (the exception bitmap)? Then
        make the exit and return True. Injected events are never checked."""
        st = self.state
        c = st.controls
        if c is None:
            return False  # no hypervisor model: the common path costs one test
        unblocked, st.iret_unblocked = st.iret_unblocked, False
        if st.injected is not None or not c.bitmap.event_exits(ev):
            return False
        m = self.m
        t = event_type(ev)
        info = EventInfo(ev.vector, t, ev.error_code is not None,
                         nmi_unblocking=unblocked and self._bit12_defined())
        length = ev.return_rip - ev.insn_rip if is_software(t) else 0
        if is_software(t):
            m.engine.uncount()  # INT3 / INTO / INT1 did not retire: RIP is the instruction
        qual = ev.cr2 or 0 if ev.vector == Vector.PF else 0
        self.exit(ExitInfo(int(ExitReason.EXCEPTION_OR_NMI), qualification=qual,
                           interruption_info=info.raw,
                           interruption_error_code=ev.error_code or 0,
                           interruptibility=self.current_interruptibility(indirect=False),
                           instruction_length=length, rip=ev.insn_rip,
                           why=f"exception bitmap bit {ev.vector}"))
        return True

    def db_trap(self, *, hits: int, bs: bool) -> bool:
        """A trap-class #DB is about to be delivered (cpu/debug.py): if the bitmap claims
        vector 1 it exits directly, DR6 untouched, its DR6-style bits (B0-B3, BS) in the
        exit qualification (SDM Vol. 3C "Architectural State Before a VM Exit"; KUT
        `vmx_db_test`)."""
        c = self.state.controls
        if c is None or self.state.injected is not None or not c.bitmap.exits(Vector.DB, None):
            return False
        rip = int(self.m.engine.read_reg("rip"))
        self.exit(ExitInfo(int(ExitReason.EXCEPTION_OR_NMI),
                           qualification=(hits & 0xF) | (PENDING_BS if bs else 0),
                           interruption_info=EventInfo(Vector.DB,
                                                       EventType.HARDWARE_EXCEPTION).raw,
                           interruptibility=self.current_interruptibility(indirect=False),
                           rip=rip, why="exception bitmap bit 1 (#DB trap)"))
        return True

    def _bit12_defined(self) -> bool:
        c = self.state.controls
        return c is not None and (not c.nmi_exiting or c.virtual_nmis)

    # -- exits from a delivery ------------------------------------------------------------
    def _vectoring(self, during: Event | None) -> tuple[int, int, int]:
        """(IDTV, IDTVEC, instruction length) for an exit during `during`'s delivery:
        the entry's own fields if `during` is the event this VM entry injected."""
        if during is None:
            return 0, 0, 0
        st = self.state
        if st.injected is not None and during is st.injected_event:
            info, ec, length = st.injected
            return info & ~NMI_UNBLOCKING, ec, length
        t = event_type(during)
        length = during.return_rip - during.insn_rip if is_software(t) else 0
        return info_of(during).raw, during.error_code or 0, length

    def delivery_exit(self, ev: Event, out: DeliveryOutcome) -> None:
        """`deliver_event` stopped at an exit: an intercepted exception (with or without
        IDT-vectoring information) or a triple fault."""
        rip = ev.insn_rip  # (cpu/machine.py uncounted an INT n: it did not retire)
        is_ = self.current_interruptibility(indirect=True)
        if out.triple_fault:
            self.exit(ExitInfo(int(ExitReason.TRIPLE_FAULT), interruptibility=is_, rip=rip,
                               why=out.shutdown_reason or "triple fault"))
            return
        fault = out.intercepted
        assert fault is not None
        idtv, idtvec, length = self._vectoring(out.intercepted_during)
        ec = fault.error_code
        if out.intercepted_during is not None and out.intercepted_during.vector == Vector.DF \
                and out.intercepted_during.source is Source.EXCEPTION and ec is not None \
                and fault.vector != Vector.PF:
            ec |= 1  # EXT for an exception during #DF delivery
        info = EventInfo(fault.vector, EventType.HARDWARE_EXCEPTION, ec is not None)
        qual = fault.cr2 or 0 if fault.vector == Vector.PF else 0
        self.exit(ExitInfo(int(ExitReason.EXCEPTION_OR_NMI), qualification=qual,
                           interruption_info=info.raw, interruption_error_code=ec or 0,
                           idt_vectoring_info=idtv, idt_vectoring_error_code=idtvec,
                           interruptibility=is_, instruction_length=length, rip=rip,
                           why=fault.why or f"exception bitmap bit {fault.vector}"))

    def ept_exit(self, *, reason: int, qualification: int, gpa: int, gla: int | None, rip: int,
                 during: Event | None, why: str) -> None:
        """An EPT violation or misconfiguration that is a VM exit (cpu/vmx.py)."""
        m = self.m
        if during is not None and during.source in (Source.SOFTWARE, Source.PRIV_SOFTWARE) \
                and self.state.injected is None:
            m.engine.uncount()
        idtv, idtvec, length = self._vectoring(during)
        self.exit(ExitInfo(reason, qualification=qualification, idt_vectoring_info=idtv,
                           idt_vectoring_error_code=idtvec,
                           interruptibility=self.current_interruptibility(
                               indirect=during is not None),
                           instruction_length=length,
                           rip=during.insn_rip if during is not None else rip,
                           gpa=gpa, gla=gla, why=why))

    # -- exits at a boundary -------------------------------------------------------------
    def at_boundary(self) -> bool:
        """Before arbitration at an instruction boundary: window exits and NMI /
        external-interrupt exits, in SDM priority order (NMI window, NMI, interrupt
        window, external interrupt). True if an exit was taken (arbitrate again)."""
        c = self.state.controls
        if c is None:
            return False
        m = self.m
        if self.state.launch is not None:
            entry, self.state.launch = self.state.launch, None
            rip = int(m.engine.read_reg("rip"))
            self.enter(entry, ExitInfo(0, rip=rip, why="VMLAUNCH"))
            return True
        is_ = self.current_interruptibility(indirect=False)
        shadow = is_ & (IS_STI | IS_MOV_SS)
        rip = int(m.engine.read_reg("rip"))
        intr = m.intr
        if c.nmi_window_exiting and not intr.nmi_blocked and not shadow:
            self.exit(ExitInfo(int(ExitReason.NMI_WINDOW), interruptibility=is_, rip=rip,
                               why="NMI window open"))
            return True
        if c.nmi_exiting and intr.nmi_pending and not shadow:
            intr.nmi_pending = False
            self.exit(ExitInfo(int(ExitReason.EXCEPTION_OR_NMI),
                               interruption_info=EventInfo(2, EventType.NMI).raw,
                               interruptibility=is_, rip=rip, why="NMI exiting"))
            return True
        rflags_if = bool(m.engine.read_reg("rflags") & RFLAGS_IF)
        if c.interrupt_window_exiting and rflags_if and not shadow:
            self.exit(ExitInfo(int(ExitReason.INTERRUPT_WINDOW), interruptibility=is_, rip=rip,
                               why="interrupt window open"))
            return True
        apic = m.apic
        if c.external_interrupt_exiting and apic is not None and not shadow:
            vector = apic.pending_vector()
            if vector is not None:
                info = 0
                if c.ack_interrupt_on_exit:
                    apic.acknowledge(vector)
                    info = EventInfo(vector, EventType.EXTERNAL_INTERRUPT).raw
                self.exit(ExitInfo(int(ExitReason.EXTERNAL_INTERRUPT), interruption_info=info,
                                   interruptibility=is_, rip=rip,
                                   why="external-interrupt exiting"))
                return True
        return False

    def wants_step(self) -> bool:
        """A window exit held by a shadow or IF = 0 becomes possible without an event:
        step one instruction at a time while a window control is set."""
        c = self.state.controls
        return c is not None and (c.interrupt_window_exiting or c.nmi_window_exiting)

    # -- state ---------------------------------------------------------------------------
    def current_interruptibility(self, *, indirect: bool) -> int:
        """The guest interruptibility state as an exit saves it."""
        m = self.m
        is_ = IS_NMI if m.intr.nmi_blocked else 0
        if not indirect and m.boundary.state.shadow is not None:
            shadow = m.boundary.shadow_at(int(m.engine.read_reg("rip")), m.engine.icount)
            if shadow & Shadow.STI:
                is_ |= IS_STI
            if shadow & Shadow.MOV_SS:
                is_ |= IS_MOV_SS
        return is_

    def _set_interruptibility(self, is_: int) -> None:
        m = self.m
        m.intr.nmi_blocked = bool(is_ & IS_NMI)
        shadow = (Shadow.STI if is_ & IS_STI else Shadow.NONE) | (
            Shadow.MOV_SS if is_ & IS_MOV_SS else Shadow.NONE)
        b = m.boundary.state
        if shadow:
            b.shadow = (m.engine.icount, int(m.engine.read_reg("rip")), Shadow(shadow))
        else:
            b.shadow = None

    # -- the exit and the entry -----------------------------------------------------------
    def exit(self, info: ExitInfo) -> None:
        """Record the exit, ask the host, perform the VM entry it asks for."""
        m = self.m
        st = self.state
        e = m.engine
        e.write({"rip": info.rip})
        m.count_event(info.rip, "events (VM exits that never resolve?)")
        if st.last_icount == e.icount:
            st.reentries += 1
        else:
            st.reentries, st.last_icount = 1, e.icount
        host = st.host
        assert host is not None
        rec = m.emit("vmexit", reason=info.basic_reason, **info.fields(), rip=info.rip,
                     gpa=info.gpa, gla=info.gla, decoded=info.decoded(), why=info.why)
        action = host(info, self.vcpu)
        rec["action"] = _action_text(action)
        if st.reentries > MAX_REENTRIES:
            raise Stop(Outcome.VMEXIT, f"{MAX_REENTRIES} VM exits in a row without a guest "
                       f"instruction retiring (last: {info.name}): the host loops", info.rip)
        self.enter(action, info)

    def launch(self, entry: Inject | Resume) -> None:
        """The VMLAUNCH that starts the guest (at the first boundary of the next run):
        an injection, or a plain entry with an interruptibility state."""
        self.state.launch = entry

    def enter(self, action: Resume | Inject | Halt, info: ExitInfo) -> None:
        """The VM entry the host asked for after the exit `info` (or the launch)."""
        m = self.m
        if isinstance(action, Halt):
            raise Stop(Outcome.VMEXIT, f"{info.name}: host stops: {action.reason}", info.rip)
        if action.interruptibility is not None:
            self._set_interruptibility(action.interruptibility)
        if isinstance(action, Resume):
            m.emit("vmentry", injected=None)
            pd = action.pending_debug
            if pd & (0xF | PENDING_ENABLED_BP | PENDING_BS) and not (
                    self.current_interruptibility(indirect=False) & IS_MOV_SS):
                # SDM Vol. 3C "Delivery of Pending Debug Exceptions after VM Entry": a
                # non-vectoring entry delivers them first, as a trap on the previous
                # instruction (above NMIs, interrupts and both window exits).
                m.debug.trap_now(hits=pd & 0xF, bs=bool(pd & PENDING_BS),
                                 why="pending debug exceptions (VM entry)")
            return
        c = self.state.controls
        assert c is not None
        rflags = int(m.engine.read_reg("rflags"))
        guest = GuestEntryState(
            rflags_if=bool(rflags & RFLAGS_IF),
            interruptibility=self.current_interruptibility(indirect=False),
            virtual_nmis=c.virtual_nmis,
            activity="hlt" if m.boundary.state.halted else "active")
        verdict = check_entry(action.info, action.error_code, action.length, guest)
        ev_info = EventInfo.decode(action.info)
        if not verdict.ok:
            m.emit("vmentry", injected=action.info, error_code=action.error_code,
                   length=action.length, failed=verdict.why,
                   vm_instruction_error=verdict.vm_instruction_error,
                   exit_reason=verdict.exit_reason)
            if verdict.vm_instruction_error is not None:
                raise Stop(Outcome.VMEXIT, f"VM entry failed: VMfailValid, VM-instruction error "
                           f"{verdict.vm_instruction_error} ({verdict.why})", info.rip)
            assert verdict.exit_reason is not None
            self.exit(replace(info, reason=verdict.exit_reason, qualification=0,
                              interruption_info=0, interruption_error_code=0,
                              idt_vectoring_info=0, idt_vectoring_error_code=0,
                              interruptibility=guest.interruptibility, why=verdict.why))
            return
        if action.cr2 is not None:
            m.engine.write({"cr2": action.cr2})
        m.emit("vmentry", injected=action.info, error_code=action.error_code,
               length=action.length, cr2=action.cr2, decoded=ev_info.text())
        ev = _event(ev_info, action.error_code, action.length, info.rip)
        # A vectoring entry leaves no STI/MOV-SS blocking and an active guest.
        m.boundary.state.shadow = None
        m.boundary.state.halted = False
        st = self.state
        st.injected = (action.info, action.error_code, action.length)
        st.injected_event = ev
        try:
            m.deliver(ev, why="VM-entry injection")
        finally:
            st.injected = None
            st.injected_event = None


def _event(info: EventInfo, error_code: int, length: int, rip: int) -> Event:
    """The event a VM-entry interruption-information field injects, at guest RIP `rip`."""
    t = info.type
    if t == EventType.EXTERNAL_INTERRUPT:
        return Event(info.vector, Source.INTERRUPT, rip, rip)
    if t == EventType.NMI:
        return Event(info.vector, Source.NMI, rip, rip)
    if t == EventType.PRIVILEGED_SOFTWARE_EXCEPTION:
        return Event(info.vector, Source.PRIV_SOFTWARE, rip + length, rip)
    if t in (EventType.SOFTWARE_INTERRUPT, EventType.SOFTWARE_EXCEPTION):
        return Event(info.vector, Source.SOFTWARE, rip + length, rip)
    return Event(info.vector, Source.EXCEPTION, rip, rip,
                 error_code if info.error_code_valid else None)


def _action_text(action: Resume | Inject | Halt) -> str:
    if isinstance(action, Halt):
        return f"stop: {action.reason}"
    if isinstance(action, Resume):
        return "resume" + ("" if action.interruptibility is None
                           else f" (interruptibility {action.interruptibility:#x})")
    return f"inject {action.info:#x}" + (
        f" error {action.error_code:#x}" if action.info & (1 << 11) else "") + (
        f" length {action.length}" if action.length else "") + (
        f" cr2 {action.cr2:#x}" if action.cr2 is not None else "")

