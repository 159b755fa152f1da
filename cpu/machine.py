"""The machine: the components wired together, the run loop, and event delivery.

Run loop (QEMU's `cpu_exec` in miniature)::

    while True:
        at the boundary: arrivals, due sources, deliver what blocking allows  (boundary)
        if halted: wait for the next deadline                                 (boundary)
        run the engine until a hook stops it or the counter does              (engine)
        interpret the stop: a fault, a site, a port, a limit                  (stops)

Unicorn runs at full speed until a hook stops it at an *event boundary*; Python never
runs per instruction on this path. Everything the architecture does at a boundary is
`deliver` (apply the pure model's answer in `idt/`, record it, charge its cycles) or a
component's business:

    cpu/layout.py        GDT, TSS, IDT, page tables; set_gate, set_tss, set_page
    cpu/registers.py     control/table registers per stop, CPL, CS/SS loads, ArchState
    cpu/translation.py   TLB fills, the two-stage walk, guest memory for delivery/IRET
    cpu/sites.py         the instructions the machine must see (IRET, HLT, MSR, ...)
    cpu/stops.py         what an engine stop means (faults, sites, #UD, outside RAM)
    cpu/emulated.py      IRET, HLT, RDMSR/WRMSR, CPUID, MOV CR, RDPMC executed in Python
    cpu/checked_sites.py XSETBV, LGDT/LIDT/LLDT/LTR, WRFSBASE, UMIP: checked, then native
    cpu/cpu_model.py     the declared CPU model: CPUID leaves as data
    cpu/msrs.py          the MSR table
    cpu/control_regs.py  CR0/CR3/CR4/CR8/XCR0 write rules
    cpu/canonical.py     canonical checks on loaded base addresses
    cpu/boundary.py      arbitration, shadows, HLT, deadlines
    cpu/debug.py         #DB traps the engine does not raise, the debug registers
    cpu/alignment.py     #AC: the native look at RFLAGS.AC, the check before the instruction
    cpu/injections.py    scheduled events and arrival counting
    cpu/frames.py        live frames, overwrite reports, CR2 observation
    cpu/platform.py      ports, UART, fw_cfg, exit devices
    cpu/progress.py      an IRET loop that makes no progress ends the run
    cpu/mmio.py          device register pages (local APIC, I/O APIC, HPET)
    cpu/interrupts.py    the wires: ISA lines -> I/O APIC -> local APIC -> CPU
    cpu/vmx.py           EPT violations: #VE or VM exit and the host's answer
    cpu/vmx_exits.py     VM exits on events, IDT-vectoring info, VM-entry injection
    cpu/apf_host.py      the KVM async-#PF host
    cpu/fred.py          FRED: delivery without the IDT, ERETS/ERETU, the FRED MSRs
    cpu/boot32.py        a multiboot image's 32-bit entry phase
    cpu/state.py         every component's mutable state in one object (checkpoints)

Instruction counting: the native counter counts each instruction *before* it executes.
When the engine stops on an instruction that did not complete (a fault, an intercepted
IRET/HLT before emulation, the limit), that instruction is subtracted; an emulated IRET
or HLT then counts as retired. `icount` in the trace is always "instructions retired".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cpu import boot32, snapshot
from cpu.alignment import AlignmentCheck
from cpu.apf_host import ApfHost, ApfHostState, ApfPolicy
from cpu.board import PC, BoardConfig
from cpu.boundary import BoundaryState, EventBoundary
from cpu.checked_sites import CheckedSites
from cpu.cpu_model import CpuModel, ModelState
from cpu.debug import Debug
from cpu.decode import MAX_INSN_LENGTH, decode_one
from cpu.delivery_memo import DeliveryMemo
from cpu.devices.apf import AsyncPf
from cpu.devices.apic import APIC_BASE, LocalApic
from cpu.devices.fwcfg import FwCfg
from cpu.devices.hpet import HPET_BASE
from cpu.devices.ioapic import IOAPIC_BASE
from cpu.devices.testdev import IORAM_BASE, IORAM_SIZE
from cpu.devices.uart import Uart16550
from cpu.emulated import Emulated
from cpu.engine import ERR_INSN_INVALID, Engine
from cpu.ept import Ept, EptMisconfig, EptViolation
from cpu.events import AsyncEvent, Injection, Interrupt, Nmi, Point, make_event, make_point
from cpu.frames import Frames, FrameState
from cpu.fred import Fred, FredConfig
from cpu.injections import Injections, InjectionState
from cpu.interrupts import Wires
from cpu.layout import KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, PageSpec, SystemLayout, memory_size_problem
from cpu.memory import PhysicalMemory
from cpu.mmio import Mmio
from cpu.mmu import PagingControl
from cpu.outcomes import Outcome, RunResult, Stop
from cpu.platform import Platform
from cpu.progress import Progress
from cpu.q35 import Q35
from cpu.registers import Registers, RegisterState
from cpu.sites import SiteTable
from cpu.snapshot import Checkpoint
from cpu.state import MachineState, RunState
from cpu.stops import Stops, StopState
from cpu.timing import CostModel, Profile, load_profile
from cpu.trace import Trace
from cpu.translation import GuestMemory, Translator
from cpu.vmx import HostPolicy, Vmx, VmxConfig, VmxState
from cpu.vmx_exits import HyperState, VmExits
from idt.blocking import Interruptibility
from idt.double_fault import Combine, DeliveryOutcome
from idt.state import RFLAGS_RF, ArchFault, ArchState, Event, Source
from idt.vectors import Vector, vector_name

MODES = ("fast", "timed")

__all__ = ["MODES", "Machine"]


class _PagingSnapshot:
    """`Machine.paging_snapshot`: a plain context manager (an event's path runs it once;
    a generator-based one cost more than the rest of the bookkeeping around it)."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def __enter__(self) -> None:
        m = self.m
        m.sysmem.ctl = m.inspect.ctl = m.regs.paging()

    def __exit__(self, *exc: object) -> None:
        m = self.m
        m.sysmem.ctl = m.inspect.ctl = None


