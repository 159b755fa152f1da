"""Injection points: scheduled asynchronous events, and counting arrivals at addresses.

An event scheduled with `Machine.inject` (cpu/events.py) *arrives* at its point:

* `Before(address, hit)`: the address is a site (a code hook); each time execution
  reaches it counts as an arrival — once per boundary: the same boundary re-entered
  after a stop there is not a new arrival, a return to it by IRET is — and the `hit`-th
  arrival stops the engine before the instruction, where the event arrives. An arrival
  at a boundary the machine holds between runs (an event was just delivered there, or
  the run starts there) counts too (`arrive_here`).
* `AtIcount`/`AtCycle`/`Now`: looked at by the event boundary (cpu/boundary.py) at each
  boundary; the run loop stops the engine at the next icount or cycle deadline.
* `AtPort(name, hit)`: the `hit`-th write to that port (cpu/platform.py).

Arrival makes the event pending (or latched, or dropped); delivery is the boundary's
business. A *pause* (`Machine.run(pause_at=...)`) is an arrival point with no event: it
ends the run there with outcome "pause", so the race explorer can checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cpu.events import (
    AsyncEvent,
    AsyncPf,
    AtCycle,
    AtIcount,
    AtPort,
    Before,
    EptRevoke,
    Injection,
    Interrupt,
    Nmi,
    Now,
    Point,
)
from cpu.outcomes import Outcome, Stop

if TYPE_CHECKING:
    from cpu.machine import Machine


@dataclass
class InjectionState:
    """Scheduled events and arrival counts. The same `Injection` objects appear in
    `scheduled` and in the per-point indexes: they are copied together."""

    scheduled: list[Injection] = field(default_factory=list)
    waiting: list[Injection] = field(default_factory=list)  # AtIcount/AtCycle/Now, not fired
    before: dict[int, dict[int, list[Injection]]] = field(default_factory=dict)  # addr->hit
    arrivals: dict[int, int] = field(default_factory=dict)
    site_seen: tuple[int, int] | None = None  # (address, boundary) last counted
    port_points: dict[str, dict[int, list[Injection]]] = field(default_factory=dict)
    port_writes: dict[str, int] = field(default_factory=dict)
    # An event that arrived between runs (`arrive_now`) and ended the run there (an async
    # #PF whose delivery shut the CPU down, say): the next run ends with it at once.
    deferred: Stop | None = None


class Injections:
    """Scheduling, arrival counting and firing of injected events."""

    def __init__(self, m: Machine, state: InjectionState) -> None:
        self.m = m
        self.state = state

    # -- scheduling --------------------------------------------------------------------
    def schedule(self, event: AsyncEvent, point: Point, *, label: str = "",
                 shown: tuple[int, int] | None = None) -> Injection:
        m = self.m
        if isinstance(point, Before) and isinstance(point.address, str):
            if point.address not in m.symbols:
                raise ValueError(f"unknown symbol {point.address!r} for an injection point")
            point = Before(m.symbols[point.address], point.hit)
        if isinstance(event, Interrupt) and m.apic is None:
            raise ValueError("interrupt injection needs the local APIC (Machine(apic=True))")
        if isinstance(event, AsyncPf) and m.apf is None:
            raise ValueError("async_pf injection needs async page faults (Machine.enable_apf)")
        if isinstance(event, EptRevoke) and m.ept is None:
            raise ValueError("ept_revoke injection needs EPT (Machine(vmx=VmxConfig(...)))")
        inj = Injection(event, point, label, shown=shown)
        st = self.state
        st.scheduled.append(inj)
        if isinstance(point, AtPort):
            st.port_points.setdefault(point.port, {}).setdefault(point.hit, []).append(inj)
        elif isinstance(point, Before):
            assert isinstance(point.address, int)
            self.watch(point.address).setdefault(point.hit, []).append(inj)
        else:
            st.waiting.append(inj)
        return inj

    def arrive_now(self, event: AsyncEvent, *, label: str = "",
                   shown: tuple[int, int] | None = None) -> Injection:
        """The event arrives at the boundary the machine holds, between runs. An arrival
        that ends the run (a host event delivered at once, whose delivery shuts the CPU
        down) is kept for the next run, which ends with it: outside the run loop, an
        outcome has nowhere else to go."""
        inj = Injection(event, Now(), label, shown=shown)
        self.state.scheduled.append(inj)
        try:
            self.fire(inj)
        except Stop as stop:
            self.state.deferred = stop
        return inj

    def raise_deferred(self) -> None:
        """At the first boundary of a run: end it with an outcome `arrive_now` kept."""
        stop, self.state.deferred = self.state.deferred, None
        if stop is not None:
            raise stop

    def watch(self, address: int) -> dict[int, list[Injection]]:
        """Count arrivals at `address` from now on; its injections by arrival number."""
        self.m.engine.add_site(address)
        return self.state.before.setdefault(address, {})

    def add_pause(self, address: int, hit: int) -> tuple[int, Injection, bool]:
        fresh = address not in self.m.engine.site_addresses
        inj = Injection(None, Before(address, hit))  # not one of the run's events
        self.watch(address).setdefault(hit, []).append(inj)
        return address, inj, fresh

    def drop_pause(self, address: int, inj: Injection, fresh: bool) -> None:
        """After a run with `pause_at`: forget the pause point. A site the pause added is
        removed with its arrival count, so a checkpoint taken there does not keep a code
        hook at every address the explorer paused at (each costs a Python call whenever
        that instruction runs); counting starts afresh if that address is watched again."""
        st = self.state
        m = self.m
        waiting = st.before.get(address, {})
        for hit, injs in list(waiting.items()):
            if inj in injs:
                injs.remove(inj)
                if not injs:
                    del waiting[hit]
        if fresh and not waiting:
            st.before.pop(address, None)
            st.arrivals.pop(address, None)
            observed = m.frames.observe_cr2 and address in m.sites.cr2_reads
            if address not in m.sites.kinds and not observed:
                m.engine.remove_site(address)

    # -- arrivals ----------------------------------------------------------------------
    def _arrive(self, address: int, here: int) -> list[Injection]:
        """Execution is at the boundary before instruction number `here`, at `address`,
        an injection point: count the arrival and return the injections due there, a
        pause last."""
        st = self.state
        if st.site_seen == (address, here):
            return []
        st.site_seen = (address, here)
        n = st.arrivals[address] = st.arrivals.get(address, 0) + 1
        due = [inj for inj in st.before[address].pop(n, ()) if not inj.fired]
        return sorted(due, key=lambda i: i.is_pause)

    def arrive_here(self) -> None:
        """At a boundary the machine holds (between engine runs): an arrival at an
        injection point there counts even when an event is delivered before its
        instruction runs (the code hook would never see it)."""
        m = self.m
        if self.state.before or m.on_boundary:
            rip = m.engine.read_reg("rip")
            for cb in m.on_boundary:
                cb(rip)
            if rip in self.state.before:
                for inj in self._arrive(rip, m.engine.icount + 1):
                    self.fire(inj)

    def at_site(self, address: int) -> bool:
        """A code hook at `address`: if injections are due there, stop the engine before
        the instruction and fire them at the boundary (True)."""
        if address not in self.state.before:
            return False
        e = self.m.engine
        due = self._arrive(address, e.count_at(address))
        if not due:
            return False

        def fire() -> None:
            e.uncount()  # stopped before the instruction at `address` executed
            for inj in due:
                self.fire(inj)
        self.m.stops.pending = fire
        e.stop()
        return True

    def forget_site_seen(self) -> None:
        self.state.site_seen = None

    def waits_for_port(self, name: str) -> bool:
        return bool(self.state.port_points.get(name))

    def port_written(self, name: str, address: int) -> list[Injection]:
        """The guest wrote port point `name`: count it, record it, fire what is due."""
        st = self.state
        n = st.port_writes[name] = st.port_writes.get(name, 0) + 1
        self.m.emit(name, address=address, hit=n)
        due = [inj for inj in st.port_points.get(name, {}).pop(n, ()) if not inj.fired]
        for inj in due:
            self.fire(inj)
        return due

    def fire_due(self) -> None:
        """Fire the icount/cycle/now injections that are due at this boundary."""
        e = self.m.engine
        waiting = self.state.waiting
        for inj in list(waiting):
            if inj.fired:
                waiting.remove(inj)
                continue
            p = inj.point
            if (isinstance(p, AtIcount) and e.icount >= p.icount) or (
                    isinstance(p, AtCycle) and e.cycles >= p.cycle) or isinstance(p, Now):
                self.fire(inj)
                waiting.remove(inj)

    def next_icount_stop(self) -> int | None:
        """The instruction count after which an AtIcount injection is due."""
        stops = [inj.point.icount + 1 for inj in self.state.waiting
                 if not inj.fired and isinstance(inj.point, AtIcount)]
        return min(stops, default=None)

    def cycle_deadlines(self) -> list[int]:
        return [inj.point.cycle for inj in self.state.waiting
                if not inj.fired and isinstance(inj.point, AtCycle)]

    # -- arrival ---------------------------------------------------------------------
    def fire(self, inj: Injection) -> None:
        """The event of `inj` arrives: it becomes pending (or latched, or is dropped)."""
        m = self.m
        inj.fired = True
        ev = inj.event
        if ev is None:
            raise Stop(Outcome.PAUSE, "paused", m.engine.read_reg("rip"))
        where = {**inj.where, **({"label": inj.label} if inj.label else {})}
        if isinstance(ev, Nmi):
            m.boundary.nmi_arrives("inject" if inj.label != "api" else "api", where)
        elif isinstance(ev, AsyncPf):
            m.apf_host.arrive(ev, where=where)
        elif isinstance(ev, EptRevoke):
            m.vmx_host.revoke(ev.gpa, where, checked=ev.policy is not None)
        else:
            assert m.apic is not None
            m.apic.set_irr(ev.vector)
            m.emit("interrupt_pending", vector=ev.vector, source="inject", **where)
