"""Checkpoints: roll a machine back to an instruction boundary it passed.

The race explorer runs one scenario many times with events injected at different
points. Everything before the first injection is the same in all of those runs, so it
runs once: the machine is checkpointed at a boundary, a schedule runs from there to its
end, and the machine is rolled back for the next one (Unicorn's own context and memory snapshots
do not cover memory mapped from a host buffer with `mem_map_ptr`, which is how idtlab
maps guest RAM, nor the machine's Python state — so this module does it itself).

What a checkpoint holds:

- the engine's CPU state (a Unicorn context, CPU only) and the instruction/cycle
  counter's scalar state;
- guest memory, by page, copy-on-write: after `PhysicalMemory.commit`, the first write
  to a page saves its contents first — Python's writes (frames, A/D bits, device DMA)
  in `PhysicalMemory`, the engine's through the TLB: while tracking, `Translator.fill`
  grants write permission only to an entry filled *for* a write, and saves the page
  then; the TLB is flushed at every checkpoint and rollback, and so are the native fill
  front's remembered translations — at a rollback only those that grant write access
  (the others re-validate their paging entries against the memory the rollback put
  back), unless something else a fill depends on changed since. A rollback puts back only
  the saved pages, and moving the checkpoint forward forgets them, so both cost what
  the schedule wrote, not the size of RAM;
- the EPT's host memory the same way, and the machine's Python state — `Machine.state`
  (cpu/state.py), every component's mutable state in one object — pickled (the machine
  and its components by reference): a rollback unpickles it, which costs a third of a
  deep copy (the race explorer rolls back once per schedule); state that does not pickle
  is deep-copied instead. The trace and the serial log by length
  (records are not changed once the boundary that emitted them is past).

Caches that depend on memory contents (the page-walk memos, the EPT translation memo)
are dropped at a rollback. Sites found since the checkpoint stay (they belong to the code,
cpu/sites.py); when the schedule changed code, the engine's blocks of it are dropped
(`SiteTable.recheck`): the rollback put the old bytes back behind the engine's back.

One checkpoint is live per machine: `take` again moves it forward, and `restore`
accepts only the latest.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpu.state import MachineState, assign

if TYPE_CHECKING:
    from cpu.machine import Machine

EPT_SKIP = ("mem", "_memo")


class CheckpointError(RuntimeError):
    """A rollback that cannot be done (not the latest checkpoint, another engine)."""


@dataclass
class Checkpoint:
    engine: Any
    cpu: tuple[Any, tuple[int, ...]]
    state: MachineState | None  # a deep copy, when the state does not pickle
    ept: dict[str, Any] | None
    ept_mem: Any
    trace_len: int  # records emitted by then (Trace.emitted)
    trace_counts: Counter[str]
    serial_len: int
    sites: frozenset[int]
    pickled: bytes | None = None  # `state` pickled (None: it does not pickle)
    fills_generation: int = 0  # the native fill front's, as the checkpoint left it


def _memo(machine: Machine) -> dict[int, Any]:
    """Deep copies of the state keep pointing at the machine and its components (device
    callbacks are bound methods of components), not at copies of them."""
    keep = [machine, machine.ioram,  # memory, reverted page by page like `phys`
            *(v for v in vars(machine).values() if hasattr(v, "m") and v.m is machine)]
    return {id(o): o for o in keep}


class _Pickler(pickle.Pickler):
    """Pickles a state, naming the machine and its components instead of copying them."""

    def __init__(self, out: io.BytesIO, keep: dict[int, int]) -> None:
        super().__init__(out, protocol=pickle.HIGHEST_PROTOCOL)
        self.keep = keep

    def persistent_id(self, obj: Any) -> int | None:
        return self.keep.get(id(obj))


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, objects: list[Any]) -> None:
        super().__init__(io.BytesIO(data))
        self.objects = objects

    def persistent_load(self, pid: Any) -> Any:
        return self.objects[pid]


def _pickled(machine: Machine, state: MachineState) -> bytes | None:
    keep = list(_memo(machine).values())
    out = io.BytesIO()
    try:
        _Pickler(out, {id(o): i for i, o in enumerate(keep)}).dump(state)
    except (pickle.PicklingError, TypeError, AttributeError):
        return None  # a callback that does not pickle, say: deep copies then
    return out.getvalue()


def _copy_of(machine: Machine, cp: Checkpoint) -> MachineState:
    if cp.pickled is not None:
        state = _Unpickler(cp.pickled, list(_memo(machine).values())).load()
        assert isinstance(state, MachineState)
        return state
    assert cp.state is not None
    return copy.deepcopy(cp.state, _memo(machine))


def take(machine: Machine) -> Checkpoint:
    """Checkpoint `machine` at the boundary where it stands (between runs)."""
    if machine.regs.running or machine.stops.pending is not None:
        raise CheckpointError("a checkpoint is taken between runs, at a boundary")
    e = machine.engine
    # Pickled straight from the live state (the bytes are the copy); a state that does
    # not pickle is deep-copied instead.
    pickled = _pickled(machine, machine.state)
    state = None if pickled is not None else copy.deepcopy(machine.state, _memo(machine))
    ept_state = None
    ept_mem = None
    if machine.ept is not None:
        ept = machine.ept
        ept_state = copy.deepcopy({k: v for k, v in vars(ept).items() if k not in EPT_SKIP})
        ept_mem = ept.mem
        ept.mem.commit()
    machine.phys.commit()
    machine.ioram.commit()
    machine.sites.changed = False  # code changes from here on are the schedule's (restore)
    e.flush_tlb()  # entries filled before tracking may grant write access
    e.forget_fills()  # and so may the translations the native fill front remembers
    cp = Checkpoint(engine=e, cpu=e.save_state(), state=state, ept=ept_state, ept_mem=ept_mem,
                    trace_len=machine.trace.emitted,
                    trace_counts=Counter(machine.trace.counts), serial_len=len(machine.serial),
                    sites=e.site_addresses, pickled=pickled,
                    fills_generation=e.fills_generation)
    machine._checkpoint = cp
    return cp


def restore(machine: Machine, cp: Checkpoint) -> None:
    """Put `machine` back to checkpoint `cp` (the latest one taken)."""
    if machine._checkpoint is not cp:
        raise CheckpointError("only the latest checkpoint of a machine can be restored")
    e = machine.engine
    if e is not cp.engine:
        raise CheckpointError("the machine changed engines since the checkpoint (a mode switch)")
    machine.phys.revert()
    machine.ioram.revert()
    for address in e.site_addresses - cp.sites:
        if not machine.sites.keeps(address):  # sites found since are the code's, not the run's
            e.remove_site(address)
    e.restore_state(cp.cpu)  # flushes the TLB
    if e.fills_generation == cp.fills_generation:
        # Nothing a fill depends on changed beyond what the native front re-checks (no
        # EPT, IA32_PKRS or data-breakpoint change since the checkpoint).
        e.forget_write_fills()
    else:
        e.forget_fills()
        cp.fills_generation = e.fills_generation
    assign(machine.state, _copy_of(machine, cp))
    if machine.ept is not None:
        ept = machine.ept
        assert cp.ept is not None
        ept.mem = cp.ept_mem
        ept.mem.revert()
        for k, v in copy.deepcopy(cp.ept).items():
            setattr(ept, k, v)
        ept._memo.clear()
    machine.trace.truncate(cp.trace_len, cp.trace_counts)
    del machine.serial[cp.serial_len:]
    machine.regs.forget()
    machine.stops.pending = None
    machine.sites.fresh.clear()
    machine.sites.recheck()  # blocks of code the schedule changed and the rollback put back
    for mem in (machine.sysmem, machine.inspect):
        mem.ctl = None
        if machine.ept is not None:
            # Walks are validated against guest memory, but keyed by the EPT generation,
            # which went back: drop them.
            mem.walks.clear()


def release(machine: Machine) -> None:
    """Stop tracking writes (the checkpoint is gone)."""
    machine.phys.untrack()
    machine.ioram.untrack()
    if machine.ept is not None:
        machine.ept.mem.untrack()
    machine._checkpoint = None
    machine.engine.flush_tlb()
    machine.engine.forget_fills()
