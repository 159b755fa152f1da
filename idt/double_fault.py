"""What happens when delivering an event raises another exception (SDM Vol. 3A
"Interrupt 8—Double Fault Exception", Table 6-5 "Conditions for Generating a Double
Fault").

A second exception raised *while the processor delivers* a first one (IDT read,
descriptor loads, TSS fetch, frame pushes) is combined with it:

    first \\ second   | benign    contributory  page-fault
    ------------------+----------------------------------
    benign            | serial    serial        serial
    contributory      | serial    #DF           serial
    page-fault        | serial    #DF           #DF

"Serial" means the first event is abandoned and the second is delivered instead (a
fault is regenerated when its instruction re-executes; an NMI or external interrupt is
*not* retried: its blocking/acknowledge already happened). Software interrupts,
external interrupts and NMIs count as benign first events. An exception while
delivering #DF is a triple fault: the processor shuts down. The 2016 SDM narrows that
to contributory or page-fault exceptions; like QEMU (target/i386/tcg/excp_helper.c
`check_exception`) and KVM (arch/x86/kvm/x86.c `kvm_multiple_exception`) we shut down on
any exception.

Under VMX (SDM Vol. 3C "Other Causes of VM Exits", "VM Exits During Event Injection")
the exception bitmap is asked first, with the *second* exception's vector: if it
exits, nothing is combined (the first event goes to the host in the IDT-vectoring
information). Only a second exception the bitmap lets through meets Table 6-5; a #DF
made from it is asked again with vector 8 (an exit then has no IDT-vectoring
information), and an exception during #DF delivery that the bitmap does not take is a
triple-fault VM exit. `deliver_event(..., intercept=...)` takes that question as a
function (cpu/vmx_exits.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from idt.deliver import Delivery, deliver
from idt.state import ArchFault, ArchState, Event, Source, SystemMemory
from idt.vectors import DFClass, Vector, df_class


class Combine(Enum):
    SERIAL = "serial"
    DOUBLE_FAULT = "double-fault"
    SHUTDOWN = "shutdown"


def combine(first: Event, second_vector: int) -> Combine:
    """Table 6-5: what a `second_vector` exception during `first`'s delivery becomes."""
    if first.source is Source.EXCEPTION and first.vector == Vector.DF:
        return Combine.SHUTDOWN
    if first.source is not Source.EXCEPTION:
        return Combine.SERIAL  # INT n, INTR and NMI are benign first events
    a, b = df_class(first.vector), df_class(second_vector)
    if b is DFClass.CONTRIBUTORY and a in (DFClass.CONTRIBUTORY, DFClass.PAGE_FAULT):
        return Combine.DOUBLE_FAULT
    if a is DFClass.PAGE_FAULT and b is DFClass.PAGE_FAULT:
        return Combine.DOUBLE_FAULT
    return Combine.SERIAL


@dataclass(frozen=True)
class NestedFault:
    """One fault raised while delivering `during`, and what the matrix made of it."""

    during: Event
    fault: ArchFault
    action: Combine


@dataclass
class DeliveryOutcome:
    """Either a delivery (possibly of a different event than asked) or a shutdown."""

    delivery: Delivery | None
    nested: list[NestedFault] = field(default_factory=list)
    double_fault_of: tuple[int, int] | None = None
    shutdown_reason: str | None = None
    # VMX: the event being delivered right now (for an exit the caller sees as a Python
    # exception, e.g. an EPT violation), an intercepted exception and the event whose
    # delivery it interrupted (None: the exit is due to #DF itself), a triple fault.
    vectoring: Event | None = None
    intercepted: ArchFault | None = None
    intercepted_during: Event | None = None
    triple_fault: bool = False


# (vector, error code) -> whether the exception bitmap makes it a VM exit.
Intercept = Callable[[int, int | None], bool]


def deliver_event(mem: SystemMemory, st: ArchState, ev: Event, intercept: Intercept | None = None,
                  out: DeliveryOutcome | None = None) -> DeliveryOutcome:
    """Deliver `ev`, applying the #DF rules to faults raised during delivery.

    `st` is not modified except `cr2` (a #PF during delivery loads CR2 when it is
    detected, even if it then becomes #DF) and `nmi_blocked` (an NMI blocks further NMIs
    as its delivery *starts*, so a failed NMI delivery leaves NMIs blocked).

    `intercept` (VMX) is the exception bitmap; `out` lets the caller read `vectoring`
    after an exception other than `ArchFault` escaped.
    """
    out = out if out is not None else DeliveryOutcome(delivery=None)
    current = ev
    if ev.source is Source.NMI:
        st.nmi_blocked = True
    if ev.cr2 is not None:
        st.cr2 = ev.cr2
    while True:
        out.vectoring = current
        try:
            out.delivery = deliver(mem, st, current)
            return out
        except ArchFault as fault:
            if intercept is not None and intercept(fault.vector, fault.error_code):
                # The bitmap sees the second exception before any #DF conversion; it
                # exits directly, so a #PF does not load CR2 (SDM Vol. 3C "Architectural
                # State Before a VM Exit").
                out.intercepted, out.intercepted_during = fault, current
                return out
            if fault.cr2 is not None:
                st.cr2 = fault.cr2
            action = combine(current, fault.vector)
            out.nested.append(NestedFault(current, fault, action))
            if action is Combine.SHUTDOWN:
                out.shutdown_reason = (
                    f"triple fault: {fault} while delivering #DF"
                )
                out.triple_fault = intercept is not None  # a VM exit, reason 2
                return out
            # The nested fault is a fault on the instruction that caused `current`
            # (for an INT n: the INT itself), or at the interrupted boundary.
            nested = Event(
                vector=fault.vector,
                source=Source.EXCEPTION,
                return_rip=current.insn_rip,
                insn_rip=current.insn_rip,
                error_code=fault.error_code,
                cr2=fault.cr2,
            )
            if action is Combine.DOUBLE_FAULT:
                out.double_fault_of = (int(current.vector), int(fault.vector))
                # #DF: vector 8, error code 0 (EXT is not applied), saved RIP undefined
                # by the SDM; we push the first event's instruction address as Bochs does.
                current = Event(Vector.DF, Source.EXCEPTION, current.insn_rip,
                                current.insn_rip, 0)
                if intercept is not None and intercept(Vector.DF, 0):
                    # An exit *due to* #DF: no IDT-vectoring information.
                    out.intercepted = ArchFault(Vector.DF, 0, why=f"double fault: {fault}")
                    out.intercepted_during = None
                    return out
            else:
                current = nested
