"""Live exception frames: the frames of delivered events whose IRET has not run yet.

The nested-NMI race is a delivery that pushes its frame over a frame still in use: a
second NMI on the same IST stack overwrites the first NMI's return frame (SDM Vol. 3A
6.14.5 "Interrupt Stack Table": the IST pointer is loaded unconditionally). The machine
keeps every live frame — address, slot names, event, when it was pushed — and after each
delivery compares their bytes with what they held before it; a change is a
`frame_overwritten` record naming the victim and every slot, old and new. An IRET pops
the innermost one; an event taken at CPL 3 (or a SYSRET) finds none live.

The same bookkeeping answers the CR2 question of the async-#PF threads: with
`observe_cr2_reads`, each `MOV reg, CR2` in decoded code emits a `cr2_read` record with
the value read and, when the innermost live frame is a #PF's, the CR2 that #PF
delivered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cpu.outcomes import Stop
from idt.state import ArchFault

if TYPE_CHECKING:
    from cpu.machine import Machine

# More live frames than any real nesting has (the #DF/NMI/#MC/#DB chains are a handful).
MAX_LIVE_FRAMES = 64
# (address, slot names, event name, icount when pushed)
LiveFrame = tuple[int, tuple[str, ...], str, int]


@dataclass
class FrameState:
    live: list[LiveFrame] = field(default_factory=list)
    depth: int = 0  # deliveries minus IRETs (the timeline's nesting)
    cr2_seen: tuple[int, int] | None = None  # the CR2 read boundary last recorded
    pf_cr2: dict[tuple[int, int], int] = field(default_factory=dict)  # #PF frame -> CR2


class Frames:
    """Live frames, overwrite reports and CR2 observation."""

    def __init__(self, m: Machine, state: FrameState) -> None:
        self.m = m
        self.state = state
        self.observe_cr2 = False  # configuration: set by observe_cr2_reads

    def snapshot(self) -> list[tuple[int, bytes]]:
        """The bytes of every live frame, before a delivery."""
        out: list[tuple[int, bytes]] = []
        for addr, slots, _name, _ic in self.state.live:
            try:
                out.append((addr, self.m.inspect.read(addr, 8 * len(slots))))
            except (ArchFault, Stop):
                out.append((addr, b""))
        return out

    def report_overwrites(self, before: list[tuple[int, bytes]], by: str) -> None:
        """Emit `frame_overwritten` for each live frame this delivery's pushes changed.
        A frame is reported once: overwritten, it is no longer a frame anything can
        return through intact, and it stops being watched (so a kernel that abandons
        frames — kvm-unit-tests' longjmp out of its handlers — costs one record per
        overwrite, not one per delivery for every frame it ever left)."""
        st = self.state
        clobbered: list[int] = []
        for i, ((addr, slots, name, icount), (_a, old)) in enumerate(
                zip(st.live, before, strict=True)):
            if not old:
                continue
            try:
                new = self.m.inspect.read(addr, len(old))
            except (ArchFault, Stop):
                continue
            if new != old:
                clobbered.append(i)
                olds = struct.unpack(f"<{len(slots)}Q", old)
                news = struct.unpack(f"<{len(slots)}Q", new)
                self.m.emit("frame_overwritten", by=by, victim=name, victim_icount=icount,
                            at=addr, slots=[[s, o, n] for s, o, n in zip(slots, olds, news,
                                                                       strict=True)])
        if clobbered:
            st.live = [f for i, f in enumerate(st.live) if i not in clobbered]

    def user_mode(self) -> None:
        """The CPU runs at CPL 3: no handler is waiting to return through a kernel frame
        (it would have had to IRET out of it first), so frames still listed were
        abandoned (a kernel that leaves a handler by switching stacks, as kvm-unit-tests'
        user-mode helper does). Forget them: they are not victims, and a long run
        would otherwise compare every delivery against all of them."""
        self.state.live.clear()
        self.state.depth = 0

    def pushed(self, rsp: int, has_error_code: bool, name: str) -> None:
        """A delivery pushed its frame at `rsp`."""
        slots = ("error_code",) if has_error_code else ()
        live = self.state.live
        live.append((rsp, (*slots, "rip", "cs", "rflags", "rsp", "ss"), name,
                     self.m.engine.icount))
        if len(live) > MAX_LIVE_FRAMES:
            del live[0]  # deeper than any real nesting: the oldest was abandoned
        self.state.depth += 1

    def returned(self) -> int:
        """An IRET popped the innermost frame; returns the new depth."""
        st = self.state
        st.depth = max(0, st.depth - 1)
        if st.live:
            st.live.pop()
        return st.depth

    # -- CR2 observation ---------------------------------------------------------------
    def observe_cr2_reads(self) -> None:
        self.observe_cr2 = True
        for address in self.m.sites.cr2_reads:
            self.m.engine.add_site(address)

    def pf_delivered(self, rsp: int, cr2: int) -> None:
        if self.observe_cr2:
            st = self.state
            st.pf_cr2[(rsp, self.m.engine.icount)] = cr2
            if len(st.pf_cr2) > 2 * MAX_LIVE_FRAMES:
                # Only a live #PF frame's CR2 is ever looked up: forget the others, so a
                # long run of page faults keeps this as small as the live frames.
                live = {(at, pushed) for at, _slots, _name, pushed in st.live}
                live.add((rsp, self.m.engine.icount))  # pushed() has not listed it yet
                st.pf_cr2 = {k: v for k, v in st.pf_cr2.items() if k in live}

    def cr2_read_site(self, address: int) -> bool:
        """At a code hook: a `MOV reg, CR2` under observation is recorded (True)."""
        if not (self.observe_cr2 and address in self.m.sites.cr2_reads):
            return False
        e = self.m.engine
        st = self.state
        boundary = e.count_at(address) - 1
        if st.cr2_seen == (address, boundary):
            return True  # the same boundary re-entered after a stop there
        st.cr2_seen = (address, boundary)
        fields: dict[str, Any] = {"rip": address, "value": e.read_reg("cr2")}
        if st.live and st.live[-1][2] == "#PF":
            at, _slots, _name, pushed = st.live[-1]
            fields["pf_cr2"] = st.pf_cr2.get((at, pushed))
        self.m.trace.emit("cr2_read", boundary, e.cycles, **fields)
        return True
