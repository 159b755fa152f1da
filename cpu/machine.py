"""The machine: guest memory with real architectural structures, an engine, and the run
loop that hands every event to the pure model in `idt/`.

Run loop
--------
Unicorn runs at full speed until a hook stops it at an *event boundary*: an exception
(UC_HOOK_INTR, a poisoned translation, an invalid opcode), an intercepted IRET or HLT, a
port write to the exit device, or the instruction limit. The loop then builds an
`idt.state.ArchState` from the engine, asks `idt` what the architecture does, writes the
result back (registers; CS/SS/CPL through the context blob), records it in the trace and
resumes. Python never runs per instruction on this path.

Instruction counting: the native counter counts each instruction *before* it executes.
When the engine stops on an instruction that did not complete (a fault, an intercepted
IRET/HLT before emulation, the limit), that instruction is subtracted; an emulated IRET
or HLT then counts as retired. `icount` in the trace is always "instructions retired".

Memory layout built by the loader (all in guest memory, so a guest can read and rewrite
it, and delivery reads it at the moment of delivery):

    0x1000  GDT   null, 0x08 kernel code64, 0x10 kernel data, 0x1b user code64,
                  0x23 user data, 0x28 64-bit TSS (16 bytes)
    0x1100  TSS   64-bit TSS, 0x68 bytes (RSP0-2, IST1-7), no I/O bitmap
    0x2000  IDT   256 gates, 4 KiB, not-present unless configured
    0x3000  page tables (identity map of guest memory), up to RESERVED_END
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpu import snapshot
from cpu.decode import (
    decode,
    decode_one,
    is_stack_reference,
    memory_operands,
    mmio_move,
    out_port,
    site_kind,
)
from cpu.devices.apf import (
    APF_FLAGS_OFFSET,
    APF_REASON_OFFSET,
    APF_TOKEN_OFFSET,
    REASON_PAGE_NOT_PRESENT,
    REASON_PAGE_READY,
    ApfMsrError,
    AsyncPf,
    Decision,
    GuestState,
    decide,
)
from cpu.devices.apf import cpuid as apf_cpuid
from cpu.devices.apic import APIC_BASE, LocalApic
from cpu.devices.fwcfg import FW_CFG_PORT_DATA, FW_CFG_PORT_SEL, FwCfg
from cpu.devices.testports import BOCHS_SHUTDOWN_PORT, FLUSH_PAGE_PORT, BochsShutdown
from cpu.devices.uart import Uart16550
from cpu.engine import ERR_INSN_INVALID, GPRS, PROT_R, PROT_W, PROT_X, Engine, native_cpuid
from cpu.ept import EXIT_REASON_EPT_MISCONFIG, Ept, EptMisconfig, EptViolation
from cpu.errors import Unsupported
from cpu.events import AsyncEvent, AtCycle, AtIcount, AtPort, Before, Point
from cpu.memory import PhysicalMemory
from cpu.mmu import (
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PTE_P,
    PTE_U,
    PTE_W,
    PTE_XD,
    Access,
    PagingControl,
    Translation,
    WalkCache,
    build_identity_map,
)
from cpu.snapshot import Checkpoint
from cpu.timing import CostModel, Profile, load_profile
from cpu.trace import Trace
from idt.blocking import Choice, Interruptibility, Shadow, arbitrate
from idt.descriptors import (
    GATE_TYPE_INTERRUPT,
    GATE_TYPE_TRAP,
    TSS_IOMAP_BASE_OFFSET,
    TSS_IST_OFFSET,
    TSS_RSP_OFFSET,
    TSS_SIZE,
    GateDescriptor,
    SegmentDescriptor,
    kernel_code64,
    kernel_data,
    tss64_descriptor,
    user_code64,
    user_data,
)
from idt.double_fault import Combine, deliver_event
from idt.error_codes import PFErr
from idt.iret import UnsupportedIret, iret64
from idt.state import (
    RFLAGS_IF,
    RFLAGS_RF,
    ArchFault,
    ArchState,
    Event,
    Source,
    is_canonical,
)
from idt.ve import (
    EXIT_REASON_EPT_VIOLATION,
    VE_BUSY,
    VE_INFO_BUSY,
    VE_VECTOR,
    VeInfo,
    convert_to_ve,
    decode_qualification,
    ept_qualification,
)
from idt.vectors import Vector, vector_name

if TYPE_CHECKING:
    from cpu.multiboot import Boot

GDT_BASE = 0x1000
TSS_BASE = 0x1100
IDT_BASE = 0x2000
PT_BASE = 0x3000
RESERVED_END = 0x20000
KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
GDT_ENTRIES: list[bytes] = [
    bytes(8),
    kernel_code64().pack(),
    kernel_data().pack(),
    user_code64().pack(),
    user_data().pack(),
    tss64_descriptor(TSS_BASE),
]
GDT_LIMIT = sum(len(e) for e in GDT_ENTRIES) - 1
EXIT_PORT = 0xF4
SERIAL_PORT = 0x3F8
CPUID_FEATURES = 0x1
CPUID_1_EDX_APIC = 1 << 9
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_EXT_FEATURES = 0x80000001
CPUID_EXT_EDX_PAGE1GB = 1 << 26
CPUID_HYPERVISOR_FIRST, CPUID_HYPERVISOR_LAST = 0x40000000, 0x4FFFFFFF
SHUTDOWN_DETAIL = 'Bochs shutdown port 0x8900: "Shutdown"'
# Ports whose writes are injection points (`Injection.at_port`): name -> port.
PORT_POINTS = {"flush_page": FLUSH_PAGE_PORT}
CR0_DEFAULT = 0x80010033  # PG | WP | NE | ET | MP | PE
CR4_DEFAULT = CR4_PAE | (1 << 9) | (1 << 10)  # PAE, OSFXSR, OSXMMEXCPT
EFER_DEFAULT = EFER_LME | EFER_LMA | EFER_NXE
MSR_TSC = 0x10
MSR_APIC_BASE = 0x1B
MSR_EFER = 0xC0000080
APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11
EFER_WRITABLE = (1 << 0) | EFER_LME | EFER_LMA | EFER_NXE  # SCE, LME, LMA, NXE
# MSRs kept by the engine itself: SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, FMASK,
# FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX.
PASSTHROUGH_MSRS = frozenset({0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083,
                              0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103})


class MsrFault(Exception):
    """RDMSR/WRMSR raises #GP(0): unknown MSR, reserved bits."""


# 32- and 64-bit GPR names -> the 64-bit register (a 32-bit write zero-extends).
_GPR64 = {**{r: r for r in GPRS},
          **{"e" + r[1:]: r for r in GPRS if not r[1:].isdigit() and len(r) == 3},
          **{r + "d": r for r in GPRS if r[1:].isdigit()}}
OUTCOMES = ("hlt", "shutdown", "max_insns", "max_events", "exit", "outside_memory", "unsupported",
            "vmexit")
MODES = ("fast", "timed")
EVENT_KINDS = ("nmi", "interrupt", "async_pf", "ept_revoke")
PAUSE = "pause"  # internal: `Machine.run(pause_at=...)` stops the run at a point
APF_FAIL_ACTIONS = ("retry", "stop", "inject-pf")
APF_MAX_RETRIES = 3  # "retry": give up (outcome vmexit) after this many failed page-ins


@dataclass(frozen=True)
class VmxConfig:
    """The VMX controls this machine models (SDM Vol. 3C; semantics.md §7.1): the
    "EPT-violation #VE" secondary control, the VE-information address (guest-physical,
    4-KiB aligned) and the EPTP index reported in the information area."""

    ept_violation_ve: bool = False
    ve_info: int | None = None
    eptp_index: int = 0

    def __post_init__(self) -> None:
        if self.ve_info is not None and self.ve_info % 4096:
            raise ValueError(f"ve_info {self.ve_info:#x} must be 4-KiB aligned (VM entry fails "
                             "otherwise)")
        if not 0 <= self.eptp_index <= 0xFFFF:
            raise ValueError(f"eptp_index {self.eptp_index} outside 0..0xffff")


@dataclass(frozen=True)
class VmExit:
    """An EPT-violation VM exit, as the host model sees it."""

    reason: int
    qualification: int
    gpa: int
    gla: int | None
    rip: int
    during_delivery: Event | None
    nmi_unblocked_by_iret: bool
    why: str


@dataclass
class Injection:
    """An asynchronous event that becomes *pending* at a point of the run.

    Exactly one of `before` (an address: pending when execution reaches it for the
    `hit`-th time, before that instruction executes), `icount` (pending once that many
    instructions have retired) or `cycle` (pending at the first boundary at or after that
    cycle) is set; with none set the event is pending at the next boundary. Or
    `at_port` (a name in `PORT_POINTS`, e.g. "flush_page"): pending at the boundary right
    after the `hit`-th write to that port.
    """

    event: str
    vector: int | None = None
    before: int | None = None
    hit: int = 1
    icount: int | None = None
    cycle: int | None = None
    label: str = ""
    fired: bool = False
    token: int | None = None  # async_pf: CR2 of the injected #PF
    gpa: int | None = None  # async_pf: the page the host pages in (page ready follows);
    # ept_revoke: the guest-physical page whose EPT access the host takes away
    # The point as the trace shows it, when it differs from how it is counted (the race
    # explorer counts arrivals from a checkpoint but reports them from the start).
    shown: tuple[int, int] | None = None
    at_port: str | None = None

    def __post_init__(self) -> None:
        if self.at_port is not None and self.at_port not in PORT_POINTS:
            raise ValueError(f"unknown port point {self.at_port!r} (known: "
                             f"{', '.join(PORT_POINTS)})")
        if self.event == "async_pf" and self.token is None and self.gpa is None:
            raise ValueError("an async_pf needs a token (CR2) or a swapped-out gpa")
        if self.token is not None and not 0 < self.token < 0xFFFFFFFF:
            raise ValueError(f"an async_pf token must be in 1..0xfffffffe, not {self.token:#x}")
        if self.event not in EVENT_KINDS and self.event != PAUSE:
            raise ValueError(f"unknown event {self.event!r} (known: {', '.join(EVENT_KINDS)})")
        if self.event == "ept_revoke" and self.gpa is None:
            raise ValueError("an ept_revoke needs the gpa of the page it revokes")
        if self.event == "interrupt" and (self.vector is None or not 16 <= self.vector <= 255):
            raise ValueError(f"an interrupt needs a vector in 16..255, not {self.vector!r}")
        if sum(x is not None for x in (self.before, self.icount, self.cycle, self.at_port)) > 1:
            raise ValueError("an injection has at most one of before/icount/cycle/at_port")
        if self.hit < 1:
            raise ValueError(f"hit must be >= 1, not {self.hit}")

    @property
    def point(self) -> dict[str, int | str]:
        if self.at_port is not None:
            return {"at_port": self.at_port, "hit": self.hit}
        if self.shown is not None:
            return {"before": self.shown[0], "hit": self.shown[1]}
        if self.before is not None:
            return {"before": self.before, "hit": self.hit}
        if self.icount is not None:
            return {"at_icount": self.icount}
        if self.cycle is not None:
            return {"at_cycle": self.cycle}
        return {}


@dataclass(frozen=True)
class PageSpec:
    """A 4-KiB override of the default identity map."""

    va: int
    pa: int
    present: bool = True
    writable: bool = True
    user: bool = True
    nx: bool = False

    @property
    def pte(self) -> int:
        if not self.present:
            return 0
        return (self.pa & ~0xFFF) | PTE_P | (PTE_W if self.writable else 0) | (
            PTE_U if self.user else 0) | (PTE_XD if self.nx else 0)


@dataclass
class RunResult:
    outcome: str
    rip: int
    icount: int
    trace: Trace
    exit_code: int | None = None
    reason: str = ""
    serial: str = ""
    cycles: int = 0

    @property
    def deliveries(self) -> list[dict[str, Any]]:
        return self.trace.of_kind("deliver")


