"""Injection points: when a scheduled NMI or interrupt becomes *pending* (Machine.inject),
the cycle stamps of fast and timed mode, and determinism.

The documented meaning of each point (cpu/machine.py `Injection`):

* `before=addr, hit=n`: pending when execution arrives at `addr` for the n-th time,
  before that instruction executes. A return to `addr` by IRET is an arrival too.
* `icount=N`: pending at the boundary where N instructions have retired, so an event
  taken there saves RIP = the (N+1)-th instruction.
* `cycle=T`: pending at the first boundary whose cycle count is >= T. In fast mode the
  boundary after k instructions from cycle 0 is at k * cycles_per_instruction (plus the
  event costs on the way); in timed mode each instruction costs its class's figure from
  the profile.

Being pending is not being delivered; these tests use IF = 1 and no shadows, so here
the two coincide. Frames: CPL0, no IST, interrupt gates, current stack.
"""

from __future__ import annotations

import json

import pytest

from idtlab.trace import to_jsonl
from tests.delivery.rig import (
    CODE,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    START_RFLAGS,
    Frame,
    gate,
)
from tests.events.kit import (
    APIC_BASE,
    DIVIDE_BY_1,
    EOI,
    ICR_LOW,
    ICR_SELF,
    LVT_PERIODIC,
    LVT_TIMER,
    SVR,
    SVR_ENABLED,
    TIMER_DIVIDE,
    TIMER_INITIAL,
    Frames,
    build,
    cost,
    expect,
    kinds,
)

NMI = 2
VEC = 0x30
MODES = ["fast", "timed"]  # fast counts per translation block, timed per instruction


def at(rip: int, rsp: int = KERNEL_STACK, rflags: int = START_RFLAGS) -> Frame:
    return Frame(rip=rip, cs=KERNEL_CS, rflags=rflags, rsp=rsp, ss=KERNEL_DS)


LOOP = """
start:
    mov ecx, 3
top:                    # arrivals: 1 falling in, 2 and 3 by the JNZ
    nop
    dec ecx
    jnz top
    hlt
nmi_handler:
    iretq
h30:
    iretq
"""


@pytest.mark.parametrize("mode", MODES)
def test_before_with_hit_2_fires_on_the_second_arrival_in_a_loop(mode: str) -> None:
    m, sym = build(LOOP, gates={NMI: gate("nmi_handler")}, mode=mode)
    m.inject("nmi", before="top", hit=2)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["nmi_pending", "deliver", "iret", "end"]
    pending = r.trace.records[0]
    assert (pending["before"], pending["hit"], pending["icount"]) == (sym["top"], 2, 4)  # mov + 3
    # RFLAGS as DEC 3 -> 2 left them: ZF=SF=AF=OF=0 and PF=0 (0b10 has odd parity), so
    # 0x202 as at the start.
    expect(frames.seen[0], vector=NMI, frame=at(sym["top"]), stack="current", stack_top=KERNEL_STACK,
           source="nmi", handler=sym["nmi_handler"])
    assert frames.seen[0][0]["icount"] == 4
    assert (r.outcome, r.icount) == ("hlt", 1 + 3 * 3 + 1 + 1)  # mov, 3 iterations, iretq, hlt


@pytest.mark.parametrize("mode", MODES)
def test_an_iretq_back_to_the_point_counts_as_an_arrival(mode: str) -> None:
    m, sym = build(LOOP, gates={NMI: gate("nmi_handler"), VEC: gate("h30")}, mode=mode)
    m.inject("nmi", before="top", hit=2)
    m.inject("interrupt", vector=VEC, before="top", hit=3)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    # Arrival 2 (the JNZ) takes the NMI; the NMI's IRETQ back to `top` is arrival 3,
    # which makes the interrupt pending before the loop body runs again.
    assert kinds(r.trace.records) == ["nmi_pending", "deliver", "iret", "interrupt_pending", "deliver",
                                      "iret", "end"]
    pending = r.trace.records[3]
    assert (pending["before"], pending["hit"], pending["icount"]) == (sym["top"], 3, 5)
    expect(frames.seen[1], vector=VEC, frame=at(sym["top"]), stack="current", stack_top=KERNEL_STACK,
           source="interrupt", handler=sym["h30"])
    assert [f[0]["icount"] for f in frames.seen] == [4, 5]


