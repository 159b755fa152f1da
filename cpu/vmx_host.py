"""The host: what a hypervisor does with each VM exit, as a Python object the scenario
names.

A host is any callable ``host(exit, vcpu) -> action``. `exit` is the raw exit
information (`idt.vmx_events.ExitInfo`: exit reason, qualification, exit interruption
information and error code, IDT-vectoring information and error code, guest
interruptibility state, instruction length, guest RIP). `vcpu` (`Vcpu`) lets the host
look at the guest and change what a real host changes between exit and entry: EPT
entries, guest page-table entries it owns (a stand-in for shadow pages it has not
built yet), the interruptibility state, the window-exiting controls, and a queue of
events it owes the guest. The action is one of:

    Resume(interruptibility=None,      VM entry with nothing injected: the guest
           pending_debug=0)            re-executes from the saved RIP (a pending #DB
                                       first, if the field says so)
    Inject(info, error_code, length,   VM entry injecting the event `info` (the VM-entry
           cr2=None, interruptibility) interruption-information field); `cr2` is written
                                       first (a reflected #PF: the direct exit did not)
    reinject(exit)                     the Inject that re-delivers the IDT-vectoring event
                                       (bit 12 cleared, error code and length copied,
                                       virtual-NMI blocking cleared for an NMI)
    Halt(reason)                       the host stops the guest (outcome "vmexit")

Writing one::

    from cpu.vmx_host import Inject, Resume, reinject

    def my_host(exit, vcpu):
        if exit.basic_reason == 48:          # EPT violation: map the page, go on
            vcpu.fix_ept(exit.gpa)
            return reinject(exit) if exit.idtv.valid else Resume()
        return Halt(f"unexpected {exit.name}")

and in the scenario: ``[hypervisor] host = "my_module:my_host"``.

Two hosts come ready-made, and differ in one line, the one the 2022 thread is about
(LKML "Re: [PATCH v2 06/25] KVM: nVMX/nSVM: do not monkey-patch inject_page_fault
callback", Sean Christopherson, 2022-03-08; fixed in Linux 6.1 by "KVM: x86: Morph
pending exceptions to pending VM-Exits at queue time"):

* `SdmHost` ("sdm") follows SDM Vol. 3C "Reflecting Exceptions to Guest Software" and
  "Resuming Guest Software after Handling an Exception": an exception it intercepted
  on a page it owns is its own fault, fixed, then the IDT-vectoring event is
  re-injected (or, after a faulting IRET, NMI blocking restored); one on a guest page is
  the guest's: reflected with Table 6-5 (`idt.vmx_events.reflect`), CR2 written for a
  #PF. When the guest is itself a hypervisor's guest (the scenario gives the inner
  hypervisor's exception bitmap, `l1_exception_bitmap`), the reflected exception is
  first checked against *that* bitmap with its own vector (KVM 6.1
  `kvm_multiple_exception` → `nested_vmx_is_exception_vmexit`): an exit to the inner
  hypervisor carries the exception in its interruption information and the interrupted
  event in its IDT-vectoring information.
* `KvmPre61Host` ("kvm-pre-6.1") merges first and checks afterwards (KVM before 6.1:
  `kvm_multiple_exception` combined the injected and the new exception,
  `nested_vmx_check_exception` looked at the result at injection time). #GP while
  vectoring #GP becomes #DF before the inner hypervisor sees its #GP; #PF while
  vectoring #PF becomes a spurious #DF in the inner guest, or a #DF exit; the vectoring
  event is lost from the exit.

Everything the hosts remember (events they owe the guest) lives in the machine's
`HyperState` (cpu/vmx_exits.py), so a checkpoint restores it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpu.mmu import ADDR_MASK, PTE_P, PTE_PS, PTE_U, PTE_W
from idt.state import RFLAGS_IF
from idt.vectors import Vector
from idt.vmx_events import (
    INVALID_GUEST_STATE_EXIT,
    IS_NMI,
    NMI_UNBLOCKING,
    EventInfo,
    EventType,
    ExceptionBitmap,
    ExitInfo,
    ExitReason,
    merge_then_check,
    reflect,
)

if TYPE_CHECKING:
    from cpu.machine import Machine


@dataclass(frozen=True)
class Resume:
    """VM entry without injection; `interruptibility` (if given) is written to the guest
    interruptibility-state field first; `pending_debug` is the pending-debug-exceptions
    field (B0-B3 in bits 3:0, enabled breakpoint 12, BS 14)."""

    interruptibility: int | None = None
    pending_debug: int = 0


@dataclass(frozen=True)
class Inject:
    """VM entry injecting `info` (VM-entry interruption information), with its error
    code and instruction length; `cr2` is written to the guest CR2 first."""

    info: int
    error_code: int = 0
    length: int = 0
    cr2: int | None = None
    interruptibility: int | None = None


@dataclass(frozen=True)
class Halt:
    """The host stops running the guest."""

    reason: str


Action = Resume | Inject | Halt
Host = Callable[[ExitInfo, "Vcpu"], Action]


def reinject(exit_: ExitInfo, *, virtual_nmis: bool = False,
             interruptibility: int | None = None) -> Inject:
    """Re-inject the event the exit interrupted (SDM Vol. 3C "Resuming Guest Software
    after Handling an Exception"; KVM `__vmx_complete_interrupts`): EII = IDTV with bit
    12 cleared (undefined in IDTV, reserved in EII), the error code, and for software
    events the VM-exit instruction length. Re-injecting an NMI with virtual NMIs needs
    interruptibility bit 3 clear, or the entry fails."""
    idtv = exit_.idt_vectoring_info
    assert idtv >> 31, "reinject: the exit has no valid IDT-vectoring information"
    is_ = exit_.interruptibility if interruptibility is None else interruptibility
    if virtual_nmis and EventInfo.decode(idtv).type == EventType.NMI:
        is_ &= ~IS_NMI
    return Inject(idtv & ~NMI_UNBLOCKING, exit_.idt_vectoring_error_code,
                  exit_.instruction_length, interruptibility=is_)


class Vcpu:
    """What a host may look at and change between a VM exit and the next entry."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    @property
    def virtual_nmis(self) -> bool:
        c = self.m.vmx_exits.state.controls
        return c is not None and c.virtual_nmis

    @property
    def rflags_if(self) -> bool:
        return bool(self.m.engine.read_reg("rflags") & RFLAGS_IF)

    @property
    def cr2(self) -> int:
        return int(self.m.engine.read_reg("cr2"))

    def fix_ept(self, gpa: int) -> None:
        """Give the page of `gpa` its RWX EPT entry back."""
        ept = self.m.ept
        assert ept is not None
        ept.fix(gpa)
        self.m.engine.flush_tlb()
        self.m.emit("host_fix", what="ept", gpa=gpa & ~0xFFF)

    def _pte_address(self, linear: int) -> int | None:
        phys = self.m.phys
        table = int(self.m.engine.read_reg("cr3")) & ADDR_MASK
        for shift in (39, 30, 21):
            entry = phys.read_uint(table + ((linear >> shift) & 0x1FF) * 8, 8)
            if not entry & PTE_P or entry & PTE_PS:
                return None
            table = entry & ADDR_MASK
        return table + ((linear >> 12) & 0x1FF) * 8

    def map_page(self, linear: int) -> bool:
        """Make the guest PTE of `linear`'s page present again (identity, writable, user),
        as a host builds a shadow page it was missing. False if there is no 4-KiB PTE."""
        slot = self._pte_address(linear)
        if slot is None:
            return False
        page = linear & ~0xFFF
        self.m.phys.write_u64(slot, page | PTE_P | PTE_W | PTE_U)
        self.m.engine.flush_tlb()
        self.m.emit("host_fix", what="pte", gla=page)
        return True

    def owns(self, linear: int) -> bool:
        """Whether `linear` is on a page the host owns (`[hypervisor] host_pages`)."""
        return (linear & ~0xFFF) in self.m.vmx_exits.state.host_pages

    def set_controls(self, **changes: bool) -> None:
        """Change window-exiting controls (interrupt_window_exiting, nmi_window_exiting)."""
        self.m.vmx_exits.set_controls(**changes)

    def queue(self, inject: Inject) -> None:
        """Remember an event to inject at the next window exit."""
        self.m.vmx_exits.state.owed.append((inject.info, inject.error_code, inject.length))

    def take_owed(self) -> Inject | None:
        owed = self.m.vmx_exits.state.owed
        if not owed:
            return None
        info, ec, length = owed.pop(0)
        return Inject(info, ec, length)

    def acknowledge_interrupt(self) -> int | None:
        """Acknowledge the APIC's highest pending interrupt (for an external-interrupt
        exit without "acknowledge interrupt on exit")."""
        apic = self.m.apic
        if apic is None:
            return None
        vector = apic.pending_vector()
        if vector is not None:
            apic.acknowledge(vector)
        return vector

    def nested_exit(self, *, info: int, error_code: int, qualification: int, idtv: int,
                    idtv_error_code: int, why: str) -> Halt:
        """An exit to the inner hypervisor (L1): record the vmcs12 exit fields it would
        read, and stop (L1 itself is not modelled as code)."""
        self.m.emit("nested_vmexit", exit_reason=int(ExitReason.EXCEPTION_OR_NMI),
                    interruption_info=info, interruption_error_code=error_code,
                    qualification=qualification, idt_vectoring_info=idtv,
                    idt_vectoring_error_code=idtv_error_code,
                    decoded={"interruption": EventInfo.decode(info).text(),
                             "idt_vectoring": EventInfo.decode(idtv).text()},
                    why=why)
        return Halt("exit to the inner hypervisor (L1)")


class SdmHost:
    """The host SDM Vol. 3C describes (see the module docstring)."""

    name = "sdm"

    def __init__(self, l1_exception_bitmap: ExceptionBitmap | None = None) -> None:
        self.l1 = l1_exception_bitmap

    def __call__(self, exit_: ExitInfo, vcpu: Vcpu) -> Action:
        r = exit_.basic_reason
        if exit_.reason == INVALID_GUEST_STATE_EXIT:
            return Halt(f"VM entry failed: invalid guest state ({exit_.why})")
        if r == ExitReason.TRIPLE_FAULT:
            return Halt("the guest triple-faulted")
        if r in (ExitReason.EPT_VIOLATION, ExitReason.EPT_MISCONFIG):
            assert exit_.gpa is not None
            vcpu.fix_ept(exit_.gpa)
            return self.resume_after_fix(exit_, vcpu)
        if r in (ExitReason.INTERRUPT_WINDOW, ExitReason.NMI_WINDOW):
            vcpu.set_controls(**{"interrupt_window_exiting" if r == ExitReason.INTERRUPT_WINDOW
                                 else "nmi_window_exiting": False})
            owed = vcpu.take_owed()
            return owed if owed is not None else Resume()
        if r == ExitReason.EXTERNAL_INTERRUPT:
            info = exit_.interruption_info
            if not info >> 31:
                vector = vcpu.acknowledge_interrupt()
                if vector is None:
                    return Resume()
                info = (1 << 31) | vector
            return self._inject_or_wait(Inject(info), vcpu, window="interrupt_window_exiting")
        if r == ExitReason.EXCEPTION_OR_NMI:
            ii = exit_.ii
            if ii.type == EventType.NMI:
                return self._inject_or_wait(Inject(0x80000202), vcpu, window="nmi_window_exiting")
            if ii.vector == Vector.PF and vcpu.owns(exit_.qualification):
                vcpu.map_page(exit_.qualification)
                return self.resume_after_fix(exit_, vcpu)
            return self.reflect(exit_, vcpu)
        return Halt(f"no handler for {exit_.name}")

    def resume_after_fix(self, exit_: ExitInfo, vcpu: Vcpu) -> Action:
        """The exit was the host's doing and is fixed: re-inject the interrupted event; or,
        if the exit came from an IRET that had unblocked NMIs, block them again before
        the IRET re-executes (qualification / II bit 12, defined only with IDTV invalid)."""
        if exit_.idtv.valid:
            return reinject(exit_, virtual_nmis=vcpu.virtual_nmis)
        unblocked = (exit_.ii.nmi_unblocking if exit_.basic_reason == ExitReason.EXCEPTION_OR_NMI
                     else bool(exit_.qualification & NMI_UNBLOCKING))
        if unblocked:
            return Resume(interruptibility=exit_.interruptibility | IS_NMI)
        return Resume()

    def _inject_or_wait(self, inject: Inject, vcpu: Vcpu, *, window: str) -> Action:
        m = vcpu.m
        st = m.vmx_exits.current_interruptibility(indirect=False)
        blocked = (st & IS_NMI) if window == "nmi_window_exiting" else (
            not vcpu.rflags_if or st & 3)
        if blocked:
            vcpu.queue(inject)
            vcpu.set_controls(**{window: True})
            return Resume()
        return inject

    def l1_intercepts(self, vector: int, error_code: int) -> bool:
        return self.l1 is not None and self.l1.exits(vector, error_code)

    def reflect(self, exit_: ExitInfo, vcpu: Vcpu) -> Action:
        """The intercepted exception is the guest's: ask the inner hypervisor's bitmap
        about the exception itself, then emulate Table 6-5 (SDM order)."""
        ii, iiec = exit_.ii, exit_.interruption_error_code
        if self.l1 is not None and self.l1_intercepts(ii.vector, iiec):
            return vcpu.nested_exit(info=exit_.interruption_info & ~NMI_UNBLOCKING,
                                    error_code=iiec, qualification=exit_.qualification,
                                    idtv=exit_.idt_vectoring_info & ~NMI_UNBLOCKING,
                                    idtv_error_code=exit_.idt_vectoring_error_code,
                                    why="the inner hypervisor intercepts the exception "
                                        "(checked before any #DF merge)")
        return self._inject(reflect(exit_.idtv, ii, iiec), exit_)

    def _inject(self, how: Any, exit_: ExitInfo) -> Action:
        if how.shutdown:
            return Halt("the reflected exception interrupted #DF delivery: the guest "
                        "would triple-fault")
        assert how.inject is not None
        cr2 = exit_.qualification if how.inject.vector == Vector.PF and not how.double_fault \
            else None
        length = exit_.instruction_length if how.inject.type in (5, 6) else 0
        return Inject(how.inject.raw, how.error_code if how.inject.error_code_valid else 0,
                      length, cr2=cr2)


class KvmPre61Host(SdmHost):
    """KVM before Linux 6.1: merge first, ask the inner hypervisor afterwards."""

    name = "kvm-pre-6.1"

    def reflect(self, exit_: ExitInfo, vcpu: Vcpu) -> Action:
        how = merge_then_check(exit_.idtv, exit_.ii, exit_.interruption_error_code)
        if self.l1 is not None and how.inject is not None and \
                self.l1_intercepts(how.inject.vector, how.error_code):
            # The vectoring event was dropped by the merge: vmcs12 IDTV is invalid.
            return vcpu.nested_exit(info=how.inject.raw, error_code=how.error_code,
                                    qualification=0 if how.double_fault
                                    else exit_.qualification, idtv=0, idtv_error_code=0,
                                    why="merged before the inner hypervisor's bitmap was "
                                        "asked (KVM before 6.1)")
        return self._inject(how, exit_)


READY_MADE: dict[str, type[SdmHost]] = {"sdm": SdmHost, "kvm-pre-6.1": KvmPre61Host}


def resolve_host(spec: str, *, l1_exception_bitmap: ExceptionBitmap | None = None) -> Host:
    """A host from its name: "sdm", "kvm-pre-6.1", or "package.module:attribute" (a
    callable, or a class instantiated without arguments)."""
    if spec in READY_MADE:
        return READY_MADE[spec](l1_exception_bitmap)
    if ":" not in spec:
        raise ValueError(f"unknown host {spec!r} (ready-made: {', '.join(READY_MADE)}; or "
                         "'module:attribute')")
    module, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"host {spec!r}: {exc}") from None
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"host {spec!r} is not callable")
    host: Host = obj
    return host