class _Stop(Exception):
    """Internal: ends the run loop with an outcome."""

    def __init__(self, outcome: str, reason: str, rip: int, exit_code: int | None = None) -> None:
        super().__init__(reason)
        self.outcome, self.reason, self.rip, self.exit_code = outcome, reason, rip, exit_code


class GuestMemory:
    """`idt.state.SystemMemory` over guest paging: what delivery and IRET access."""

    def __init__(self, machine: Machine, *, architectural: bool = True) -> None:
        """`architectural`: the CPU's own implicit accesses (delivery, IRET), which go
        through the second stage (EPT) when there is one; otherwise an inspection by the
        emulator (disassembly, decoding), which never causes an EPT violation."""
        self.m = machine
        self.architectural = architectural
        # Paging controls snapshotted for the duration of one delivery or IRET (see
        # `Machine._paging_snapshot`): nothing can write CR0/CR3/CR4/EFER in between, and
        # reading them from the engine for every 8-byte access dominated event cost.
        self.ctl: PagingControl | None = None
        self.walks = WalkCache(machine.phys)

    def _pieces(self, linear: int, size: int) -> Iterable[tuple[int, int, int]]:
        off = 0
        while off < size:
            addr = (linear + off) & (2**64 - 1)
            n = min(size - off, 4096 - (addr & 0xFFF))
            yield addr, off, n
            off += n

    def _translate(self, addr: int, size: int, access: Access, user: bool, stack: bool) -> int:
        if not is_canonical(addr):
            raise ArchFault(Vector.SS if stack else Vector.GP, 0,
                            why=f"non-canonical address {addr:#x}")
        ctl = self.ctl if self.ctl is not None else self.m.paging()
        m = self.m
        if self.architectural and m.ept is not None:
            t = self.walks.walk(ctl, addr, access, user=user, stage2=m.stage2,
                                stage2_generation=m.ept.generation)
        else:
            t = self.walks.walk(ctl, addr, access, user=user)
        paddr = t.paddr | (addr & 0xFFF)
        if not self.m.phys.contains(paddr, size):
            # A present translation to no RAM: a 2-MiB identity page over the end of a
            # memory size that is not a multiple of 2 MiB, a PageSpec, or tables the guest
            # rewrote. The guest's own accesses end the run as "outside_memory"
            # (_on_unmapped, _memory_fault); delivery's and IRET's implicit accesses (a
            # frame pushed through RSP0/IST) must end it the same way, not escape
            # Machine.run as PhysicalAccessError.
            raise _Stop("outside_memory",
                        f"{access.name.lower()} of {addr:#x} maps to physical {paddr:#x}, "
                        "outside guest memory", self.m.engine.read_reg("rip"))
        return paddr

    def read(self, linear: int, size: int, *, user: bool = False, stack: bool = False) -> bytes:
        if (linear & 0xFFF) + size <= 0x1000:  # one page: the common case, no splitting
            paddr = self._translate(linear, size, Access.READ, user, stack)
            return bytes(self.m.phys.view[paddr : paddr + size])
        out = bytearray(size)
        for addr, off, n in self._pieces(linear, size):
            paddr = self._translate(addr, n, Access.READ, user, stack)
            out[off : off + n] = self.m.phys.read(paddr, n)
        return bytes(out)

    def write(self, linear: int, data: bytes, *, user: bool = False, stack: bool = False) -> None:
        if (linear & 0xFFF) + len(data) <= 0x1000:
            paddr = self._translate(linear, len(data), Access.WRITE, user, stack)
            phys = self.m.phys
            if phys.dirty is not None:
                phys.mark(paddr, len(data))
            phys.view[paddr : paddr + len(data)] = data
            return
        for addr, off, n in self._pieces(linear, len(data)):
            paddr = self._translate(addr, n, Access.WRITE, user, stack)
            self.m.phys.write(paddr, data[off : off + n])


