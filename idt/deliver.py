"""Delivery of one event through a 64-bit IDT gate (SDM Vol. 3A "Interrupt and
Exception Handling in 64-bit Mode", "64-Bit Mode Stack Frame", "Interrupt Stack Table").

The routine is a straight list of checks, in the order Bochs and QEMU implement (the
SDM's INT pseudocode leaves some ties open; docs/sdm-map.md lists them), each raising
the fault the SDM names, followed by one push sequence. It does not decide what happens
when a check fails: it raises `ArchFault` and `idt.double_fault` decides (serial
delivery, #DF, or shutdown).

Check order (Bochs exception.cc `long_mode_int`; QEMU target/i386/tcg/seg_helper.c
`do_interrupt64`):
  1  IDT limit                     #GP(v<<3|IDT|EXT)
  2  gate type is 64-bit int/trap  #GP(v<<3|IDT|EXT)
  3  software INT: gate.DPL < CPL  #GP(v<<3|IDT)       before the present check
  4  gate present                  #NP(v<<3|IDT|EXT)
  5  target selector null          #GP(EXT)
  6  selector inside the GDT       #GP(sel|EXT)
  7  code segment, DPL <= CPL      #GP(sel|EXT)
  8  64-bit code (L=1, D=0)        #GP(sel|EXT)
  9  code segment present          #NP(sel|EXT)
  10 target RIP canonical          #GP(EXT)
  11 TSS slot inside TR.limit      #TS(TR|EXT)
  12 new RSP canonical             #SS(EXT)
  13 frame pushes                  #PF / #SS as the memory says
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from idt.descriptors import (
    GATE_SIZE,
    GATE_TYPE_INTERRUPT,
    GATE_TYPE_TRAP,
    TSS_IST_OFFSET,
    TSS_RSP_OFFSET,
    GateDescriptor,
    SegmentDescriptor,
)
from idt.error_codes import idt_error_code, selector_code
from idt.state import (
    RFLAGS_IF,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
    ArchFault,
    ArchState,
    Event,
    Source,
    SystemMemory,
    is_canonical,
)
from idt.vectors import Vector, pushes_error_code


@dataclass(frozen=True)
class Frame:
    """The pushed frame, slot by slot, as it lies on the handler's stack."""

    error_code: int | None
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    def slots(self) -> list[tuple[str, int]]:
        """(name, value) from the final RSP upwards."""
        out: list[tuple[str, int]] = []
        if self.error_code is not None:
            out.append(("error_code", self.error_code))
        out += [("rip", self.rip), ("cs", self.cs), ("rflags", self.rflags),
                ("rsp", self.rsp), ("ss", self.ss)]
        return out


@dataclass(frozen=True)
class Delivery:
    """The result of a successful delivery: the new register state and what was pushed."""

    event: Event
    gate: GateDescriptor
    frame: Frame
    stack: str  # "current" | "rsp0".."rsp2" | "ist1".."ist7"
    new_rip: int
    new_rsp: int
    new_rflags: int
    new_cs: int
    new_ss: int
    new_cpl: int
    # The code segment's descriptor as read and checked (what CS's hidden part is loaded
    # from; None where no model delivery made this result).
    cs_descriptor: SegmentDescriptor | None = None


def read_descriptor(mem: SystemMemory, st: ArchState, selector: int, *, ext: bool) -> SegmentDescriptor:
    """Fetch a GDT descriptor for `selector` (checks 6). The LDT is not modelled: a TI=1
    selector behaves as if the LDT were null (limit 0), i.e. #GP(sel)."""
    index = selector >> 3
    if selector & 4 or index * 8 + 7 > st.gdtr_limit:
        raise ArchFault(Vector.GP, selector_code(selector, ext=ext),
                        why=f"selector {selector:#x} outside the GDT")
    return SegmentDescriptor.unpack(mem.read(st.gdtr_base + index * 8, 8))


def read_tss_rsp(mem: SystemMemory, st: ArchState, offset: int, *, ext: bool) -> int:
    """A stack pointer from the TSS (check 11): #TS(TR) if the slot is beyond TR.limit."""
    if offset + 7 > st.tr_limit:
        raise ArchFault(Vector.TS, selector_code(st.tr_selector, ext=ext),
                        why=f"TSS offset {offset:#x} beyond TR.limit {st.tr_limit:#x}")
    (value,) = struct.unpack("<Q", mem.read(st.tr_base + offset, 8))
    return int(value)


def frame_of(st: ArchState, ev: Event) -> Frame:
    """The frame delivering `ev` from `st` pushes (step 13): SS, RSP, RFLAGS, CS, RIP and,
    for the exceptions that have one, the error code."""
    pushed_rflags = st.rflags
    if ev.is_fault_class and ev.vector != Vector.DB:
        pushed_rflags |= RFLAGS_RF  # fault-class exceptions except #DB push RF=1
    error_code: int | None = None
    if ev.source is Source.EXCEPTION and pushes_error_code(ev.vector):
        error_code = 0 if ev.error_code is None else ev.error_code
    return Frame(error_code=error_code, rip=ev.return_rip, cs=st.cs, rflags=pushed_rflags,
                 rsp=st.rsp, ss=st.ss)


