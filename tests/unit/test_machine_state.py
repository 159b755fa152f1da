"""`Machine.state` is the machine's whole mutable state (cpu/state.py): a run changes
nothing of a component outside its state object (beyond the caches each component
names), and checkpoint → run → rollback gives back exactly the checkpointed machine —
for every shipped example, and at points in the middle of runs with events injected."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from pathlib import Path
from typing import Any

import pytest

from cpu.engine import Engine
from cpu.events import Nmi
from cpu.machine import Machine
from cpu.memory import PhysicalMemory
from cpu.trace import Trace
from idtlab import scenario as scn
from tests.delivery.rig import CODE, KERNEL_STACK, build, gate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "idtlab" / "examples").rglob("*.toml"))
REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags", "cs", "ss", "ds", "es", "fs", "gs",
             "cr0", "cr2", "cr3", "cr4")


def digest(obj: Any, seen: set[int] | None = None) -> Any:
    """A comparable structural image of `obj`: dataclasses, containers and plain
    objects are walked; the machine, its components, the engine and memory are named,
    not walked (they are compared separately); callables by name."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj.value if isinstance(obj, enum.Enum) else obj
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, bytearray):
        return bytes(obj)
    if isinstance(obj, (Machine, Engine, PhysicalMemory, Trace)) or (
            hasattr(obj, "m") and isinstance(getattr(obj, "m", None), Machine)):
        return f"<{type(obj).__name__}>"
    if callable(obj):
        return f"<callable {getattr(obj, '__qualname__', type(obj).__name__)}>"
    if id(obj) in seen:
        return "<cycle>"
    seen = seen | {id(obj)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__, tuple((f.name, digest(getattr(obj, f.name), seen))
                                          for f in dataclasses.fields(obj)))
    if isinstance(obj, dict):
        return ("dict", tuple(sorted(((repr(k), digest(v, seen)) for k, v in obj.items()),
                                     key=lambda kv: kv[0])))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(digest(v, seen) for v in obj))
    if isinstance(obj, (set, frozenset)):
        return ("set", tuple(sorted(repr(digest(v, seen)) for v in obj)))
    if hasattr(obj, "__dict__"):
        return (type(obj).__name__, digest(vars(obj), seen))
    return repr(obj)


def components(m: Machine) -> dict[str, Any]:
    return {name: c for name, c in vars(m).items() if getattr(c, "m", None) is m}


def outside_state(m: Machine) -> dict[str, Any]:
    """Each component's attributes other than its state object, its named caches and its
    append-only logs (checkpointed by length)."""
    out = {}
    for name, c in components(m).items():
        caches = getattr(type(c), "CACHES", frozenset()) | getattr(type(c), "LOGS", frozenset())
        out[name] = digest({k: v for k, v in vars(c).items()
                            if k != "state" and k not in caches})
    return out


def whole(m: Machine) -> tuple[Any, ...]:
    """Everything a rollback must restore."""
    e = m.engine
    ept = None
    if m.ept is not None:
        ept = (digest({k: v for k, v in vars(m.ept).items() if k not in ("mem", "_memo")}),
               hashlib.sha256(bytes(m.ept.mem.view)).hexdigest())
    return (digest(m.state), tuple(e.read(REGISTERS)), e.icount, e.cycles, m.cpl,
            hashlib.sha256(bytes(m.phys.view)).hexdigest(), ept, len(m.trace.records),
            bytes(m.serial), e.site_addresses)


def loaded(path: Path) -> tuple[Machine, dict[str, Any]]:
    sc = scn.load(path)
    assert sc.machine is not None
    return sc.machine, dict(sc.run_args)


def test_every_component_holds_a_reference_to_its_state_inside_machine_state() -> None:
    m = Machine()
    st = m.state
    for name, c in components(m).items():
        if hasattr(c, "state"):
            assert any(c.state is getattr(st, f.name) for f in dataclasses.fields(st)), name


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "multiboot" not in p.read_text()],
                         ids=lambda p: p.name)
def test_a_run_of_an_example_changes_no_component_outside_its_state(path: Path) -> None:
    m, args = loaded(path)
    m.build()
    before = outside_state(m)
    m.run(**args)
    assert outside_state(m) == before


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_checkpoint_run_rollback_restores_the_whole_machine_and_the_rerun_is_identical(
        path: Path) -> None:
    m, args = loaded(path)
    max_insns = args.pop("max_insns")
    if "entry" in args:
        m.start_state(entry=args["entry"], rsp=args["rsp"], cpl=args["cpl"],
                      rflags=args["rflags"], regs=args["regs"])
    else:
        pytest.skip("a multiboot example: its checkpoints start after the mode switch")
    cp = m.checkpoint()
    saved = whole(m)
    first = m.run(max_insns=max_insns)
    records = [dict(r) for r in first.trace.records]
    m.rollback(cp)
    assert whole(m) == saved
    again = m.run(max_insns=max_insns)
    assert [dict(r) for r in again.trace.records] == records


@pytest.mark.parametrize("name, window", [
    ("explore/nested_nmi_naive.toml", "nmi_handler"),
    ("explore/cr2_race.toml", "pf_handler"),
    ("explore/ve_rearm_clear_then_iret.toml", "ve_handler"),
    ("apf/apf_cr2_flags_race.toml", "pf_handler"),
])
def test_a_checkpoint_in_a_handler_with_an_nmi_injected_after_it_rolls_back_exactly(
        name: str, window: str) -> None:
    m, args = loaded(ROOT / "idtlab" / "examples" / name)
    address = m.symbols[window]
    paused = m.run(**args, pause_at=(address, 1))
    assert paused.outcome == "pause"
    cp = m.checkpoint()
    saved = whole(m)
    for _ in range(2):
        m.arrive_now(Nmi(), label="test")
        m.run()
        m.rollback(cp)
        assert whole(m) == saved


def test_frames_a_kernel_abandoned_are_forgotten_when_the_cpu_next_takes_an_event_at_cpl3(
        ) -> None:
    """A kernel that leaves an INT handler by switching stacks and enters user mode with
    SYSRET never IRETs through the INT's frame (kvm-unit-tests' user-mode helper): the
    frame must not stay "live", or every later entry would be reported overwriting it
    (and compared against all of them: the access test grew to gigabytes)."""
    m, _sym = build(f"""
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, 0xc0000081
    xor eax, eax
    mov edx, 0x00080008
    wrmsr
to_user:
    mov rsp, {KERNEL_STACK:#x}
    lea rcx, [rip + user]
    mov r11, 0x202
    .byte 0x48, 0x0f, 0x07        # sysretq
user:
    int 0x20
kernel_entry:
    jmp to_user                   # abandon the frame
    """, gates={0x20: gate("kernel_entry", dpl=3)})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, max_insns=400)

    assert r.outcome == "max_insns" and len(r.deliveries) > 20
    assert r.trace.of_kind("frame_overwritten") == []
    assert len(m.state.frames.live) <= 1 and m.state.frames.depth <= 1
