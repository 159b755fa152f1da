"""Events in real-address mode, during a multiboot image's 32-bit phase.

A multiboot image starts in 32-bit protected mode on a `UC_MODE_32` engine
(cpu/boot32.py). Some images drop to real-address mode (CR0.PE = 0) on the way:
kvm-unit-tests' realmode.flat runs all its tests there. The engine executes real-mode
code, but never delivers an event: an INT n, INT3 or INTO, or an exception the code
raises, reaches its interrupt hook as a bare vector, an invalid opcode stops it with an
error, and nothing in it knows the 8259A pair. This module delivers all of them through
the interrupt vector table with the pure model (`idt.real_mode`: the IVT entry read with
its limit check, the three-word frame at SS:SP with SP wrapping, IF/TF/AC/RF cleared,
and the #DF/shutdown rules):

* software interrupts (INT n, INT3, INTO, INT1): the pushed IP is the next instruction;
  a fault while delivering one is a fault on the INT (it does not retire);
* exceptions: faults push the faulting instruction's IP (the instruction did not
  retire), traps (#DB from the engine) the next one; no error code ever;
* external interrupts: the 8259A pair's INTR (cpu/devices/pic.py; the wiring,
  cpu/interrupts.py, says when it reaches the CPU), taken at an instruction boundary
  when IF = 1 and no STI/MOV SS/POP SS shadow is in force (SDM Vol. 2 STI: "interrupts
  ... not recognized until after the instruction following STI"; Vol. 3A "Masking
  Exceptions and Interrupts When Switching Stacks"). The INTA cycle gives the vector;
  the pushed IP is the boundary's.

Finding those boundaries without Python on every instruction: a rising INTR that can
reach the CPU asks the engine to stop at the next boundary (the OUT that raised it is
then the last instruction run). While an interrupt is pending but held (IF = 0, or a
shadow), the engine runs one instruction at a time (`step`), and after each one this
module looks at the instruction it ran: an STI that set IF, or a load of SS, holds the
next boundary too. A HLT stops the engine by itself; a pending interrupt that may be
taken then wakes it, with the IP after the HLT pushed (HLT is the instruction the STI
shadow covers in `sti; hlt`).

The engine executes IRET in real mode itself (QEMU `helper_iret_real`: IP, CS, FLAGS
popped with a 16-bit stack; IRETD loads RF, AC, ID, IF, TF, IOPL and NT from the image,
the mask the SDM's real-address-mode IRET gives). No `iret` record is emitted for it.

Not modelled here: events in 32-bit protected mode (they end the run as `unsupported`,
cpu/boot32.py), NMIs and local-APIC interrupts before long mode (likewise), A20 (masked
addresses wrap at 1 MiB on a PC with A20 off; the model assumes A20 on, as a firmware
leaves it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.decode import LEGACY_PREFIXES
from cpu.outcomes import Outcome, Stop
from idt.real_mode import RealModeCpu, RealOutcome, deliver_real
from idt.state import RFLAGS_IF, Event, Source
from idt.vectors import VECTOR_INFO, Kind, Vector, vector_name

if TYPE_CHECKING:
    from cpu.engine import Engine
    from cpu.machine import Machine

CR0_PE = 1 << 0
_STI, _POP_SS, _MOV_SREG = 0xFB, 0x17, 0x8E
_SREG_SS = 2
_SS_BIG = 1 << 22  # SS.B in the descriptor cache's flags


@dataclass
class RealModeState:
    """What real-mode event delivery keeps between engine runs."""

    # The boundary (instructions retired) at which an STI/SS-load shadow holds interrupts.
    shadow_at: int | None = None
    # While stepping: (linear address, IF) of the instruction about to run.
    stepping: tuple[int, bool] | None = None


def _opcode(code: bytes) -> tuple[int, int | None]:
    """The opcode byte after the prefixes, and the ModRM byte after it (if any)."""
    i = 0
    while i < len(code) and code[i] in LEGACY_PREFIXES:
        i += 1
    if i >= len(code):
        return -1, None
    return code[i], code[i + 1] if i + 1 < len(code) else None


def opens_shadow(code: bytes, *, if_before: bool) -> bool:
    """Does the instruction at the start of `code` hold interrupts at the boundary after
    it: an STI that sets IF (STI with IF = 1 already opens none: SDM Vol. 2 STI), MOV SS
    or POP SS."""
    op, modrm = _opcode(code)
    if op == _STI:
        return not if_before
    if op == _POP_SS:
        return True
    return op == _MOV_SREG and modrm is not None and (modrm >> 3) & 7 == _SREG_SS


class RealModeEvents:
    """Event delivery for the real-mode part of the 32-bit phase (`e` is its engine)."""

    def __init__(self, m: Machine, e: Engine) -> None:
        self.m = m
        self.e = e
        self.state: RealModeState = m.state.real_mode

    # -- registers -----------------------------------------------------------------------
    def active(self) -> bool:
        """Real-address mode: CR0.PE = 0."""
        return not self.e.read_reg("cr0") & CR0_PE

    def _ip(self) -> int:
        return self.e.read_reg("rip") & 0xFFFFFFFF

    def _linear(self, ip: int) -> int:
        return self.e.segment_cache("cs")[1] + ip

    def _byte(self, linear: int) -> int | None:
        phys = self.m.phys
        return phys.read(linear, 1)[0] if phys.contains(linear) else None

    # -- delivery ------------------------------------------------------------------------
    def deliver(self, ev: Event, why: str = "") -> RealOutcome:
        """Deliver `ev` through the IVT now and record it (`deliver`, and a
        `delivery_fault` per exception its delivery met); a triple fault ends the run."""
        m, e = self.m, self.e
        ss_sel, ss_base, ss_limit, ss_flags = e.segment_cache("ss")
        eflags, esp = e.read(("rflags", "rsp"))
        _sel, idt_base, idt_limit = e.read_table("idtr")
        cpu = RealModeCpu(eflags=eflags, cs=e.read_reg("cs"), esp=esp, ss_base=ss_base,
                          ss_limit=ss_limit, stack_32=bool(ss_flags & _SS_BIG),
                          idtr_base=idt_base, idtr_limit=idt_limit)
        out = deliver_real(self, cpu, ev)
        m.after_delivery(m.intr.nmi_blocked, 0, 0,
                         ((nf.during.vector, nf.during.name, nf.fault, nf.action.value)
                          for nf in out.nested))
        if out.nested and ev.source in (Source.SOFTWARE, Source.PRIV_SOFTWARE):
            e.uncount()  # a fault while delivering an INT n is a fault on the INT
        d = out.delivery
        if d is None:
            m.emit("shutdown", reason=out.shutdown_reason)
            raise Stop(Outcome.SHUTDOWN, out.shutdown_reason or "shutdown", ev.insn_rip)
        m.count_event(ev.insn_rip, "deliveries (runaway event storm, e.g. a handler that "
                      "returns to its own fault)")
        for address, word in zip(d.slots, (d.ip, d.cs, d.flags), strict=True):
            if not m.phys.contains(address, 2):
                raise Stop(Outcome.OUTSIDE_MEMORY, f"real-mode delivery of {d.event.name}: "
                           f"push at physical {address:#x}", ev.insn_rip)
            m.phys.write(address, word.to_bytes(2, "little"))
        e.load_real_segment("cs", d.new_cs)
        e.write({"rip": d.new_ip, "rsp": d.new_esp, "rflags": d.new_eflags})
        e.patch_context(clear_stale_exception=True)  # Unicorn issue #1883 (cpu/engine.py)
        self.state.shadow_at = None  # a delivered event ends any shadow
        rec = m.emit("deliver", vector=d.event.vector, name=d.event.name,
                     source=d.event.source.trace_name, error_code=None, rip=d.ip, cs=d.cs,
                     rflags=d.flags, old_rsp=d.old_esp, ss=ss_sel, rsp=d.new_esp,
                     stack="current", handler=(d.new_cs << 4) + d.new_ip, cpl=0,
                     depth=m.state.frames.depth, real_mode=True, handler_cs=d.new_cs,
                     handler_ip=d.new_ip)
        if out.double_fault_of is not None:
            rec["double_fault_of"] = list(out.double_fault_of)
        if why:
            rec["why"] = why
        e.cycles += m.profile.event("deliver_same_cpl")
        return out

    def read(self, address: int, size: int) -> bytes:
        """`idt.real_mode.RealMemory`: the IVT, in physical memory (paging is off)."""
        if not self.m.phys.contains(address, size):
            raise Stop(Outcome.OUTSIDE_MEMORY, f"real-mode IVT read at physical {address:#x}",
                       self._ip())
        return self.m.phys.read(address, size)

    def exception(self, vector: int, is_int: bool) -> None:
        """The engine's interrupt hook reported `vector` (and QEMU's INT-instruction flag):
        deliver it. Faults did not retire (the count is taken back)."""
        ip = self._ip()
        if is_int:
            start = ip - 1 if self._byte(self._linear(ip - 1)) in (0xCC, 0xCE) and \
                vector in (Vector.BP, Vector.OF) else ip - 2
            self.deliver(Event(vector, Source.SOFTWARE, ip, start))
            return
        if vector == Vector.DB and self._byte(self._linear(ip)) == 0xF1:
            # INT1 (ICEBP): the engine raises it before the instruction; it is a trap.
            self.deliver(Event(vector, Source.PRIV_SOFTWARE, ip + 1, ip))
            return
        info = VECTOR_INFO.get(vector)
        if info is not None and info.kind is Kind.FAULT and vector != Vector.DB:
            self.e.uncount()  # a fault: the instruction does not retire
        self.deliver(Event.exception(vector, ip), why=f"raised by the engine in real mode "
                     f"({vector_name(vector)})")

    def invalid_opcode(self) -> None:
        """The engine stopped on an instruction it cannot decode: #UD, a fault."""
        self.e.uncount()
        ip = self._ip()
        self.deliver(Event.exception(Vector.UD, ip), why="invalid opcode")

    # -- external interrupts --------------------------------------------------------------
    def _interrupt_waiting(self) -> bool:
        return self.m.wires.pic_reaches_cpu() and self.m.state.platform.pic.intr

    def _can_take(self) -> bool:
        return bool(self.e.read_reg("rflags") & RFLAGS_IF) and \
            self.state.shadow_at != self.e.icount

    def step(self) -> int | None:
        """Before a run: the instruction count to stop at when an interrupt is waiting but
        held (run one instruction, then look again), else None."""
        st = self.state
        st.stepping = None
        if not self._interrupt_waiting():
            return None
        ip = self._ip()
        st.stepping = (self._linear(ip), bool(self.e.read_reg("rflags") & RFLAGS_IF))
        return self.e.icount + 2

    def stepped(self, before: int) -> None:
        """After a run that started at `before` retired instructions: if it ran exactly
        the one instruction `step` looked at, note the shadow that instruction opens."""
        st = self.state
        if st.stepping is None or self.e.icount != before + 1:
            return
        linear, if_before = st.stepping
        code = self.m.phys.read(linear, 4) if self.m.phys.contains(linear, 4) else b""
        if opens_shadow(code, if_before=if_before):
            st.shadow_at = self.e.icount

    def boundary(self, *, halted: bool = False) -> bool:
        """At an instruction boundary: take a waiting external interrupt when IF = 1 and
        no shadow holds it. `halted`: the boundary after a HLT (a delivery wakes it).
        True when an interrupt was delivered."""
        if not self.active() or not self._interrupt_waiting() or not self._can_take():
            return False
        m = self.m
        pic = m.state.platform.pic
        vector = pic.acknowledge()
        ip = self._ip()
        if halted:
            m.emit("wake", by="interrupt", vector=vector)
        self.deliver(Event(vector, Source.INTERRUPT, ip, ip))
        return True