def entry_rflags(st: ArchState, gate: GateDescriptor) -> int:
    """RFLAGS on entry to the handler: TF, NT, RF, VM cleared; IF cleared only through an
    interrupt gate."""
    new_rflags = st.rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gate.type == GATE_TYPE_INTERRUPT:
        new_rflags &= ~RFLAGS_IF
    return new_rflags


def deliver(mem: SystemMemory, st: ArchState, ev: Event) -> Delivery:
    """Deliver `ev` through the IDT, writing the frame to guest memory.

    Raises `ArchFault` for any check that fails; guest memory may then hold part of a
    frame (the pushes happen slot by slot from SS down, as in Bochs, so CR2 of a #PF on
    the frame names the first slot that could not be written).
    """
    v = int(ev.vector)
    ext = ev.ext
    gate_fault = idt_error_code(v, ext=ext)

    # 1. The IDT limit covers all 16 bytes of the gate.
    if GATE_SIZE * v + GATE_SIZE - 1 > st.idtr_limit:
        raise ArchFault(Vector.GP, gate_fault, why=f"IDT[{v}] beyond IDTR.limit")
    gate = GateDescriptor.unpack(mem.read(st.idtr_base + GATE_SIZE * v, GATE_SIZE))

    # 2. Only 64-bit interrupt and trap gates are legal in IA-32e mode.
    if gate.s != 0 or gate.type not in (GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP):
        raise ArchFault(Vector.GP, gate_fault, why=f"IDT[{v}] type {gate.type:#x} is not a 64-bit gate")

    # 3. Software interrupts only (INT n, INT3, INTO; not INT1, not exceptions):
    #    gate DPL >= CPL. This check comes *before* the present check, so INT n from
    #    CPL3 into a not-present DPL0 gate raises #GP, not #NP.
    if ev.source is Source.SOFTWARE and gate.dpl < st.cpl:
        raise ArchFault(Vector.GP, idt_error_code(v, ext=False),
                        why=f"gate DPL {gate.dpl} < CPL {st.cpl}")

    # 4. Present.
    if not gate.present:
        raise ArchFault(Vector.NP, gate_fault, why=f"IDT[{v}] not present")

    # 5-9. The target code segment.
    sel = gate.selector
    if sel & 0xFFFC == 0:
        raise ArchFault(Vector.GP, selector_code(0, ext=ext), why="gate selector is null")
    cs_desc = read_descriptor(mem, st, sel, ext=ext)
    if not cs_desc.is_code or cs_desc.dpl > st.cpl:
        raise ArchFault(Vector.GP, selector_code(sel, ext=ext),
                        why=f"selector {sel:#x} is not a code segment with DPL <= CPL")
    if not cs_desc.is_64bit_code:
        raise ArchFault(Vector.GP, selector_code(sel, ext=ext),
                        why=f"selector {sel:#x} is not a 64-bit code segment")
    if not cs_desc.present:
        raise ArchFault(Vector.NP, selector_code(sel, ext=ext), why=f"selector {sel:#x} not present")
    new_cpl = st.cpl if cs_desc.conforming else cs_desc.dpl

    # 10. The handler address must be canonical.
    if not is_canonical(gate.offset):
        raise ArchFault(Vector.GP, selector_code(0, ext=ext), why=f"handler {gate.offset:#x} non-canonical")

    # 11-12. Stack selection (SDM "Interrupt Stack Table"): an IST index always switches,
    # even at the same privilege; otherwise RSP[new CPL] on a privilege change; otherwise
    # the current stack. SS becomes NULL with RPL = new CPL whenever the stack is switched
    # (the SDM's IST prose; Bochs keeps SS at same-CPL IST, QEMU loads NULL|DPL).
    if gate.ist:
        stack = f"ist{gate.ist}"
        rsp = read_tss_rsp(mem, st, TSS_IST_OFFSET(gate.ist), ext=ext)
        new_ss = new_cpl
    elif new_cpl < st.cpl:
        stack = f"rsp{new_cpl}"
        rsp = read_tss_rsp(mem, st, TSS_RSP_OFFSET(new_cpl), ext=ext)
        new_ss = new_cpl
    else:
        stack = "current"
        rsp = st.rsp
        new_ss = st.ss
    if not is_canonical(rsp):
        raise ArchFault(Vector.SS, selector_code(0, ext=ext), why=f"new RSP {rsp:#x} non-canonical")

    # 13. Align, then push SS, RSP, RFLAGS, CS, RIP [, error code] — always all five in
    # 64-bit mode, privilege change or not.
    frame = frame_of(st, ev)
    sp = rsp & ~0xF
    for _name, value in reversed(frame.slots()):
        sp = (sp - 8) & (2**64 - 1)
        mem.write(sp, struct.pack("<Q", value & (2**64 - 1)), stack=True)
    new_rflags = entry_rflags(st, gate)
    return Delivery(
        event=ev,
        gate=gate,
        frame=frame,
        stack=stack,
        new_rip=gate.offset,
        new_rsp=sp,
        new_rflags=new_rflags,
        new_cs=(sel & 0xFFFC) | new_cpl,
        new_ss=new_ss,
        new_cpl=new_cpl,
        cs_descriptor=cs_desc,
    )
