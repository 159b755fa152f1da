"""The machine's mutable state, in one object.

Each mechanism keeps what changes while the machine runs in a dataclass of its own,
defined beside it; `MachineState` bundles them. Everything else a component holds is
configuration (fixed once the machine is built) or a reference to another component.
A checkpoint (cpu/snapshot.py) copies this object whole — there is no list of names to
forget — plus what lives outside Python: the engine's registers, guest memory, the EPT
tables, and the trace and serial log by length.

tests/unit/test_machine_state.py checks both halves of that promise: a run changes
nothing of a component outside its state object, and checkpoint → run → rollback gives
back a machine whose state equals the checkpointed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from cpu.apf_host import ApfHostState
from cpu.boundary import BoundaryState
from cpu.cpu_model import ModelState
from cpu.debug import DebugState
from cpu.devices.apic import LocalApic
from cpu.frames import FrameState
from cpu.fred import FredState
from cpu.injections import InjectionState
from cpu.platform import PlatformState
from cpu.progress import ProgressState
from cpu.q35 import Q35State
from cpu.real_mode import RealModeState
from cpu.registers import RegisterState
from cpu.stops import StopState
from cpu.vmx import VmxState
from cpu.vmx_exits import HyperState

if TYPE_CHECKING:
    from cpu.multiboot import Boot


@dataclass
class RunState:
    """Limits of the run and what counts against them."""

    max_insns: int
    max_events: int
    events: int = 0  # deliveries and VM exits so far (against max_events)


@dataclass
class MachineState:
    """Every component's mutable state (see the module docstring)."""

    run: RunState
    regs: RegisterState
    boundary: BoundaryState
    injections: InjectionState
    stops: StopState
    frames: FrameState
    model: ModelState
    platform: PlatformState
    vmx: VmxState
    apf: ApfHostState
    hyper: HyperState
    apic: LocalApic | None
    debug: DebugState = field(default_factory=DebugState)
    fred: FredState = field(default_factory=FredState)
    progress: ProgressState = field(default_factory=ProgressState)
    real_mode: RealModeState = field(default_factory=RealModeState)
    boot: Boot | None = None  # a multiboot image and whether its 32-bit phase is over
    q35: Q35State | None = None  # the q35 machine's PCI devices (cpu/q35.py)


def assign(live: MachineState, saved: MachineState) -> None:
    """Make `live` equal to `saved` (a copy), keeping `live`'s component state objects
    (components hold references to them) and replacing what is inside."""
    for name in _field_names(MachineState):
        new: Any = getattr(saved, name)
        old: Any = getattr(live, name)
        if hasattr(old, "__dataclass_fields__") and type(old) is type(new) and \
                not isinstance(old, LocalApic):
            # A dataclass's instance dict holds exactly its fields (none of these has
            # __slots__ or properties stored elsewhere): one update replaces them all.
            vars(old).update(vars(new))
        else:
            setattr(live, name, new)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names
