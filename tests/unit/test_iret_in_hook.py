"""An IRETQ executed inside its code hook (cpu/emulated.py `iret_in_hook`, the engine
keeps running) gives exactly the trace, counts and state of the same IRETQ executed at
a held boundary (`iret`, the engine stopped): every case is run both ways and compared
record for record, and each test checks that the in-hook path was really taken."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cpu.machine import Machine
from idtlab import explore as ex
from idtlab import scenario as scn
from idtlab.assemble import CodeBlock, assemble_blocks

ROOT = Path(__file__).resolve().parents[2]
CR2_RACE = ROOT / "idtlab" / "examples" / "explore" / "cr2_race.toml"
CODE, HANDLER, STACK = 0x100000, 0x101000, 0x70000


def asm(source: str, at: int) -> bytes:
    blocks, _ = assemble_blocks([CodeBlock(at, source, origin="test", first_line=1)], known={})
    return blocks[0].code


def forbid_in_hook(m: Machine) -> None:
    m.emulated.iret_in_hook = lambda address: False  # type: ignore[method-assign]


def count_in_hook(m: Machine) -> list[int]:
    taken: list[int] = []
    inner = m.emulated.iret_in_hook

    def spy(address: int) -> bool:
        done = inner(address)
        if done:
            taken.append(address)
        return done
    m.emulated.iret_in_hook = spy  # type: ignore[method-assign]
    return taken


def int3_machine(handler: str, mode: str) -> Machine:
    m = Machine(2 << 20, mode=mode, max_insns=10_000)
    m.load(CODE, asm("mov rcx, 20\nl:\nint3\ndec rcx\njnz l\nhlt\n", CODE), code=True)
    m.load(HANDLER, asm(handler, HANDLER), code=True)
    m.set_gate(3, HANDLER)
    return m


def outcome(m: Machine, **run: Any) -> tuple[Any, ...]:
    r = m.run(**run)
    regs = m.engine.read(("rip", "rsp", "rflags", "rcx", "rax"))
    return r.outcome, r.icount, r.cycles, regs, m.trace.records


@pytest.mark.parametrize("handler", ["iretq\n", "push rax\npop rax\niretq\n"],
                         ids=["bare-iretq", "iretq-after-pops"])
def test_an_iretq_in_its_code_hook_traces_as_one_at_a_held_boundary(handler: str) -> None:
    fast = int3_machine(handler, "fast")
    taken = count_in_hook(fast)
    held = int3_machine(handler, "fast")
    forbid_in_hook(held)
    got = outcome(fast, entry=CODE, rsp=STACK)
    want = outcome(held, entry=CODE, rsp=STACK)
    assert got == want
    # The first in Python's hook path, which vouches for the native one (the rest; each
    # run after a delivery re-arms it: cpu/native_paths.py).
    assert got[0] == "hlt" and len(taken) == 1 and fast.engine.paths.iret_hits == 19


def test_timed_mode_stops_at_every_iretq() -> None:
    m = int3_machine("push rax\npop rax\niretq\n", "timed")
    taken = count_in_hook(m)
    assert m.run(entry=CODE, rsp=STACK).outcome == "hlt"
    assert taken == []


def test_a_latched_nmi_is_delivered_at_the_iretq_that_unblocks_it() -> None:
    """The NMI handler's IRETQ unblocks NMIs with one latched: the boundary after it has
    an event to deliver, so that IRETQ must not run inside the hook."""
    def build() -> Machine:
        m = Machine(2 << 20, max_insns=10_000)
        m.load(CODE, asm("nop\nnop\nhlt\n", CODE), code=True)
        m.load(HANDLER, asm("nop\nnop\nnop\niretq\n", HANDLER), code=True)
        m.set_gate(2, HANDLER)
        m.inject("nmi", before=CODE + 1)
        m.inject("nmi", before=HANDLER + 1)  # latched: NMIs are blocked in the handler
        return m
    fast, held = build(), build()
    taken = count_in_hook(fast)
    forbid_in_hook(held)
    got, want = outcome(fast, entry=CODE, rsp=STACK), outcome(held, entry=CODE, rsp=STACK)
    assert got == want
    delivered = [r for r in got[4] if r["kind"] == "deliver"]
    irets = [r for r in got[4] if r["kind"] == "iret"]
    assert [r["vector"] for r in delivered] == [2, 2]
    assert delivered[1]["icount"] == irets[0]["icount"]  # at the unblocking IRETQ
    # The first IRETQ did not run in the hook: it had the latched NMI to deliver after
    # it. The second did, though it returns to an injection point: the code hook there
    # counts the arrival as the held boundary would (the traces are equal above).
    assert taken == [HANDLER + 3]


def test_the_cr2_race_pairs_trace_the_same_with_the_iretq_loop_in_the_hook(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pair of NMIs sends the guest into an IRETQ loop through a clobbered frame whose
    RFLAGS has RF = 1 (a #PF frame): every IRETQ of the loop runs in the hook."""
    plan = ex.plan_for(CR2_RACE, "pf_handler", "pf_done", invariants=("cr2-consistent",))
    points = plan.window.points
    schedule = (points[3], points[20])
    counted: list[list[int]] = []
    machines: list[Machine] = []

    def observe(m: Machine) -> None:
        counted.append(count_in_hook(m))
        machines.append(m)
    _, got = ex.replay(plan, ("nmi", "nmi"), schedule, observe=observe)
    _, want = ex.replay(plan, ("nmi", "nmi"), schedule, observe=forbid_in_hook)
    assert got.trace.records == want.trace.records
    assert (got.outcome, got.icount, got.cycles) == (want.outcome, want.icount, want.cycles)
    # In the hook: by Python, then natively once Python vouched (cpu/native_paths.py).
    assert len(counted[0]) + machines[0].engine.paths.iret_hits > 100
    assert sum(r["kind"] == "iret" for r in got.trace.records) > 100


def test_every_shipped_example_traces_the_same_with_iretqs_held_at_the_boundary() -> None:
    compared = 0
    for path in sorted((ROOT / "idtlab" / "examples").rglob("*.toml")):
        try:
            a, b = scn.load(path), scn.load(path)
        except Exception:  # an example that needs more than a plain load
            continue
        if a.machine is None or b.machine is None:
            continue
        forbid_in_hook(b.machine)
        ra, rb = scn.run(a), scn.run(b)
        assert ra.trace.records == rb.trace.records, path.name
        assert (ra.outcome, ra.icount, ra.cycles) == (rb.outcome, rb.icount, rb.cycles)
        compared += 1
    assert compared > 20