STRAIGHT = """
start:
    nop
    nop
    nop
fourth:
    nop
fifth:
    nop
sixth:
    nop
    hlt
h30:
    iretq
"""


@pytest.mark.parametrize("mode", MODES)
def test_icount_n_makes_the_event_pending_after_n_retired_instructions(mode: str) -> None:
    m, sym = build(STRAIGHT, gates={VEC: gate("h30")}, mode=mode)
    m.inject("interrupt", vector=VEC, icount=3)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "deliver", "iret", "end"]
    pending = r.trace.records[0]
    assert (pending["at_icount"], pending["icount"], pending["vector"]) == (3, 3, VEC)
    expect(frames.seen[0], vector=VEC, frame=at(sym["fourth"]), stack="current", stack_top=KERNEL_STACK,
           source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["icount"] == 3
    assert (r.outcome, r.icount) == ("hlt", 8)


@pytest.mark.parametrize("mode", MODES)
def test_cycle_t_makes_the_event_pending_at_the_first_boundary_at_or_after_t(mode: str) -> None:
    m, sym = build(STRAIGHT, gates={VEC: gate("h30")}, mode=mode)
    c = cost(m, "nop")  # the same in both modes with the default profile
    t = 4 * c - (c - 1)  # reached by the 4th instruction, not by the 3rd (for any c >= 1)
    m.inject("interrupt", vector=VEC, cycle=t)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "deliver", "iret", "end"]
    pending = r.trace.records[0]
    assert (pending["at_cycle"], pending["cycle"], pending["icount"]) == (t, 4 * c, 4)
    expect(frames.seen[0], vector=VEC, frame=at(sym["fifth"]), stack="current", stack_top=KERNEL_STACK,
           source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["cycle"] == 4 * c


@pytest.mark.parametrize("mode", MODES)
def test_a_cycle_that_falls_inside_a_delivery_is_reached_at_the_handlers_first_instruction(mode: str) -> None:
    m, sym = build("""
    start:
        nop
        int3
    after_int3:
        hlt
    bp_handler:             # the NMI is taken here, before this nop runs
        nop
        iretq
    nmi_handler:
        iretq
    """, gates={3: gate("bp_handler"), NMI: gate("nmi_handler")}, mode=mode)
    c, d = cost(m, "nop"), m.profile.event("deliver_same_cpl")
    assert cost(m, "event_instruction") == c  # nop then int3: the #BP delivery starts at 2c
    t = 2 * c + 1  # one cycle into the #BP delivery, which starts at 2c and lasts d
    m.inject("nmi", cycle=t)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["deliver", "nmi_pending", "deliver", "iret", "iret", "end"]
    pending = r.trace.records[1]
    assert (pending["at_cycle"], pending["cycle"], pending["icount"]) == (t, 2 * c + d, 2)
    expect(frames.seen[0], vector=3, frame=at(sym["after_int3"]), stack="current",
           stack_top=KERNEL_STACK, source="software", handler=sym["bp_handler"])
    bp_rsp = KERNEL_STACK - 40
    expect(frames.seen[1], vector=NMI, frame=at(sym["bp_handler"], rsp=bp_rsp, rflags=0x002),
           stack="current", stack_top=bp_rsp, source="nmi", handler=sym["nmi_handler"])
    assert [f[0]["cycle"] for f in frames.seen] == [2 * c, 2 * c + d]


TIMED = """
start:
    mov rax, qword ptr [rsp]            # load
    mov qword ptr [rsp - 8], rax        # store
    mfence                              # fence
    nop                                 # nop
target:                                 # the NMI arrives here
    nop
    hlt
nmi_handler:
    iretq                               # event_instruction
"""
CLASSES = ("load", "store", "fence", "nop", "event_instruction")


def test_timed_mode_charges_each_instruction_its_class_cost_and_fast_mode_one_figure() -> None:
    stamps = {}
    for mode in ("fast", "timed"):
        m, sym = build(TIMED, gates={NMI: gate("nmi_handler")}, mode=mode)
        m.inject("nmi", before="target")
        frames = Frames(m)

        r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

        assert kinds(r.trace.records) == ["nmi_pending", "deliver", "iret", "end"]
        expect(frames.seen[0], vector=NMI, frame=at(sym["target"]), stack="current",
               stack_top=KERNEL_STACK, source="nmi", handler=sym["nmi_handler"])
        p = m.profile
        d = p.event("deliver_same_cpl") + p.event("nmi_extra")
        c = {k: cost(m, k) for k in CLASSES}
        body = c["load"] + c["store"] + c["fence"] + c["nop"]
        iret_at = body + d + c["event_instruction"]
        assert [x["cycle"] for x in r.trace.records] == [
            body, body, iret_at, iret_at + p.event("iret_same_cpl") + c["nop"] + c["event_instruction"]]
        assert r.cycles == r.trace.records[-1]["cycle"]
        stamps[mode] = [x["cycle"] for x in r.trace.records]
    assert stamps["fast"] != stamps["timed"]


def scenario(mode: str) -> str:
    """A run that touches every event source and ends by itself: a periodic APIC timer
    waking HLT, fixed self-IPIs, an NMI latched behind another, an interrupt by icount
    and an NMI by cycle; returns its trace as JSONL."""
    m, _ = build(f"""
    start:
        mov rbx, {APIC_BASE:#x}
        mov dword ptr [rbx+{SVR:#x}], {SVR_ENABLED:#x}
        mov dword ptr [rbx+{TIMER_DIVIDE:#x}], {DIVIDE_BY_1:#x}
        mov dword ptr [rbx+{LVT_TIMER:#x}], {LVT_PERIODIC | 0x40:#x}
        mov dword ptr [rbx+{TIMER_INITIAL:#x}], 7000
        mov ecx, 3
    work:
        mov dword ptr [rbx+{ICR_LOW:#x}], {ICR_SELF | 0x31:#x}
        mov rax, qword ptr [rsp]
        hlt
        dec ecx
        jnz work
        mov dword ptr [rbx+{TIMER_INITIAL:#x}], 0
        hlt
    nmi_handler:
        push rax
        nop
    nmi_pop:
        pop rax
        iretq
    irq:
        mov dword ptr [rbx+{EOI:#x}], 0
        iretq
    """, gates={NMI: gate("nmi_handler", ist=1), 0x31: gate("irq"), 0x40: gate("irq"),
                0x50: gate("irq")}, mode=mode)
    m.inject("nmi", before="work")
    m.inject("nmi", before="nmi_pop")
    m.inject("interrupt", vector=0x50, icount=9)
    m.inject("nmi", cycle=20000)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=400)
    assert r.outcome == "hlt"
    return to_jsonl(r.trace.records)


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_the_same_scenario_twice_gives_byte_identical_traces(mode: str) -> None:
    first, second = scenario(mode), scenario(mode)

    assert first == second
    # It did exercise the sources it claims to (so the comparison is not vacuous).
    for kind in ('"nmi_latched"', '"apic_ipi"', '"wake"', '"source":"apic_timer"', '"at_icount":9',
                 '"at_cycle":20000'):
        assert kind in first


def test_timed_mode_stamps_the_same_scenario_differently_from_fast_mode() -> None:
    fast = [json.loads(line) for line in scenario("fast").splitlines()]
    timed = [json.loads(line) for line in scenario("timed").splitlines()]

    assert [x["cycle"] for x in fast] != [x["cycle"] for x in timed]
