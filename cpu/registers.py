"""The CPU's architectural registers as the event model sees them: the paging controls
and descriptor-table registers (read once per engine stop), the CPL, CS/SS loads with
their hidden parts, and the `idt.state.ArchState` that delivery and IRET work on.

Unicorn keeps the registers; this module decides when to read them. Between two engine
runs nothing but Python can change CR0/CR3/CR4/EFER, GDTR, IDTR or TR, so they are read
once per stop and cached until the next run (`forget` clears the cache, as every run and
every Python write of those registers does). During a run (a TLB fill) they are read
fresh.

The CPL is not an engine register: a CS/SS load in 64-bit mode sets only the selectors,
so privilege changes are made by patching the engine's context (segment caches and the
CPL bits of `hflags`; cpu/engine.py), and the CPL is kept here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpu.layout import MSR_EFER
from cpu.mmu import CR4_PKE, CR4_PKS, PagingControl
from cpu.msrs import MSR_PKRS
from idt.descriptors import SegmentDescriptor
from idt.iret import DATA_SEGMENT_REGISTERS
from idt.state import ArchState, DataSegment

if TYPE_CHECKING:
    from cpu.machine import Machine

# A segment descriptor's high dword (as the engine caches it): S = 1 and type bit 11 mark
# a code segment, type bit 10 a conforming one (SDM Vol. 3A "Code- and Data-Segment
# Descriptor Types").
DESC_CODE = 1 << 11
DESC_CONFORMING = 1 << 10


@dataclass
class RegisterState:
    """What the machine knows about the CPU beyond the engine's registers."""

    cpl: int = 0
    # QEMU remembers an exception it raised until its own delivery code runs, which
    # Unicorn skips: set after every engine-raised exception, cleared by the next context
    # patch (which resets the field).
    stale_exception: bool = False


