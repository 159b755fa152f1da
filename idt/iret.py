"""IRETQ in 64-bit mode (SDM Vol. 2A "IRET/IRETD/IRETQ", Vol. 3A "NMI Handling").

The NMI rule, first: **any** IRET clears NMI blocking, and it does so *before* its own
checks, so an IRET that faults still leaves NMIs unblocked (SDM Vol. 3A "Handling
Multiple NMIs"; older editions give the V86 IOPL<3 IRET #GP example). This is the line
QEMU gets wrong (it clears the mask only after a successful IRET) and Bochs gets right
without a comment. Do not move it below the pops or the checks.

Then, still before anything is popped, the IA-32e-mode rule on the *current* RFLAGS:
"IF EFLAGS.NT = 1 and IA32_EFER.LMA = 1 THEN #GP(0)" (Vol. 2 IRET, "Operation"; there is
no task return in IA-32e mode). The NT bit of the *popped* image is not checked: it is
loaded like the other flags.

Then the pops (RIP, CS, RFLAGS, RSP, SS — 64-bit mode always pops SS:RSP) and the
protected-mode return checks on CS and SS, then the target RIP's canonical check (and,
for a 32-bit compatibility-mode target, the CS limit). A 16-bit code segment target
raises `Unsupported` (an outcome, not a crash).

Last, a return to an outer privilege level (RETURN-TO-OUTER-PRIVILEGE-LEVEL) nulls the
data segment registers the new CPL may not use: "FOR each SegReg in (ES, FS, GS, and DS)
DO tempDesc <- descriptor cache for SegReg; IF (SegmentSelector == NULL) OR (tempDesc(DPL)
< CPL AND tempDesc(Type) is (data or non-conforming code)) THEN SegReg <- NULL". The pure
part is `segments_to_null`; `IretResult.null_segments` names the registers whose
selector becomes 0, from the caches the caller put in `ArchState.data_segments` (none
when the caller gives none). A conforming code segment and a segment of DPL >= the new
CPL are kept. In 64-bit mode nothing else about a null DS/ES/FS/GS matters to the
processor (FS/GS keep their bases, Vol. 3A "Segment Loading Instructions in IA-32e
Mode"), so loading the selector 0 is all the caller has to do.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from idt.deliver import read_descriptor
from idt.error_codes import selector_code
from idt.state import (
    RFLAGS_AC,
    RFLAGS_CF,
    RFLAGS_DF,
    RFLAGS_FIXED1,
    RFLAGS_ID,
    RFLAGS_IF,
    RFLAGS_IOPL,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VIF,
    RFLAGS_VIP,
    ArchFault,
    ArchState,
    DataSegment,
    SystemMemory,
    is_canonical,
)
from idt.vectors import Vector

# Arithmetic flags and the rest of what POPF/IRET may write at CPL0 (VM is 0 in 64-bit
# mode IRET; reserved bits read as 0 except bit 1).
_STATUS = RFLAGS_CF | 0x4 | 0x10 | 0x40 | 0x80 | 0x800
_WRITABLE = (_STATUS | RFLAGS_TF | RFLAGS_IF | RFLAGS_DF | RFLAGS_IOPL | RFLAGS_NT | RFLAGS_RF
             | RFLAGS_AC | RFLAGS_VIF | RFLAGS_VIP | RFLAGS_ID)


def _limit_bytes(limit: int, granular: int) -> int:
    """The last valid offset of a segment (G = 1: the limit counts 4-KiB pages)."""
    return (limit << 12) | 0xFFF if granular else limit


class UnsupportedIret(Exception):
    """IRET forms idtlab does not model (compatibility-mode targets)."""


# The order of the SDM's loop (it matters only for the order of `null_segments`).
DATA_SEGMENT_REGISTERS = ("es", "fs", "gs", "ds")


@dataclass(frozen=True)
class IretResult:
    nmi_unblocked: bool
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int
    cpl: int
    # Data segment registers whose selector becomes NULL (0): RETURN-TO-OUTER-PRIVILEGE-
    # LEVEL, from `ArchState.data_segments` (empty on a return to the same CPL).
    null_segments: tuple[str, ...] = ()


def segments_to_null(new_cpl: int, segments: Mapping[str, DataSegment]) -> tuple[str, ...]:
    """The data segment registers an IRET (or RET far) to the outer level `new_cpl` nulls,
    in the SDM's order (ES, FS, GS, DS): a non-zero null selector (index 0, TI 0, any RPL),
    or a data or non-conforming code segment whose cached DPL is below `new_cpl`. A
    register already holding selector 0 is left out (nulling it changes nothing)."""
    out: list[str] = []
    for name in DATA_SEGMENT_REGISTERS:
        seg = segments.get(name)
        if seg is None or seg.selector == 0:
            continue
        if seg.selector & 0xFFFC == 0 or (
                seg.dpl < new_cpl and (not seg.is_code or not seg.conforming)):
            out.append(name)
    return tuple(out)


def iret64(mem: SystemMemory, st: ArchState) -> IretResult:
    """Execute IRETQ on `st`. Clears `st.nmi_blocked` first, whatever happens next.

    Raises `ArchFault` (the IRET is then the faulting instruction) — with NMIs already
    unblocked; the caller reads `st.nmi_blocked` to know.
    """
    nmi_unblocked = st.nmi_blocked
    st.nmi_blocked = False  # SDM: before the checks; a faulting IRET still unblocks NMIs

    # IA-32e mode has no task return: NT = 1 in the RFLAGS in force (not the popped
    # image) is #GP(0), before anything is popped.
    if st.rflags & RFLAGS_NT:
        raise ArchFault(Vector.GP, 0, why="IRETQ with RFLAGS.NT = 1 in IA-32e mode")

    user = st.cpl == 3
    raw = mem.read(st.rsp, 40, user=user, stack=True)
    rip, cs, rflags, rsp, ss = struct.unpack("<5Q", raw)
    cs &= 0xFFFF
    ss &= 0xFFFF

    # Return code segment (SDM IRET pseudocode, PROTECTED-MODE-RETURN).
    if cs & 0xFFFC == 0:
        raise ArchFault(Vector.GP, 0, why="IRET to a null CS")
    cs_desc = read_descriptor(mem, st, cs, ext=False)
    rpl = cs & 3
    if not cs_desc.is_code:
        raise ArchFault(Vector.GP, selector_code(cs, ext=False), why=f"IRET CS {cs:#x} not code")
    if rpl < st.cpl:
        raise ArchFault(Vector.GP, selector_code(cs, ext=False),
                        why=f"IRET to CS.RPL {rpl} < CPL {st.cpl}")
    if cs_desc.conforming and cs_desc.dpl > rpl:
        raise ArchFault(Vector.GP, selector_code(cs, ext=False), why="conforming CS DPL > RPL")
    if not cs_desc.conforming and cs_desc.dpl != rpl:
        raise ArchFault(Vector.GP, selector_code(cs, ext=False),
                        why=f"IRET CS {cs:#x}: DPL {cs_desc.dpl} != RPL {rpl}")
    if not cs_desc.present:
        raise ArchFault(Vector.NP, selector_code(cs, ext=False), why=f"IRET CS {cs:#x} not present")
    if not cs_desc.is_64bit_code and not (cs_desc.is_code and cs_desc.db and not cs_desc.l):
        raise UnsupportedIret(f"IRET to 16-bit compatibility-mode CS {cs:#x} is not modelled")

    # Stack segment: 64-bit mode pops SS:RSP on every IRET. A null SS is allowed only
    # when returning to a 64-bit segment at CPL < 3.
    if ss & 0xFFFC == 0:
        if rpl == 3:
            raise ArchFault(Vector.GP, 0, why="IRET to CPL3 with a null SS")
    else:
        ss_desc = read_descriptor(mem, st, ss, ext=False)
        if (ss & 3) != rpl or not ss_desc.writable or ss_desc.dpl != rpl:
            raise ArchFault(Vector.GP, selector_code(ss, ext=False),
                            why=f"IRET SS {ss:#x} not a writable data segment at RPL {rpl}")
        if not ss_desc.present:
            raise ArchFault(Vector.SS, selector_code(ss, ext=False), why=f"IRET SS {ss:#x} not present")

    if not is_canonical(rip):
        raise ArchFault(Vector.GP, 0, why=f"IRET to non-canonical RIP {rip:#x}")
    if not cs_desc.is_64bit_code and rip > _limit_bytes(cs_desc.limit, cs_desc.g):
        # A compatibility-mode target: EIP within the CS limit (IRET pseudocode,
        # RETURN-TO-OUTER/SAME-PRIVILEGE-LEVEL: "IF tempEIP is not within CS limit").
        raise ArchFault(Vector.GP, 0, why=f"IRET to RIP {rip:#x} beyond CS limit")

    # RFLAGS: IOPL, VIF and VIP change only at CPL0; IF only when CPL <= IOPL (SDM IRET
    # "Operation": "IF CPL = 0 THEN EFLAGS(IOPL) <- tempEFLAGS; EFLAGS(VIF, VIP) <-
    # tempEFLAGS"; Bochs iret.cc: "VIF, VIP, IOPL only changed if CPL == 0").
    writable = _WRITABLE
    if st.cpl > 0:
        writable &= ~(RFLAGS_IOPL | RFLAGS_VIF | RFLAGS_VIP)
    if st.cpl > (st.rflags & RFLAGS_IOPL) >> 12:
        writable &= ~RFLAGS_IF
    new_rflags = (st.rflags & ~writable) | (rflags & writable) | RFLAGS_FIXED1
    nulled = segments_to_null(rpl, st.data_segments) if rpl > st.cpl else ()
    return IretResult(nmi_unblocked, rip, cs, new_rflags, rsp, ss, rpl, nulled)
