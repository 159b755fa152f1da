"""FRED as a mode of the machine: the FRED MSRs, CR4.FRED, event delivery through
`idt.fred` instead of the IDT, and the instructions FRED adds or changes (ERETS, ERETU,
LKGS, SYSCALL/SYSENTER as events, SWAPGS/SYSRET/SYSEXIT as #UD).

The pure model (`idt.fred`) computes the frame, the new RSP, the stack level and the
faults; this module applies its answer to the machine, as `Machine.deliver` does for the
IDT model, and records it. The SDM sections are Vol. 3A "FRED Event Delivery" and "FRED
Transitions" and the Vol. 2 instruction pages; the layout followed is revision 5.0 and
later of the Intel *Flexible Return and Event Delivery (FRED) Architecture
Specification* (docs/fred.md).

* **Support and enabling.** A machine supports FRED only after `Machine.enable_fred`
  (configuration, `FredConfig`): CPUID.(EAX=07H,ECX=1):EAX then reports FRED (bit 17)
  and LKGS (bit 18), CR4 bit 32 becomes writable (#GP(0) while IA32_EFER.LMA = 0), and
  the FRED MSRs exist. Without it every one of those is as on a CPU without FRED.
* **Routing.** While CR4.FRED = 1 (in IA-32e mode) every event `Machine.deliver` is
  given goes through `Fred.deliver`: exceptions, NMIs, interrupts, INT n/INT1/INT3,
  #VE and the host's async #PF alike (they all reach the machine through `deliver`).
  SYSCALL and SYSENTER become FRED events of type 7 (`Fred.syscall`).
* **State.** The FRED MSRs live in `FredState` (IA32_FRED_CONFIG holds the current
  stack level in bits 1:0, so delivery and ERETS update it there); CR4.FRED lives in the
  engine's CR4, which keeps bit 32 as written.
* **GS.** An event from ring 3 and ERETU to ring 3 swap IA32_GS_BASE with
  IA32_KERNEL_GS_BASE (SDM "FRED Event Delivery", ERETU "Operation"): a FRED kernel has
  no SWAPGS, which is #UD. LKGS loads a user GS selector while keeping the kernel's
  GS.base.
* **NMI blocking.** An NMI blocks NMIs as its delivery starts; only an ERET whose SS
  slot has bit 18 unblocks them, and only when it completes. IRET keeps its IDT-mode
  behaviour (a same-ring IRET unblocks NMIs, as Bochs does under FRED; docs/sdm-map.md).
* **Shadows and single-step.** SS bit 16 records blocking by STI at the event; ERETS
  re-establishes it when the frame says so and the new IF is 1. SS bit 17 (SYSCALL,
  SYSENTER, INT n) with TF = 1 in the popped RFLAGS pends a single-step #DB right after
  the ERET, before NMI and INTR (its event data is DR6.BS, 0x4000).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.ept import EptMisconfig, EptViolation
from cpu.msrs import MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_STAR, MsrFault
from cpu.outcomes import Outcome, Stop
from idt.blocking import Shadow
from idt.fred import (
    CONFIG_CSL,
    CR4_FRED,
    CS64_DPL0,
    MSR_FRED_CONFIG,
    MSR_FRED_RSP0,
    MSR_FRED_SSP1,
    MSR_FRED_STKLVLS,
    SS_DPL0,
    SYSCALL_VECTOR,
    SYSENTER_VECTOR,
    EretResult,
    EventType,
    FredEvent,
    FredMsrs,
    debug_event_data,
    deliver_event,
    erets,
    eretu,
    fred_event,
    lkgs_base,
)
from idt.state import RFLAGS_RF, ArchFault, Event, Source, is_canonical
from idt.vectors import Vector, pushes_error_code

if TYPE_CHECKING:
    from cpu.machine import Machine

EFER_LMA = 1 << 10
EFER_SCE = 1 << 0
MSR_EFER_INDEX, MSR_FMASK_INDEX = 0xC0000080, 0xC0000084
RFLAGS_TF = 1 << 8


@dataclass(frozen=True)
class FredConfig:
    """How this machine's FRED behaves where the sources disagree (docs/sdm-map.md,
    "FRED"). The defaults follow the SDM pseudocode, then KVM, then Linux."""

    lkgs: bool = True  # CPUID.(7,1):EAX[18]; Bochs and Xen pair it with FRED
    # RFLAGS after delivery: 0x2 (Bochs; Linux's FRED entry has no CLAC and never programs
    # IA32_FMASK), or RFLAGS & ~IA32_FMASK (one reading of Xen's 2025 RFC).
    apply_fmask: bool = False
    # SYSCALL with EFER.SCE = 0: a FRED event (SDM Vol. 2 SYSCALL), or #UD (Bochs).
    syscall_requires_sce: bool = False
    # WRMSR IA32_FRED_CONFIG with a non-canonical entry: #GP(0) (KVM), or accepted and
    # #GP(0) at delivery (Bochs).
    config_canonical_check: bool = True
    # Which exceptions are "nested" (SS bit 58, the ring-0 stack-level rule): any raised
    # while delivering any event (KVM; FRED 5.0 appendix B as KVM quotes it), or only one
    # raised while delivering an exception (Bochs).
    nested_after_any_event: bool = True
    # SS bit 16 for an event taken in a MOV-SS shadow: the bit is named for STI and no
    # source covers MOV SS; True counts a MOV-SS shadow too (Bochs' inhibit-mask test
    # would, were it not cleared first).
    mov_ss_sets_sti_bit: bool = False


@dataclass
class FredState:
    """The FRED MSRs (IA32_FRED_CONFIG[1:0] is the current stack level)."""

    config: int = 0
    rsp0: int = 0
    rsp1: int = 0
    rsp2: int = 0
    rsp3: int = 0
    stklvls: int = 0
    ssp1: int = 0
    ssp2: int = 0
    ssp3: int = 0

    @property
    def csl(self) -> int:
        return self.config & CONFIG_CSL


_FIELDS = {MSR_FRED_RSP0: "rsp0", MSR_FRED_RSP0 + 1: "rsp1", MSR_FRED_RSP0 + 2: "rsp2",
           MSR_FRED_RSP0 + 3: "rsp3", MSR_FRED_STKLVLS: "stklvls", MSR_FRED_SSP1: "ssp1",
           MSR_FRED_SSP1 + 1: "ssp2", MSR_FRED_SSP1 + 2: "ssp3", MSR_FRED_CONFIG: "config"}


class Fred:
    """FRED delivery and its instructions on one machine (see the module docstring)."""

    def __init__(self, m: Machine, state: FredState) -> None:
        self.m = m
        self.state = state
        self.config: FredConfig | None = None  # None: this CPU has no FRED
        self.enable_at_build = False  # set CR4.FRED when the machine builds its registers

    # -- support, enabling, the MSRs --------------------------------------------------------
    @property
    def supported(self) -> bool:
        return self.config is not None

    @property
    def lkgs_supported(self) -> bool:
        return self.config is not None and self.config.lkgs

    def active(self) -> bool:
        """CR4.FRED = 1 in IA-32e mode: events go through FRED."""
        if self.config is None:
            return False
        ctl = self.m.regs.paging()
        return bool(ctl.cr4 & CR4_FRED) and bool(ctl.efer & EFER_LMA)

    def enable(self, options: FredConfig | None = None, *, enable: bool = True,
               **msrs: int) -> None:
        """Give the CPU FRED: CPUID reports FRED and LKGS, CR4.FRED and the FRED MSRs
        exist. `msrs` sets them by name (config, rsp0..rsp3, stklvls, ssp1..ssp3; the
        WRMSR checks apply, `MsrFault`); `enable` also sets CR4.FRED (now, or when the
        machine builds its registers before the first run)."""
        self.config = options or FredConfig()
        for name, value in msrs.items():
            self.set_msr(name, value)
        self.enable_at_build = enable
        if enable and self.m.layout.built:
            self.set_cr4_fred()

    def built(self) -> None:
        """The machine has just loaded its control registers for the first run."""
        if self.enable_at_build:
            self.set_cr4_fred()

    def set_cr4_fred(self) -> None:
        """Set CR4.FRED in the engine (the machine's registers are built)."""
        e = self.m.engine
        e.write({"cr4": e.read_reg("cr4") | CR4_FRED})
        self.m.regs.forget()

    def msrs(self) -> FredMsrs:
        s = self.state
        return FredMsrs(config=s.config, rsp=(s.rsp0, s.rsp1, s.rsp2, s.rsp3),
                        stklvls=s.stklvls)

    def read_msr(self, index: int) -> int:
        if self.config is None:
            raise MsrFault(f"MSR {index:#x} is a FRED MSR and this CPU has no FRED")
        return int(getattr(self.state, _FIELDS[index]))

    def write_msr(self, index: int, value: int) -> None:
        """WRMSR after the MSR table's reserved-bit and alignment checks
        (cpu/msrs.py)."""
        if self.config is None:
            raise MsrFault(f"MSR {index:#x} is a FRED MSR and this CPU has no FRED")
        if index == MSR_FRED_CONFIG and self.config.config_canonical_check \
                and not is_canonical(value & ~0xFFF):
            raise MsrFault(f"IA32_FRED_CONFIG: non-canonical entry point {value & ~0xFFF:#x}")
        setattr(self.state, _FIELDS[index], value)

    def set_msr(self, name: str, value: int) -> None:
        """WRMSR of the FRED MSR `name` (config, rsp0..rsp3, stklvls, ssp1..ssp3), with
        its checks (`MsrFault`)."""
        index = {v: k for k, v in _FIELDS.items()}.get(name)
        if index is None:
            raise ValueError(f"unknown FRED MSR {name!r} (known: {', '.join(_FIELDS.values())})")
        self.m.model.wrmsr(index, value)

    def _set_csl(self, csl: int) -> None:
        self.state.config = (self.state.config & ~CONFIG_CSL) | csl

    # -- delivery ---------------------------------------------------------------------------
    def deliver(self, ev: Event, why: str = "") -> None:
        """`Machine.deliver` while FRED is active."""
        m = self.m
        data = 0
        if ev.source is Source.EXCEPTION and ev.vector == Vector.DB:
            data = debug_event_data(m.engine.read_reg("dr6"))
        self.deliver_fred(fred_event(ev, event_data=data), why, idt_event=ev)

    def deliver_fred(self, fev: FredEvent, why: str = "", *, idt_event: Event | None = None,
                     retire: bool = False) -> None:
        """Deliver the FRED event `fev` with the nested-exception and #DF rules, then
        commit, record and charge it. `retire`: the instruction that raised it (SYSCALL,
        SYSENTER at their sites) retires when the delivery succeeds."""
        m = self.m
        e = m.engine
        st = m.regs.arch_state()
        cr2_before = st.cr2
        st.rip = fev.return_rip
        if fev.type not in (EventType.NMI, EventType.EXTINT):
            st.rflags &= ~RFLAGS_RF  # see Machine.deliver: RF is stale after one instruction
        options = self.config or FredConfig()
        shadows = Shadow.STI | (Shadow.MOV_SS if options.mov_ss_sets_sti_bit else Shadow.NONE)
        sti = bool(m.boundary.shadow_at(fev.return_rip, e.icount) & shadows)
        if st.cpl == 3:
            m.frames.user_mode()
        live = m.frames.snapshot()
        fmask = e.read_msr(MSR_FMASK_INDEX) if options.apply_fmask else None
        during = idt_event or fev.as_event()
        try:
            with m.paging_snapshot():
                out = deliver_event(m.sysmem, st, fev, self.msrs(), sti=sti,
                                    long_mode=e.in_64bit_mode(), fmask=fmask,
                                    nested_after_any_event=options.nested_after_any_event)
        except EptViolation as violation:
            m.vmx_host.ept_violation(violation, fev.insn_rip, violation.access, during=during)
            return
        except EptMisconfig as bad:
            m.vmx_host.ept_misconfig(bad, fev.insn_rip, during=during)
            return
        if out.nested and fev.type in (EventType.SWINT, EventType.SWEXC,
                                       EventType.PRIV_SWEXC):
            e.uncount()  # as in Machine.deliver: the INT did not retire
        elif retire and not out.nested:
            e.recount()
        m.after_delivery(st.nmi_blocked, st.cr2, cr2_before,
                         ((nf.during.vector, nf.during.name, nf.fault, nf.action)
                          for nf in out.nested))
        d = out.delivery
        if d is None:
            m.emit("shutdown", reason=out.shutdown_reason)
            raise Stop(Outcome.SHUTDOWN, out.shutdown_reason or "shutdown", fev.insn_rip)
        m.count_event(fev.insn_rip, "deliveries (runaway event storm, e.g. a handler that "
                      "returns to its own fault)")
        cost = m.profile.event("fred_deliver_switch" if d.switched else "fred_deliver_same_level")
        if d.event.type is EventType.NMI:
            cost += m.profile.event("nmi_extra")
        if d.from_user:
            kernel_cs = (e.read_msr(MSR_STAR) >> 32) & 0xFFFC
            m.regs.load_fixed_segments(kernel_cs, CS64_DPL0, (kernel_cs + 8) & 0xFFFC,
                                       SS_DPL0, 0)
            self._swap_gs()
        else:
            # CS and SS stay; this only resets QEMU's stale exception state when an
            # engine-raised exception left one (cpu/registers.py), as IDT delivery does.
            m.regs.load_segments(st.cs, st.ss, st.cpl, current=(st.cs, st.ss))
        self._set_csl(d.new_csl)
        e.write({"rip": d.new_rip, "rsp": d.new_rsp, "rflags": d.new_rflags})
        m.state.boundary.shadow = None  # a delivered event ends any interrupt shadow
        f = d.frame
        source = during.source.trace_name if d.event.type is not EventType.OTHER else "software"
        # Slot 0 is always there (0 when the event has none); the record says null for an
        # event without an error code, as IDT delivery records do.
        has_code = d.event.type is EventType.HWEXC and pushes_error_code(d.event.vector)
        rec = m.emit(
            "deliver", vector=d.event.vector, name=d.event.name, source=source,
            error_code=f.error_code if has_code else None, rip=f.rip, cs=f.cs, rflags=f.rflags, old_rsp=f.rsp,
            ss=f.ss, rsp=d.new_rsp, stack=d.stack, handler=d.new_rip, cpl=0,
            depth=m.state.frames.depth, fred=True, type=int(d.event.type),
            stack_level=d.new_csl, event_data=f.event_data)
        if d.event.nested:
            rec["nested"] = True
        if d.event.type is EventType.HWEXC and d.event.vector == Vector.PF:
            rec["cr2"] = st.cr2
            m.frames.pf_delivered(d.new_rsp, st.cr2)
        if out.double_fault_of is not None:
            rec["double_fault_of"] = list(out.double_fault_of)
        if why:
            rec["why"] = why
        m.frames.report_overwrites(live, d.event.name)
        m.frames.pushed(d.new_rsp, True, d.event.name)  # slots 0-5 read as an IDT frame
        e.cycles += cost
        for cb in m.on_deliver:
            cb(rec)

    def _swap_gs(self) -> None:
        e = self.m.engine
        gs, kgs = e.read_msr(MSR_GS_BASE), e.read_msr(MSR_KERNEL_GS_BASE)
        e.write_msr(MSR_GS_BASE, kgs)
        e.write_msr(MSR_KERNEL_GS_BASE, gs)

    # -- SYSCALL, SYSENTER: events of type 7 --------------------------------------------------
    def syscall(self, address: int, *, sysenter: bool = False) -> None:
        """SYSCALL/SYSENTER under FRED (SDM Vol. 2 SYSCALL/SYSENTER, the FRED branch): an
        event of type 7, vector 1 or 2, instruction length 2, saved RIP the next
        instruction; RCX, R11, IA32_LSTAR and IA32_FMASK are not used. The site has
        already taken the instruction's count back."""
        m = self.m
        name = "SYSENTER" if sysenter else "SYSCALL"
        if not sysenter and self.config is not None and self.config.syscall_requires_sce \
                and not m.engine.read_msr(MSR_EFER_INDEX) & EFER_SCE:
            m.deliver(Event.exception(Vector.UD, address), why="SYSCALL with EFER.SCE = 0 "
                      "(the Bochs reading, FredConfig.syscall_requires_sce)")
            return
        size = m.sites.lengths.get(address, 2)
        fev = FredEvent(EventType.OTHER, SYSENTER_VECTOR if sysenter else SYSCALL_VECTOR,
                        return_rip=address + size, insn_rip=address, insn_len=size,
                        source=Source.SOFTWARE)
        m.debug.before_delivery(fev.as_event())  # as Machine.deliver does for every event
        self.deliver_fred(fev, f"{name} under FRED", retire=True)

    def undefined(self, address: int, what: str) -> None:
        """SWAPGS, SYSRET, SYSEXIT while FRED is active: #UD."""
        self.m.deliver(Event.exception(Vector.UD, address), why=f"{what} with CR4.FRED = 1")

    # -- ERETS, ERETU ------------------------------------------------------------------------
    def eret(self, address: int, *, user: bool) -> None:
        """ERETS (`user` False) or ERETU at its site (SDM Vol. 2 ERETS/ERETU)."""
        m = self.m
        e = m.engine
        e.uncount()
        name = "ERETU" if user else "ERETS"
        st = m.regs.arch_state()
        fred = self.active()
        try:
            with m.paging_snapshot():
                if user:
                    res = eretu(m.sysmem, st, self.msrs(), fred=fred,
                                star=e.read_msr(MSR_STAR), long_mode=e.in_64bit_mode())
                else:
                    sti_now = bool(m.boundary.shadow_at(address, e.icount) & Shadow.STI)
                    res = erets(m.sysmem, st, self.msrs(), fred=fred, sti_blocking=sti_now)
        except ArchFault as fault:
            # Nothing was committed: NMI blocking stays as it was even when the frame has
            # bit 18 (Linux's ex_handler_eretu moves that bit into the fault's frame).
            m.emit("eret_fault", insn=name.lower(), rip=address, vector=fault.vector,
                   error_code=fault.error_code, why=fault.why)
            m.deliver(Event.exception(fault.vector, address, fault.error_code, fault.cr2),
                      why=fault.why)
            return
        except EptViolation as violation:
            m.vmx_host.ept_violation(violation, address, violation.access)
            return
        except EptMisconfig as bad:
            m.vmx_host.ept_misconfig(bad, address)
            return
        e.recount()
        was_blocked = m.intr.nmi_blocked
        if res.unblock_nmi:
            m.intr.nmi_blocked = False
        self._commit_eret(res, user)
        depth = m.frames.returned()
        m.emit("eret", insn=name.lower(), rip=address, to_rip=res.rip, to_rsp=res.rsp,
               to_cpl=3 if user else 0, stack_level=res.new_csl,
               nmi_unblocked=res.unblock_nmi and was_blocked, depth=depth)
        e.cycles += m.profile.event("eretu" if user else "erets")
        if res.sti_shadow:
            m.boundary.state.shadow = (e.icount, res.rip, Shadow.STI)
        if res.single_step:
            m.debug.trap_now(bs=True, why=f"single-step pended by {name} (SS bit 17, TF = 1)")
        else:
            m.emulated.single_step(st.rflags)

    def _commit_eret(self, res: EretResult, user: bool) -> None:
        m = self.m
        e = m.engine
        self._set_csl(res.new_csl)
        if user:
            if res.cs_flags is not None and res.ss_flags is not None:
                m.regs.load_fixed_segments(res.cs, res.cs_flags, res.ss, res.ss_flags, 3)
            else:
                m.regs.load_segments(res.cs, res.ss, 3)
            self._swap_gs()
        e.write({"rip": res.rip, "rsp": res.rsp, "rflags": res.rflags})

    # -- LKGS -------------------------------------------------------------------------------
    def lkgs(self, address: int) -> None:
        """LKGS r16 (F2 0F 00 /6, register form): GS.selector from the operand, its
        descriptor's base into IA32_KERNEL_GS_BASE, GS.base unchanged."""
        m = self.m
        e = m.engine
        e.uncount()
        code = m.code_bytes(address, 15) or b""
        at = code.find(b"\x0f\x00")
        modrm = code[at + 2] if at >= 0 and at + 2 < len(code) else 0
        if modrm >> 6 != 3:
            raise Stop(Outcome.UNSUPPORTED, "LKGS with a memory operand is not modelled",
                       address)
        rex_b = any(0x40 <= b <= 0x4F and b & 1 for b in code[:max(at, 0)])
        reg = _GPR64[(modrm & 7) | (8 if rex_b else 0)]
        selector = e.read_reg(reg) & 0xFFFF
        st = m.regs.arch_state()
        try:
            with m.paging_snapshot():
                base = lkgs_base(m.sysmem, st, selector, fred_lkgs=self.lkgs_supported)
        except ArchFault as fault:
            m.deliver(Event.exception(fault.vector, address, fault.error_code, fault.cr2),
                      why=fault.why)
            return
        gs_base = e.read_msr(MSR_GS_BASE)
        e.write({"gs": selector})
        e.write_msr(MSR_GS_BASE, gs_base)  # the selector write reloads the base: put it back
        e.write_msr(MSR_KERNEL_GS_BASE, base)
        size = m.sites.lengths.get(address, 4)
        rflags = e.read_reg("rflags")
        e.write({"rip": address + size})
        e.recount()
        m.emit("lkgs", rip=address, selector=selector, kernel_gs_base=base)
        m.emulated.single_step(rflags)


_GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

__all__ = ["Fred", "FredConfig", "FredState"]
