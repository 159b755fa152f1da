"""Delivery is total: whatever the IDT, TSS and limits hold, an event ends in an
architectural outcome — a delivery (of it, of a nested fault, or of #DF) or a shutdown —
and never in a Python exception.

Checked twice: on the pure model with the unit tests' fake memory (many examples, fast),
and on the real `cpu.machine.Machine` (few examples: each one runs Unicorn), where the run
must end in one of `cpu.machine.OUTCOMES`.
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cpu.layout import GDT_ENTRIES, IDT_BASE, KERNEL_CS, TSS_BASE, TSS_SEL, USER_CS
from cpu.machine import Machine
from cpu.outcomes import OUTCOMES
from idt.descriptors import GATE_SIZE, GateDescriptor, SegmentDescriptor
from idt.double_fault import Combine, deliver_event
from idt.state import RFLAGS_IF, ArchState, Event, Source
from idt.vectors import Vector
from idtlab.assemble import CodeBlock, assemble_blocks
from tests.unit import fakes

MEM = fakes.MEM_SIZE
NESTED_VECTORS = (Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF)
TSS_SLOTS = ("rsp0", "rsp1", "rsp2", *(f"ist{n}" for n in range(1, 8)))

# -- strategies ------------------------------------------------------------------------

# Stack pointers and handler addresses: mostly plausible, some hostile.
qwords = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, MEM + 0x4000),  # inside memory, around its end
    st.sampled_from([0, 8, 0x1000, 0x2000, 0x8000, 0x0000_7FFF_FFFF_FFF8,
                     0x0000_8000_0000_0000, 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_FFF0,
                     2**64 - 1]),
)
selectors = st.one_of(st.sampled_from([0, 3, 0x08, 0x0B, 0x10, 0x1B, 0x23, 0x28, 0x30, 0x38,
                                       0x40, 0x0C]), st.integers(0, 0xFFFF))


def structured_gates(handlers: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    """Gates that look like gates, so the later checks are reached too."""
    return st.builds(
        GateDescriptor,
        offset=st.one_of(handlers, qwords),
        selector=selectors,
        ist=st.integers(0, 7),
        type=st.one_of(st.sampled_from([0xE, 0xF]), st.integers(0, 15)),
        dpl=st.integers(0, 3),
        present=st.booleans(),
        s=st.integers(0, 1),
        reserved_ist=st.integers(0, 31),
        reserved_high=st.integers(0, 2**32 - 1),
    ).map(GateDescriptor.pack)


def gate_bytes(handlers: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(min_size=GATE_SIZE, max_size=GATE_SIZE),
                     structured_gates(handlers))


limits = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0x67, 0xFFF]))


@st.composite
def events(draw: st.DrawFn) -> Event:
    kind = draw(st.sampled_from(["exception", "software", "interrupt", "nmi", "int1"]))
    rip = draw(st.sampled_from([fakes.INSN_RIP, 0, 2**64 - 2]))
    if kind == "exception":
        v = draw(st.integers(0, 31))
        return Event.exception(v, rip, draw(st.integers(0, 0xFFFF)),
                               draw(st.none() | qwords) if v == Vector.PF else None)
    if kind == "software":
        return Event(draw(st.integers(0, 255)), Source.SOFTWARE, rip + 2, rip)
    if kind == "interrupt":
        return Event(draw(st.integers(0, 255)), Source.INTERRUPT, rip, rip)
    if kind == "nmi":
        return Event(Vector.NMI, Source.NMI, rip, rip)
    return Event(Vector.DB, Source.PRIV_SOFTWARE, rip + 1, rip)


@st.composite
def states(draw: st.DrawFn) -> ArchState:
    cpl = draw(st.sampled_from([0, 3]))
    base = fakes.make_state if cpl == 0 else fakes.user_state
    return base(
        rsp=draw(qwords),
        rflags=draw(st.integers(0, 2**22 - 1)) | 2,
        idtr_limit=draw(limits),
        tr_limit=draw(limits),
        gdtr_limit=draw(st.one_of(st.just(fakes.GDT_LIMIT), limits)),
        nmi_blocked=draw(st.booleans()),
    )


# -- the pure model --------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(ev=events(), state=states(),
       gate=gate_bytes(st.just(fakes.HANDLER)),
       nested=st.lists(gate_bytes(st.just(fakes.HANDLER)), min_size=len(NESTED_VECTORS),
                       max_size=len(NESTED_VECTORS)),
       tss=st.lists(qwords, min_size=len(TSS_SLOTS), max_size=len(TSS_SLOTS)),
       not_present=st.sets(st.integers(0, MEM // 4096 - 1).map(lambda p: p * 4096),
                           max_size=4))
def test_random_gates_tss_slots_and_limits_always_give_a_delivery_or_a_shutdown(
        ev: Event, state: ArchState, gate: bytes, nested: list[bytes], tss: list[int],
        not_present: set[int]) -> None:
    world = fakes.World(fakes.FakeMemory(not_present=not_present))
    for v, raw in zip(NESTED_VECTORS, nested, strict=True):
        world.set_gate_raw(v, raw)
    world.set_gate_raw(ev.vector, gate)  # the event's own gate wins if it is one of them
    world.set_tss(**dict(zip(TSS_SLOTS, tss, strict=True)))

    cpl_before = state.cpl
    out = deliver_event(world.mem, state, ev)

    assert (out.delivery is None) == (out.shutdown_reason is not None)
    # benign -> contributory -> page fault -> #DF -> shutdown is the longest chain
    assert len(out.nested) <= 4
    if ev.source is Source.NMI:
        assert state.nmi_blocked
    if out.delivery is None:
        assert out.nested[-1].action is Combine.SHUTDOWN
        return
    d = out.delivery
    assert all(n.action is not Combine.SHUTDOWN for n in out.nested)
    assert (out.double_fault_of is not None) == (d.event.vector == Vector.DF
                                                 and d.event is not ev)
    assert d.new_cpl <= cpl_before
    assert d.new_rsp % 16 == (0 if d.frame.error_code is not None else 8)
    if d.gate.type == 0xE:
        assert not d.new_rflags & RFLAGS_IF


# -- the real machine ------------------------------------------------------------------

CODE = 0x10_0000
HANDLER = 0x10_1000
TRIGGERS = {"int3": Vector.BP, "ud2": Vector.UD, "int 0x80": 0x80}


def _assembled(source: str, at: int) -> bytes:
    blocks, _ = assemble_blocks([CodeBlock(at, source, origin="test", first_line=1)], known={})
    return blocks[0].code


_TRIGGER_CODE = {insn: _assembled(f"{insn}\nhlt\n", CODE) for insn in TRIGGERS}
_HANDLER_CODE = _assembled("hlt\niretq\n", HANDLER)
_TR_FLAGS = SegmentDescriptor.unpack(GDT_ENTRIES[5][:8]).high_dword


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Found by this test: a frame pushed through RSP0 into the 2-MiB identity page that runs
# past the end of a 3-MiB guest escaped Machine.run as PhysicalAccessError.
@example(trigger="int 0x80", cpl=3, memory=3 << 20, gate=bytes(16), nested=[None] * 6,
         tss=[(3 << 20) + 16] + [0] * 9, tr_limit=11, idt_limit=143)
@given(trigger=st.sampled_from(sorted(TRIGGERS)),
       cpl=st.sampled_from([0, 3]),
       memory=st.sampled_from([2 << 20, 3 << 20]),
       gate=gate_bytes(st.sampled_from([HANDLER, HANDLER + 1, CODE])),
       nested=st.lists(st.one_of(st.none(), gate_bytes(st.just(HANDLER))),
                       min_size=len(NESTED_VECTORS), max_size=len(NESTED_VECTORS)),
       tss=st.lists(st.one_of(qwords, st.integers(0, 4 << 20)), min_size=len(TSS_SLOTS),
                    max_size=len(TSS_SLOTS)),
       tr_limit=limits, idt_limit=st.one_of(limits, st.just(256 * 16 - 1)))
def test_random_gates_tss_slots_and_limits_end_the_real_machine_in_an_outcome(
        trigger: str, cpl: int, memory: int, gate: bytes, nested: list[bytes | None],
        tss: list[int], tr_limit: int, idt_limit: int) -> None:
    m = Machine(memory, max_insns=20_000, max_events=64)
    m.load(CODE, _TRIGGER_CODE[trigger], code=True)
    m.load(HANDLER, _HANDLER_CODE, code=True)
    # Nested-fault vectors: a sane DPL0 gate to a `hlt` unless the example replaces it.
    for v, raw in zip(NESTED_VECTORS, nested, strict=True):
        m.set_gate(v, HANDLER)
        if raw is not None:
            m.write_gate_raw(v, raw)
    m.write_gate_raw(TRIGGERS[trigger], gate)
    m.set_tss(**dict(zip(TSS_SLOTS, tss, strict=True)))
    m.build()
    m.engine.write_table("tr", TSS_SEL, TSS_BASE, tr_limit, _TR_FLAGS)
    m.engine.write_table("idtr", 0, IDT_BASE, idt_limit)

    result = m.run(entry=CODE, rsp=0x7_0000, cpl=cpl)

    assert result.outcome in OUTCOMES, result
    for rec in result.deliveries:
        assert rec["cs"] in (KERNEL_CS, USER_CS)  # the interrupted CS is always ours


def test_a_frame_pushed_past_the_end_of_ram_ends_the_run_outside_memory() -> None:
    """RSP0 points into the part of a 2-MiB identity page that has no RAM behind it (a
    3-MiB guest): the frame push cannot land anywhere, and the run says so."""
    m = Machine(3 << 20)
    m.load(CODE, _TRIGGER_CODE["int 0x80"], code=True)
    m.load(HANDLER, _HANDLER_CODE, code=True)
    m.set_gate(0x80, HANDLER, dpl=3)
    m.set_tss(rsp0=0x38_0000)
    result = m.run(entry=CODE, rsp=0x7_0000, cpl=3)
    assert result.outcome == "outside_memory"
    assert "0x37fff8" in result.reason
    assert result.rip == CODE + 2