class Registers:
    """Cached reads of the control and table registers, CS/SS loads, `ArchState`."""

    # Derived or transient, not state: rebuilt as needed, cleared by a rollback.
    CACHES = frozenset({"_cache", "running", "_paging"})

    def __init__(self, m: Machine, state: RegisterState) -> None:
        self.m = m
        self.state = state
        self.running = False  # True while the engine runs (a hook is asking)
        self._cache: dict[str, object] = {}  # per stop: "paging", "idtr", "gdtr", "tr"
        self._paging: PagingControl | None = None  # the last paging controls read

    def forget(self) -> None:
        """Drop the per-stop cache (before a run, after Python wrote a register)."""
        self._cache.clear()

    def paging(self) -> PagingControl:
        """The paging controls: once per stop between runs, fresh during a run."""
        ctl = self._cache.get("paging")
        if ctl is None:
            if self.m.engine.bits != 64:
                return self.read_paging()
            self._snapshot()
            ctl = self._paging
        assert isinstance(ctl, PagingControl)
        return ctl

    def read_paging(self) -> PagingControl:
        """CR0, CR3, CR4, EFER, and the protection-key rights the walk uses: PKRU (kept
        by the engine) when CR4.PKE = 1, IA32_PKRS (kept by the MSR table) when
        CR4.PKS = 1."""
        e = self.m.engine
        if e.bits == 64:
            self._snapshot()
            assert self._paging is not None
            return self._paging
        cr0, cr3, cr4 = e.read(("cr0", "cr3", "cr4"))
        return self._control(cr0, cr3, cr4, e.read_msr(MSR_EFER))

    def last_paging(self) -> PagingControl:
        """The paging controls read with the last `arch_state` (the same engine call)."""
        assert self._paging is not None
        return self._paging

    def _control(self, cr0: int, cr3: int, cr4: int, efer: int) -> PagingControl:
        pkru = self.m.engine.pkru() if cr4 & CR4_PKE else 0
        pkrs = self.m.state.model.msrs.values[MSR_PKRS] if cr4 & CR4_PKS else 0
        return PagingControl(cr3=cr3, cr0=cr0, cr4=cr4, efer=efer, pkru=pkru, pkrs=pkrs)

    def _snapshot(self) -> tuple[int, ...]:
        """Everything an event reads from the engine, in one call
        (`Engine.read_event_state`); between runs the paging controls and the table
        registers it read are kept for the rest of the stop."""
        v = self.m.engine.read_event_state()
        ctl = self._paging
        if ctl is None or (ctl.cr0, ctl.cr3, ctl.cr4, ctl.efer) != (v[6], v[7], v[8], v[21]) \
                or v[8] & (CR4_PKE | CR4_PKS):
            # (A new object only when something changed: walks are memoised per value.)
            ctl = self._control(v[6], v[7], v[8], v[21])
            self._paging = ctl
        if not self.running:
            cache = self._cache
            cache["paging"] = ctl
            cache["idtr"] = (v[9], v[10], v[11])
            cache["gdtr"] = (v[13], v[14], v[15])
            cache["tr"] = (v[17], v[18], v[19])
        return v

    def table(self, which: str) -> tuple[int, int, int]:
        """IDTR/GDTR/TR as (selector, base, limit), cached like `paging`."""
        val = self._cache.get(which)
        if val is None:
            e = self.m.engine
            if e.bits != 64:
                return e.read_table(which)
            v = self._snapshot()
            i = (9, 13, 17)[("idtr", "gdtr", "tr").index(which)]
            val = (v[i], v[i + 1], v[i + 2])
        assert isinstance(val, tuple)
        return val

    def arch_state(self) -> ArchState:
        """The state `idt` delivers from: RIP, RSP, RFLAGS, CS, SS, CPL, the table
        registers, CR2, NMI blocking, and the descriptor caches of DS/ES/FS/GS (what an
        IRET to an outer level looks at; read only if something looks)."""
        if self.m.engine.bits != 64:
            rip, rsp, rflags, cs, ss, cr2 = self.m.engine.read(("rip", "rsp", "rflags", "cs",
                                                                "ss", "cr2"))
            _, idt_base, idt_limit = self.table("idtr")
            _, gdt_base, gdt_limit = self.table("gdtr")
            tr_sel, tr_base, tr_limit = self.table("tr")
        else:
            v = self._snapshot()
            rip, rsp, rflags, cs, ss, cr2 = v[:6]
            idt_base, idt_limit, gdt_base, gdt_limit = v[10], v[11], v[14], v[15]
            tr_sel, tr_base, tr_limit = v[17], v[18], v[19]
        return ArchState(rip=rip, rsp=rsp, rflags=rflags, cs=cs, ss=ss, cpl=self.state.cpl,
                         idtr_base=idt_base, idtr_limit=idt_limit, gdtr_base=gdt_base,
                         gdtr_limit=gdt_limit, tr_selector=tr_sel, tr_base=tr_base,
                         tr_limit=tr_limit, cr2=cr2, nmi_blocked=self.m.intr.nmi_blocked,
                         data_segments=_DataSegments(self))

    def data_segments(self) -> dict[str, DataSegment]:
        """DS/ES/FS/GS holding a non-zero selector, with the DPL and type of the
        descriptor cached when it was loaded (the engine's segment caches: the GDT entry
        may have changed since, and the SDM's IRET rule reads the cache)."""
        e = self.m.engine
        names = [n for n, sel in zip(DATA_SEGMENT_REGISTERS, e.read(DATA_SEGMENT_REGISTERS),
                                     strict=True) if sel & 0xFFFF]
        if not names:
            return {}
        out: dict[str, DataSegment] = {}
        for name, (selector, flags) in e.segment_caches(names).items():
            out[name] = DataSegment(selector=selector, dpl=(flags >> 13) & 3,
                                    is_code=bool(flags & DESC_CODE),
                                    conforming=bool(flags & DESC_CONFORMING))
        return out

    def load_segments(self, cs: int, ss: int, cpl: int,
                      current: tuple[int, int] | None = None,
                      cs_descriptor: SegmentDescriptor | None = None) -> None:
        """Load CS/SS hidden state and the CPL (and reset QEMU's stale exception state).

        Skipped when nothing would change: `current` (the CS and SS selectors in the
        engine now) equal the new ones at the same CPL — the engine's hidden caches then
        already describe these selectors (set by an earlier patch, or loaded by the guest
        from the same GDT entries) — and no QEMU exception is in flight. Saves a context
        save/restore on INT n and same-stack IRETs. `cs_descriptor`: CS's descriptor as a
        delivery read and checked it (else it is read from the GDT now)."""
        st = self.state
        if current == (cs, ss) and cpl == st.cpl and not st.stale_exception:
            return
        st.stale_exception = False
        cs_desc = cs_descriptor if cs_descriptor is not None else self.gdt_descriptor(cs)
        self.m.engine.patch_context(segments=(cs, cs_desc.high_dword, ss, self.ss_flags(ss, cpl),
                                              cpl),
                                    clear_stale_exception=True)
        if cpl != st.cpl:
            # TLB entries carry rights computed for one privilege: drop them on a change.
            self.m.engine.flush_tlb()
            self.m.alignment.arm(cpl)
        st.cpl = cpl

    def load_fixed_segments(self, cs: int, cs_flags: int, ss: int, ss_flags: int,
                            cpl: int) -> None:
        """Load CS/SS with fixed hidden parts (not read from the GDT: SYSCALL, SYSRET)."""
        st = self.state
        st.stale_exception = False
        self.m.engine.patch_context(segments=(cs, cs_flags, ss, ss_flags, cpl),
                                    clear_stale_exception=True)
        if cpl != st.cpl:
            self.m.engine.flush_tlb()
            self.m.alignment.arm(cpl)
        st.cpl = cpl

    def ss_flags(self, ss: int, cpl: int) -> int:
        """The flags SS's hidden part takes when `ss` is loaded at `cpl` (as QEMU caches
        them): a null selector's are its RPL's DPL, otherwise its descriptor's high dword."""
        return (cpl << 13) if ss & 0xFFFC == 0 else self.gdt_descriptor(ss).high_dword

    def gdt_descriptor(self, selector: int) -> SegmentDescriptor:
        _, base, _limit = self.table("gdtr")
        return SegmentDescriptor.unpack(self.m.inspect.read(base + (selector & ~7), 8))


class _DataSegments(Mapping[str, DataSegment]):
    """`Registers.data_segments`, read on first use: only an IRET to an outer privilege
    level looks at them, and reading the engine's segment caches costs a context save."""

    def __init__(self, regs: Registers) -> None:
        self._regs = regs
        self._read: dict[str, DataSegment] | None = None

    def _get(self) -> dict[str, DataSegment]:
        if self._read is None:
            self._read = self._regs.data_segments()
        return self._read

    def __getitem__(self, name: str) -> DataSegment:
        return self._get()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())