class Machine:
    """A single x86-64 CPU in long mode with Python-owned event delivery.

    Typical use (the scenario loader does exactly this)::

        >>> m = Machine(16 << 20)
        >>> m.load(0x100000, bytes.fromhex("cc f4"), code=True)   # int3; hlt
        >>> m.load(0x100040, bytes.fromhex("48 cf"), code=True)   # iretq
        >>> m.set_gate(3, handler=0x100040, ist=1)
        >>> m.set_tss(rsp0=0x80000, ist1=0x90000)
        >>> result = m.run(entry=0x100000, rsp=0x70000)
        >>> result.outcome, [d["name"] for d in result.deliveries]
        ('hlt', ['#BP'])

    Events arrive at exact points: ``m.inject(Nmi(), Before("handler", hit=2))``.
    ``m.checkpoint()`` / ``m.rollback(cp)`` return to a boundary (the race explorer).
    """

    def __init__(self, memory: int = 16 << 20, *, max_insns: int = 10_000_000,
                 max_events: int = 100_000, mode: str = "fast",
                 profile: Profile | str = "default", sti_blocks_nmi: bool = True,
                 apic: bool = True, vmx: VmxConfig | None = None,
                 board: BoardConfig = PC) -> None:
        problem = memory_size_problem(memory)
        if problem is not None:
            raise ValueError(f"guest memory {problem}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        self.mode = mode
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self._costs = CostModel(self.profile)
        self.phys = PhysicalMemory(memory)
        # pc-testdev's IORAM: plain memory at IORAM_BASE, mapped like RAM so that every
        # instruction works on it (kvm-unit-tests' emulator.c runs string ops, BT*, SSE...).
        self.ioram = PhysicalMemory(IORAM_SIZE)
        # Fast mode counts per translation block, timed mode per instruction (it needs
        # each instruction's cost); both give exact counts at every stop.
        self.engine = Engine(self.phys, block_counting=mode == "fast",
                             windows=((IORAM_BASE, self.ioram),))
        self.trace = Trace()
        self.symbols: dict[str, int] = {}
        # VMX: the second translation stage and the #VE controls (None: no VMX).
        self.vmx = vmx
        self.ept: Ept | None = Ept(memory) if vmx is not None else None
        self.on_deliver: list[Callable[[dict[str, Any]], None]] = []
        # Called with RIP at every boundary the machine holds between engine runs (where
        # it looks for events to deliver), before anything is delivered there.
        self.on_boundary: list[Callable[[int], None]] = []
        self._checkpoint: Checkpoint | None = None  # the live one (cpu.snapshot)

        # -- components, each with its state object ------------------------------------
        self.wires = Wires(self)
        self.platform = Platform(self, memory, apic=apic)
        st = MachineState(
            run=RunState(max_insns=max_insns, max_events=max_events),
            regs=RegisterState(),
            boundary=BoundaryState(intr=Interruptibility(sti_blocks_nmi=sti_blocks_nmi)),
            injections=InjectionState(),
            stops=StopState(),
            frames=FrameState(),
            model=ModelState(),
            platform=self.platform.state,
            vmx=VmxState(),
            apf=ApfHostState(),
            hyper=HyperState(),
            apic=LocalApic(on_nmi=self.wires.apic_nmi, on_event=self.wires.apic_event,
                           on_eoi=self.wires.apic_eoi) if apic else None,
        )
        self.state = st
        self.layout = SystemLayout(self)
        self.alignment = AlignmentCheck(self)
        self.regs = Registers(self, st.regs)
        self.translator = Translator(self)
        self.sysmem = GuestMemory(self)
        self._paging_snapshot = _PagingSnapshot(self)
        self.delivery_memo = DeliveryMemo(self)
        self.inspect = GuestMemory(self, architectural=False)
        self.sites = SiteTable(self)
        self.boundary = EventBoundary(self, st.boundary)
        self.injections = Injections(self, st.injections)
        self.frames = Frames(self, st.frames)
        self.model = CpuModel(self, st.model)
        self.vmx_host = Vmx(self, st.vmx)
        self.vmx_exits = VmExits(self, st.hyper)
        self.apf_host = ApfHost(self, st.apf)
        self.debug = Debug(self, st.debug)
        self.fred = Fred(self, st.fred)
        self.progress = Progress(self, st.progress)
        self.emulated = Emulated(self)
        self.checked = CheckedSites(self)
        self.stops = Stops(self, st.stops)
        self.symbols.update({"gdt": 0x1000, "tss": 0x1100, "idt": 0x2000})
        self.mmio = Mmio(self)
        if apic:
            self.symbols["apic"] = APIC_BASE
            plat = self.state.platform
            self.mmio.add(APIC_BASE, "apic",
                          lambda: self.state.apic if self.state.apic and self.state.apic.enabled
                          else None)
            self.mmio.add(IOAPIC_BASE, "ioapic", lambda: plat.ioapic)
            self.mmio.add(HPET_BASE, "hpet", lambda: plat.hpet)
        self.q35 = Q35(self, board)  # PCI, edu and the IOMMU on a q35 board (cpu/q35.py)
        self._wire(self.engine)
        if self.ept is not None:
            self.engine.remember_fills(False)  # fills depend on EPT state too

    def _wire(self, e: Engine) -> None:
        e.fill = self.translator.fill
        e.poison = self.stops.on_poison
        e.refused = self.stops.on_refused
        e.unmapped = self.stops.on_unmapped
        e.interrupt = self.stops.on_interrupt
        e.site = self.stops.on_site
        e.irets_done = self.emulated.native_irets
        e.on_run_start = self.emulated.rearm_native_iret
        e.port_in = self.platform.port_in
        e.port_out = self.platform.port_out
        e.code_reader = self.code_bytes
        e.starts_hint = self.sites.starts_within
        e.translated = self.sites.translated
        e.cpuid = self.model.cpuid
        if self.mode == "timed":
            e.set_cost_mode(timed=True, default_cost=self.profile.cycles_per_instruction,
                            miss=self._insn_cost)
        else:
            e.set_cost_mode(timed=False, default_cost=self.profile.cycles_per_instruction)

    # -- the parts users look at ---------------------------------------------------------
    @property
    def apic(self) -> LocalApic | None:
        """The local APIC (None: `Machine(apic=False)`)."""
        return self.state.apic

    @property
    def apf(self) -> AsyncPf | None:
        """The async-#PF device (None until `enable_apf`)."""
        return self.state.apf.device

    @property
    def intr(self) -> Interruptibility:
        """NMI blocking, the NMI latch and the shadow (`idt.blocking`)."""
        return self.state.boundary.intr

    @property
    def nmi_blocked(self) -> bool:
        return self.state.boundary.intr.nmi_blocked

    @nmi_blocked.setter
    def nmi_blocked(self, value: bool) -> None:
        self.state.boundary.intr.nmi_blocked = value

    @property
    def cpl(self) -> int:
        return self.state.regs.cpl

    @property
    def max_insns(self) -> int:
        return self.state.run.max_insns

    @max_insns.setter
    def max_insns(self, value: int) -> None:
        self.state.run.max_insns = value

    @property
    def max_events(self) -> int:
        return self.state.run.max_events

    @max_events.setter
    def max_events(self, value: int) -> None:
        self.state.run.max_events = value

    @property
    def multiboot(self) -> Any:
        """The multiboot image loaded (`cpu.multiboot.Boot`), or None."""
        return self.state.boot

    @property
    def uart(self) -> Uart16550:
        return self.state.platform.uart

    @property
    def fwcfg(self) -> FwCfg:
        return self.state.platform.fwcfg

    @property
    def serial(self) -> bytearray:
        """Everything the UART transmitted."""
        return self.platform.serial

    @property
    def on_serial_line(self) -> list[Callable[[str], None]]:
        """Callbacks called with each line the UART completes."""
        return self.platform.on_serial_line

    @property
    def on_ept_violation(self) -> HostPolicy:
        """The host model's answer to an EPT-violation VM exit: "resume-fixed" (the
        default), "resume", "stop", or a callback `(machine, VmExit) -> action`."""
        return self.state.vmx.on_ept_violation

    @on_ept_violation.setter
    def on_ept_violation(self, policy: HostPolicy) -> None:
        self.state.vmx.on_ept_violation = policy

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append a trace record stamped with the current icount and cycle. A record made
        inside an instruction (a hook while the engine runs: a port write, a serial line)
        counts that instruction and no later one, in both counting modes."""
        e = self.engine
        if self.regs.running:
            icount, cycles = e.hook_stamp(e.read_reg("rip"))
            return self.trace.append(kind, icount, cycles, fields)
        return self.trace.append(kind, e.icount, e.cycles, fields)

    # -- building ----------------------------------------------------------------------
    def load(self, addr: int, data: bytes, *, code: bool = False) -> None:
        """Copy `data` to guest-physical `addr`; decode it for sites if `code`."""
        self.phys.write(addr, data)
        if code:
            self.add_code(addr, data)

    def add_code(self, addr: int, data: bytes) -> None:
        """Decode guest code at linear `addr` for the instructions the machine must see
        (cpu/sites.py)."""
        self.sites.add_code(addr, data)

    def set_gate(self, vector: int, handler: int, *, ist: int = 0, gate_type: str = "interrupt",
                 dpl: int = 0, present: bool = True, selector: int = KERNEL_CS) -> None:
        """Write IDT entry `vector`: a 64-bit interrupt or trap gate to `handler`."""
        self.layout.set_gate(vector, handler, ist=ist, gate_type=gate_type, dpl=dpl,
                             present=present, selector=selector)

    def write_gate_raw(self, vector: int, raw: bytes) -> None:
        """Write IDT entry `vector` as 16 raw bytes (malformed gates for tests)."""
        self.layout.write_gate_raw(vector, raw)

    def set_tss(self, **slots: int) -> None:
        """Set TSS fields by name: rsp0..rsp2, ist1..ist7."""
        self.layout.set_tss(**slots)

    def set_page(self, spec: PageSpec) -> None:
        """Override one 4-KiB page of the identity map (before the first run)."""
        self.layout.set_page(spec)

    def build(self) -> None:
        """Write page tables and load the control registers (once, before running)."""
        if not self.layout.built:
            self.layout.build()
            self.fred.built()  # CR4.FRED, when FRED was enabled before the first run

    def enable_fred(self, options: FredConfig | None = None, *, enable: bool = True,
                    **msrs: int) -> None:
        """Give the CPU FRED and set its MSRs by name (cpu/fred.py `Fred.enable`)."""
        self.fred.enable(options, enable=enable, **msrs)

    def observe_cr2_reads(self) -> None:
        """Emit a `cr2_read` record at every `MOV reg, CR2` in decoded code: the value
        read and, when the innermost live frame is a #PF's, the CR2 that #PF delivered
        (what the race explorer's `cr2-consistent` invariant compares). Observation
        only: the instruction runs natively."""
        self.frames.observe_cr2_reads()

    def enable_ept(self) -> None:
        """Give the machine a second translation stage (identity, all RWX) without #VE."""
        self.vmx = VmxConfig()
        self.ept = Ept(self.phys.size)
        self.engine.remember_fills(False)
        self.sysmem.forget()
        self.inspect.forget()

    def enable_apf(self, *, policy: ApfPolicy = "kvm", layout: str = "2020",
                   on_fail: str = "retry", error_policy: str | None = None) -> AsyncPf:
        """Model a KVM host with paravirtual async page faults (cpu/apf_host.py).
        Swapped-out pages (`swap_out`) are EPT-not-present with suppress-#VE set, so a
        guest access to one is a VM exit that the host answers by `policy`: inject a
        page-not-present #PF or stall the vCPU until the page is in. `on_fail`: "retry",
        "stop" or "inject-pf", when a page-in fails; `error_policy` (cpu/apf_host.py)
        replaces it with the 2020 thread's designs."""
        return self.apf_host.enable(policy=policy, layout=layout, on_fail=on_fail,
                                    error_policy=error_policy)

    def swap_out(self, gpa: int, size: int = 4096, *, latency: int = 5000,
                 fail: bool = False) -> None:
        """The host swaps guest-physical [gpa, gpa+size) out: the first access waits
        `latency` cycles for the page-in (asynchronously or not, by policy)."""
        self.apf_host.swap_out(gpa, size, latency=latency, fail=fail)

    # -- state -------------------------------------------------------------------------
    def paging(self) -> PagingControl:
        """The paging controls (CR0, CR3, CR4, EFER)."""
        return self.regs.paging()

    def arch_state(self) -> ArchState:
        """The architectural state delivery starts from (`idt.state.ArchState`)."""
        return self.regs.arch_state()

    def read_linear(self, addr: int, size: int) -> bytes:
        """Read guest memory through guest paging as the supervisor (no A/D side effects
        beyond what the hardware walk would do); raises `ArchFault` if unmapped."""
        return self.inspect.read(addr, size)

    def code_bytes(self, address: int, size: int) -> bytes | None:
        """Guest code at a linear address (for counting a translation block)."""
        try:
            return self.inspect.read(address, size)
        except (ArchFault, Stop):
            return None

    def _insn_cost(self, address: int, size: int) -> int:
        """Timed mode: one instruction's cost (called once per address by the counter).

        `size` is the engine's, and is not trusted beyond the architectural limit of 15
        bytes (SDM Vol. 2A, "Instruction Format": longer is #GP): Unicorn reports
        0xF1F1F1F1 for INT1 (ICEBP), and reading that many bytes of guest memory took 4 GiB.
        The cost model keys on at most 15 bytes anyway."""
        try:
            code = self.read_linear(address, min(size, MAX_INSN_LENGTH))
        except (ArchFault, Stop):
            return self.profile.cycles_per_instruction
        return self._costs.instruction_cost(code, address)

    def disassemble(self, addr: int) -> str:
        """The instruction at linear `addr` in Intel syntax ("??" if unreadable)."""
        try:
            insn = decode_one(self.read_linear(addr, 15), addr)
        except (ArchFault, Stop):
            return "??"
        return insn.text if insn else "??"

    def paging_snapshot(self) -> _PagingSnapshot:
        """Read the paging controls once for the implicit accesses of one event (a `with`
        block: they are dropped when it ends)."""
        return self._paging_snapshot

    def count_event(self, rip: int, what: str | None) -> bool:
        """Count a delivery or VM exit against `max_events`. Over the limit: end the run
        ("more than N `what`"), or return False when `what` is None."""
        run = self.state.run
        run.events += 1
        if run.events <= run.max_events:
            return True
        if what is None:
            return False
        raise Stop(Outcome.MAX_EVENTS, f"more than {run.max_events} {what}", rip)

    # -- delivery --------------------------------------------------------------------------
    def deliver(self, ev: Event, why: str = "") -> None:
        """Deliver `ev` now (at the current boundary), with the #DF/shutdown rules."""
        if self.vmx_exits.direct(ev):
            return  # the exception bitmap made it a VM exit (cpu/vmx_exits.py)
        self.debug.before_delivery(ev)  # a #DB trap still owed is void (cpu/debug.py)
        if self.fred.config is not None and self.fred.active():
            self.fred.deliver(ev, why)  # CR4.FRED = 1: no IDT (cpu/fred.py)
            return
        st = self.regs.arch_state()
        cr2_before = st.cr2
        st.rip = ev.return_rip
        if ev.source not in (Source.NMI, Source.INTERRUPT):
            # RF (set by an IRET that loaded a fault frame) only suppresses instruction
            # breakpoints for the next instruction: it is clear again once that instruction
            # runs (Bochs clears it as the instruction starts). Unicorn clears it only at the
            # end of a translation block, so an INT3 a few instructions after such an IRET
            # would push a stale RF=1. Every event here but an external one is raised by an
            # executing instruction, so RF is architecturally 0; fault-class exceptions set
            # it in their pushed image anyway (idt.deliver).
            st.rflags &= ~RFLAGS_RF
        if st.cpl == 3:
            self.frames.user_mode()
        live: list[tuple[int, bytes]] = []  # frames a push could overwrite, as they were
        if self.state.frames.live:
            with self.paging_snapshot():
                live = self.frames.snapshot()
        hyper = self.vmx_exits
        progress = DeliveryOutcome(delivery=None)
        try:
            with self.paging_snapshot():
                out = self.delivery_memo.deliver(st, ev, hyper.intercept_fn(), progress)
        except EptViolation as violation:
            # Never converted to #VE while delivering an event (SDM "EPT Violations"):
            # a VM exit with the event in the IDT-vectoring information.
            during = ev
            if hyper.enabled:  # an indirect exit: the delivery's side effects happened
                during = progress.vectoring or ev
                self.after_delivery(st.nmi_blocked, st.cr2, cr2_before, ())
            self.vmx_host.ept_violation(violation, ev.insn_rip, violation.access, during=during)
            return
        except EptMisconfig as bad:
            self.vmx_host.ept_misconfig(bad, ev.insn_rip, during=ev)
            return
        e = self.engine
        exited = out.intercepted is not None or out.triple_fault
        if (out.nested or exited) and ev.source in (Source.SOFTWARE, Source.PRIV_SOFTWARE) \
                and hyper.state.injected is None:
            # INT n / INT3 / INTO / INT1 were counted as retired when they trapped, but a
            # fault while delivering them is a fault *on* the instruction (saved RIP = the
            # INT, which restarts after the handler): it did not retire.
            e.uncount()
        self.after_delivery(st.nmi_blocked, st.cr2, cr2_before,
                            [(nf.during.vector, nf.during.name, nf.fault, nf.action.value)
                             for nf in out.nested] if out.nested else ())
        if exited:
            hyper.delivery_exit(ev, out)
            return
        if out.delivery is None:
            last = out.nested[-1]
            assert last.action is Combine.SHUTDOWN
            self.emit("shutdown", reason=out.shutdown_reason)
            raise Stop(Outcome.SHUTDOWN, out.shutdown_reason or "shutdown", ev.insn_rip)
        d = out.delivery
        self.count_event(ev.insn_rip, "deliveries (runaway event storm, e.g. a handler that "
                         "returns to its own fault)")
        cost = self.profile.event("deliver_cpl_change" if d.new_cpl != st.cpl
                                  else "deliver_same_cpl")
        if d.event.source is Source.NMI:
            cost += self.profile.event("nmi_extra")
        self.regs.load_segments(d.new_cs, d.new_ss, d.new_cpl, current=(st.cs, st.ss),
                                cs_descriptor=d.cs_descriptor)
        e.write({"rip": d.new_rip, "rsp": d.new_rsp, "rflags": d.new_rflags})
        self.state.boundary.shadow = None  # a delivered event ends any interrupt shadow
        rec = self.emit(
            "deliver",
            vector=d.event.vector, name=d.event.name, source=d.event.source.trace_name,
            error_code=d.frame.error_code, rip=d.frame.rip, cs=d.frame.cs,
            rflags=d.frame.rflags, old_rsp=d.frame.rsp, ss=d.frame.ss, rsp=d.new_rsp,
            stack=d.stack, handler=d.new_rip, cpl=d.new_cpl, depth=self.state.frames.depth,
        )
        if d.event.vector == Vector.PF and d.event.source is Source.EXCEPTION:
            rec["cr2"] = st.cr2
            self.frames.pf_delivered(d.new_rsp, st.cr2)
        if out.double_fault_of is not None:
            rec["double_fault_of"] = list(out.double_fault_of)
        if why:
            rec["why"] = why
        if live:
            with self.paging_snapshot():
                self.frames.report_overwrites(live, d.event.name)
        self.frames.pushed(d.new_rsp, d.frame.error_code is not None, d.event.name)
        e.cycles += cost
        for cb in self.on_deliver:
            cb(rec)

    # -- asynchronous events ---------------------------------------------------------------
    def after_delivery(self, nmi_blocked: bool, cr2: int, cr2_before: int,
                       faults: Iterable[tuple[int, str, ArchFault, str]]) -> None:
        """What an IDT or FRED delivery leaves besides its frame: NMI blocking, CR2 (a
        #PF during it), and a `delivery_fault` record per exception raised while
        delivering (vector and name of the event being delivered, the fault, the
        Table 6-5 action)."""
        self.intr.nmi_blocked = nmi_blocked
        if cr2 != cr2_before:
            self.engine.write({"cr2": cr2})
        for vector, name, fault, action in faults:
            self.emit("delivery_fault", vector=vector, name=name, fault=fault.vector,
                      fault_name=vector_name(fault.vector), error_code=fault.error_code,
                      action=action, why=fault.why)

    def inject(self, event: str | AsyncEvent, point: Point | None = None, *,
               vector: int | None = None, before: int | str | None = None,
               hit: int = 1, icount: int | None = None, cycle: int | None = None,
               label: str = "", token: int | None = None, gpa: int | None = None,
               shown: tuple[int, int] | None = None, at_port: str | None = None) -> Injection:
        """Schedule an asynchronous event (cpu/events.py) to arrive at a point.

            >>> from cpu.events import Before, Nmi
            >>> m = Machine()
            >>> inj = m.inject(Nmi(), Before(0x100000, hit=2))
            >>> inj = m.inject("interrupt", vector=0x30, icount=57)   # the keyword form

        The point: `Before(address or symbol, hit)` (before that instruction, at its
        hit-th arrival), `AtIcount`, `AtCycle`, `AtPort("flush_page", hit)` (right after
        the hit-th write to pc-testdev's flush-page port 0xE4), or `Now()` (the default:
        the next boundary). Pending is not delivered: the blocking rules (idt.blocking)
        decide when it is. The keyword form names the event kind and its arguments and
        the point's fields; both are validated by the same code.
        """
        if isinstance(event, str):
            event = make_event(event, vector=vector, token=token, gpa=gpa)
        if point is None:
            point = make_point(before=before, hit=hit, icount=icount, cycle=cycle,
                               at_port=at_port)
        return self.injections.schedule(event, point, label=label, shown=shown)

    def watch(self, address: int) -> None:
        """Count the arrivals at `address` (as an injection point there would) without
        scheduling anything: `arrivals(address)` reads the count."""
        self.injections.watch(address)

    def arrivals(self, address: int) -> int:
        """Arrivals at `address` counted since it became an injection point or was
        watched (0 if it never was)."""
        return self.state.injections.arrivals.get(address, 0)

    def arrive_now(self, event: str | AsyncEvent, *, vector: int | None = None, label: str = "",
                   token: int | None = None, gpa: int | None = None,
                   shown: tuple[int, int] | None = None) -> Injection:
        """Between runs: the event arrives at this boundary now, as an injection point's
        event would (before the time-based sources of the boundary are looked at)."""
        if isinstance(event, str):
            if event == "pause":
                raise ValueError("a pause is not an event")
            event = make_event(event, vector=vector, token=token, gpa=gpa)
        return self.injections.arrive_now(event, label=label, shown=shown)

    def nmi(self) -> None:
        """An NMI arrives now (pending at the current boundary)."""
        self.injections.fire(Injection(Nmi(), label="api"))

    def interrupt(self, vector: int) -> None:
        """A fixed interrupt with `vector` arrives at the APIC now."""
        self.injections.fire(Injection(Interrupt(vector), label="api"))

    # -- running -----------------------------------------------------------------------
    def start_state(self, *, entry: int, rsp: int, cpl: int = 0, rflags: int = 0x202,
                    regs: dict[str, int] | None = None) -> None:
        """Reset the CPU to `entry` at `cpl` (0 or 3) with the machine's flat selectors."""
        self.build()
        if cpl not in (0, 3):
            raise ValueError(f"cpl must be 0 or 3, not {cpl}")
        cs, ss = (USER_CS, USER_DS) if cpl == 3 else (KERNEL_CS, KERNEL_DS)
        b = self.state.boundary
        b.halted = False  # a reset CPU is not halted and in no shadow
        b.shadow = None
        self.state.regs.cpl = cpl
        self.regs.load_segments(cs, ss, cpl)
        self.engine.flush_tlb()
        self.engine.write({**(regs or {}), "rip": entry, "rsp": rsp, "rflags": rflags | 2})

    def checkpoint(self) -> Checkpoint:
        """Remember the state at this boundary (between runs) for `rollback`: CPU,
        counters, guest memory (by page, copy-on-write), EPT, and `state` (cpu.snapshot).
        Taking another moves the checkpoint forward."""
        return snapshot.take(self)

    def rollback(self, cp: Checkpoint) -> None:
        """Return to checkpoint `cp` (the latest one), as if nothing ran since."""
        snapshot.restore(self, cp)

    def run(self, *, entry: int | None = None, rsp: int | None = None, cpl: int = 0,
            rflags: int = 0x202, regs: dict[str, int] | None = None,
            max_insns: int | None = None, max_events: int | None = None,
            pause_at: tuple[int, int] | None = None) -> RunResult:
        """Run until an outcome (`cpu.outcomes.Outcome`).

        With `entry` the CPU is first reset to that entry point (`start_state`); without
        it, the run continues from the current state. With `pause_at = (address, hit)`
        the run stops at the `hit`-th arrival at `address` from here on (a boundary the
        machine already stopped at does not count again; an address that injections
        already watch keeps counting as theirs do), after the events due there have
        arrived, with outcome "pause" and no `end` record; `run()` continues from there.
        """
        if entry is not None and self.multiboot is not None:
            raise ValueError("a multiboot machine starts at its image's entry: run() without entry")
        if entry is not None:
            self.start_state(entry=entry, rsp=rsp if rsp is not None else 0x70000, cpl=cpl,
                             rflags=rflags, regs=regs)
        if max_insns is not None:
            self.state.run.max_insns = max_insns
        if max_events is not None:
            self.state.run.max_events = max_events
        pause = self.injections.add_pause(*pause_at) if pause_at is not None else None
        try:
            return self._loop()
        finally:
            if pause is not None:
                self.injections.drop_pause(*pause)

    def _loop(self) -> RunResult:
        e = self.engine
        self.regs.forget()  # the caller may have written registers directly
        boundary = self.boundary
        stops = self.stops
        while True:
            try:
                if self.multiboot is not None and not self.multiboot.done:
                    boot32.run(self)  # on a 32-bit engine, until 64-bit mode
                    e = self.engine
                boundary.service()
                if boundary.state.halted:
                    boundary.halt_wait()
                e.set_stop_at(boundary.next_stop_at())
                e.set_stop_cycle(boundary.next_stop_cycle())
                stops.pending = None
                rip = e.read_reg("rip")
                until, stops.state.fetch_boundary = stops.state.fetch_boundary, None
                self.regs.forget()
                self.regs.running = True
                try:
                    err = e.run(rip) if until is None else e.run(rip, until=until)
                finally:
                    self.regs.running = False
                pending, stops.pending = stops.pending, None
                if e.stopped_by_counter:
                    # The counter stopped before an instruction ran: a boundary. Anything
                    # a code hook of that same instruction asked for is void (it re-runs
                    # when execution resumes there).
                    e.uncount()
                    self.injections.forget_site_seen()
                    self.platform.check_exit()
                    if e.icount >= self.max_insns:
                        raise Stop(Outcome.MAX_INSNS, f"instruction limit {self.max_insns} "
                                   "reached", e.read_reg("rip"))
                elif pending is not None:
                    pending()
                elif err == ERR_INSN_INVALID:
                    stops.invalid_opcode()
                elif err is None and until is not None and e.read_reg("rip") == until:
                    continue  # ran up to a faulting fetch (Stops.fetch_boundary_before): retry
                elif err is not None:
                    raise Stop(Outcome.UNSUPPORTED, f"engine error {err} at "
                               f"{e.read_reg('rip'):#x}", e.read_reg("rip"))
                else:
                    stops.native_stop()
            except Stop as stop:
                return self._end(stop)

    def _end(self, stop: Stop) -> RunResult:
        e = self.engine  # the 32-bit engine when a multiboot image's 32-bit phase ended
        serial = self.serial.decode("latin-1")
        if stop.outcome == Outcome.PAUSE:
            return RunResult(Outcome.PAUSE.value, stop.rip, e.icount, self.trace, serial=serial,
                             cycles=e.cycles)
        reason = stop.outcome.value
        fields: dict[str, Any] = {"reason": reason, "rip": stop.rip}
        if stop.reason:
            fields["detail"] = stop.reason
        if stop.exit_code is not None:
            fields["exit_code"] = stop.exit_code
        self.emit("end", **fields)
        return RunResult(reason, stop.rip, e.icount, self.trace,
                         exit_code=stop.exit_code, reason=stop.reason, serial=serial,
                         cycles=e.cycles)
