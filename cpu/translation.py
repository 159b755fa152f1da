"""Address translation: the guest's page walk (and the EPT stage behind it) for the
engine's TLB fills, and guest memory as delivery and IRET access it.

Unicorn does not walk the guest's page tables; it asks (`UC_HOOK_TLB_FILL`) and this
module answers with the physical page and the rights both stages grant, or refuses, in
which case the access lands on a poison page and stops the engine at its instruction
(the fault is then raised by cpu/stops.py with the exact error code and CR2; SDM Vol. 3A
4.7 "Page-Fault Exceptions").

`GuestMemory` is the `idt.state.SystemMemory` the pure model reads and writes: the
CPU's implicit accesses during delivery and IRET (the IDT, the TSS, the stacks) go
through guest paging and — when the machine has VMX — through EPT, so they can fault
(#PF, #SS, an EPT violation during delivery) exactly as on hardware.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cpu.engine import PROT_R, PROT_W, PROT_X, REFUSE, Refuse
from cpu.ept import EptMisconfig, EptViolation
from cpu.memory import PhysicalMemory
from cpu.mmu import CR4_PKE, CR4_SMAP, Access, PagingControl, Translation, WalkCache
from cpu.outcomes import Outcome, Stop
from idt.state import RFLAGS_AC, ArchFault, is_canonical
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine


def window_at(m: Machine, paddr: int, size: int) -> tuple[int, PhysicalMemory] | None:
    """The memory window (base, memory) beyond RAM that holds [paddr, paddr + size)
    (pc-testdev's IORAM), if any."""
    for base, window in m.engine.windows:
        if base <= paddr and paddr + size <= base + window.size:
            return base, window
    return None


def physical_read(m: Machine, paddr: int, size: int) -> bytes | None:
    """`size` bytes at physical `paddr`, in RAM or a memory window; None outside both."""
    if m.phys.contains(paddr, size):
        return m.phys.read(paddr, size)
    found = window_at(m, paddr, size)
    return None if found is None else found[1].read(paddr - found[0], size)


class GuestMemory:
    """`idt.state.SystemMemory` over guest paging: what delivery and IRET access."""

    # Derived or transient, not state: rebuilt as needed, cleared by a rollback.
    CACHES = frozenset({"walks", "ctl", "_recent", "record"})

    def __init__(self, machine: Machine, *, architectural: bool = True) -> None:
        """`architectural`: the CPU's own implicit accesses (delivery, IRET), which go
        through the second stage (EPT) when there is one; otherwise an inspection by the
        emulator (disassembly, decoding), which never causes an EPT violation."""
        self.m = machine
        self.architectural = architectural
        # Paging controls snapshotted for the duration of one delivery or IRET (see
        # `Machine.paging_snapshot`): nothing can write CR0/CR3/CR4/EFER in between, and
        # reading them from the engine for every 8-byte access dominated event cost.
        self.ctl: PagingControl | None = None
        self.walks = WalkCache(machine.phys)
        # Pages translated under a snapshot's paging controls (an event pushes five or six
        # slots and reads the IDT, the GDT and the TSS; the next event touches the same
        # pages): (page, access, user) -> (ctl, physical page, the walk's check). Used only
        # under the same controls (the same object: `Registers` keeps it while they do not
        # change) and while the walk's entries still hold, so it gives what `walks` would.
        self._recent: dict[tuple[int, Access, bool], tuple[PagingControl, int, Any]] = {}
        # While not None, what the accesses touched, for cpu/delivery_memo.py: ("page",
        # physical page, the walk's check) per translation, ("read", physical address,
        # bytes) and ("write", physical address, size) per one-page access, ("other",)
        # for anything else (a split access, a memory window, EPT).
        self.record: list[tuple[Any, ...]] | None = None

    def forget(self) -> None:
        """Drop the pages kept from earlier events (a second stage was added: the
        translations they hold no longer describe the implicit accesses)."""
        self._recent.clear()

    def _pieces(self, linear: int, size: int) -> Iterable[tuple[int, int, int]]:
        off = 0
        while off < size:
            addr = (linear + off) & (2**64 - 1)
            n = min(size - off, 4096 - (addr & 0xFFF))
            yield addr, off, n
            off += n

    def _translate(self, addr: int, size: int, access: Access, user: bool, stack: bool) -> int:
        ctl = self.ctl
        if ctl is not None:
            hit = self._recent.get((addr >> 12, access, user))
            if hit is not None and hit[0] is ctl and self.walks.holds(hit[2]):
                if self.record is not None:
                    self.record.append(("page", hit[1], hit[2]))
                return hit[1] | (addr & 0xFFF)  # (its page is in RAM: checked when kept)
        if not is_canonical(addr):
            raise ArchFault(Vector.SS if stack else Vector.GP, 0,
                            why=f"non-canonical address {addr:#x}")
        m = self.m
        if ctl is None:
            ctl = m.regs.paging()
        if self.architectural and m.ept is not None:
            t = self.walks.walk(ctl, addr, access, user=user, stage2=m.translator.stage2,
                                stage2_generation=m.ept.generation)
        elif self.architectural:
            # The CPU's implicit accesses: SMAP refuses user pages whatever EFLAGS.AC.
            t = self.walks.walk(ctl, addr, access, user=user)
        else:
            # An inspection by the emulator: no SMAP, no protection keys.
            t = self.walks.walk(ctl, addr, access, user=user, smap_exempt=True, keys=False)
        paddr = t.paddr | (addr & 0xFFF)
        if not m.phys.contains(paddr, size) and window_at(m, paddr, size) is None:
            # A present translation to no RAM: a 2-MiB identity page over the end of a
            # memory size that is not a multiple of 2 MiB, a PageSpec, or tables the guest
            # rewrote. The guest's own accesses end the run as "outside_memory"
            # (cpu/stops.py); delivery's and IRET's implicit accesses (a frame pushed
            # through RSP0/IST) must end it the same way, not escape Machine.run as
            # PhysicalAccessError.
            raise Stop(Outcome.OUTSIDE_MEMORY,
                       f"{access.name.lower()} of {addr:#x} maps to physical {paddr:#x}, "
                       "outside guest memory", m.engine.read_reg("rip"))
        if self.ctl is not None and m.ept is None and m.phys.contains(t.paddr, 4096):
            if len(self._recent) >= 256:
                self._recent.clear()
            self._recent[(addr >> 12, access, user)] = (self.ctl, t.paddr, self.walks.last_check)
            if self.record is not None:
                self.record.append(("page", t.paddr, self.walks.last_check))
        elif self.record is not None:
            self.record.append(("other",))
        return paddr

    def read(self, linear: int, size: int, *, user: bool = False, stack: bool = False) -> bytes:
        phys = self.m.phys
        if (linear & 0xFFF) + size <= 0x1000:  # one page: the common case, no splitting
            paddr = self._translate(linear, size, Access.READ, user, stack)
            if paddr < phys.size:
                data = bytes(phys.view[paddr : paddr + size])
                if self.record is not None:
                    self.record.append(("read", paddr, data))
                return data
            return self._window_read(paddr, size)
        if self.record is not None:
            self.record.append(("other",))
        out = bytearray(size)
        for addr, off, n in self._pieces(linear, size):
            paddr = self._translate(addr, n, Access.READ, user, stack)
            out[off : off + n] = phys.read(paddr, n) if paddr < phys.size else \
                self._window_read(paddr, n)
        return bytes(out)

    def write(self, linear: int, data: bytes, *, user: bool = False, stack: bool = False) -> None:
        phys = self.m.phys
        if (linear & 0xFFF) + len(data) <= 0x1000:
            paddr = self._translate(linear, len(data), Access.WRITE, user, stack)
            if paddr >= phys.size:
                self._window_write(paddr, data)
                return
            if phys.dirty is not None:
                phys.mark(paddr, len(data))
            phys.view[paddr : paddr + len(data)] = data
            if self.record is not None:
                self.record.append(("write", paddr, len(data)))
            return
        if self.record is not None:
            self.record.append(("other",))
        for addr, off, n in self._pieces(linear, len(data)):
            paddr = self._translate(addr, n, Access.WRITE, user, stack)
            if paddr < phys.size:
                phys.write(paddr, data[off : off + n])
            else:
                self._window_write(paddr, data[off : off + n])

    def _window_read(self, paddr: int, size: int) -> bytes:
        data = physical_read(self.m, paddr, size)
        assert data is not None  # _translate checked
        return data

    def _window_write(self, paddr: int, data: bytes) -> None:
        found = window_at(self.m, paddr, len(data))
        assert found is not None  # _translate checked
        base, mem = found
        mem.write(paddr - base, data)


class Translator:
    """The guest's own accesses: TLB fills for the engine, the two-stage walk."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def fill(self, vpage: int, access: Access) -> tuple[int, int] | Refuse | None:
        """The engine's TLB fill: (physical page, PROT_* rights), None to poison, or
        REFUSE.

        A fill that faults (non-canonical, #PF, EPT) is poisoned — the access stops at its
        instruction with its exact address (cpu/stops.py) — except a WRITE, which is
        refused: QEMU's `store_helper` fills the second page of a store that crosses a
        page boundary *before* writing a byte, but then stores byte by byte, so with a
        poisoned second page the first page's bytes would already be written. A
        faulting instruction changes nothing (SDM Vol. 3A "Exception Classifications"),
        so the store must not start (cpu/stops.py `Stops.refused_write` finds the
        address from the instruction)."""
        m = self.m
        if not is_canonical(vpage):
            return REFUSE if access is Access.WRITE else None
        ctl = m.regs.read_paging()
        try:
            t = self.guest_walk(ctl, vpage, access)
        except (ArchFault, EptViolation, EptMisconfig):
            # The access stops at its instruction (cpu/stops.py).
            return REFUSE if access is Access.WRITE else None
        if not m.phys.contains(t.paddr, 4096):
            window = window_at(m, t.paddr, 4096)
            if window is not None:
                return self._window_fill(window, t, access)
            # Also the local APIC page: every access to it stops the engine at the
            # accessing instruction, which the machine emulates (cpu/mmio.py); so are
            # the other device pages.
            return None
        watched = m.debug.watches(vpage)
        if watched and access is not Access.FETCH:
            # A data breakpoint's page: every data access stops at its instruction
            # (cpu/debug.py `Debug.data_access`); a store is refused, as above.
            return REFUSE if access is Access.WRITE else None
        prot = self._rights(t, access, m.phys, t.paddr)
        if watched:
            prot &= PROT_X  # fetches only: data accesses must miss and come back here
        if m.ept is not None:
            # The engine's TLB entry serves every kind of access: it may only grant what
            # both stages allow. A kind EPT refuses misses the TLB and comes back here
            # as its own fill, which then poisons (a violation at its instruction).
            for kind, bit in ((Access.READ, PROT_R), (Access.WRITE, PROT_W), (Access.FETCH, PROT_X)):
                if prot & bit and kind is not access and not self._ept_allows(t.paddr, kind):
                    prot &= ~bit
        elif not ctl.cr4 & CR4_PKE and vpage not in m.debug.state.watched:
            # The same fill, while the entries this walk read hold, needs no Python (not
            # under CR4.PKE: PKRU changes natively, out of the native front's sight; never
            # for a data breakpoint's page: its mapping depends on more).
            m.engine.remember_fill(vpage, access, m.regs.state.cpl == 3,
                                   m.sysmem.walks.last_used, t.paddr, prot)
        return t.paddr, prot

    def _window_fill(self, window: tuple[int, PhysicalMemory], t: Translation,
                     access: Access) -> tuple[int, int]:
        """A fill into a memory window (pc-testdev's IORAM): the rights of the page walk,
        and the same checkpoint rule as RAM. Not remembered by the native front, which
        knows RAM only; the engine's own TLB keeps the entry until the next flush."""
        base, mem = window
        return t.paddr, self._rights(t, access, mem, t.paddr - base)

    @staticmethod
    def _rights(t: Translation, access: Access, mem: PhysicalMemory, offset: int) -> int:
        """The PROT_* rights of a fill of walk `t` for `access`, to `offset` in `mem`."""
        prot = PROT_R if t.readable else 0
        if t.writable and (t.dirty or access is Access.WRITE):
            prot |= PROT_W  # a clean page is filled read-only so the first write sets D
        if mem.dirty is not None:
            # Checkpoint tracking (cpu.snapshot): the engine may write a page only through
            # an entry filled for a write, which is where the page is marked.
            if access is Access.WRITE:
                mem.mark(offset, 4096)
            else:
                prot &= ~PROT_W
        if t.executable:
            prot |= PROT_X
        return prot

    def _ept_allows(self, hpa: int, access: Access) -> bool:
        assert self.m.ept is not None
        try:
            self.m.ept.translate(hpa, access)  # identity: the host address is the GPA
        except (EptViolation, EptMisconfig):
            return False
        return True

    def guest_walk(self, ctl: PagingControl, vaddr: int, access: Access) -> Translation:
        """The guest's own (explicit) access at the current CPL: guest paging, then EPT
        when the machine has it. With CR4.SMAP = 1, a supervisor access made with
        EFLAGS.AC = 1 may touch user pages (the engine keeps the TLB entries of AC = 0
        and AC = 1 apart, so reading AC here is exact; cpu/mmu.py)."""
        m = self.m
        user = m.regs.state.cpl == 3
        exempt = (not user and bool(ctl.cr4 & CR4_SMAP)
                  and bool(m.engine.read_reg("rflags") & RFLAGS_AC))
        if m.ept is None:
            return m.sysmem.walks.walk(ctl, vaddr, access, user=user, smap_exempt=exempt)
        return m.sysmem.walks.walk(ctl, vaddr, access, user=user, stage2=self.stage2,
                                   stage2_generation=m.ept.generation, smap_exempt=exempt)

    def stage2(self, gpa: int, access: Access, linear: int, final: bool) -> int:
        """EPT translation of one guest-physical access (`cpu.mmu.Stage2`). A violation
        is annotated with the guest-linear address and whether it hit the final
        translation or a guest paging-structure entry (qualification bits 7 and 8)."""
        m = self.m
        assert m.ept is not None
        if m.mmio.claims(gpa & ~0xFFF):
            return gpa  # device pages are not behind EPT here (no APIC virtualization)
        try:
            return m.ept.translate(gpa, access)
        except EptViolation as v:
            v.gla = linear
            v.final = final
            raise
