"""INT3 and INT n delivered inside the engine's interrupt hook (cpu/stops.py
`software_interrupt_in_hook`, the engine keeps running) give exactly the trace, counts
and state of the same delivery made by the run loop with the engine stopped: every case
runs both ways (`Stops.deliver_in_hook` off) and is compared record for record, and each
test checks which path was taken."""

from __future__ import annotations

from typing import Any

from cpu.machine import Machine
from idt.vectors import Vector
from idtlab.assemble import CodeBlock, assemble_blocks

CODE, HANDLER, STACK = 0x100000, 0x101000, 0x70000


def asm(source: str, at: int) -> bytes:
    blocks, _ = assemble_blocks([CodeBlock(at, source, origin="test", first_line=1)], known={})
    return blocks[0].code


def machine(code: str, handler: str, *, in_hook: bool, **kw: Any) -> tuple[Machine, list[bool]]:
    """`code` at CODE, `handler` at HANDLER (the gate of #BP and of vector 0x40); the
    list records, per INT, whether it was delivered in the hook."""
    m = Machine(2 << 20, max_insns=10_000, **kw)
    m.load(CODE, asm(code, CODE), code=True)
    m.load(HANDLER, asm(handler, HANDLER), code=True)
    for vector in (Vector.DB, Vector.BP, 0x40, Vector.NMI, Vector.GP, Vector.NP):
        m.set_gate(vector, HANDLER, dpl=3)
    m.stops.deliver_in_hook = in_hook
    taken: list[bool] = []
    inner = m.stops.software_interrupt_in_hook

    def spy(vector: int) -> bool:
        done = inner(vector)
        taken.append(done)
        return done
    m.stops.software_interrupt_in_hook = spy  # type: ignore[method-assign]
    return m, taken


def both(code: str, handler: str, setup: Any = None, **kw: Any) -> tuple[
        tuple[Any, ...], list[bool], list[bool]]:
    results, paths = [], []
    for in_hook in (True, False):
        m, taken = machine(code, handler, in_hook=in_hook, **kw)
        if setup is not None:
            setup(m)
        r = m.run(entry=CODE, rsp=STACK)
        regs = m.engine.read(("rip", "rsp", "rflags", "rcx", "rax", "cs", "ss"))
        results.append((r.outcome, r.rip, r.icount, r.cycles, regs, r.trace.records,
                        m.intr.nmi_blocked))
        paths.append(taken)
    assert results[0] == results[1]
    return results[0], paths[0], paths[1]


LOOP = "mov rcx, 20\nl:\nint3\ndec rcx\njnz l\nhlt\n"


def test_an_int3_loop_is_delivered_in_the_hook_and_traces_as_the_run_loop() -> None:
    got, in_hook, held = both(LOOP, "iretq\n")
    assert got[0] == "hlt"
    assert [r["vector"] for r in got[5] if r["kind"] == "deliver"] == [3] * 20
    assert in_hook == [True] * 20 and held == [False] * 20


def test_int_n_through_a_trap_gate_is_delivered_in_the_hook() -> None:
    def trap_gate(m: Machine) -> None:
        m.set_gate(0x40, HANDLER, gate_type="trap")
    got, in_hook, _ = both("mov rcx, 5\nl:\nint 0x40\ndec rcx\njnz l\nhlt\n", "iretq\n",
                           setup=trap_gate)
    assert [r["vector"] for r in got[5] if r["kind"] == "deliver"] == [0x40] * 5
    assert in_hook == [True] * 5


def test_an_int_n_whose_gate_is_not_present_faults_on_the_instruction_as_in_the_run_loop(
        ) -> None:
    # The #NP is a fault on the INT (it did not retire): its handler skips the 2-byte INT.
    def absent(m: Machine) -> None:
        m.set_gate(0x40, HANDLER, present=False)
    got, in_hook, _ = both("mov rcx, 3\nl:\nint 0x40\ndec rcx\njnz l\nhlt\n",
                           "add qword ptr [rsp + 8], 2\nadd rsp, 8\niretq\n", setup=absent)
    assert [r["vector"] for r in got[5] if r["kind"] == "deliver"] == [Vector.NP] * 3
    assert any(r["kind"] == "delivery_fault" for r in got[5])
    assert in_hook == [True] * 3


def test_the_event_limit_reached_in_the_hook_ends_the_run_as_in_the_run_loop() -> None:
    got, in_hook, _ = both(LOOP, "iretq\n", max_events=5)
    assert got[0] == "max_events"
    assert in_hook[-1] is True


def test_an_injection_point_at_the_handler_entry_is_counted_as_in_the_run_loop() -> None:
    def watch(m: Machine) -> None:
        m.inject("nmi", before=HANDLER, hit=4)
    got, in_hook, _ = both(LOOP, "nop\niretq\n", setup=watch)
    delivered = [r["vector"] for r in got[5] if r["kind"] == "deliver"]
    assert delivered.count(Vector.NMI) == 1 and delivered.count(3) == 20
    assert all(in_hook)


def test_an_nmi_due_by_cycles_during_the_delivery_is_taken_at_the_handler_entry() -> None:
    # The NMI's cycle falls inside the INT3's delivery cost: the counter stops before the
    # handler's first instruction, the boundary the run loop would service.
    plain, _, _ = both(LOOP, "nop\niretq\n")
    first = next(r for r in plain[5] if r["kind"] == "deliver")

    def timed(m: Machine) -> None:
        m.inject("nmi", cycle=first["cycle"] + 1)
    got, in_hook, _ = both(LOOP, "nop\niretq\n", setup=timed)
    nmi = next(r for r in got[5] if r["kind"] == "deliver" and r["vector"] == Vector.NMI)
    assert nmi["rip"] == HANDLER
    assert in_hook[0] is True


def test_an_int3_with_tf_set_keeps_the_run_loops_path() -> None:
    # TF = 1 at the INT3 (single-step): the run loop's path, both ways.
    got, in_hook, _ = both("pushfq\nor qword ptr [rsp], 0x100\npopfq\nint3\nhlt\n",
                           "iretq\n")
    assert in_hook == [False]
    assert next(r["vector"] for r in got[5] if r["kind"] == "deliver") == Vector.BP
