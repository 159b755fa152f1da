"""FRED's stack discipline as a property (SDM Vol. 3A "FRED Event Delivery"): whatever
the stack levels of the events and however they nest, a delivery never writes over a
frame whose ERETS has not run yet, and ERETS unwinds each frame to exactly the RSP and
stack level it interrupted. This is the property the IDT's IST breaks (the nested-NMI
clobber): an IST delivery always writes at the same top.

Hypothesis draws a sequence of ring-0 events (a vector, an event type, a stack level per
vector) and returns (ERETS), with the events properly nested; the pure model delivers and
returns on the unit tests' fake memory, and a reference stack of live frames written here
checks every write."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from idt.fred import EventType, FredEvent, FredMsrs, deliver, erets
from tests.unit.fakes import FakeMemory, make_state

RSPS = (0x40000, 0x50000, 0x60000, 0x70000)  # level 0 is the interrupted stack
START_RSP = 0x40000
TYPES = (EventType.HWEXC, EventType.NMI, EventType.EXTINT, EventType.SWINT,
         EventType.SWEXC, EventType.PRIV_SWEXC)

steps = st.lists(st.one_of(
    st.tuples(st.just("event"), st.sampled_from(TYPES), st.integers(0, 31)),
    st.tuples(st.just("erets"), st.just(EventType.HWEXC), st.just(0))), max_size=40)


class Recorder(FakeMemory):
    """Fake memory that remembers the addresses of the last run of writes."""

    def __init__(self) -> None:
        super().__init__(0x80000)
        self.writes: list[int] = []

    def write(self, linear: int, data: bytes, *, user: bool = False, stack: bool = False) -> None:
        self.writes.append(linear)
        super().write(linear, data, user=user, stack=stack)


@settings(max_examples=150, deadline=None)
@given(steps=steps, stklvls=st.integers(0, 2**64 - 1), config_bits=st.integers(0, 0xF) )
def test_no_delivery_writes_over_a_live_frame_and_erets_unwinds_exactly(
        steps: list[tuple[str, EventType, int]], stklvls: int, config_bits: int) -> None:
    mem = Recorder()
    red_zone = (config_bits & 0x7) << 6
    int_level = config_bits >> 2 & 3
    config = 0x1000 | red_zone | int_level << 9
    state = make_state(rsp=START_RSP, cs=0x08, ss=0x10, rflags=0x202)
    live: list[tuple[int, int, int]] = []  # (frame address, RSP before, CSL before)
    for what, etype, vector in steps:
        msrs = FredMsrs(config=config, rsp=RSPS, stklvls=stklvls)
        if what == "erets":
            if not live:
                continue
            at, rsp_before, csl_before = live.pop()
            state.rsp = at
            result = erets(mem, state, msrs, fred=True)
            assert (result.rsp, result.new_csl) == (rsp_before, csl_before)
            state.rsp, state.rflags = result.rsp, result.rflags
            config = (config & ~3) | result.new_csl
            continue
        if etype is EventType.NMI:
            vector = 2
        ev = FredEvent(etype, vector, return_rip=0x1000, insn_rip=0x1000)
        mem.writes.clear()
        d = deliver(mem, state, ev, msrs)
        frame = range(d.new_rsp, d.new_rsp + 64)
        assert sorted(mem.writes) == list(range(d.new_rsp, d.new_rsp + 64, 8))
        for at, _rsp, _csl in live:
            assert not set(frame) & set(range(at, at + 64)), "a live frame was overwritten"
        assert d.new_rsp % 64 == 0
        live.append((d.new_rsp, state.rsp, config & 3))
        state.rsp, state.rflags = d.new_rsp, d.new_rflags
        config = (config & ~3) | d.new_csl
    # Unwind what is left: every ERETS lands exactly where its event was taken.
    while live:
        at, rsp_before, csl_before = live.pop()
        state.rsp = at
        result = erets(mem, state, FredMsrs(config=config, rsp=RSPS, stklvls=stklvls),
                       fred=True)
        assert (result.rsp, result.new_csl) == (rsp_before, csl_before)
        config = (config & ~3) | result.new_csl
    assert config & 3 == 0  # back at the stack level the first event interrupted
