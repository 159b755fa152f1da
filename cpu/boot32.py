"""A multiboot image's 32-bit entry phase, on a 32-bit engine.

The multiboot specification enters the image in 32-bit protected mode (flat CS/DS,
paging and interrupts off, EAX = 0x2BADB002, EBX = the information). idtlab models
events from long mode on, so this phase only runs the image until it reaches 64-bit
code: a `UC_MODE_32` engine executes it (Unicorn's 64-bit engine cannot leave long
mode), and at its first 64-bit block the CPU state and the counters migrate to the
machine's own 64-bit engine (`Engine.migrate_from`) and the ordinary run loop takes
over (`mode_switch` record).

The same devices answer its port accesses and CPUID, and the same exit check ends the
run when it writes an exit port (`Platform.check_exit`). Code that drops to real-address
mode (CR0.PE = 0) has its events delivered through the interrupt vector table
(cpu/real_mode.py): INT n, exceptions, and the 8259A pair's interrupts, which also wake
a HLT. Everything else the phase cannot model ends the run with a clear outcome: an
exception or a pending event in protected mode ("events are modelled in real-address
mode and from the switch to 64-bit mode on"), paging without long mode, a HLT nothing
can wake, an access outside RAM, the instruction limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cpu.engine import ERR_INSN_INVALID, Engine
from cpu.events import AtCycle, AtIcount, Injection, Interrupt, Nmi
from cpu.multiboot import (
    CR0_PG,
    EFER_LMA,
    ENTRY_CR0,
    ENTRY_CS,
    ENTRY_DS,
    ENTRY_EFLAGS,
    ENTRY_GDT,
    MB_BOOT_MAGIC,
    MSR_EFER,
)
from cpu.outcomes import Outcome, Stop
from cpu.real_mode import RealModeEvents
from cpu.smsw import Smsw32
from cpu.stale_rf import clear_stale_rf
from idt.vectors import vector_name

if TYPE_CHECKING:
    from cpu.machine import Machine

_LATER = "events are modelled in real-address mode and from the switch to 64-bit mode on"


def _event_name(inj: Injection) -> str:
    if isinstance(inj.event, Nmi):
        return "an injected NMI"
    if isinstance(inj.event, Interrupt):
        return f"an injected interrupt ({inj.event.vector:#x})"
    return f"an injected {inj.event.kind if inj.event is not None else 'pause'}"


def _point_text(inj: Injection) -> str:
    """The point as the pre-typed `Injection.point` dict printed."""
    return str(dict(inj.where))


def run(m: Machine) -> None:
    """Run the image from its 32-bit entry until it is in 64-bit mode, then move the CPU to
    the machine's 64-bit engine (`m.engine`). Raises `Stop` for every other end of the
    32-bit phase (the run then ends with that outcome)."""
    boot = m.multiboot
    assert boot is not None and not boot.done
    e64 = m.engine
    # Per-instruction counting in both modes (the phase is short): a stop requested by a
    # port write (an exit port) then lands exactly after the OUT.
    e32 = Engine(m.phys, bits=32, windows=e64.windows)
    e32.set_cost_mode(timed=False, default_cost=m.profile.cycles_per_instruction)
    e32.counter.count = e64.counter.count
    e32.counter.cycles = e64.counter.cycles
    e32.code_reader = m.code_bytes
    e32.port_in = m.platform.port_in
    e32.port_out = m.platform.port_out
    e32.cpuid = m.model.cpuid  # (leaf, subleaf)
    # The TSC at an RDTSC: the cycles before it (the counter has counted it) plus the offset.
    e32.tsc = lambda: m.model.msrs.tsc_at(int(e32.counter.cycles) - int(e32.counter.last_cost))
    why: list[tuple[str, Any]] = []  # what stopped the engine, set by the callbacks
    saved: list[tuple[int, int]] = []

    def on_interrupt(vector: int) -> None:
        why.append(("exception", vector))
        e32.stop()

    def on_unmapped(paddr: int, access: Any) -> None:
        why.append(("unmapped", (paddr, access)))

    def on_block(address: int, size: int) -> None:
        clear_stale_rf(e32)  # Unicorn's PUSHF would store it (cpu/stale_rf.py)
        cr0 = e32.read_reg("cr0")
        c = e32.counter
        if not cr0 & CR0_PG:
            if smsw.scan(address, size):
                # A new SMSW site: run the block again with its hook (cpu/smsw.py).
                saved.append((int(c.count), int(c.cycles)))
                why.append(("site", address))
                e32.stop()
            return
        if not e32.read_msr(MSR_EFER) & EFER_LMA:
            why.append(("paging", address))
        elif e32.in_64bit_mode():
            why.append(("long_mode", address))
        else:
            return  # compatibility mode: long mode is on, the code is still 32-bit
        # Stop before this block runs (whatever the counter adds for it is taken back).
        saved.append((int(c.count), int(c.cycles)))
        e32.stop()

    smsw = Smsw32(e32, m.phys)
    e32.interrupt = on_interrupt
    e32.unmapped = on_unmapped
    e32.block = on_block

    e32.write_table("gdtr", 0, boot.info.gdt, 8 * len(ENTRY_GDT) - 1)
    e32.write({"cr0": ENTRY_CR0, "cr4": 0})
    e32.write({"cs": ENTRY_CS, "ds": ENTRY_DS, "es": ENTRY_DS, "fs": ENTRY_DS, "gs": ENTRY_DS,
               "ss": ENTRY_DS})
    e32.write({"rax": MB_BOOT_MAGIC, "rbx": boot.info.address, "rcx": 0, "rdx": 0, "rsi": 0,
               "rdi": 0, "rbp": 0, "rsp": 0, "rflags": ENTRY_EFLAGS, "rip": boot.image.entry})
    m.engine = e32
    m.emit("boot", protocol="multiboot", entry=boot.image.entry, info=boot.info.address,
           eax=MB_BOOT_MAGIC, cmdline=boot.info.cmdline.decode("latin-1"))

    def eip() -> int:
        return e32.read_reg("rip")

    real = RealModeEvents(m, e32)

    while True:
        if m.intr.nmi_pending or (m.apic is not None and m.apic.pending_vector() is not None):
            raise Stop(Outcome.UNSUPPORTED, f"an event is pending in 32-bit mode; {_LATER}",
                       eip())
        due = [inj for inj in m.state.injections.waiting if not inj.fired]
        stop_at = m.max_insns + 1
        stop_cycle = 2**64 - 1
        for inj in due:
            if isinstance(inj.point, AtIcount):
                stop_at = min(stop_at, inj.point.icount + 1)
            elif isinstance(inj.point, AtCycle):
                stop_cycle = min(stop_cycle, inj.point.cycle)
            else:
                raise Stop(Outcome.UNSUPPORTED, f"{_event_name(inj)} pending at the 32-bit "
                           f"entry: {_LATER}", eip())
        step = real.step()  # an interrupt waits: one instruction at a time
        e32.set_stop_at(stop_at if step is None else min(stop_at, step))
        e32.set_stop_cycle(stop_cycle)
        why.clear()
        saved.clear()
        before = e32.icount
        err = e32.run(eip())
        by_counter = e32.stopped_by_counter
        if saved:
            e32.counter.count, e32.counter.cycles = saved[-1]
        elif by_counter:
            e32.uncount()  # counted, not executed: the boundary before it
        kind: str = ""
        arg: Any = None
        if why:
            kind, arg = why[-1]
        m.platform.check_exit()
        if kind == "long_mode":
            break
        if kind == "site":
            continue
        if kind == "paging":
            raise Stop(Outcome.UNSUPPORTED, "paging enabled without long mode (32-bit or PAE "
                       f"paging) at {arg:#x}: only 4-level paging in long mode is modelled", arg)
        if kind == "exception":
            is_int = e32.exception_info()[1]
            if real.active():
                real.exception(arg, is_int)
                real.boundary()
                continue
            if not is_int:
                e32.uncount()  # a fault: the instruction did not retire (INT n / INT3 did)
            raise Stop(Outcome.UNSUPPORTED, f"an exception in 32-bit protected mode: "
                       f"{vector_name(arg)} (vector {arg}) at {eip():#x}; {_LATER}", eip())
        if kind == "unmapped":
            paddr, access = arg
            raise Stop(Outcome.OUTSIDE_MEMORY, f"{access.name.lower()} of physical {paddr:#x} "
                       "in 32-bit mode", eip())
        if by_counter:
            if e32.icount >= m.max_insns:
                raise Stop(Outcome.MAX_INSNS, f"instruction limit {m.max_insns} reached", eip())
            for inj in due:
                p = inj.point
                if (isinstance(p, AtIcount) and e32.icount >= p.icount) or (
                        isinstance(p, AtCycle) and e32.cycles >= p.cycle):
                    raise Stop(Outcome.UNSUPPORTED, f"{_event_name(inj)} arrives in 32-bit mode "
                               f"({_point_text(inj)}); {_LATER}", eip())
            real.stepped(before)
            real.boundary()
            continue
        if err is not None:
            if err == ERR_INSN_INVALID and real.active():
                real.invalid_opcode()
                continue
            if err == ERR_INSN_INVALID:
                e32.uncount()
                raise Stop(Outcome.UNSUPPORTED, f"an exception in 32-bit protected mode: #UD "
                           f"(vector 6) at {eip():#x}; {_LATER}", eip())
            raise Stop(Outcome.UNSUPPORTED, f"engine error {err} in 32-bit mode at {eip():#x}",
                       eip())
        hlt = e32.segment_cache("cs")[1] + eip() - 1  # a HLT stops the engine after it
        if m.phys.contains(hlt) and m.phys.read(hlt, 1) == b"\xf4":
            if real.boundary(halted=True):
                continue  # an interrupt woke the CPU (the IP after the HLT was pushed)
            raise Stop(Outcome.HLT, "HLT in 32-bit mode with no event that can wake the CPU",
                       eip())
        raise Stop(Outcome.UNSUPPORTED, f"engine stopped unexpectedly in 32-bit mode at "
                   f"{eip():#x}", eip())

    # The guest is in 64-bit mode: the machine's own engine takes over.
    cs = e32.read_reg("cs")
    rip = eip()
    e64.migrate_from(e32)
    m.engine = e64
    m.state.regs.cpl = cs & 3
    m.regs.forget()
    boot.done = True
    m.emit("mode_switch", **{"from": "32-bit", "to": "64-bit"}, rip=rip, cs=cs)
