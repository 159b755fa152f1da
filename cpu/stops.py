"""Engine stops: why Unicorn stopped, and what the architecture does about it.

The engine runs at full speed until a hook stops it. Each hook here only records what
happened (`StopState.pending`, a deferred action) and stops the engine; the run loop
then calls the action at the boundary, outside the engine, where Python may change the
CPU state. The kinds of stop:

* an exception the engine raised (`UC_HOOK_INTR`): INT n/INT3 are traps (saved RIP after
  the instruction), #DB from TF is a trap, everything else a fault on the instruction
  (saved RIP = the instruction; it did not retire) — SDM Vol. 3A 6.5 "Exception
  Classifications". INT3 and INT n are delivered inside the hook where that is exact
  (`software_interrupt_in_hook`): the boundary at the handler's entry would hold nothing
  for the run loop to do, so the engine goes on there without stopping;
* a memory access the TLB fill refused (poisoned): a #PF, #GP/#SS for a non-canonical
  address, an EPT violation or misconfiguration, the local APIC page (emulated MMIO), or
  a code fetch that belongs to a later instruction of the block;
* an invalid opcode (#UD, or INT1/ICEBP which Unicorn does not know);
* a site (cpu/sites.py): an injection point, an IRET/HLT/MSR/CPUID/MOV-CR/RDPMC to
  emulate, a checked instruction that must fault (cpu/checked_sites.py), a STI/MOV SS
  that opens a shadow, an OUT to an exit port;
* a physical access outside RAM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.decode import (
    SiteKind,
    access_ranges,
    branch_target,
    decode,
    decoded_accesses,
    faulting_segment,
    invalid_encoding,
    memory_operands,
    opcode_offset,
    state_before_branch,
)
from cpu.engine import GPRS
from cpu.ept import EptMisconfig, EptViolation
from cpu.mmu import Access
from cpu.outcomes import Outcome, Stop
from idt.state import RFLAGS_TF, ArchFault, Event, Source, is_canonical, is_canonical_range
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine

MSR_FS_BASE, MSR_GS_BASE = 0xC0000100, 0xC0000101
_DECODE_REGS = (*GPRS, "rflags")
# Exceptions that push an error code (SDM Vol. 3A 6.13, "Error Code").
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})


@dataclass
class StopState:
    """A code fetch that faults in a later instruction of a block: run only up to it
    first (see `fetch_boundary_before`). Set by a stop, used by the next run."""

    fetch_boundary: int | None = None


class Stops:
    """The engine's hooks and what each stop means."""

    # Derived or transient, not state: rebuilt as needed, cleared by a rollback.
    CACHES = frozenset({"pending"})

    def __init__(self, m: Machine, state: StopState) -> None:
        self.m = m
        self.state = state
        # The action for the stop in progress (None between runs: a checkpoint checks).
        self.pending: Callable[[], None] | None = None
        # False: INT3 / INT n always stop the engine (tests compare the two paths).
        self.deliver_in_hook = True
        self._site_actions: dict[SiteKind, Callable[[int], bool]] = {
            SiteKind.IRET: lambda a: (not m.emulated.iret_in_hook(a)
                                      and self._defer(lambda: m.emulated.iret(a))),
            SiteKind.HLT: lambda a: self._defer(lambda: m.emulated.hlt(a)),
            SiteKind.STI: lambda a: (m.boundary.may_set_if(a)
                                     or m.boundary.open_shadow(a, SiteKind.STI)),
            SiteKind.POPF: m.boundary.may_set_if,
            SiteKind.MOV_SS: lambda a: (m.checked.mov_ss(a)
                                        or m.boundary.open_shadow(a, SiteKind.MOV_SS)),
            SiteKind.OUT: lambda a: self.io_site(a) or m.platform.exit_write(a),
            SiteKind.IN: self.io_site,
            SiteKind.MOV_DR: lambda a: self._defer(lambda: m.debug.mov_dr(a)),
            SiteKind.RDMSR: lambda a: self._defer(lambda: m.emulated.msr(a, write=False)),
            SiteKind.WRMSR: lambda a: self._defer(lambda: m.emulated.msr(a, write=True)),
            SiteKind.CPUID: lambda a: self._defer(lambda: m.emulated.cpuid(a)),
            SiteKind.MOV_CR: lambda a: self._defer(lambda: m.emulated.mov_cr(a)),
            SiteKind.RDPMC: lambda a: self._defer(lambda: m.emulated.rdpmc(a)),
            SiteKind.RDTSC: lambda a: (not m.emulated.rdtsc_in_hook(a)
                                       and self._defer(lambda: m.emulated.rdtsc(a))),
            SiteKind.RDTSCP: lambda a: (not m.emulated.rdtsc_in_hook(a, rdtscp=True)
                                        and self._defer(lambda: m.emulated.rdtsc(a, rdtscp=True))),
            SiteKind.UNDECLARED: lambda a: self._defer(lambda: m.emulated.undeclared(a)),
            SiteKind.XCR: m.checked.xcr,
            SiteKind.TABLE_LOAD: m.checked.table_load,
            SiteKind.BASE_WRITE: m.checked.base_write,
            SiteKind.UMIP: m.checked.umip,
            SiteKind.SSE_ALIGN: m.checked.sse_align,
            SiteKind.SYSCALL: lambda a: self._defer(lambda: m.emulated.syscall(a)),
            SiteKind.SYSRET: lambda a: self._defer(lambda: m.emulated.sysret(a)),
            SiteKind.SYSENTER: lambda a: self._defer(lambda: m.emulated.sysenter(a)),
            SiteKind.SYSEXIT: lambda a: self._defer(lambda: m.emulated.sysexit(a)),
            SiteKind.LOCK_UD: lambda a: self._defer(lambda: self.lock_ud(a)),
            SiteKind.INVALID_UD: lambda a: self._defer(lambda: self.invalid_ud(a)),
            SiteKind.ERETS: lambda a: self._defer(lambda: m.fred.eret(a, user=False)),
            SiteKind.ERETU: lambda a: self._defer(lambda: m.fred.eret(a, user=True)),
            SiteKind.LKGS: lambda a: self._defer(lambda: m.fred.lkgs(a)),
            SiteKind.SWAPGS: lambda a: m.fred.active() and self._defer(
                lambda: self.fault_at(a, ArchFault(Vector.UD, why="SWAPGS with CR4.FRED = 1"))),
        }

    def io_site(self, address: int) -> bool:
        """IN/OUT/INS/OUTS: the I/O permission check (a #GP stops the engine), then the
        I/O breakpoints (a trap after the instruction)."""
        return self.m.platform.io_check(address) or self.m.debug.io_site(address)

    def _defer(self, action: Callable[[], None]) -> bool:
        self.pending = action
        return True

    # -- engine hooks (record, stop; no CPU state changes) ---------------------------------
    def on_poison(self, vaddr: int, access: Access) -> None:
        self.pending = lambda: self.memory_fault(vaddr, access)

    def on_refused(self, vpage: int, access: Access) -> None:
        self.pending = lambda: self.refused_write(vpage)

    def on_unmapped(self, paddr: int, access: Access) -> None:
        def stop() -> None:
            rip = self.m.engine.read_reg("rip")
            raise Stop(Outcome.OUTSIDE_MEMORY, f"{access.name.lower()} of physical {paddr:#x}",
                       rip)
        self.pending = stop

    def on_interrupt(self, vector: int) -> None:
        if self.software_interrupt_in_hook(vector):
            return
        self.pending = lambda: self.hooked_exception(vector)
        self.m.engine.stop()

    def software_interrupt_in_hook(self, vector: int) -> bool:
        """INT3 / INT n (vector 3 or >= 32), from the engine's interrupt hook: deliver it
        here and let the engine go on at the handler (True), or leave it to the run loop
        (False, nothing changed). The delivery is `hooked_exception`'s, the same call the
        run loop makes; it may run here when nothing else could: fast mode (the INT ended
        its translation block, so the counts stand as the loop would find them and the
        records are stamped with them), no VMX controls, EPT or FRED, no TF, and a quiet
        boundary before the INT (`Emulated.quiet_boundary`). After it, the boundary at the
        handler's entry must be quiet too, or the engine stops there with nothing left
        to do but the run loop's service; an outcome (shutdown, the event limit) ends the
        run from the loop. Injection points and thresholds at the handler are the engine's
        hooks' business, as after any instruction."""
        m = self.m
        e = m.engine
        if (not self.deliver_in_hook or not (vector == Vector.BP or vector >= 32)
                or not e.block_counting or e.bits != 64 or m.vmx_exits.enabled
                or m.ept is not None or m.fred.config is not None
                or m.regs.state.stale_exception or not m.emulated.quiet_boundary()
                or e.read_reg("rflags") & RFLAGS_TF):
            return False
        regs = m.regs
        regs.running = False  # records stamped with the counts as they stand (see above)
        try:
            self.hooked_exception(vector)
        except Stop as stop:
            def end(stop: Stop = stop) -> None:
                raise stop
            self.pending = end
            e.stop()
            return True
        finally:
            regs.running = True
            regs.forget()
        if m.emulated.quiet_boundary():
            m.emulated.rearm_native_iret()  # the handler's IRETQ, as at a run's start
        else:
            self.pending = lambda: None  # the handler's entry is the run loop's boundary
            e.stop()
        return True

    def on_site(self, address: int) -> bool:
        """A code hook: an injection point, an observed CR2 read, or a site. A site
        action returns True when the engine must stop before the instruction. Returns
        True when the hook only observed: an arrival counted at an injection point with
        nothing due, or a CR2 read recorded, and nothing else at the address."""
        m = self.m
        if m.injections.at_site(address):
            return False
        if m.frames.cr2_read_site(address):
            return True
        if m.debug.breakpoint_site(address):
            m.engine.stop()  # an instruction breakpoint: #DB fault before it
            return False
        kind = m.sites.kinds.get(address)
        if kind is not None:
            if self._site_actions[kind](address):
                m.engine.stop()
            return False
        # An arrival counted at an injection point with nothing due is an observation.
        return address in m.injections.state.before and \
            address not in m.debug.state.exec_breakpoints

    # -- what a stop means -------------------------------------------------------------
    def memory_fault(self, vaddr: int, access: Access) -> None:
        m = self.m
        m.regs.state.stale_exception = True  # conservative: a context patch follows anyway
        if access is Access.FETCH:
            boundary = self.fetch_boundary_before(vaddr)
            if boundary is not None:
                # Not this instruction's fault yet: run up to the boundary, then retry.
                self.state.fetch_boundary = boundary
                m.engine.flush_tlb()
                return
        if access is not Access.FETCH:
            # A data access faults inside an instruction the native counter has already
            # counted: it did not complete. A fetch fault happens while the engine
            # translates code, before the counter's hook runs for the instruction being
            # fetched, so there is nothing to take back.
            m.engine.uncount()
        rip = m.engine.read_reg("rip")
        try:
            if access is not Access.FETCH:
                # Before paging: the canonical check of every byte (SDM Vol. 1 "Canonical
                # Addressing"), then the access's intent (a read-modify-write is a write).
                access = self.data_access(rip, vaddr, access)
            elif not is_canonical(vaddr):
                branch = self.branch_into(vaddr)
                if branch is not None:
                    rip = branch
                    raise ArchFault(Vector.GP, 0, why=f"branch to non-canonical {vaddr:#x}")
                raise ArchFault(Vector.GP, 0, why=f"non-canonical address {vaddr:#x}")
            t = m.translator.guest_walk(m.regs.paging(), vaddr, access)
        except EptViolation as violation:
            m.engine.flush_tlb()
            m.vmx_host.ept_violation(violation, rip, access)
            return
        except EptMisconfig as bad:
            m.engine.flush_tlb()
            m.vmx_host.ept_misconfig(bad, rip)
            return
        except ArchFault as fault:
            m.engine.flush_tlb()  # drop the poison entry; the retry walks again
            cr2 = fault.cr2
            if cr2 is not None and access is not Access.FETCH:
                cr2 = self.split_access_cr2(rip, vaddr)
            m.deliver(Event.exception(fault.vector, rip, fault.error_code, cr2), why=fault.why)
            return
        if m.mmio.claims(t.paddr) and access is not Access.FETCH:
            m.mmio.emulate(rip, vaddr, t.paddr, access)
            return
        if access is not Access.FETCH and m.debug.data_access(rip, vaddr):
            return  # a data breakpoint's page (cpu/debug.py): the instruction runs alone
        if not m.phys.contains(t.paddr | (vaddr & 0xFFF)):
            raise Stop(Outcome.OUTSIDE_MEMORY,
                       f"{access.name.lower()} of {vaddr:#x} maps to physical {t.paddr:#x}, "
                       "outside guest memory", rip)
        m.engine.flush_tlb()  # the page became valid since it was poisoned: retry

    def refused_write(self, vpage: int) -> None:
        """A store's TLB fill for page `vpage` was refused (cpu/translation.py): the
        engine stopped at the storing instruction with nothing written. The faulting
        address is the first byte of the store that falls in that page: the store's
        start, or `vpage` when the store began on the page before (SDM "Page-Fault
        Exceptions": CR2 is the address whose access faulted; Bochs translates both pages
        of a crossing access before writing either). Then it is the fault of that
        address, as for any other access (`memory_fault`)."""
        rip = self.m.engine.read_reg("rip")
        vaddr = vpage
        code = self.insn_bytes(rip)
        if code is not None:
            for r in access_ranges(code, rip, self.decode_regs()):
                if r.write and r.start < vpage + 0x1000 and vpage < r.start + r.size:
                    vaddr = max(r.start, vpage)
                    break
        self.memory_fault(vaddr, Access.WRITE)

    def split_access_cr2(self, rip: int, vaddr: int) -> int:
        """CR2 for a data #PF at `vaddr`, reported by the engine, in the instruction at RIP.

        An access that starts on one page and runs into a second, faulting page faults
        at the first byte of the second page (CR2 = that page's address; Bochs translates
        both pages before it touches memory). Unicorn splits such a store into pieces and
        the poisoned piece may be any byte of the second page (e.g. 0x401003 for an
        8-byte store at 0x400ffc), so when an explicit memory operand of the instruction
        covers `vaddr` but starts on an earlier page, CR2 is that page boundary. (A store
        writes nothing of its first page: its faulting fill is refused, `refused_write`.)
        """
        m = self.m
        page = vaddr & ~0xFFF
        try:
            length, operands = memory_operands(m.read_linear(rip, 15), rip)
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
                ea += m.engine.read_reg(op.base)
            if op.index is not None:
                ea += m.engine.read_reg(op.index) * op.scale
            ea &= 2**64 - 1
            if ea < page <= vaddr < ea + op.size:
                return page
        return vaddr

    def fetch_boundary_before(self, vaddr: int) -> int | None:
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
        rip = self.m.engine.read_reg("rip")
        page = vaddr & ~0xFFF
        if not rip < page <= rip + 4096:
            return None
        try:
            code = self.m.read_linear(rip, page - rip)
        except ArchFault:
            return None
        end = rip
        for insn in decode(code, rip):  # stops at an instruction cut off by the page end
            end = insn.address + insn.size
        return end if end != rip else None

    def data_access(self, rip: int, vaddr: int, access: Access) -> Access:
        """The checks a data access at `vaddr` by the instruction at RIP passes before
        paging, on the instruction's decoded accesses (`decode.access_ranges`, with the
        registers as they are: the instruction did not complete):

        * canonical addresses (SDM Vol. 1 "Canonical Addressing"): every byte of the
          access, so one that straddles the end of the lower half is #GP(0)/#SS(0) even
          where its first page is not present. Which of the two is the *segment's*
          business, not the mnemonic's (Vol. 2 PUSH/POP/MOV, "64-Bit Mode Exceptions"):
          #SS(0) for the implicit stack access and for an RSP/RBP base without an FS/GS
          override, #GP(0) otherwise (`decode.faulting_segment`);
        * write intent: a read-modify-write operand (ADD [m], r; INC [m]; XCHG; CMPXCHG;
          any LOCKed form) is translated for writing from its first, reading part on,
          so its #PF has W = 1 and its EPT violation says "write" (Bochs
          `read_RMW_virtual_*`; SDM Vol. 3A "Page-Fault Exceptions").

        Returns the access to walk (a READ becomes a WRITE); raises the canonical fault."""
        code = self.insn_bytes(rip)
        if code is None:
            if not is_canonical(vaddr):
                raise ArchFault(Vector.GP, 0, why=f"non-canonical address {vaddr:#x}")
            return access
        decoded = decoded_accesses(code, rip)
        regs = self.decode_regs(bases=not is_canonical(vaddr) or decoded is None
                                or any(r.override for r in decoded.refs))
        if not is_canonical(vaddr):
            seg = faulting_segment(code, rip, vaddr, regs)
            raise ArchFault(Vector.SS if seg == "ss" else Vector.GP, 0,
                            why=f"non-canonical address {vaddr:#x}")
        for r in access_ranges(code, rip, regs):
            if not r.start <= vaddr < r.start + r.size:
                continue
            if not is_canonical_range(r.start, r.size):
                end = (r.start + r.size - 1) & (2**64 - 1)
                raise ArchFault(Vector.SS if r.segment == "ss" else Vector.GP, 0,
                                why=f"access {r.start:#x}..{end:#x} crosses into "
                                    f"non-canonical addresses ({r.segment})")
            if access is Access.READ and r.write:
                return Access.WRITE
        return access

    def branch_into(self, target: int) -> int | None:
        """A fetch from the non-canonical `target`, which is RIP: the engine executed a
        branch there (QEMU checks the target only when it fetches from it). The SDM
        faults the *branch*: "#GP(0) If the target offset is non-canonical" (Vol. 2 JMP,
        CALL, RET, Jcc, LOOP), with the state before it (Vol. 3A "Exception
        Classifications": a fault leaves the state as before the instruction). So the
        last instruction the engine ran is decoded; if it is a near branch to `target`,
        RIP goes back to it, RSP to before a CALL's push or a RET's pop (and immediate),
        RCX to before a LOOP's decrement (`decode.state_before_branch`), the branch is not
        counted as retired, and its address is returned. A CALL's return address stays
        written below RSP (not architectural state; Bochs writes it too)."""
        m = self.m
        e = m.engine
        address = e.last_instruction()
        if address is None or e.read_reg("rip") != target:
            return None
        code = self.insn_bytes(address)
        if code is None:
            return None
        after = self.decode_regs()
        before = state_before_branch(code, address, after)
        if not before:
            return None
        regs = {**after, **before}
        try:
            branch = branch_target(code, address, regs,
                                   lambda a: int.from_bytes(m.read_linear(a, 8), "little"))
        except ArchFault:
            return None
        if branch is None or not branch.taken or branch.target != target:
            return None
        e.write(before)
        e.uncount()
        return address

    def insn_bytes(self, rip: int) -> bytes | None:
        """The bytes of the instruction at RIP (up to 15, fewer at the end of a mapped
        page before an unmapped one); None if RIP itself is unreadable."""
        m = self.m
        try:
            return m.read_linear(rip, 15)
        except ArchFault:
            try:
                return m.read_linear(rip, 0x1000 - (rip & 0xFFF))
            except ArchFault:
                return None

    def decode_regs(self, *, bases: bool = True) -> dict[str, int]:
        """The registers `cpu.decode` computes addresses from: the GPRs, RFLAGS and (with
        `bases`: only an FS or GS override adds them) the FS/GS bases."""
        e = self.m.engine
        regs = dict(zip(_DECODE_REGS, e.read(_DECODE_REGS), strict=True))
        if bases:
            regs["fs_base"], regs["gs_base"] = e.read_msr(MSR_FS_BASE), e.read_msr(MSR_GS_BASE)
        return regs

    def hooked_exception(self, vector: int) -> None:
        m = self.m
        e = m.engine
        rip = e.read_reg("rip")
        if vector == Vector.BP or vector >= 32:
            # Only INT3 / INT n raise these vectors here: software interrupts, which QEMU
            # raises without its nested-exception bookkeeping.
            error_code, is_int = 0, True
        else:
            error_code, is_int = e.exception_info()
            m.regs.state.stale_exception = m.regs.state.stale_exception or not is_int
        if is_int:
            # INT n / INT3 (trap): RIP is already past the instruction; find its start.
            insn = rip - 1 if vector == 3 and self.byte_at(rip - 1) == 0xCC else rip - 2
            m.deliver(Event(vector, Source.SOFTWARE, rip, insn), why="")
        elif vector == Vector.DB:
            # Single-step (TF) #DB: a trap at the boundary after the instruction.
            m.debug.single_step_native()
        else:
            e.uncount()  # a fault: the instruction did not retire
            ec = error_code if vector in _ERROR_CODE_VECTORS else None
            m.deliver(Event.exception(vector, rip, ec), why="")

    def byte_at(self, addr: int) -> int | None:
        try:
            return self.m.read_linear(addr, 1)[0]
        except ArchFault:
            return None

    def invalid_opcode(self) -> None:
        m = self.m
        m.regs.state.stale_exception = True
        rip = m.engine.read_reg("rip")
        m.engine.uncount()
        code = m.code_bytes(rip, min(15, 0x1000 - (rip & 0xFFF)))  # this page's part
        at = opcode_offset(code) if code is not None else 0
        if code is not None and at < len(code) and code[at] == 0xF1:
            # INT1/ICEBP, prefixes ignored (kvm-unit-tests x86/debug.c runs `cs cs int1`):
            # a trap through vector 1 with no gate-DPL check (EXT=1, Bochs).
            m.engine.recount()
            m.deliver(Event(Vector.DB, Source.PRIV_SOFTWARE, rip + at + 1, rip), why="INT1")
        else:
            m.deliver(Event.exception(Vector.UD, rip), why="invalid opcode")

    def fault_at(self, address: int, fault: ArchFault) -> None:
        """A fault raised by the instruction at `address` before it did anything (it was
        counted when the engine stopped at its site: it did not retire)."""
        m = self.m
        m.engine.uncount()
        m.deliver(Event.exception(fault.vector, address, fault.error_code, fault.cr2),
                  why=fault.why)

    def lock_ud(self, address: int) -> None:
        """A LOCK prefix on an instruction or form that cannot be locked (SDM Vol. 2
        LOCK: #UD unless the instruction is lockable and its destination is memory): a
        fault on the instruction, before it does anything."""
        self.fault_at(address, ArchFault(Vector.UD, why="LOCK prefix on an instruction that "
                                         "cannot be locked"))

    def invalid_ud(self, address: int) -> None:
        """An encoding the SDM makes #UD and the engine would run (cpu/decode.py
        `invalid_encoding`): a fault on the instruction."""
        code = self.m.code_bytes(address, 15)
        found = invalid_encoding(code) if code is not None else None
        self.fault_at(address, ArchFault(Vector.UD, why=found[1] if found is not None
                                         else "invalid encoding"))

    def native_stop(self) -> None:
        """The engine stopped without a hook: a HLT no site caught (every block is decoded
        before it runs, cpu/sites.py, so this is a safety net)."""
        rip = self.m.engine.read_reg("rip")
        if self.byte_at(rip - 1) == 0xF4:
            raise Stop(Outcome.HLT, "HLT (not intercepted)", rip)
        raise Stop(Outcome.UNSUPPORTED, f"engine stopped unexpectedly at {rip:#x}", rip)