class Machine:
    """A single x86-64 CPU in long mode with Python-owned event delivery.

    Typical use (the scenario loader does exactly this)::

        m = Machine(16 << 20)
        m.load(0x100000, code, code=True)
        m.set_gate(3, handler=0x100040, ist=1)
        m.set_tss(rsp0=0x80000, ist1=0x90000)
        result = m.run(entry=0x100000, rsp=0x70000)
    """

    def __init__(self, memory: int = 16 << 20, *, max_insns: int = 10_000_000,
                 max_events: int = 100_000, mode: str = "fast",
                 profile: Profile | str = "default", sti_blocks_nmi: bool = True,
                 apic: bool = True, vmx: VmxConfig | None = None) -> None:
        if memory < RESERVED_END + 0x1000:
            raise ValueError(f"guest memory must be at least {RESERVED_END + 0x1000:#x} bytes")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        if memory > APIC_BASE:
            raise ValueError(f"guest memory must end below the local APIC at {APIC_BASE:#x}")
        self.mode = mode
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self._costs = CostModel(self.profile)
        self.phys = PhysicalMemory(memory)
        # Fast mode counts per translation block, timed mode per instruction (it needs
        # each instruction's cost); both give exact counts at every stop.
        self.engine = Engine(self.phys, block_counting=mode == "fast")
        self.sysmem = GuestMemory(self)
        self.inspect = GuestMemory(self, architectural=False)
        # VMX: the second translation stage and the #VE controls (None: no VMX).
        self.vmx = vmx
        self.ept: Ept | None = Ept(memory) if vmx is not None else None
        self.on_ept_violation: str | Callable[[Machine, VmExit], str] = "resume-fixed"
        self.apf: AsyncPf | None = None  # KVM async page faults (enable_apf)
        self._tsc_offset = 0
        self._apf_wants_step = False
        self.trace = Trace()
        self.max_insns = max_insns
        self.max_events = max_events
        self._events = 0
        self.symbols: dict[str, int] = {"gdt": GDT_BASE, "tss": TSS_BASE, "idt": IDT_BASE}
        self.sites: dict[int, str] = {}
        self.pages: dict[int, PageSpec] = {}
        self.cpl = 0
        self.intr = Interruptibility(sti_blocks_nmi=sti_blocks_nmi)
        self.injections: list[Injection] = []
        self._waiting: list[Injection] = []  # not fired, point by icount/cycle/now
        self._before: dict[int, dict[int, list[Injection]]] = {}  # address -> hit -> events
        self._arrivals: dict[int, int] = {}
        self._site_seen: tuple[int, int] | None = None
        self._site_len: dict[int, int] = {}
        self._iretq: set[int] = set()  # IRET sites with REX.W (the only form modelled)
        # (icount after the shadow-opening instruction retires, the RIP after it, kind)
        self._shadow_rec: tuple[int, int, Shadow] | None = None
        self._step = False
        self._halted = False
        # Frames of delivered events whose IRET has not run yet: (address, slot names,
        # event name, icount when pushed). A delivery that rewrites one of them is what
        # the nested-NMI race looks like; the trace shows it as `frame_overwritten`.
        self._frames: list[tuple[int, tuple[str, ...], str, int]] = []
        self._exit_code: int | None = None
        self.serial = bytearray()
        self._built = False
        self._step_cache: dict[str, object] = {}
        # QEMU remembers an exception it raised until its own delivery code runs, which
        # Unicorn skips (fact 4): set after every engine-raised exception, cleared by the
        # next context patch (which resets the field).
        self._stale_exception = False
        self._running = False
        self._pending: Callable[[], None] | None = None
        self._fetch_boundary: int | None = None  # run only up to here next (a fetch fault)
        self._cr3 = 0
        self.on_deliver: list[Callable[[dict[str, Any]], None]] = []
        # Called with RIP at every boundary the machine holds between engine runs (where
        # it looks for events to deliver), before anything is delivered there.
        self.on_boundary: list[Callable[[int], None]] = []
        self._depth = 0
        self._checkpoint: Checkpoint | None = None  # the live one (cpu.snapshot)
        self._cr2_reads: set[int] = set()  # MOV reg, CR2 sites (observe_cr2_reads)
        self._observe_cr2 = False
        self._cr2_seen: tuple[int, int] | None = None
        self._pf_cr2: dict[tuple[int, int], int] = {}  # #PF frame (address, icount) -> CR2

        self.phys.write(GDT_BASE, b"".join(GDT_ENTRIES))
        # Unconfigured vectors hold *not-present* 64-bit interrupt gates (not zeroes: a
        # zeroed gate has type 0 and raises #GP before the present check is reached).
        absent = GateDescriptor(offset=0, selector=KERNEL_CS, present=False).pack()
        self.phys.write(IDT_BASE, absent * 256)
        e = self.engine
        e.fill = self._fill
        e.poison = self._on_poison
        e.unmapped = self._on_unmapped
        e.interrupt = self._on_interrupt
        e.site = self._on_site
        e.port_in = self._on_port_in
        e.port_out = self._on_port_out
        e.code_reader = self._code_bytes
        if mode == "timed":
            e.set_cost_mode(timed=True, default_cost=self.profile.cycles_per_instruction,
                            miss=self._insn_cost)
        else:
            e.set_cost_mode(timed=False, default_cost=self.profile.cycles_per_instruction)
        self.apic: LocalApic | None = None
        if apic:
            self.apic = LocalApic(on_nmi=self._apic_nmi, on_event=self._apic_event)
            self.symbols["apic"] = APIC_BASE
        # Platform devices test kernels use (cpu/devices/uart.py, fwcfg.py, testports.py).
        self.uart = Uart16550(SERIAL_PORT, on_byte=self._serial_byte)
        self.fwcfg = FwCfg(ram_size=memory)
        self.bochs_shutdown = BochsShutdown()
        self._shutdown_requested = False
        self.on_serial_line: list[Callable[[str], None]] = []  # each completed line
        self._port_points: dict[str, dict[int, list[Injection]]] = {}  # at_port injections
        self._port_writes: dict[str, int] = {}
        # A multiboot image (cpu/multiboot.py): run() first runs its 32-bit phase.
        self.multiboot: Boot | None = None

    @property
    def nmi_blocked(self) -> bool:
        return self.intr.nmi_blocked

    @nmi_blocked.setter
    def nmi_blocked(self, value: bool) -> None:
        self.intr.nmi_blocked = value

    def _emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self.trace.emit(kind, self.engine.icount, self.engine.cycles, **fields)

    # -- building ----------------------------------------------------------------------
    def load(self, addr: int, data: bytes, *, code: bool = False) -> None:
        """Copy `data` to guest-physical `addr`; decode it for IRET/HLT sites if `code`."""
        self.phys.write(addr, data)
        if code:
            self.add_code(addr, data)

    def add_code(self, addr: int, data: bytes) -> None:
        for insn in decode(data, addr):
            kind = site_kind(insn)
            if kind is not None:
                self.sites[insn.address] = kind
                self._site_len[insn.address] = insn.size
                if insn.mnemonic == "iretq":
                    self._iretq.add(insn.address)
                self.engine.add_site(insn.address)
            elif insn.mnemonic == "mov" and insn.op_str.endswith(", cr2"):
                self._cr2_reads.add(insn.address)
        self.engine.clear_cost_cache()

    def observe_cr2_reads(self) -> None:
        """Emit a `cr2_read` record at every `MOV reg, CR2` in decoded code: the value
        read and, when the innermost live frame is a #PF's, the CR2 that #PF delivered
        (what the race explorer's `cr2-consistent` invariant compares). Observation
        only: the instruction runs natively."""
        self._observe_cr2 = True
        for address in self._cr2_reads:
            self.engine.add_site(address)

    def _cr2_read(self, address: int) -> None:
        e = self.engine
        boundary = e.count_at(address) - 1
        if self._cr2_seen == (address, boundary):
            return  # the same boundary re-entered after a stop there
        self._cr2_seen = (address, boundary)
        fields: dict[str, Any] = {"rip": address, "value": e.read_reg("cr2")}
        if self._frames and self._frames[-1][2] == "#PF":
            at, _slots, _name, pushed = self._frames[-1]
            fields["pf_cr2"] = self._pf_cr2.get((at, pushed))
        self.trace.emit("cr2_read", boundary, e.cycles, **fields)

    def set_gate(self, vector: int, handler: int, *, ist: int = 0, gate_type: str = "interrupt",
                 dpl: int = 0, present: bool = True, selector: int = KERNEL_CS) -> None:
        if not 0 <= vector <= 255:
            raise ValueError(f"vector {vector} outside 0..255")
        t = {"interrupt": GATE_TYPE_INTERRUPT, "trap": GATE_TYPE_TRAP}[gate_type]
        gate = GateDescriptor(offset=handler, selector=selector, ist=ist, type=t, dpl=dpl,
                              present=present)
        self.phys.write(IDT_BASE + 16 * vector, gate.pack())

    def write_gate_raw(self, vector: int, raw: bytes) -> None:
        self.phys.write(IDT_BASE + 16 * vector, raw)

    def set_tss(self, **slots: int) -> None:
        """Set TSS fields by name: rsp0..rsp2, ist1..ist7."""
        for name, value in slots.items():
            if name.startswith("rsp"):
                off = TSS_RSP_OFFSET(int(name[3:]))
            elif name.startswith("ist"):
                off = TSS_IST_OFFSET(int(name[3:]))
            else:
                raise ValueError(f"unknown TSS field {name!r}")
            self.phys.write_u64(TSS_BASE + off, value)

    def set_page(self, spec: PageSpec) -> None:
        if self._built:
            raise RuntimeError("page overrides must be set before the first run")
        self.pages[spec.va & ~0xFFF] = spec

    def build(self) -> None:
        """Write page tables and load the control registers (once, before running)."""
        if self._built:
            return
        self._built = True
        self.phys.write_u64(TSS_BASE + TSS_IOMAP_BASE_OFFSET - 2, 0)
        self.phys.write(TSS_BASE + TSS_IOMAP_BASE_OFFSET, struct.pack("<H", TSS_SIZE))
        overrides = {va: p.pte for va, p in self.pages.items()}
        if self.apic is not None:
            # The APIC page: supervisor, writable, not executable (as Linux maps it).
            overrides.setdefault(APIC_BASE, APIC_BASE | PTE_P | PTE_W | PTE_XD)
        cr3, end = build_identity_map(self.phys, PT_BASE, self.phys.size, overrides)
        if end > RESERVED_END:
            raise ValueError("page tables overflow the reserved system area")
        self._cr3 = cr3
        self.symbols["pml4"] = cr3
        e = self.engine
        self._step_cache.clear()
        e.write({"cr4": CR4_DEFAULT})
        e.write_msr(0xC0000080, EFER_DEFAULT)
        e.write({"cr3": cr3, "cr0": CR0_DEFAULT})
        e.write_table("gdtr", 0, GDT_BASE, GDT_LIMIT)
        e.write_table("idtr", 0, IDT_BASE, 256 * 16 - 1)
        e.write_table("tr", TSS_SEL, TSS_BASE, TSS_SIZE - 1,
                      SegmentDescriptor.unpack(GDT_ENTRIES[5][:8]).high_dword)

    # -- state -------------------------------------------------------------------------
    def paging(self) -> PagingControl:
        """The paging controls. Between two engine runs nothing can change them but
        Python, so they are read once per stop (`_step_cache`, cleared around every run);
        during a run (TLB fills) they are read fresh."""
        ctl = self._step_cache.get("paging")
        if ctl is None:
            ctl = self._read_paging()
            if not self._running:
                self._step_cache["paging"] = ctl
        assert isinstance(ctl, PagingControl)
        return ctl

    def _read_paging(self) -> PagingControl:
        cr0, cr3, cr4 = self.engine.read(("cr0", "cr3", "cr4"))
        return PagingControl(cr3=cr3, cr0=cr0, cr4=cr4, efer=self.engine.read_msr(0xC0000080))

    def _table(self, which: str) -> tuple[int, int, int]:
        """IDTR/GDTR/TR, read once per stop like `paging`."""
        val = self._step_cache.get(which)
        if val is None:
            val = self.engine.read_table(which)
            if not self._running:
                self._step_cache[which] = val
        assert isinstance(val, tuple)
        return val

    def arch_state(self) -> ArchState:
        rip, rsp, rflags, cs, ss, cr2 = self.engine.read(("rip", "rsp", "rflags", "cs", "ss", "cr2"))
        _, idt_base, idt_limit = self._table("idtr")
        _, gdt_base, gdt_limit = self._table("gdtr")
        tr_sel, tr_base, tr_limit = self._table("tr")
        return ArchState(rip=rip, rsp=rsp, rflags=rflags, cs=cs, ss=ss, cpl=self.cpl,
                         idtr_base=idt_base, idtr_limit=idt_limit, gdtr_base=gdt_base,
                         gdtr_limit=gdt_limit, tr_selector=tr_sel, tr_base=tr_base,
                         tr_limit=tr_limit, cr2=cr2, nmi_blocked=self.nmi_blocked)

    def read_linear(self, addr: int, size: int) -> bytes:
        """Read guest memory through guest paging as the supervisor (no A/D side effects
        beyond what the hardware walk would do); raises `ArchFault` if unmapped."""
        return self.inspect.read(addr, size)

    def _load_segments(self, cs: int, ss: int, cpl: int,
                       current: tuple[int, int] | None = None) -> None:
        """Load CS/SS hidden state and the CPL (and reset QEMU's stale exception state).

        Skipped when nothing would change: `current` (the CS and SS selectors in the
        engine now) equal the new ones at the same CPL — the engine's hidden caches then
        already describe these selectors (set by an earlier patch, or loaded by the guest
        from the same GDT entries) — and no QEMU exception is in flight. Saves a context
        save/restore on INT n and same-stack IRETs."""
        if current == (cs, ss) and cpl == self.cpl and not self._stale_exception:
            return
        self._stale_exception = False
        cs_desc = self._gdt_descriptor(cs)
        ss_flags = (cpl << 13) if ss & 0xFFFC == 0 else self._gdt_descriptor(ss).high_dword
        self.engine.patch_context(segments=(cs, cs_desc.high_dword, ss, ss_flags, cpl),
                                  clear_stale_exception=True)
        if cpl != self.cpl:
            # TLB entries carry rights computed for one privilege: drop them on a change.
            self.engine.flush_tlb()
        self.cpl = cpl

    def _gdt_descriptor(self, selector: int) -> SegmentDescriptor:
        _, base, _limit = self._table("gdtr")
        return SegmentDescriptor.unpack(self.inspect.read(base + (selector & ~7), 8))

    # -- engine callbacks (no Python state changes beyond recording) ----------------------
    def _fill(self, vpage: int, access: Access) -> tuple[int, int] | None:
        if not is_canonical(vpage):
            return None
        try:
            t = self._guest_walk(self._read_paging(), vpage, access)
        except (ArchFault, EptViolation, EptMisconfig):
            return None  # poisoned: the access stops at its instruction (_memory_fault)
        if not self.phys.contains(t.paddr, 4096):
            # Also the local APIC page: every access to it stops the engine at the
            # accessing instruction, which the machine emulates (_emulate_apic_access).
            return None
        prot = PROT_R
        if t.writable and (t.dirty or access is Access.WRITE):
            prot |= PROT_W  # a clean page is filled read-only so the first write sets D
        if self.phys.dirty is not None:
            # Checkpoint tracking (cpu.snapshot): the engine may write a page only through
            # an entry filled for a write, which is where the page is marked.
            if access is Access.WRITE:
                self.phys.mark(t.paddr, 4096)
            else:
                prot &= ~PROT_W
        if t.executable:
            prot |= PROT_X
        if self.ept is not None:
            # The engine's TLB entry serves every kind of access: it may only grant what
            # both stages allow. A kind EPT refuses misses the TLB and comes back here
            # as its own fill, which then poisons (a violation at its instruction).
            for kind, bit in ((Access.READ, PROT_R), (Access.WRITE, PROT_W), (Access.FETCH, PROT_X)):
                if prot & bit and kind is not access and not self._ept_allows(t.paddr, kind):
                    prot &= ~bit
        return t.paddr, prot

    def _ept_allows(self, hpa: int, access: Access) -> bool:
        assert self.ept is not None
        try:
            self.ept.translate(hpa, access)  # identity: the host address is the GPA
        except (EptViolation, EptMisconfig):
            return False
        return True

    # -- the second translation stage (VMX EPT) and #VE ------------------------------------
    def _guest_walk(self, ctl: PagingControl, vaddr: int, access: Access) -> Translation:
        """The guest's own access: guest paging, then EPT when the machine has it."""
        if self.ept is None:
            return self.sysmem.walks.walk(ctl, vaddr, access, user=self.cpl == 3)
        return self.sysmem.walks.walk(ctl, vaddr, access, user=self.cpl == 3, stage2=self.stage2,
                                      stage2_generation=self.ept.generation)

    def stage2(self, gpa: int, access: Access, linear: int, final: bool) -> int:
        """EPT translation of one guest-physical access (`cpu.mmu.Stage2`). A violation
        is annotated with the guest-linear address and whether it hit the final
        translation or a guest paging-structure entry (qualification bits 7 and 8)."""
        assert self.ept is not None
        if self.apic is not None and gpa & ~0xFFF == APIC_BASE:
            return gpa  # the APIC page is not behind EPT here (no APIC virtualization)
        try:
            return self.ept.translate(gpa, access)
        except EptViolation as v:
            v.gla = linear
            v.final = final
            raise

    def _ept_violation(self, v: EptViolation, rip: int, access: Access, *,
                       during: Event | None = None, nmi_unblocked: bool = False) -> None:
        """An EPT violation at `rip` (in the access `access`, or while delivering `during`):
        convert it to #VE when SDM "EPT Violations" / semantics §7.1 allow, else VM-exit
        to the host model."""
        assert self.vmx is not None and self.ept is not None
        if self.apf is not None and self.apf.is_swapped(v.gpa):
            self._apf_fault(v, rip, during)
            return
        gla = getattr(v, "gla", None)
        qual = ept_qualification(
            read=v.access is Access.READ, write=v.access is Access.WRITE,
            fetch=v.access is Access.FETCH, readable=v.readable, writable=v.writable,
            executable=v.executable, gla_valid=gla is not None,
            final_translation=bool(getattr(v, "final", True)), nmi_unblocked_by_iret=nmi_unblocked)
        ve_info = self.vmx.ve_info
        busy = VE_BUSY if ve_info is None else self.phys.read_uint(ve_info + VE_INFO_BUSY, 4)
        convert, why = convert_to_ve(ve_enabled=self.vmx.ept_violation_ve and self.vmx.ve_info is not None,
                                     suppress_ve=v.suppress_ve, busy=busy,
                                     during_delivery=during is not None)
        if convert:
            assert self.vmx.ve_info is not None
            info = VeInfo(exit_reason=EXIT_REASON_EPT_VIOLATION, busy=VE_BUSY, qualification=qual,
                          guest_linear=gla or 0, guest_physical=v.gpa,
                          eptp_index=self.vmx.eptp_index)
            self.phys.write(self.vmx.ve_info, info.pack())
            self._emit("ve_info_written", at=self.vmx.ve_info, exit_reason=info.exit_reason,
                       busy=info.busy, qualification=qual, gla=info.guest_linear,
                       gpa=info.guest_physical, eptp_index=info.eptp_index,
                       **decode_qualification(qual))
            # #VE: a fault with no error code; saved RIP = the faulting instruction.
            self.deliver(Event.exception(VE_VECTOR, rip), why=f"EPT violation at GPA {v.gpa:#x}")
            return
        exit_ = VmExit(reason=EXIT_REASON_EPT_VIOLATION, qualification=qual, gpa=v.gpa, gla=gla,
                       rip=rip, during_delivery=during, nmi_unblocked_by_iret=nmi_unblocked, why=why)
        self._events += 1
        if self._events > self.max_events:
            raise _Stop("max_events", f"more than {self.max_events} events (VM exits that never "
                        "resolve?)", rip)
        policy = self.on_ept_violation
        action = policy(self, exit_) if callable(policy) else policy
        self._emit("vmexit", reason=exit_.reason, qualification=qual, gpa=v.gpa, gla=gla, rip=rip,
                   during_delivery=during.name if during is not None else None,
                   nmi_unblocked_by_iret=nmi_unblocked, why=why, action=action)
        if action == "stop":
            raise _Stop("vmexit", f"EPT violation at GPA {v.gpa:#x} ({why}): VM exit, host stops",
                        rip)
        if action == "resume-fixed":
            self.ept.fix(v.gpa)
        elif action != "resume":
            raise Unsupported(f"host action {action!r} (known: resume-fixed, resume, stop)")
        self.engine.flush_tlb()
        if during is not None and action == "resume":
            # Nothing changed for the delivery: re-delivering would only exit again.
            raise _Stop("vmexit", f"EPT violation at GPA {v.gpa:#x} while delivering "
                        f"{during.name}: the host resumed without fixing it", rip)
        if nmi_unblocked:
            # The IRET re-executes: the host re-establishes the NMI blocking it cleared
            # (SDM "NMI Unblocking Due to IRET"; KVM vmx_recover_nmi_blocking).
            self.nmi_blocked = True
        if during is not None:
            self.deliver(during)  # the interrupted delivery re-executes (re-injection)

    # -- KVM async page faults: the host side (semantics §8) --------------------------------
    def enable_apf(self, *, policy: str | Callable[[Machine, GuestState], Decision] = "kvm",
                   layout: str = "2020", on_fail: str = "retry") -> AsyncPf:
        """Model a KVM host with paravirtual async page faults. Swapped-out pages
        (`swap_out`) are EPT-not-present with suppress-#VE set, so a guest access to one
        is a VM exit that the host answers by `policy`: inject a page-not-present #PF
        (error code 0, CR2 = token, `flags` = 1) or stall the vCPU ("artificial halt")
        until the page is in. `on_fail`: what the host does when a page-in fails (seed
        mail 2020-06-30): "retry" (synchronously, successfully), "stop" (outcome
        `vmexit`), or "inject-pf" (a synchronous #PF for the access)."""
        if on_fail not in APF_FAIL_ACTIONS:
            raise ValueError(f"unknown on_fail {on_fail!r} (known: {', '.join(APF_FAIL_ACTIONS)})")
        self.apf = AsyncPf(layout=layout, policy=policy if isinstance(policy, str) else "kvm")
        self._apf_policy = policy
        self._apf_on_fail = on_fail
        self._apf_notified: set[int] = set()  # tokens given to the guest
        self._apf_legacy_ready: list[int] = []
        if self.ept is None:
            # An async #PF is a host decision on an EPT violation: give the machine the
            # second stage (identity, all RWX) without #VE.
            self.vmx = VmxConfig()
            self.ept = Ept(self.phys.size)
        return self.apf

    def swap_out(self, gpa: int, size: int = 4096, *, latency: int = 5000,
                 fail: bool = False) -> None:
        """The host swaps guest-physical [gpa, gpa+size) out: the first access waits
        `latency` cycles for the page-in (asynchronously or not, by policy)."""
        if self.apf is None or self.ept is None:
            raise ValueError("swap_out needs async page faults (Machine.enable_apf)")
        self.apf.swap_out(gpa, size, latency=latency, fail=fail)
        self.ept.set_range(gpa, size, read=False, write=False, execute=False, suppress_ve=True)

    def _apf_guest_state(self, rip: int) -> GuestState:
        assert self.apf is not None
        rflags = self.engine.read_reg("rflags")
        # Pre-2020 KVM (the legacy layout) had no DELIVERY_AS_INT: page ready was a #PF.
        legacy = self.apf.layout == "legacy"
        return GuestState(apf_enabled=self.apf.enabled, send_always=self.apf.send_always,
                          delivery_as_int=self.apf.delivery_as_int or legacy,
                          if_flag=bool(rflags & RFLAGS_IF),
                          shadow=self._shadow_at(rip, self.engine.icount) is not Shadow.NONE,
                          exception_pending=False, cpl=self.cpl, nmi_blocked=self.nmi_blocked,
                          paging=True)

    def _apf_decide(self, rip: int) -> Decision:
        policy = self._apf_policy
        g = self._apf_guest_state(rip)
        return policy(self, g) if callable(policy) else decide(policy, g)

    def _apf_fault(self, v: EptViolation, rip: int, during: Event | None) -> None:
        """A guest access hit a swapped-out page: a VM exit the host answers itself by
        its policy (inject a page-not-present #PF, or stall the vCPU until the page is
        in), or, for a page whose page-in fails, by `on_fail`."""
        assert self.apf is not None and self.ept is not None
        e = self.engine
        page = v.gpa & ~0xFFF
        st = self.apf.swap_state(page)
        assert st is not None
        gla = getattr(v, "gla", None)
        if st.fail and st.token is None and st.failed_page_ins:
            # A page-in of this page already failed (seed mail 2020-06-30).
            self._emit("apf_page_in_failed", gpa=page, gla=gla, failures=st.failed_page_ins,
                       action=self._apf_on_fail)
            if self._apf_on_fail == "stop" or st.failed_page_ins >= APF_MAX_RETRIES:
                raise _Stop("vmexit", f"page-in of GPA {page:#x} failed "
                            f"{st.failed_page_ins} time(s): host stops", rip)
            if self._apf_on_fail == "inject-pf" and during is None and gla is not None:
                ec = int(PFErr.P) | (int(PFErr.W) if v.access is Access.WRITE else 0) | (
                    int(PFErr.U) if self.cpl == 3 else 0)
                self.deliver(Event.exception(Vector.PF, rip, ec, gla),
                             why=f"page-in of GPA {page:#x} failed: host injects a #PF")
                return
        if st.token is not None:
            decision = Decision(False, "page-in already in flight (repeated fault)")
        elif during is not None:
            decision = Decision(False, "during event delivery")
        else:
            decision = self._apf_decide(rip)
        if decision.inject:
            token = self.apf.start_page_in(page, e.cycles)
            self._apf_notified.add(token)
            self._emit("apf_not_present", token=token, gpa=page, gla=gla, decision="inject",
                       reason=decision.reason, policy=self._policy_name())
            self._apf_deliver_not_present(token, rip)
            return
        # Synchronous page-in or KVM's "artificial halt": the vCPU stalls until the page
        # is in; the guest sees an ordinary (slow) access.
        if st.token is None:
            self.apf.start_page_in(page, e.cycles, notify=False)
        st = self.apf.swap_state(page)
        assert st is not None and st.ready_at is not None
        wait = max(0, st.ready_at - e.cycles)
        self._emit("apf_not_present", token=None, gpa=page, gla=gla, decision="halt",
                   reason=decision.reason, policy=self._policy_name())
        self._emit("apf_halt", gpa=page, cycles=wait)
        e.cycles += wait
        self._apf_service()  # completes the page-in (and queues any page-ready)
        if during is not None:
            self.deliver(during)

    def _apf_area_write(self, offset: int, value: int) -> None:
        assert self.apf is not None and self.apf.area_gpa is not None
        self.phys.write(self.apf.area_gpa + offset, value.to_bytes(4, "little"))

    def _apf_area_read(self, offset: int) -> int:
        assert self.apf is not None and self.apf.area_gpa is not None
        return self.phys.read_uint(self.apf.area_gpa + offset, 4)

    def _policy_name(self) -> str:
        return self._apf_policy if isinstance(self._apf_policy, str) else "callback"

    def _apf_deliver_not_present(self, token: int, rip: int) -> None:
        """Page not present: `flags` (or the legacy `reason`) = 1, then #PF(0), CR2 = token."""
        assert self.apf is not None
        if self.apf.area_gpa is not None:
            self._apf_area_write(APF_FLAGS_OFFSET, REASON_PAGE_NOT_PRESENT)
        self.deliver(Event.exception(Vector.PF, rip, 0, token), why="async #PF: page not present")

    def _apf_inject(self, token: int | None, gpa: int | None, *, where: dict[str, Any]) -> None:
        """A scenario-forced async #PF at an injection point (the policy is not asked).
        With a swapped-out `gpa` the host starts its page-in and the #PF carries the
        host's token (page ready follows); otherwise CR2 = `token`."""
        assert self.apf is not None
        rip = self.engine.read_reg("rip")
        st = self.apf.swap_state(gpa) if gpa is not None else None
        if gpa is not None and st is not None and st.token is None:
            token = self.apf.start_page_in(gpa, self.engine.cycles)
            self._apf_notified.add(token)
        if token is None:
            raise _Stop("unsupported", "async_pf injection without a token needs a swapped-out "
                        "gpa whose page-in is not already in flight", rip)
        self._emit("apf_not_present", token=token, gpa=gpa, gla=None, decision="inject",
                   reason="forced by the scenario", policy=self._policy_name(), **where)
        self._apf_deliver_not_present(token, rip)

    def _apf_service(self) -> None:
        """At a boundary: page-ins that completed, and page-ready notifications."""
        apf = self.apf
        if apf is None:
            return
        e = self.engine
        for page, token in apf.complete_due(e.cycles):
            assert self.ept is not None
            if not apf.is_swapped(page):
                self.ept.fix(page)
                self.engine.flush_tlb()
            self._emit("apf_page_in_done", gpa=page, token=token, ok=not apf.is_swapped(page))
            if apf.layout == "legacy" and token in self._apf_notified:
                self._apf_legacy_ready.append(token)
        if apf.area_gpa is None or not apf.enabled:
            return
        if apf.layout == "legacy":
            # Page ready is a second #PF with reason 2 (pre-2020 ABI), injected under
            # the same conditions as page-not-present, when the reason word is free.
            if not self._apf_legacy_ready:
                self._apf_wants_step = False
                return
            if self._apf_area_read(APF_REASON_OFFSET) != 0:
                # The guest frees the reason word with an ordinary store: step until then.
                self._apf_wants_step = True
                return
            rip = e.read_reg("rip")
            decision = self._apf_decide(rip)
            if not decision.inject:
                # Held by IF = 0 or a shadow: both can end without an event the machine
                # sees, so step until they do (KVM: the next VM exit re-checks).
                self._apf_wants_step = decision.outcome == "synchronous"
                return
            self._apf_wants_step = False
            token = self._apf_legacy_ready.pop(0)
            self._apf_area_write(APF_REASON_OFFSET, REASON_PAGE_READY)
            self._emit("apf_page_ready", token=token, vector=int(Vector.PF), layout="legacy")
            if self._halted:
                # Old KVM made the vCPU runnable (kvm_arch_async_page_present).
                self._halted = False
                e.cycles += self.profile.event("hlt_wake")
                self._emit("wake", by="async_pf", vector=int(Vector.PF))
            self.deliver(Event.exception(Vector.PF, rip, 0, token), why="async #PF: page ready")
            return
        if self.apic is None:
            return
        ready = apf.page_ready_to_deliver(self._apf_area_read(APF_TOKEN_OFFSET),
                                          apic_enabled=self.apic.software_enabled)
        if ready is None:
            return
        token = ready
        assert apf.vector is not None
        self._apf_area_write(APF_TOKEN_OFFSET, token)
        apf.delivered(token)
        # KVM's dequeue loop goes on at once, finds the slot it just filled busy and
        # stops: the next page-ready waits for the guest's ACK (or another completion).
        apf.page_ready_to_deliver(token, apic_enabled=self.apic.software_enabled)
        self.apic.set_irr(apf.vector)
        self._emit("apf_page_ready", token=token, vector=apf.vector, layout="2020")

    def _ept_misconfig(self, bad: EptMisconfig, rip: int, *, during: Event | None = None) -> None:
        """An EPT misconfiguration (SDM 3C "EPT Misconfigurations"): a VM exit with basic
        reason 49, never a #VE. The host stops, or with "resume-fixed" rewrites the page's
        entry as RWX and resumes (the delivery, if any, re-executes)."""
        assert self.ept is not None
        policy = self.on_ept_violation
        action = "stop" if callable(policy) else policy
        self._emit("vmexit", reason=EXIT_REASON_EPT_MISCONFIG, qualification=0, gpa=bad.gpa,
                   gla=None, rip=rip, during_delivery=during.name if during is not None else None,
                   nmi_unblocked_by_iret=False, why=bad.why, action=action)
        self._events += 1
        if action != "resume-fixed" or self._events > self.max_events:
            raise _Stop("vmexit", str(bad), rip)
        self.ept.set_range(bad.gpa & ~0xFFF, 4096, read=True, write=True, execute=True)
        self.engine.flush_tlb()
        if during is not None:
            self.deliver(during)

    def _on_poison(self, vaddr: int, access: Access) -> None:
        self._pending = lambda: self._memory_fault(vaddr, access)

    def _on_unmapped(self, paddr: int, access: Access) -> None:
        def stop() -> None:
            rip = self.engine.read_reg("rip")
            raise _Stop("outside_memory", f"{access.name.lower()} of physical {paddr:#x}", rip)
        self._pending = stop

    def _on_interrupt(self, vector: int) -> None:
        self._pending = lambda: self._hooked_exception(vector)
        self.engine.stop()

    def _arrive(self, address: int, here: int) -> list[Injection]:
        """Execution is at the boundary before instruction number `here`, at `address`,
        an injection point: count the arrival (once per boundary: the same boundary
        re-entered after a stop is not a new arrival; a return to it by IRET is) and
        return the injections due there, a pause last."""
        if self._site_seen == (address, here):
            return []
        self._site_seen = (address, here)
        n = self._arrivals[address] = self._arrivals.get(address, 0) + 1
        due = [inj for inj in self._before[address].pop(n, ()) if not inj.fired]
        return sorted(due, key=lambda i: i.event == PAUSE)

    def _arrive_here(self) -> None:
        """At a boundary the machine holds (between engine runs): an arrival at an
        injection point there counts even when an event is delivered before its
        instruction runs (the code hook would never see it)."""
        if self._before or self.on_boundary:
            rip = self.engine.read_reg("rip")
            for cb in self.on_boundary:
                cb(rip)
            if rip in self._before:
                for inj in self._arrive(rip, self.engine.icount + 1):
                    self._fire(inj)

    def _on_site(self, address: int) -> None:
        e = self.engine
        if address in self._before:
            due = self._arrive(address, e.count_at(address))
            if due:
                def fire() -> None:
                    e.uncount()  # stopped before the instruction at `address` executed
                    for inj in due:
                        self._fire(inj)
                self._pending = fire
                e.stop()
                return
        if self._observe_cr2 and address in self._cr2_reads:
            self._cr2_read(address)
            return
        kind = self.sites.get(address)
        if kind == "iret":
            self._pending = lambda: self._emulate_iret(address)
        elif kind == "hlt":
            self._pending = lambda: self._hlt(address)
        elif kind in ("sti", "mov_ss"):
            self._open_shadow(address, kind)
            return  # observed, not intercepted: the instruction runs natively
        elif kind == "out":
            if not self._exit_write(address):
                return  # another port: the instruction runs natively (port hook)
        elif kind in ("rdmsr", "wrmsr"):
            self._pending = lambda: self._emulate_msr(address, write=kind == "wrmsr")
        elif kind == "cpuid":
            leaf = e.read_reg("rax") & 0xFFFFFFFF
            if self._cpuid_leaf(leaf) is None:
                return  # Unicorn's own CPUID
            self._pending = lambda: self._emulate_cpuid(address, leaf)
        else:
            return
        e.stop()

    # -- MSRs and CPUID (intercepted at their sites, like IRET) ----------------------------
    def _emulate_msr(self, address: int, *, write: bool) -> None:
        """RDMSR/WRMSR (SDM Vol. 2): #GP(0) at CPL > 0, for an MSR this machine does not
        implement, or for reserved bits; otherwise EDX:EAX <-> MSR[ECX]."""
        e = self.engine
        e.uncount()
        rax, rcx, rdx = e.read(("rax", "rcx", "rdx"))
        msr = rcx & 0xFFFFFFFF
        name = "WRMSR" if write else "RDMSR"
        if self.cpl != 0:
            self.deliver(Event.exception(Vector.GP, address, 0), why=f"{name} at CPL{self.cpl}")
            return
        value = ((rdx & 0xFFFFFFFF) << 32) | (rax & 0xFFFFFFFF)
        try:
            if write:
                self._wrmsr(msr, value)
            else:
                value = self._rdmsr(msr)
        except MsrFault as fault:
            self._emit("msr_fault", msr=msr, write=write, why=str(fault))
            self.deliver(Event.exception(Vector.GP, address, 0), why=f"{name} {msr:#x}: {fault}")
            return
        self._emit("msr_write" if write else "msr_read", msr=msr, value=value)
        regs = {"rip": address + 2}
        if not write:
            regs.update(rax=value & 0xFFFFFFFF, rdx=value >> 32)
        e.write(regs)
        e.recount()

    def _rdmsr(self, msr: int) -> int:
        if msr == MSR_EFER:
            return self.engine.read_msr(msr)
        if msr == MSR_APIC_BASE:
            return APIC_BASE | APIC_BASE_BSP | (APIC_BASE_ENABLE if self.apic is not None else 0)
        if msr == MSR_TSC:
            return (self.engine.cycles + self._tsc_offset) & (2**64 - 1)
        if msr in PASSTHROUGH_MSRS:
            return self.engine.read_msr(msr)
        if self.apf is not None and self.apf.handles(msr):
            return self.apf.rdmsr(msr)
        raise MsrFault(f"MSR {msr:#x} is not implemented by this machine")

    def _wrmsr(self, msr: int, value: int) -> None:
        if msr == MSR_EFER:
            old = self.engine.read_msr(msr)
            if value & ~EFER_WRITABLE:
                raise MsrFault(f"reserved EFER bits {value & ~EFER_WRITABLE:#x}")
            if (value ^ old) & EFER_LME:
                raise MsrFault("EFER.LME changed while paging is on")
            # LMA is read-only: keep the processor's value.
            self.engine.write_msr(msr, (value & ~EFER_LMA) | (old & EFER_LMA))
            self._step_cache.clear()
            self.engine.flush_tlb()
            return
        if msr == MSR_APIC_BASE:
            if value != self._rdmsr(msr):
                raise Unsupported(f"IA32_APIC_BASE write {value:#x}: moving or disabling the "
                                  "local APIC is not modelled")
            return
        if msr == MSR_TSC:
            self._tsc_offset = (value - self.engine.cycles) & (2**64 - 1)
            return
        if msr in PASSTHROUGH_MSRS:
            self.engine.write_msr(msr, value)
            return
        if self.apf is not None and self.apf.handles(msr):
            try:
                self.apf.wrmsr(msr, value, self.engine.cycles)
            except ApfMsrError as exc:
                raise MsrFault(str(exc)) from None
            return
        raise MsrFault(f"MSR {msr:#x} is not implemented by this machine")

    def _cpuid_leaf(self, leaf: int) -> tuple[int, int, int, int] | None:
        """CPUID where this machine differs from Unicorn's CPU model (None: Unicorn's own
        answer is right). Leaf 1: the local APIC bit (EDX bit 9) and the initial APIC ID
        (EBX[31:24]) say whether and which xAPIC there is, and the hypervisor bit (ECX
        bit 31) is set only when the machine models KVM's paravirtual interface, whose
        leaves (0x40000000..) it then answers; without it those leaves are all zero.
        Leaf 0x80000001: 1-GiB pages (EDX bit 26), which the page walk implements."""
        if leaf == CPUID_FEATURES:
            eax, ebx, ecx, edx = native_cpuid(leaf)
            edx &= ~CPUID_1_EDX_APIC
            ecx &= ~CPUID_1_ECX_HYPERVISOR
            ebx &= 0x00FFFFFF
            if self.apic is not None:
                edx |= CPUID_1_EDX_APIC
                ebx |= self.apic.apic_id << 24
            if self.apf is not None:
                ecx |= CPUID_1_ECX_HYPERVISOR
            return eax, ebx, ecx, edx
        if leaf == CPUID_EXT_FEATURES:
            eax, ebx, ecx, edx = native_cpuid(leaf)
            return eax, ebx, ecx, edx | CPUID_EXT_EDX_PAGE1GB
        if CPUID_HYPERVISOR_FIRST <= leaf <= CPUID_HYPERVISOR_LAST:
            regs = apf_cpuid(leaf) if self.apf is not None else None
            return regs if regs is not None else (0, 0, 0, 0)
        return None

    def _emulate_cpuid(self, address: int, leaf: int) -> None:
        e = self.engine
        e.uncount()
        regs = self._cpuid_leaf(leaf)
        assert regs is not None
        eax, ebx, ecx, edx = regs
        e.write({"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx, "rip": address + 2})
        e.recount()

    def _exit_write(self, address: int) -> bool:
        """An OUT about to write the exit port, the last byte of Bochs' "Shutdown", or the
        flush-page port while injections wait for it: emulate it and end the run (or fire
        the injections) right after it (exact in both counting modes; the port hook alone
        would stop only at the next block boundary in fast mode). Returns False for other
        ports (the instruction then runs natively and reaches the port hook)."""
        insn = decode_one(self._code_bytes(address, 2) or b"", address)
        if insn is None:
            return False
        port = out_port(insn.op_str)
        if port is None:
            port = self.engine.read_reg("rdx") & 0xFFFF
        if port not in (EXIT_PORT, BOCHS_SHUTDOWN_PORT, FLUSH_PAGE_PORT):
            return False
        width = {"al": 1, "ax": 2, "eax": 4}.get(insn.op_str.split(",")[-1].strip(), 1)
        value = self.engine.read_reg("rax") & ((1 << (8 * width)) - 1)
        after = address + insn.size
        if port == BOCHS_SHUTDOWN_PORT and width == 1 and self.bochs_shutdown.completes(value):
            def shutdown() -> None:
                self.bochs_shutdown.write(value)
                self.engine.write({"rip": after})  # the OUT retires
                raise _Stop("exit", SHUTDOWN_DETAIL, after)

            self._pending = shutdown
            return True
        if port == FLUSH_PAGE_PORT and self._port_points.get("flush_page"):
            def flush() -> None:
                self.engine.write({"rip": after})  # the OUT retires, then the flush happens
                self._flush_page(value, in_hook=False)

            self._pending = flush
            return True
        if port != EXIT_PORT:
            return False

        def stop() -> None:
            # The OUT retires (it was counted when the engine stopped before it).
            self.engine.write({"rip": address + insn.size})
            raise _Stop("exit", f"exit device: {value:#x}", address + insn.size, exit_code=value)

        self._pending = stop
        return True

    def _open_shadow(self, address: int, kind: str) -> None:
        """STI (only when IF was 0) and MOV SS open a one-instruction shadow, recorded as
        "in force at the boundary where `icount` instructions have retired and RIP is the
        next instruction". The instruction has been counted but not executed yet; if it
        faults instead, the delivery clears the record. A shadow-opening instruction
        inside an existing shadow opens none (only the first of a run of them is
        guaranteed to delay, SDM STI; Bochs ignores a MOV SS in a MOV-SS shadow)."""
        e = self.engine
        here = e.count_at(address)
        if self._shadow_at(address, here - 1) is not Shadow.NONE:
            return
        if kind == "sti":
            if e.read_reg("rflags") & RFLAGS_IF:
                return  # STI with IF already 1 opens no shadow
            shadow = Shadow.STI
        else:
            shadow = Shadow.MOV_SS
        self._shadow_rec = (here, address + self._site_len.get(address, 1), shadow)

    def _shadow_at(self, rip: int, retired: int) -> Shadow:
        rec = self._shadow_rec
        if rec is not None and rec[0] == retired and rec[1] == rip:
            return rec[2]
        return Shadow.NONE

    def _on_port_in(self, port: int, size: int) -> int:
        if self.uart.handles(port):
            # A 16550's registers are bytes: a wider access reads consecutive ones.
            return sum((self.uart.read(port + i) if self.uart.handles(port + i) else 0xFF) << 8 * i
                       for i in range(size))
        if port == FW_CFG_PORT_DATA and size == 1:
            return self.fwcfg.read_data()
        # No device: all ones, like an undriven ISA bus.
        self._emit("port", direction="in", port=port, size=size)
        return (1 << (8 * size)) - 1

    def _serial_byte(self, byte: int) -> None:
        """A byte the UART transmitted."""
        self.serial.append(byte)
        if byte == 0x0A:
            # One record per line, so the output appears in the timeline where it was
            # written.
            start = self.serial.rfind(b"\n", 0, len(self.serial) - 1) + 1
            text = self.serial[start:-1].decode("latin-1")
            self._emit("serial", text=text)
            for cb in self.on_serial_line:
                cb(text)

    def _flush_page(self, address: int, *, in_hook: bool) -> None:
        """pc-testdev's flush-page port (cpu/devices/testports.py): drop the engine's
        translations, so the next access to the page goes through the TLB-fill hook and
        guest paging again; then the `at_port = "flush_page"` injections of this write
        arrive (pending at the boundary right after the OUT)."""
        self.engine.flush_tlb()
        n = self._port_writes["flush_page"] = self._port_writes.get("flush_page", 0) + 1
        self._emit("flush_page", address=address, hit=n)
        due = [inj for inj in self._port_points.get("flush_page", {}).pop(n, ()) if not inj.fired]
        for inj in due:
            self._fire(inj)
        if due and in_hook:
            self._request_boundary()

    def _on_port_out(self, port: int, size: int, value: int) -> None:
        if self.uart.handles(port):
            for i in range(size):
                if self.uart.handles(port + i):
                    self.uart.write(port + i, value >> 8 * i)
        elif port == FW_CFG_PORT_SEL and size == 2:
            self.fwcfg.select(value)
        elif port == FLUSH_PAGE_PORT:
            self._flush_page(value, in_hook=True)
        elif port == BOCHS_SHUTDOWN_PORT and size == 1:
            if self.bochs_shutdown.write(value):
                # Ends the run at the next boundary (exactly after the OUT when the OUT was
                # decoded at load: _exit_write).
                self._shutdown_requested = True
                self._request_boundary()
        elif port == EXIT_PORT:
            # Ends the run at the boundary after the OUT (the counter stops there exactly).
            self._exit_code = value
            self._request_boundary()
        else:
            self._emit("port", direction="out", port=port, size=size, value=value)

    # -- event handling (run loop side) ----------------------------------------------
    def _memory_fault(self, vaddr: int, access: Access) -> None:
        self._stale_exception = True  # conservative: a context patch follows anyway
        if access is Access.FETCH:
            boundary = self._fetch_boundary_before(vaddr)
            if boundary is not None:
                # Not this instruction's fault yet: run up to the boundary, then retry.
                self._fetch_boundary = boundary
                self.engine.flush_tlb()
                return
        if access is not Access.FETCH:
            # A data access faults inside an instruction the native counter has already
            # counted: it did not complete. A fetch fault happens while the engine
            # translates code, before the counter's hook runs for the instruction being
            # fetched, so there is nothing to take back.
            self.engine.uncount()
        rip = self.engine.read_reg("rip")
        try:
            if not is_canonical(vaddr):
                stack = access is not Access.FETCH and self._stack_reference(rip)
                raise ArchFault(Vector.SS if stack else Vector.GP, 0,
                                why=f"non-canonical address {vaddr:#x}")
            t = self._guest_walk(self.paging(), vaddr, access)
        except EptViolation as violation:
            self.engine.flush_tlb()
            self._ept_violation(violation, rip, access)
            return
        except EptMisconfig as bad:
            self.engine.flush_tlb()
            self._ept_misconfig(bad, rip)
            return
        except ArchFault as fault:
            self.engine.flush_tlb()  # drop the poison entry; the retry walks again
            cr2 = fault.cr2
            if cr2 is not None and access is not Access.FETCH:
                cr2 = self._split_access_cr2(rip, vaddr)
            self.deliver(Event.exception(fault.vector, rip, fault.error_code, cr2),
                         why=fault.why)
            return
        if self.apic is not None and t.paddr == APIC_BASE and access is not Access.FETCH:
            self._emulate_apic_access(rip, vaddr, access)
            return
        if not self.phys.contains(t.paddr | (vaddr & 0xFFF)):
            raise _Stop("outside_memory",
                        f"{access.name.lower()} of {vaddr:#x} maps to physical {t.paddr:#x}, "
                        "outside guest memory", rip)
        self.engine.flush_tlb()  # the page became valid since it was poisoned: retry

    def _split_access_cr2(self, rip: int, vaddr: int) -> int:
        """CR2 for a data #PF at `vaddr`, reported by the engine, in the instruction at RIP.

        An access that starts on one page and runs into a second, faulting page faults
        at the first byte of the second page (CR2 = that page's address; Bochs translates
        both pages before it touches memory). Unicorn splits such a store into pieces and
        the poisoned piece may be any byte of the second page (e.g. 0x401003 for an
        8-byte store at 0x400ffc), so when an explicit memory operand of the instruction
        covers `vaddr` but starts on an earlier page, CR2 is that page boundary.
        Known deviation, not repaired: the bytes of such a store that the engine already
        wrote to the first page stay written (the architecture writes none of them).
        """
        page = vaddr & ~0xFFF
        try:
            length, operands = memory_operands(self.read_linear(rip, 15), rip)
        except ArchFault:
            return vaddr
        for op in operands:
            if op.segment in ("fs", "gs"):
                continue  # segment bases are not read here
            ea = op.disp
            regs = [r for r in (op.base, op.index) if r is not None]
            if any(r != "rip" and r not in GPRS for r in regs):
                continue  # 32-bit address size and the like: keep the engine's address
            if op.base == "rip":
                ea += rip + length
            elif op.base is not None:
                ea += self.engine.read_reg(op.base)
            if op.index is not None:
                ea += self.engine.read_reg(op.index) * op.scale
            ea &= 2**64 - 1
            if ea < page <= vaddr < ea + op.size:
                return page
        return vaddr

    def _fetch_boundary_before(self, vaddr: int) -> int | None:
        """Where straight-line code from RIP first touches `vaddr`'s page, if not at RIP.

        Unicorn translates a whole block of straight-line code before running any of it,
        and a block may run on from one page into the next. When fetching a *later*
        instruction of the block faults, the engine stops at the block's start with none
        of it executed, but architecturally the instructions before the faulting one run
        and retire first, and the #PF names the faulting instruction (SDM "Page-Fault
        Exceptions"; the saved RIP is the instruction whose fetch faulted). A block has
        no taken branch inside, so a linear decode from RIP finds that instruction: the
        first one not wholly inside the bytes before `vaddr`'s page (it either starts on
        that page or straddles into it). Returns its address, or None if it is at RIP.
        """
        rip = self.engine.read_reg("rip")
        page = vaddr & ~0xFFF
        if not rip < page <= rip + 4096:
            return None
        try:
            code = self.read_linear(rip, page - rip)
        except ArchFault:
            return None
        end = rip
        for insn in decode(code, rip):  # stops at an instruction cut off by the page end
            end = insn.address + insn.size
        return end if end != rip else None

    def _stack_reference(self, rip: int) -> bool:
        try:
            code = self.read_linear(rip, 15)
        except ArchFault:
            return False
        return is_stack_reference(code, rip)

    def _hooked_exception(self, vector: int) -> None:
        rip = self.engine.read_reg("rip")
        if vector == Vector.BP or vector >= 32:
            # Only INT3 / INT n raise these vectors here: software interrupts, which QEMU
            # raises without its nested-exception bookkeeping.
            error_code, is_int = 0, True
        else:
            error_code, is_int = self.engine.exception_info()
            self._stale_exception = self._stale_exception or not is_int
        if is_int:
            # INT n / INT3 (trap): RIP is already past the instruction; find its start.
            insn = rip - 1 if vector == 3 and self._byte_at(rip - 1) == 0xCC else rip - 2
            self.deliver(Event(vector, Source.SOFTWARE, rip, insn), why="")
        elif vector == Vector.DB:
            # Single-step (TF) #DB: a trap at the boundary after the instruction.
            self.deliver(Event(vector, Source.EXCEPTION, rip, rip, trap_like=True), why="")
        else:
            self.engine.uncount()  # a fault: the instruction did not retire
            ec = error_code if vector in (8, 10, 11, 12, 13, 14, 17, 21) else None
            self.deliver(Event.exception(vector, rip, ec), why="")

    def _byte_at(self, addr: int) -> int | None:
        try:
            return self.read_linear(addr, 1)[0]
        except ArchFault:
            return None

    def _invalid_opcode(self) -> None:
        self._stale_exception = True
        rip = self.engine.read_reg("rip")
        self.engine.uncount()
        if self._byte_at(rip) == 0xF1:
            # INT1/ICEBP: a trap through vector 1 with no gate-DPL check (EXT=1, Bochs).
            self.engine.recount()
            self.deliver(Event(Vector.DB, Source.PRIV_SOFTWARE, rip + 1, rip), why="INT1")
        else:
            self.deliver(Event.exception(Vector.UD, rip), why="invalid opcode")

    def _hlt(self, address: int) -> None:
        self.engine.uncount()
        if self.cpl != 0:
            self.deliver(Event.exception(Vector.GP, address, 0), why="HLT at CPL>0")
            return
        self.engine.recount()
        # HLT retires; the CPU waits at the boundary after it, so an event that wakes it
        # saves RIP = the instruction after the HLT (SDM HLT). The run loop does the wait.
        self.engine.write({"rip": address + 1})
        self._halted = True

    def _emulate_iret(self, address: int) -> None:
        self.engine.uncount()
        if address not in self._iretq:
            raise _Stop("unsupported", "IRET without REX.W (IRETD/IRETW) is not modelled", address)
        st = self.arch_state()
        was_blocked = st.nmi_blocked
        try:
            with self._paging_snapshot():
                res = iret64(self.sysmem, st)
        except ArchFault as fault:
            self.nmi_blocked = st.nmi_blocked  # cleared even though the IRET faulted
            self._emit("iret_fault", rip=address, vector=fault.vector,
                            error_code=fault.error_code, nmi_unblocked=was_blocked,
                            why=fault.why)
            self.deliver(Event.exception(fault.vector, address, fault.error_code, fault.cr2),
                         why=fault.why)
            return
        except UnsupportedIret as exc:
            raise _Stop("unsupported", str(exc), address) from None
        except EptViolation as violation:
            # NMI blocking was cleared first thing (idt.iret); bit 12 of the
            # qualification says so when it was in force before this IRET.
            self.nmi_blocked = False
            self._ept_violation(violation, address, violation.access, nmi_unblocked=was_blocked)
            return
        except EptMisconfig as bad:
            self.nmi_blocked = was_blocked  # the host re-blocks: the IRET re-executes
            self._ept_misconfig(bad, address)
            return
        self.nmi_blocked = False
        self.engine.recount()
        cost = self.profile.event("iret_to_user" if res.cpl > st.cpl else "iret_same_cpl")
        self._load_segments(res.cs, res.ss, res.cpl, current=(st.cs, st.ss))
        self.engine.write({"rip": res.rip, "rsp": res.rsp, "rflags": res.rflags})
        self._depth = max(0, self._depth - 1)
        if self._frames:
            self._frames.pop()
        self._emit("iret", rip=address, to_rip=res.rip, to_rsp=res.rsp,
                   to_cpl=res.cpl, nmi_unblocked=res.nmi_unblocked, depth=self._depth)
        self.engine.cycles += cost

    def _snapshot_frames(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for addr, slots, _name, _ic in self._frames:
            try:
                out.append((addr, self.inspect.read(addr, 8 * len(slots))))
            except (ArchFault, _Stop):
                out.append((addr, b""))
        return out

    def _report_overwrites(self, before: list[tuple[int, bytes]], by: str) -> None:
        """Emit `frame_overwritten` for each live frame this delivery's pushes changed."""
        for (addr, slots, name, icount), (_a, old) in zip(self._frames, before, strict=True):
            if not old:
                continue
            try:
                new = self.inspect.read(addr, len(old))
            except (ArchFault, _Stop):
                continue
            if new != old:
                olds = struct.unpack(f"<{len(slots)}Q", old)
                news = struct.unpack(f"<{len(slots)}Q", new)
                self._emit("frame_overwritten", by=by, victim=name, victim_icount=icount,
                           at=addr, slots=[[s, o, n] for s, o, n in zip(slots, olds, news,
                                                                      strict=True)])

    @contextmanager
    def _paging_snapshot(self) -> Iterator[None]:
        """Read the paging controls once for the implicit accesses of one event."""
        self.sysmem.ctl = self.paging()
        try:
            yield
        finally:
            self.sysmem.ctl = None

    def deliver(self, ev: Event, why: str = "") -> None:
        """Deliver `ev` now (at the current boundary), with the #DF/shutdown rules."""
        st = self.arch_state()
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
        live = self._snapshot_frames()
        try:
            with self._paging_snapshot():
                out = deliver_event(self.sysmem, st, ev)
        except EptViolation as violation:
            # Never converted to #VE while delivering an event (SDM "EPT Violations"):
            # a VM exit with the event in the IDT-vectoring information.
            self._ept_violation(violation, ev.insn_rip, violation.access, during=ev)
            return
        except EptMisconfig as bad:
            self._ept_misconfig(bad, ev.insn_rip, during=ev)
            return
        if out.nested and ev.source in (Source.SOFTWARE, Source.PRIV_SOFTWARE):
            # INT n / INT3 / INTO / INT1 were counted as retired when they trapped, but a
            # fault while delivering them is a fault *on* the instruction (saved RIP = the
            # INT, which restarts after the handler): it did not retire.
            self.engine.uncount()
        self.nmi_blocked = st.nmi_blocked
        if st.cr2 != cr2_before:
            self.engine.write({"cr2": st.cr2})
        for nf in out.nested:
            self._emit("delivery_fault", vector=nf.during.vector,
                            name=nf.during.name, fault=nf.fault.vector,
                            fault_name=vector_name(nf.fault.vector),
                            error_code=nf.fault.error_code, action=nf.action.value,
                            why=nf.fault.why)
        if out.delivery is None:
            last = out.nested[-1]
            assert last.action is Combine.SHUTDOWN
            self._emit("shutdown", reason=out.shutdown_reason)
            raise _Stop("shutdown", out.shutdown_reason or "shutdown", ev.insn_rip)
        d = out.delivery
        self._events += 1
        if self._events > self.max_events:
            raise _Stop("max_events", f"more than {self.max_events} deliveries (runaway event "
                        "storm, e.g. a handler that returns to its own fault)", ev.insn_rip)
        cost = self.profile.event("deliver_cpl_change" if d.new_cpl != st.cpl
                                  else "deliver_same_cpl")
        if d.event.source is Source.NMI:
            cost += self.profile.event("nmi_extra")
        self._load_segments(d.new_cs, d.new_ss, d.new_cpl, current=(st.cs, st.ss))
        self.engine.write({"rip": d.new_rip, "rsp": d.new_rsp, "rflags": d.new_rflags})
        self._shadow_rec = None  # a delivered event ends any interrupt shadow
        rec = self._emit(
            "deliver",
            vector=d.event.vector, name=d.event.name, source=d.event.source.trace_name,
            error_code=d.frame.error_code, rip=d.frame.rip, cs=d.frame.cs,
            rflags=d.frame.rflags, old_rsp=d.frame.rsp, ss=d.frame.ss, rsp=d.new_rsp,
            stack=d.stack, handler=d.new_rip, cpl=d.new_cpl, depth=self._depth,
        )
        if d.event.vector == Vector.PF and d.event.source is Source.EXCEPTION:
            rec["cr2"] = st.cr2
            if self._observe_cr2:
                self._pf_cr2[(d.new_rsp, self.engine.icount)] = st.cr2
        if out.double_fault_of is not None:
            rec["double_fault_of"] = list(out.double_fault_of)
        if why:
            rec["why"] = why
        self._report_overwrites(live, d.event.name)
        slots = ("error_code",) if d.frame.error_code is not None else ()
        self._frames.append((d.new_rsp, (*slots, "rip", "cs", "rflags", "rsp", "ss"),
                             d.event.name, self.engine.icount))
        self._depth += 1
        self.engine.cycles += cost
        for cb in self.on_deliver:
            cb(rec)

    # -- asynchronous events ---------------------------------------------------------------
    def inject(self, event: str | AsyncEvent, point: Point | None = None, *,
               vector: int | None = None, before: int | str | None = None,
               hit: int = 1, icount: int | None = None, cycle: int | None = None,
               label: str = "", token: int | None = None, gpa: int | None = None,
               shown: tuple[int, int] | None = None, at_port: str | None = None) -> Injection:
        """Schedule an event (`EVENT_KINDS`): an NMI, a maskable interrupt (which arrives
        through the APIC IRR), an async #PF, or the host revoking a page's EPT access.

        `before` (an address or a symbol, `hit`-th arrival), `icount`, `cycle` or
        `at_port` ("flush_page": right after the `hit`-th write to pc-testdev's flush-page
        port 0xE4) say when it becomes pending; with none of them it is pending at the
        next boundary. Pending is not delivered: the blocking rules (idt.blocking) decide
        when it is.
        """
        if not isinstance(event, str):
            vector = getattr(event, "vector", None)
            token = getattr(event, "token", None)
            gpa = getattr(event, "gpa", None)
            event = str(event.kind)
        if isinstance(point, Before):
            before, hit = point.address, point.hit
        elif isinstance(point, AtIcount):
            icount = point.icount
        elif isinstance(point, AtCycle):
            cycle = point.cycle
        elif isinstance(point, AtPort):
            at_port, hit = point.port, point.hit
        if isinstance(before, str):
            if before not in self.symbols:
                raise ValueError(f"unknown symbol {before!r} for an injection point")
            before = self.symbols[before]
        if event == "interrupt" and self.apic is None:
            raise ValueError("interrupt injection needs the local APIC (Machine(apic=True))")
        if event == "async_pf" and self.apf is None:
            raise ValueError("async_pf injection needs async page faults (Machine.enable_apf)")
        if event == "ept_revoke" and self.ept is None:
            raise ValueError("ept_revoke injection needs EPT (Machine(vmx=VmxConfig(...)))")
        inj = Injection(event, vector, before, hit, icount, cycle, label, token=token, gpa=gpa,
                        shown=shown, at_port=at_port)
        self.injections.append(inj)
        if at_port is not None:
            self._port_points.setdefault(at_port, {}).setdefault(hit, []).append(inj)
        elif before is None:
            self._waiting.append(inj)
        if before is not None:
            self._watch(before).setdefault(hit, []).append(inj)
        return inj

    def _watch(self, address: int) -> dict[int, list[Injection]]:
        """Count arrivals at `address` from now on; its injections by arrival number."""
        self.engine.add_site(address)
        return self._before.setdefault(address, {})

    def watch(self, address: int) -> None:
        """Count the arrivals at `address` (as an injection point there would) without
        scheduling anything: `arrivals(address)` reads the count."""
        self._watch(address)

    def arrivals(self, address: int) -> int:
        """Arrivals at `address` counted since it became an injection point or was
        watched (0 if it never was)."""
        return self._arrivals.get(address, 0)

    def arrive_now(self, event: str | AsyncEvent, *, vector: int | None = None, label: str = "",
                   token: int | None = None, gpa: int | None = None,
                   shown: tuple[int, int] | None = None) -> Injection:
        """Between runs: the event arrives at this boundary now, as an injection point's
        event would (before the time-based sources of the boundary are looked at)."""
        if not isinstance(event, str):
            vector = getattr(event, "vector", None)
            token = getattr(event, "token", None)
            gpa = getattr(event, "gpa", None)
            event = str(event.kind)
        if event == PAUSE:
            raise ValueError("a pause is not an event")
        inj = Injection(event, vector, label=label, token=token, gpa=gpa, shown=shown)
        self.injections.append(inj)
        self._fire(inj)
        return inj

    def nmi(self) -> None:
        """An NMI arrives now (pending at the current boundary)."""
        self._fire(Injection("nmi", label="api"))

    def interrupt(self, vector: int) -> None:
        """A fixed interrupt with `vector` arrives at the APIC now."""
        self._fire(Injection("interrupt", vector, label="api"))

    def _fire(self, inj: Injection) -> None:
        """The event of `inj` arrives: it becomes pending (or latched, or is dropped)."""
        inj.fired = True
        if inj.event == PAUSE:
            raise _Stop(PAUSE, "paused", self.engine.read_reg("rip"))
        where = {**inj.point, **({"label": inj.label} if inj.label else {})}
        if inj.event == "nmi":
            self._nmi_arrives("inject" if inj.label != "api" else "api", where)
        elif inj.event == "async_pf":
            self._apf_inject(inj.token, inj.gpa, where=where)
        elif inj.event == "ept_revoke":
            self._ept_revoke(inj.gpa, where)
        else:
            assert inj.vector is not None and self.apic is not None
            self.apic.set_irr(inj.vector)
            self._emit("interrupt_pending", vector=inj.vector, source="inject", **where)

    def _ept_revoke(self, gpa: int | None, where: dict[str, Any]) -> None:
        """The host takes all access to a guest-physical page away (an EPT entry made not
        present, suppress-#VE clear): the guest's next access to it is an EPT violation,
        converted to a #VE when the #VE controls allow it (idt.ve), a VM exit otherwise."""
        assert gpa is not None and self.ept is not None
        page = gpa & ~0xFFF
        self.ept.set_range(page, 0x1000, read=False, write=False, execute=False,
                           suppress_ve=False)
        self.engine.flush_tlb()  # entries filled earlier carry the old rights
        self._emit("ept_revoke", gpa=page, **where)

    def _nmi_arrives(self, source: str, where: dict[str, Any] | None = None) -> None:
        arrival = self.intr.nmi_arrives()
        self._emit(arrival.value, source=source, nmi_blocked=self.intr.nmi_blocked,
                   **(where or {}))

    def _apic_nmi(self) -> None:
        self._nmi_arrives("apic")

    def _apic_event(self, kind: str, **fields: Any) -> None:
        # The APIC stamps timer events with the exact expiry cycle; the record's own
        # `cycle` is the boundary where the machine saw it.
        if "cycle" in fields:
            fields["expiry"] = fields.pop("cycle")
        if kind == "timer" and not fields.get("masked"):
            fields.pop("masked", None)
            self._emit("interrupt_pending", source="apic_timer", **fields)
        else:
            self._emit(kind if kind.startswith("apic") else f"apic_{kind}", **fields)

    def _emulate_apic_access(self, rip: int, vaddr: int, access: Access) -> None:
        """The instruction at RIP reads or writes the local APIC page: emulate it.

        The APIC page is never mapped in the engine: an access to it stops the engine
        *at* the instruction (like a fault), and this emulates it here, as a hypervisor
        emulates MMIO: a MOV between a register or immediate and a 32-bit APIC register.
        So the effect of the write (an EOI unmasking a vector, a self-IPI, a TPR change,
        the timer starting) is seen at the boundary right after the instruction, in both
        counting modes. Other instruction forms end the run as `unsupported`."""
        e = self.engine
        assert self.apic is not None
        try:
            code = self.read_linear(rip, 15)
        except ArchFault:
            code = self.read_linear(rip, 0x1000 - (rip & 0xFFF))
        mv = mmio_move(code, rip)
        what = decode_one(code, rip)
        if mv is None or (access is Access.WRITE) != mv.store:
            raise _Stop("unsupported", f"local APIC access by '{what.text if what else '??'}' at "
                        f"{rip:#x}: only MOV between a register or immediate and a 32-bit APIC "
                        "register is emulated", rip)
        e.recount()  # the instruction retires here
        e.cycles += self.profile.event("apic_access")  # the access lands at its end
        now = e.cycles
        offset = vaddr & 0xFFF
        try:
            if mv.store:
                value = mv.imm if mv.imm is not None else e.read_reg(_GPR64[str(mv.reg)])
                value &= (1 << (8 * mv.size)) - 1
                self._emit("apic_write", offset=offset, value=value)
                self.apic.write(offset, mv.size, value, now)
                e.write({"rip": rip + mv.length})
            else:
                value = self.apic.read(offset, mv.size, now)
                reg = str(mv.reg)
                if reg not in _GPR64 or mv.size != 4:
                    raise Unsupported(f"APIC read into {reg} ({mv.size} bytes)")
                # A 32-bit destination is zero-extended (SDM MOV, 64-bit mode).
                e.write({_GPR64[reg]: value, "rip": rip + mv.length})
        except Unsupported as exc:
            e.cycles -= self.profile.event("apic_access")
            e.uncount()
            raise _Stop("unsupported", str(exc), rip) from None

    def _request_boundary(self) -> None:
        """Stop at the next boundary the counter sees (the next instruction in timed mode,
        the end of the current translation block in fast mode)."""
        e = self.engine
        e.set_stop_at(min(int(e.counter.stop_at), e.icount + 1))

    def _fire_due(self) -> None:
        """Fire the time-based sources that are due at this boundary."""
        e = self.engine
        if self.apic is not None:
            self.apic.tick(e.cycles)
        self._apf_service()
        for inj in list(self._waiting):
            if inj.fired:
                self._waiting.remove(inj)
                continue
            if (inj.icount is not None and e.icount >= inj.icount) or (
                    inj.cycle is not None and e.cycles >= inj.cycle) or (
                    inj.before is None and inj.icount is None and inj.cycle is None):
                self._fire(inj)
                self._waiting.remove(inj)

    def _arbitrate(self) -> Choice:
        e = self.engine
        intr = self.apic is not None and self.apic.pending_vector() is not None
        rip = e.read_reg("rip") if self._shadow_rec is not None else 0
        self.intr.shadow = self._shadow_at(rip, e.icount) if self._shadow_rec else Shadow.NONE
        if_flag = bool(e.read_reg("rflags") & RFLAGS_IF) if intr else False
        return arbitrate(self.intr, if_flag=if_flag, intr_pending=intr)

    def _service(self) -> None:
        """At an instruction boundary: fire what is due, then deliver what the blocking
        rules allow (idt.blocking.arbitrate), one event per boundary, until nothing more
        can be taken. Sets `_step` when something is held by a shadow or IF = 0: the
        next run then executes one instruction only, so the moment it becomes
        deliverable is seen exactly."""
        self._arrive_here()
        self._fire_due()
        while True:
            choice = self._arbitrate()
            self._step = choice.needs_stepping or self._apf_wants_step
            if choice.deliver is None:
                return
            rip = self.engine.read_reg("rip")
            woke = self._halted
            self._halted = False
            if choice.deliver == "nmi":
                self.intr.nmi_pending = False
                ev = Event(Vector.NMI, Source.NMI, rip, rip)
            else:
                assert self.apic is not None
                vector = self.apic.pending_vector()
                assert vector is not None
                self.apic.acknowledge(vector)
                ev = Event(vector, Source.INTERRUPT, rip, rip)
            if woke:
                self.engine.cycles += self.profile.event("hlt_wake")
                self._emit("wake", by=choice.deliver, vector=ev.vector)
            self.deliver(ev)
            self._arrive_here()  # the handler's first instruction is a boundary too

    def _pending_sources(self) -> tuple[object, ...]:
        apic = self.apic
        return (self.intr.nmi_pending, tuple(apic.irr) if apic is not None else ())

    def _halt_wait(self) -> None:
        """HLT: let time pass to the next scheduled source until an event is delivered
        (which clears `_halted`), or end the run when nothing can ever wake the CPU."""
        e = self.engine
        while self._halted:
            deadline = self._next_deadline()
            rip = e.read_reg("rip")
            if deadline is None:
                raise _Stop("hlt", "HLT with no event that can wake the CPU", rip)
            before = self._pending_sources()
            self._emit("hlt", rip=rip - 1, until=deadline)
            e.cycles = max(e.cycles, deadline)
            self._service()
            if self._halted and self._pending_sources() == before and not any(
                    not inj.fired and inj.cycle is not None for inj in self._waiting):
                # Only a timer that re-sets an IRR bit already set (held by IF = 0 or
                # PPR) remains: time can pass forever without changing anything.
                raise _Stop("hlt", "HLT with every wake source held (IF = 0 or masked)", rip)

    def _next_stop_at(self) -> int:
        e = self.engine
        n = self.max_insns + 1
        for inj in self._waiting:
            if not inj.fired and inj.icount is not None:
                n = min(n, inj.icount + 1)
        if self._step:
            n = min(n, e.icount + 2)
        return n

    def _next_deadline(self) -> int | None:
        """The cycle of the next time-based source: a `cycle` injection, the APIC timer's
        next expiry, a page-in completing. None if there is none."""
        deadlines: list[int | None] = [inj.cycle for inj in self._waiting if not inj.fired]
        if self.apic is not None:
            deadlines.append(self.apic.next_deadline())
        if self.apf is not None:
            deadlines.append(self.apf.next_ready())
        return min((d for d in deadlines if d is not None), default=None)

    def _next_stop_cycle(self) -> int:
        deadline = self._next_deadline()
        return 2**64 - 1 if deadline is None else deadline

    def _code_bytes(self, address: int, size: int) -> bytes | None:
        """Guest code at a linear address (for counting a translation block)."""
        try:
            return self.inspect.read(address, size)
        except (ArchFault, _Stop):
            return None

    def _insn_cost(self, address: int, size: int) -> int:
        """Timed mode: one instruction's cost (called once per address by the counter)."""
        try:
            code = self.read_linear(address, size)
        except (ArchFault, _Stop):
            return self.profile.cycles_per_instruction
        return self._costs.instruction_cost(code, address)

    # -- running -----------------------------------------------------------------------
    def start_state(self, *, entry: int, rsp: int, cpl: int = 0, rflags: int = 0x202,
                    regs: dict[str, int] | None = None) -> None:
        self.build()
        if cpl not in (0, 3):
            raise ValueError(f"cpl must be 0 or 3, not {cpl}")
        cs, ss = (USER_CS, USER_DS) if cpl == 3 else (KERNEL_CS, KERNEL_DS)
        self._halted = False  # a reset CPU is not halted and in no shadow
        self._shadow_rec = None
        self.cpl = cpl
        self._load_segments(cs, ss, cpl)
        self.engine.flush_tlb()
        self.engine.write({**(regs or {}), "rip": entry, "rsp": rsp, "rflags": rflags | 2})

    def checkpoint(self) -> Checkpoint:
        """Remember the state at this boundary (between runs) for `rollback`: CPU,
        counters, guest memory (by page, copy-on-write), EPT, and the machine's own state
        (cpu.snapshot). Taking another moves the checkpoint forward."""
        return snapshot.take(self)

    def rollback(self, cp: Checkpoint) -> None:
        """Return to checkpoint `cp` (the latest one), as if nothing ran since."""
        snapshot.restore(self, cp)

    def run(self, *, entry: int | None = None, rsp: int | None = None, cpl: int = 0,
            rflags: int = 0x202, regs: dict[str, int] | None = None,
            max_insns: int | None = None, max_events: int | None = None,
            pause_at: tuple[int, int] | None = None) -> RunResult:
        """Run until an outcome: hlt, shutdown, max_insns, exit, outside_memory, unsupported.

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
            self.max_insns = max_insns
        if max_events is not None:
            self.max_events = max_events
        pause: tuple[int, Injection, bool] | None = None
        if pause_at is not None:
            address, hit = pause_at
            fresh = address not in self.engine.site_addresses
            inj = Injection(PAUSE, before=address, hit=hit)  # not one of the run's events
            self._watch(address).setdefault(hit, []).append(inj)
            pause = (address, inj, fresh)
        try:
            return self._loop()
        finally:
            if pause is not None:
                self._drop_pause(*pause)

    def _drop_pause(self, address: int, inj: Injection, fresh: bool) -> None:
        """After a run with `pause_at`: forget the pause point. A site the pause added is
        removed with its arrival count, so a checkpoint taken there does not keep a code
        hook at every address the explorer paused at (each costs a Python call whenever
        that instruction runs); counting starts afresh if that address is watched again."""
        waiting = self._before.get(address, {})
        for hit, injs in list(waiting.items()):
            if inj in injs:
                injs.remove(inj)
                if not injs:
                    del waiting[hit]
        if fresh and not waiting:
            self._before.pop(address, None)
            self._arrivals.pop(address, None)
            observed = self._observe_cr2 and address in self._cr2_reads
            if address not in self.sites and not observed:
                self.engine.remove_site(address)

    def _loop(self) -> RunResult:
        e = self.engine
        self._step_cache.clear()  # the caller may have written registers directly
        while True:
            try:
                if self.multiboot is not None and not self.multiboot.done:
                    from cpu.multiboot import run_32bit_phase  # imports this module

                    run_32bit_phase(self)  # on a 32-bit engine, until 64-bit mode
                    e = self.engine
                self._service()
                if self._halted:
                    self._halt_wait()
                e.set_stop_at(self._next_stop_at())
                e.set_stop_cycle(self._next_stop_cycle())
                self._pending = None
                rip = e.read_reg("rip")
                boundary, self._fetch_boundary = self._fetch_boundary, None
                self._step_cache.clear()
                self._running = True
                try:
                    err = e.run(rip) if boundary is None else e.run(rip, until=boundary)
                finally:
                    self._running = False
                pending, self._pending = self._pending, None
                if e.stopped_by_counter:
                    # The counter stopped before an instruction ran: a boundary. Anything
                    # a code hook of that same instruction asked for is void (it re-runs
                    # when execution resumes there).
                    e.uncount()
                    self._site_seen = None
                    if self._exit_code is not None:
                        code, self._exit_code = self._exit_code, None
                        raise _Stop("exit", f"exit device: {code:#x}", e.read_reg("rip"),
                                    exit_code=code)
                    if self._shutdown_requested:
                        raise _Stop("exit", SHUTDOWN_DETAIL, e.read_reg("rip"))
                    if e.icount >= self.max_insns:
                        raise _Stop("max_insns", f"instruction limit {self.max_insns} reached",
                                    e.read_reg("rip"))
                elif pending is not None:
                    pending()
                elif err == ERR_INSN_INVALID:
                    self._invalid_opcode()
                elif err is None and boundary is not None and e.read_reg("rip") == boundary:
                    continue  # ran up to a faulting fetch (_fetch_boundary_before): retry it
                elif err is not None:
                    raise _Stop("unsupported", f"engine error {err} at {e.read_reg('rip'):#x}",
                                e.read_reg("rip"))
                else:
                    self._native_stop()
            except _Stop as stop:
                e = self.engine  # the 32-bit engine when a multiboot image's 32-bit phase ended
                if stop.outcome == PAUSE:
                    return RunResult(PAUSE, stop.rip, e.icount, self.trace,
                                     serial=self.serial.decode("latin-1"), cycles=e.cycles)
                fields: dict[str, Any] = {"reason": stop.outcome, "rip": stop.rip}
                if stop.reason:
                    fields["detail"] = stop.reason
                if stop.exit_code is not None:
                    fields["exit_code"] = stop.exit_code
                self._emit("end", **fields)
                return RunResult(stop.outcome, stop.rip, e.icount, self.trace,
                                 exit_code=stop.exit_code, reason=stop.reason,
                                 serial=self.serial.decode("latin-1"), cycles=e.cycles)

    def _native_stop(self) -> None:
        """The engine stopped without a hook: a HLT in code that was never decoded."""
        rip = self.engine.read_reg("rip")
        if self._byte_at(rip - 1) == 0xF4:
            raise _Stop("hlt", "HLT (in code not decoded at load time)", rip)
        raise _Stop("unsupported", f"engine stopped unexpectedly at {rip:#x}", rip)

    def disassemble(self, addr: int) -> str:
        try:
            insn = decode_one(self.read_linear(addr, 15), addr)
        except (ArchFault, _Stop):
            return "??"
        return insn.text if insn else "??"
