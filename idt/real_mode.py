"""Event delivery in real-address mode: the interrupt vector table.

In real-address mode (CR0.PE = 0) there are no gates, no privilege levels and no error
codes. The "IDT" is the interrupt vector table (IVT): 256 four-byte entries, each a
16-bit offset followed by a 16-bit segment selector, at IDTR.base (0 after reset; LIDT
moves it in real mode too). SDM Vol. 3B "Interrupt and Exception Handling" in the
chapter "8086 Emulation" (Real-Address Mode), and Vol. 2 INT n/INTO/INT3/INT1, the
REAL-ADDRESS-MODE part of the pseudo-code:

    IF ((vector_number << 2) + 3) is not within IDT limit
        THEN #GP; FI;
    IF stack not large enough for a 6-byte return information
        THEN #SS; FI;
    Push (EFLAGS[15:0]);
    IF <- 0; TF <- 0; AC <- 0;
    Push (CS);
    Push (IP);
    (* No error codes are pushed in real-address mode *)
    CS <- IDT(Descriptor (vector_number << 2), selector));
    EIP <- IDT(Descriptor (vector_number << 2), offset)); (* 16 bit offset AND 0000FFFFH *)

The same steps serve every event: INT n, INT3, INTO and INT1 (the pushed IP is the next
instruction's), a fault (the faulting instruction's IP, and no error code even for #GP,
#SS or #DF), and an external interrupt or NMI (the interrupted boundary's IP).

The decisions this module makes where the pseudo-code is silent (docs/sdm-map.md,
"Real-address mode"):

* The stack check is made on each of the three word slots before anything is written:
  a word at offset o must satisfy o + 1 <= SS.limit. With a 16-bit stack (SS.B = 0, what
  a real-mode load of SS leaves) SP wraps: SP = 0 pushes at 0xFFFE, 0xFFFC, 0xFFFA and
  leaves SP = 0xFFFA; SP = 1 puts the first word at 0xFFFF, which crosses the limit:
  #SS. That is the SDM's PUSH note ("If the ESP or SP register is 1 when the PUSH
  instruction is executed in real-address mode, a stack-fault exception (#SS) is
  generated ... Its delivery encounters a second stack-fault exception ..., causing
  generation of a double-fault exception (#DF). Delivery of the double-fault exception
  encounters a third stack-fault exception, and the logical processor enters shutdown
  mode"). Only SP (the low 16 bits of ESP) changes with a 16-bit stack. With SS.B = 1
  (a big stack left over from protected mode) ESP is used, as Bochs' `push_16` does.
* The #DF rules are those of every mode (Vol. 3A Table "Conditions for Generating a
  Double Fault", `idt.double_fault.combine`): #GP and #SS are contributory, so an IVT
  limit too small for the event (the classic "LIDT with limit 0, then INT") gives #GP,
  whose own entry is past the limit too: #DF, and then shutdown. A fault while
  delivering a software interrupt or an external interrupt is delivered instead of it
  (serial), with the IP of the instruction that caused the first event.
* RF: the pushed image is FLAGS[15:0], which has no RF; EFLAGS.RF is cleared on entry,
  as Bochs' `real_mode_int` does (in protected mode every gate clears it as well).
* The handler's segment base is selector * 16; its limit and attributes stay what they
  were (real-mode segment loads change only the selector and the base: Bochs
  `load_seg_reg` in real mode, QEMU `do_interrupt_real`). Bochs also raises #GP when the
  new IP is above CS.limit, which can only happen with a CS limit below 0xFFFF; the
  pseudo-code has no such check, and this model follows the pseudo-code.

Pure: the caller supplies the registers (`RealModeCpu`) and a reader of physical memory
(`RealMemory`; paging is off in real mode, linear = physical), and applies the result
(`RealDelivery`: the frame bytes and where they go, the new CS:IP, SP and FLAGS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from idt.double_fault import Combine, NestedFault, combine
from idt.state import RFLAGS_AC, RFLAGS_IF, RFLAGS_RF, RFLAGS_TF, ArchFault, Event, Source
from idt.vectors import Vector

IVT_ENTRY_SIZE = 4
FRAME_SIZE = 6  # IP, CS, FLAGS: three words
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
# EFLAGS bits real-mode delivery clears (SDM Vol. 2 INT n: IF, TF, AC; RF: see above).
CLEARED_ON_ENTRY = RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | RFLAGS_RF


class RealMemory(Protocol):
    """Physical memory as real-mode delivery reads it (the IVT)."""

    def read(self, address: int, size: int) -> bytes:
        ...


@dataclass(frozen=True)
class RealModeCpu:
    """The registers real-mode delivery reads: EFLAGS, CS, the stack, IDTR."""

    eflags: int
    cs: int
    esp: int
    ss_base: int
    ss_limit: int = _U16
    stack_32: bool = False  # SS.B: ESP instead of SP
    idtr_base: int = 0
    idtr_limit: int = 0x3FF


@dataclass(frozen=True)
class RealDelivery:
    """One successful delivery through the IVT."""

    event: Event
    ip: int          # the IP pushed (slot at the new SP)
    cs: int          # the CS pushed (new SP + 2)
    flags: int       # the FLAGS pushed (new SP + 4)
    old_esp: int
    new_esp: int
    frame_address: int   # linear address of the IP slot (the lowest of the three)
    frame: bytes         # the six bytes written there, IP first (little-endian words)
    new_cs: int
    new_ip: int
    new_eflags: int
    # Linear addresses of the IP, CS and FLAGS slots: a 16-bit stack may wrap between
    # them, so `frame` is contiguous only when these are.
    slots: tuple[int, int, int]


@dataclass
class RealOutcome:
    """A delivery (possibly of another event than asked: a nested fault, #DF) or a
    shutdown."""

    delivery: RealDelivery | None
    nested: list[NestedFault] = field(default_factory=list)
    double_fault_of: tuple[int, int] | None = None
    shutdown_reason: str | None = None


def _stack_slots(cpu: RealModeCpu) -> tuple[list[int], int]:
    """Offsets in SS of the FLAGS, CS and IP words (push order) and the new stack
    pointer; #SS when a word crosses SS.limit."""
    mask = _U32 if cpu.stack_32 else _U16
    sp = cpu.esp & mask
    offsets = []
    for _ in range(3):
        sp = (sp - 2) & mask
        if sp + 1 > cpu.ss_limit:
            raise ArchFault(Vector.SS, 0, why=f"real-mode push at SS:{sp:#x} crosses the "
                            f"stack-segment limit {cpu.ss_limit:#x}")
        offsets.append(sp)
    new_esp = sp if cpu.stack_32 else (cpu.esp & ~_U16 & _U32) | sp
    return offsets, new_esp


def deliver_once(mem: RealMemory, cpu: RealModeCpu, ev: Event) -> RealDelivery:
    """Deliver `ev` through the IVT, or raise the `ArchFault` its delivery meets."""
    vector = ev.vector
    entry = cpu.idtr_base + vector * IVT_ENTRY_SIZE
    if vector * IVT_ENTRY_SIZE + 3 > cpu.idtr_limit:
        raise ArchFault(Vector.GP, 0, why=f"IVT entry {vector:#x} (bytes {vector * 4:#x}-"
                        f"{vector * 4 + 3:#x}) is past the IDTR limit {cpu.idtr_limit:#x}")
    offsets, new_esp = _stack_slots(cpu)
    raw = mem.read(entry, IVT_ENTRY_SIZE)
    new_ip = int.from_bytes(raw[0:2], "little")
    new_cs = int.from_bytes(raw[2:4], "little")
    ip = ev.return_rip & _U16
    cs = cpu.cs & _U16
    flags = cpu.eflags & _U16
    flags_off, cs_off, ip_off = offsets
    frame = ip.to_bytes(2, "little") + cs.to_bytes(2, "little") + flags.to_bytes(2, "little")
    slots = (cpu.ss_base + ip_off, cpu.ss_base + cs_off, cpu.ss_base + flags_off)
    return RealDelivery(
        event=ev, ip=ip, cs=cs, flags=flags, old_esp=cpu.esp, new_esp=new_esp,
        frame_address=slots[0], frame=frame, new_cs=new_cs, new_ip=new_ip,
        new_eflags=cpu.eflags & ~CLEARED_ON_ENTRY & _U32, slots=slots)


def deliver_real(mem: RealMemory, cpu: RealModeCpu, ev: Event) -> RealOutcome:
    """Deliver `ev` in real-address mode with the #DF/shutdown rules: a fault during
    delivery is combined with the event being delivered (`idt.double_fault.combine`)."""
    out = RealOutcome(delivery=None)
    current = ev
    while True:
        try:
            out.delivery = deliver_once(mem, cpu, current)
            return out
        except ArchFault as fault:
            action = combine(current, fault.vector)
            out.nested.append(NestedFault(current, fault, action))
            if action is Combine.SHUTDOWN:
                out.shutdown_reason = f"triple fault: {fault} while delivering #DF"
                return out
            if action is Combine.DOUBLE_FAULT:
                out.double_fault_of = (int(current.vector), int(fault.vector))
                current = Event(Vector.DF, Source.EXCEPTION, current.insn_rip,
                                current.insn_rip, None)
            else:
                current = Event(fault.vector, Source.EXCEPTION, current.insn_rip,
                                current.insn_rip, None)
