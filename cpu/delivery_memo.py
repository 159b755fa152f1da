"""Deliveries remembered: a plain IDT delivery replayed without re-reading what it read.

Why: an event's delivery through the pure model (`idt.double_fault.deliver_event`) reads
the IDT gate, the code segment's descriptor and perhaps a TSS stack pointer, each through
a validated page walk, checks them, and pushes five or six slots one by one, each
through the walk again. That is most of the Python an NMI or an INT3 costs, and a
handler under test takes the same delivery again and again.

What is remembered, per key of everything the model reads that is not memory (the
vector, the event's source, the CPL, CS and SS, IDTR, GDTR, TR and the paging controls):
the model's answer that does not depend on the frame's values (the gate, the stack and
its top when it comes from the TSS, the new CS, SS and CPL), and the memory the delivery
touched, recorded by `GuestMemory.record` as it ran: the bytes it read (gate, descriptor,
TSS slot) and, for every page it touched, the walk's check (the paging-structure entries
and the values they held, A/D bits included). The frame must have gone onto one page.

A replay holds only while all of it does: the same key, the same bytes, every check
(`WalkCache.holds`), and the new frame on the page the remembered one went to (for the
current stack, RSP decides). Then the frame's values (`idt.deliver.frame_of`) are
written in one piece — the page is present, writable and dirty, so nothing could fault
halfway, which is the only case where the model's slot-by-slot order shows — and the
same `Delivery` is built (`entry_rflags`). Anything else runs the model, which is then
remembered if it was plain: no fault while delivering, no VMX controls, no EPT, no
memory window. The answer is the model's either way; tests run both paths and compare.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idt.deliver import Delivery, entry_rflags, frame_of
from idt.descriptors import GateDescriptor, SegmentDescriptor
from idt.double_fault import DeliveryOutcome, Intercept, deliver_event
from idt.state import ArchState, Event, Source, is_canonical

if TYPE_CHECKING:
    from cpu.machine import Machine

_MASK = 2**64 - 1


@dataclass(frozen=True)
class _Plan:
    gate: GateDescriptor
    stack: str
    top: int | None  # the TSS's stack pointer, aligned (None: the current stack)
    new_cs: int
    new_ss: int
    new_cpl: int
    cs_descriptor: SegmentDescriptor | None
    reads: tuple[tuple[int, bytes], ...]  # physical address, the bytes read there
    checks: tuple[Any, ...]  # `WalkCache` checks of every page touched
    stack_page: int  # the linear page the frame went onto, and its physical page
    stack_paddr: int


class DeliveryMemo:
    """Remembered deliveries of one machine (see the module docstring)."""

    LIMIT = 64  # plans kept; more keys than that start the table afresh
    # Derived from guest memory and re-checked against it at every use: not state (a
    # rollback keeps them, as it keeps the walk caches' checks).
    CACHES = frozenset({"_plans"})

    def __init__(self, m: Machine) -> None:
        self.m = m
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        # False: every delivery runs the model (tests compare the two).
        self.enabled = True

    def deliver(self, st: ArchState, ev: Event, intercept: Intercept | None,
                out: DeliveryOutcome) -> DeliveryOutcome:
        """`deliver_event(sysmem, st, ev, intercept, out)`, replayed when remembered."""
        m = self.m
        mem = m.sysmem
        if not self.enabled or intercept is not None or m.ept is not None or mem.ctl is None:
            return deliver_event(mem, st, ev, intercept, out)
        key = (ev.vector, ev.source, ev.trap_like, st.cpl, st.cs, st.ss, st.idtr_base,
               st.idtr_limit, st.gdtr_base, st.gdtr_limit, st.tr_selector, st.tr_base,
               st.tr_limit, mem.ctl)
        plan = self._plans.get(key)
        if plan is not None and self._replay(plan, st, ev, out):
            return out
        mem.record = []
        try:
            deliver_event(mem, st, ev, intercept, out)
        finally:
            record, mem.record = mem.record, None
        self._learn(key, out, record)
        return out

    def _replay(self, plan: _Plan, st: ArchState, ev: Event, out: DeliveryOutcome) -> bool:
        m = self.m
        phys = m.phys
        view = phys.view
        for paddr, data in plan.reads:
            if view[paddr:paddr + len(data)] != data:
                return False
        holds = m.sysmem.walks.holds
        for check in plan.checks:
            if not holds(check):
                return False
        if plan.top is None:
            if not is_canonical(st.rsp):
                return False
            top = st.rsp & ~0xF
        else:
            top = plan.top
        frame = frame_of(st, ev)
        slots = frame.slots()
        sp = (top - 8 * len(slots)) & _MASK
        if sp >> 12 != plan.stack_page or (sp & 0xFFF) + 8 * len(slots) > 0x1000:
            return False
        paddr = plan.stack_paddr | (sp & 0xFFF)
        data = struct.pack(f"<{len(slots)}Q", *[v & _MASK for _n, v in slots])
        if phys.dirty is not None:
            phys.mark(paddr, len(data))
        view[paddr:paddr + len(data)] = data
        # What `deliver_event` does besides the delivery itself.
        if ev.source is Source.NMI:
            st.nmi_blocked = True
        if ev.cr2 is not None:
            st.cr2 = ev.cr2
        out.vectoring = ev
        out.delivery = Delivery(event=ev, gate=plan.gate, frame=frame, stack=plan.stack,
                                new_rip=plan.gate.offset, new_rsp=sp,
                                new_rflags=entry_rflags(st, plan.gate), new_cs=plan.new_cs,
                                new_ss=plan.new_ss, new_cpl=plan.new_cpl,
                                cs_descriptor=plan.cs_descriptor)
        return True

    def _learn(self, key: tuple[Any, ...], out: DeliveryOutcome,
               record: list[tuple[Any, ...]]) -> None:
        d = out.delivery
        if d is None or out.nested or out.intercepted is not None:
            return
        reads: list[tuple[int, bytes]] = []
        checks: list[Any] = []
        writes: list[tuple[int, int]] = []
        for entry in record:
            kind = entry[0]
            if kind == "page":
                if entry[2] not in checks:  # the IDT, GDT, TSS and stack may share pages
                    checks.append(entry[2])
            elif kind == "read":
                reads.append((entry[1], entry[2]))
            elif kind == "write":
                writes.append((entry[1], entry[2]))
            else:
                return  # a split access, a window, EPT: not remembered
        size = 8 * len(d.frame.slots())
        if not writes or (d.new_rsp & 0xFFF) + size > 0x1000:
            return  # the frame is not on one page
        low = min(p for p, _n in writes)
        if low >> 12 != max(p for p, _n in writes) >> 12:
            return
        top = None if d.stack == "current" else (d.new_rsp + size) & _MASK
        if len(self._plans) >= self.LIMIT:
            self._plans.clear()
        self._plans[key] = _Plan(gate=d.gate, stack=d.stack, top=top, new_cs=d.new_cs,
                                 new_ss=d.new_ss, new_cpl=d.new_cpl,
                                 cs_descriptor=d.cs_descriptor, reads=tuple(reads),
                                 checks=tuple(checks), stack_page=d.new_rsp >> 12,
                                 stack_paddr=low & ~0xFFF)
