"""NMI delivery, blocking and the one-deep latch (SDM Vol. 3A "Nonmaskable Interrupt
(NMI)", "Handling Multiple NMIs", Table 6-2 priority).

The rules the expected values below come from:

* delivering an NMI blocks NMIs until the next IRET, *any* IRET, even a faulting one
  (the unblock happens before the IRET's checks);
* while blocked, one NMI is latched and the rest are lost;
* a latched NMI is delivered at the first boundary after the unblocking IRET, so its
  saved RIP is that IRET's target (or, when the IRET faults, the first instruction of
  the fault handler);
* `INT 2` runs the NMI handler as a software interrupt and blocks nothing;
* NMIs ignore IF; at one boundary an NMI (class 5) goes before a maskable interrupt
  (class 6), which stays pending.

Frames: an external event at a boundary pushes RIP = the next instruction, RF unchanged
(0), no error code; RSP is aligned down to 16 and five 8-byte slots are pushed. SS inside
a handler entered through an IST gate is NULL (0) here: the machine follows the SDM's IST
prose (the Vol. 2 INT n pseudo-code leaves SS alone; unconfirmed on hardware, see
docs/sdm-map.md), so a frame pushed *from* such a handler saves SS = 0.

Every test runs in both counting modes: fast (per translation block) and timed (per
instruction); none of these events comes from inside a block, so both must agree.
"""

from __future__ import annotations

import pytest

from tests.delivery.rig import (
    CODE,
    IST1_TOP,
    IST2_TOP,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_RF,
    START_RFLAGS,
    Frame,
    gate,
)
from tests.events.kit import Frames, build, expect, kinds, of_kind

NMI = 2
MODES = ["fast", "timed"]  # fast counts per translation block, timed per instruction
NULL_SS = 0  # SS inside a handler entered through an IST gate (see the module docstring)
IF_CLEAR = 0x002  # RFLAGS inside an interrupt-gate handler: IF=0, only the fixed bit 1
IST1_FRAME = IST1_TOP - 40  # handler RSP after an NMI through IST1
IST2_FRAME = IST2_TOP - 48  # handler RSP after a #GP (error code) through IST2


@pytest.mark.parametrize("mode", MODES)
def test_an_nmi_arriving_in_the_nmi_handler_is_latched_and_delivered_at_the_target_of_its_iretq(mode: str) -> None:
    m, sym = build("""
    start:
        nop
    work:                   # NMI #1 arrives here
        nop
        nop
        hlt
    nmi_handler:            # IST1
        nop
    nmi_iret:               # NMI #2 arrives here: NMIs are blocked, so it is latched
        iretq
    """, gates={NMI: gate("nmi_handler", ist=1)}, mode=mode)
    m.inject("nmi", before="work")
    m.inject("nmi", before="nmi_iret")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["nmi_pending", "deliver", "nmi_latched", "iret", "deliver",
                                      "iret", "end"]
    pending, _, latched, iret1, _, iret2, end = r.trace.records
    assert (pending["icount"], pending["nmi_blocked"]) == (1, False)
    # NMI #1: at `work`, on IST1, from the interrupted code's stack.
    outer = Frame(rip=sym["work"], cs=KERNEL_CS, rflags=START_RFLAGS, rsp=KERNEL_STACK, ss=KERNEL_DS)
    expect(frames.seen[0], vector=NMI, frame=outer, stack="ist1", stack_top=IST1_TOP, source="nmi",
           handler=sym["nmi_handler"])
    assert frames.seen[0][0]["icount"] == 1
    # NMI #2 arrives after the handler's nop: blocked, so latched (not pending, not lost).
    assert (latched["icount"], latched["nmi_blocked"], latched["before"]) == (2, True, sym["nmi_iret"])
    # The IRETQ pops NMI #1's frame and unblocks NMIs ...
    assert (iret1["rip"], iret1["to_rip"], iret1["to_rsp"], iret1["nmi_unblocked"]) == (
        sym["nmi_iret"], sym["work"], KERNEL_STACK, True)
    # ... and the latched NMI is taken at once, at the IRETQ's target: the same frame
    # again (RIP = work, the restored RFLAGS with IF=1), at the same IST1 address, with
    # no instruction of the interrupted code run in between.
    expect(frames.seen[1], vector=NMI, frame=outer, stack="ist1", stack_top=IST1_TOP, source="nmi",
           handler=sym["nmi_handler"])
    assert frames.seen[1][0]["icount"] == iret1["icount"] == 3  # nop, nop, iretq
    # Its IRETQ returns to `work` for good; no frame was overwritten (NMI #1's was popped).
    assert (iret2["to_rip"], iret2["nmi_unblocked"]) == (sym["work"], True)
    assert frames.blocked == [True, True]
    assert (r.outcome, r.rip, r.icount) == ("hlt", sym["work"] + 3, 8)
    assert end["reason"] == "hlt"
    assert m.nmi_blocked is False and m.intr.nmi_pending is False


@pytest.mark.parametrize("mode", MODES)
def test_three_nmis_while_blocked_latch_one_and_drop_two_and_only_one_is_delivered_after_the_iretq(mode: str) -> None:
    m, sym = build("""
    start:
        nop
    work:                   # NMI #1 arrives here
        nop
        hlt
    nmi_handler:
        nop
    second:                 # NMI #2: latched
        nop
    third:                  # NMI #3: the latch is full, lost
        nop
    fourth:                 # NMI #4: lost
        iretq
    """, gates={NMI: gate("nmi_handler", ist=1)}, mode=mode)
    for label in ("work", "second", "third", "fourth"):
        m.inject("nmi", before=label, label=label)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["nmi_pending", "deliver", "nmi_latched", "nmi_dropped",
                                      "nmi_dropped", "iret", "deliver", "iret", "end"]
    arrivals = r.trace.records[2:5]
    assert [(a["label"], a["nmi_blocked"], a["icount"]) for a in arrivals] == [
        ("second", True, 2), ("third", True, 3), ("fourth", True, 4)]
    (iret1,) = of_kind(r.trace.records, "iret")[:1]
    assert (iret1["to_rip"], iret1["nmi_unblocked"]) == (sym["work"], True)
    # Exactly one NMI after the IRETQ, at its target, on IST1.
    assert len(frames.seen) == 2
    outer = Frame(rip=sym["work"], cs=KERNEL_CS, rflags=START_RFLAGS, rsp=KERNEL_STACK, ss=KERNEL_DS)
    for got in frames.seen:
        expect(got, vector=NMI, frame=outer, stack="ist1", stack_top=IST1_TOP, source="nmi",
               handler=sym["nmi_handler"])
    assert frames.seen[1][0]["icount"] == 5  # nop + nop, nop, nop, iretq
    assert frames.blocked == [True, True]
    assert r.outcome == "hlt" and r.icount == 11
    assert m.nmi_blocked is False and m.intr.nmi_pending is False


@pytest.mark.parametrize("mode", MODES)
def test_an_int3_iretq_inside_the_nmi_handler_unblocks_nmis_and_the_latched_nmi_overwrites_the_ist_frame(mode: str) -> None:
    m, sym = build("""
    start:
        nop
    work:                   # NMI #1 arrives here
        nop
        hlt
    nmi_handler:            # IST1: every NMI frame goes to the same address
        int3
    after_int3:
        nop
        iretq
    bp_handler:             # no IST: runs on the NMI stack, below NMI #1's frame
        nop
    bp_iret:                # NMI #2 arrives here (latched); this IRETQ unblocks NMIs
        iretq
    """, gates={NMI: gate("nmi_handler", ist=1), 3: gate("bp_handler")}, mode=mode)
    m.inject("nmi", before="work")
    m.inject("nmi", before="bp_iret")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=30)

    assert kinds(r.trace.records)[:7] == ["nmi_pending", "deliver", "deliver", "nmi_latched", "iret",
                                          "deliver", "frame_overwritten"]
    _, _, _, latched, bp_iret, _, overwritten = r.trace.records[:7]
    outer = Frame(rip=sym["work"], cs=KERNEL_CS, rflags=START_RFLAGS, rsp=KERNEL_STACK, ss=KERNEL_DS)
    expect(frames.seen[0], vector=NMI, frame=outer, stack="ist1", stack_top=IST1_TOP, source="nmi",
           handler=sym["nmi_handler"])
    # INT3 in the NMI handler: a trap (RIP = next instruction), current stack (the NMI
    # stack: RSP = IST1_FRAME, aligned down to 16 first), IF=0 from the NMI's interrupt
    # gate, SS NULL.
    expect(frames.seen[1], vector=3, stack="current", stack_top=IST1_FRAME, source="software",
           handler=sym["bp_handler"],
           frame=Frame(rip=sym["after_int3"], cs=KERNEL_CS, rflags=IF_CLEAR, rsp=IST1_FRAME, ss=NULL_SS))
    assert frames.seen[1][0]["depth"] == 1
    assert (latched["nmi_blocked"], latched["icount"]) == (True, 3)  # nop, int3, the #BP nop retired
    # The #BP handler's IRETQ: back into the NMI handler, and NMIs are unblocked.
    assert (bp_iret["rip"], bp_iret["to_rip"], bp_iret["to_rsp"], bp_iret["nmi_unblocked"]) == (
        sym["bp_iret"], sym["after_int3"], IST1_FRAME, True)
    # The latched NMI is delivered right there: saved RIP = the instruction after the
    # INT3, on the same IST1 top, over NMI #1's frame.
    inner = Frame(rip=sym["after_int3"], cs=KERNEL_CS, rflags=IF_CLEAR, rsp=IST1_FRAME, ss=NULL_SS)
    expect(frames.seen[2], vector=NMI, frame=inner, stack="ist1", stack_top=IST1_TOP, source="nmi",
           handler=sym["nmi_handler"])
    assert frames.seen[2][0]["icount"] == bp_iret["icount"] == 4
    assert overwritten == {**overwritten, "by": "NMI", "victim": "NMI", "victim_icount": 1,
                           "at": IST1_FRAME, "icount": 4}
    assert overwritten["slots"] == [
        ["rip", sym["work"], sym["after_int3"]],
        ["cs", KERNEL_CS, KERNEL_CS],
        ["rflags", START_RFLAGS, IF_CLEAR],
        ["rsp", KERNEL_STACK, IST1_FRAME],
        ["ss", KERNEL_DS, NULL_SS],
    ]
    # NMI #1 can never return to `work`: every later IRETQ of the NMI handler consumes
    # NMI #2's frame, which points back into the handler.
    # NMIs stay blocked through the #BP delivery and again after NMI #2's.
    assert frames.blocked[:3] == [True, True, True]
    assert r.outcome == "max_insns"
    assert all(i["to_rip"] != sym["work"] for i in of_kind(r.trace.records, "iret"))


@pytest.mark.parametrize("mode", MODES)
def test_a_faulting_iretq_unblocks_nmis_and_the_latched_nmi_is_taken_before_the_gp_handler_runs(mode: str) -> None:
    m, sym = build("""
    start:
        nop
    work:                   # NMI #1 arrives here
        nop
        hlt
    nmi_handler:            # builds a CPL0 IRET frame whose RIP is non-canonical
        mov rax, rsp
        push 0x10
        push rax
        pushfq
        push 0x8
        mov rbx, 0x800000000000
        push rbx
    bad_iret:               # NMI #2 arrives here (latched); the IRETQ raises #GP(0)
        iretq
    gp_handler:             # IST2
        nop
        hlt
    """, gates={NMI: gate("nmi_handler", ist=1), 13: gate("gp_handler", ist=2)}, mode=mode)
    m.inject("nmi", before="work")
    m.inject("nmi", before="bad_iret")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records)[:7] == ["nmi_pending", "deliver", "nmi_latched", "iret_fault",
                                          "deliver", "deliver", "frame_overwritten"]
    _, _, latched, fault, _, _, overwritten = r.trace.records[:7]
    assert (latched["nmi_blocked"], latched["icount"]) == (True, 8)  # nop + 7 in the handler
    assert (fault["rip"], fault["vector"], fault["error_code"], fault["nmi_unblocked"]) == (
        sym["bad_iret"], 13, 0, True)
    # #GP(0) is a fault on the IRETQ: RIP = the IRETQ, RF=1 pushed, RSP = the five
    # slots the handler pushed below its own frame, SS NULL (IST1 handler), on IST2.
    rsp_at_iret = IST1_FRAME - 40
    expect(frames.seen[1], vector=13, stack="ist2", stack_top=IST2_TOP, source="exception",
           handler=sym["gp_handler"],
           frame=Frame(error_code=0, rip=sym["bad_iret"], cs=KERNEL_CS, rflags=IF_CLEAR | RFLAGS_RF,
                       rsp=rsp_at_iret, ss=NULL_SS))
    # NMIs were unblocked before the fault was delivered, so the latched NMI goes at the
    # very next boundary: the #GP handler's first instruction, before it executes (same
    # icount as the #GP delivery).
    expect(frames.seen[2], vector=NMI, stack="ist1", stack_top=IST1_TOP, source="nmi",
           handler=sym["nmi_handler"],
           frame=Frame(rip=sym["gp_handler"], cs=KERNEL_CS, rflags=IF_CLEAR, rsp=IST2_FRAME, ss=NULL_SS))
    assert frames.seen[2][0]["icount"] == frames.seen[1][0]["icount"] == fault["icount"] == 8
    # Blocking: cleared by the faulting IRETQ (the #GP delivery does not set it), set
    # again by NMI #2's delivery.
    assert frames.blocked[:3] == [True, False, True]
    assert [s for s, *_ in overwritten["slots"]] == ["rip", "cs", "rflags", "rsp", "ss"]
    assert overwritten["slots"][0] == ["rip", sym["work"], sym["gp_handler"]]
    # The second pass through the handler faults the same way (NMIs unblocked again,
    # nothing latched), then the #GP handler halts with nothing left to wake it.
    assert kinds(r.trace.records)[7:] == ["iret_fault", "deliver", "end"]
    assert r.trace.records[7]["nmi_unblocked"] is True
    assert (r.outcome, r.rip) == ("hlt", sym["gp_handler"] + 2)
    assert m.nmi_blocked is False and m.intr.nmi_pending is False


@pytest.mark.parametrize("mode", MODES)
def test_int_2_runs_the_nmi_handler_without_blocking_nmis_so_a_real_nmi_nests_at_once(mode: str) -> None:
    m, sym = build("""
    start:
        int 2
    back:
        hlt
    nmi_handler:            # no IST, so the nested frame goes below the outer one
        nop
    inner:                  # a real NMI arrives here
        nop
        iretq
    """, gates={NMI: gate("nmi_handler")}, mode=mode)
    m.inject("nmi", before="inner")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["deliver", "nmi_pending", "deliver", "iret", "iret", "end"]
    _, pending, _, nested_iret, outer_iret, _ = r.trace.records
    # INT 2: a software interrupt through vector 2, trap-like (RIP = next instruction).
    expect(frames.seen[0], vector=NMI, stack="current", stack_top=KERNEL_STACK, source="software",
           handler=sym["nmi_handler"],
           frame=Frame(rip=sym["back"], cs=KERNEL_CS, rflags=START_RFLAGS, rsp=KERNEL_STACK, ss=KERNEL_DS))
    # It blocked nothing: the real NMI is pending (not latched) and delivered at once.
    assert (pending["nmi_blocked"], pending["icount"]) == (False, 2)
    handler_rsp = KERNEL_STACK - 40
    expect(frames.seen[1], vector=NMI, stack="current", stack_top=handler_rsp, source="nmi",
           handler=sym["nmi_handler"],
           frame=Frame(rip=sym["inner"], cs=KERNEL_CS, rflags=IF_CLEAR, rsp=handler_rsp, ss=KERNEL_DS))
    assert (frames.seen[1][0]["icount"], frames.seen[1][0]["depth"]) == (2, 1)
    assert frames.blocked == [False, True]
    # The real NMI's IRETQ unblocks; the INT 2 handler's IRETQ had nothing to unblock.
    assert (nested_iret["to_rip"], nested_iret["nmi_unblocked"]) == (sym["inner"], True)
    assert (outer_iret["to_rip"], outer_iret["nmi_unblocked"]) == (sym["back"], False)
    assert (r.outcome, r.icount) == ("hlt", 8)
    assert m.nmi_blocked is False


@pytest.mark.parametrize("mode", MODES)
def test_an_nmi_is_delivered_with_if_clear(mode: str) -> None:
    m, sym = build("""
    start:
        cli
    work:                   # NMI arrives here, IF = 0
        nop
        hlt
    nmi_handler:
        iretq
    """, gates={NMI: gate("nmi_handler")}, mode=mode)
    m.inject("nmi", before="work")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["nmi_pending", "deliver", "iret", "end"]
    expect(frames.seen[0], vector=NMI, stack="current", stack_top=KERNEL_STACK, source="nmi",
           handler=sym["nmi_handler"],
           frame=Frame(rip=sym["work"], cs=KERNEL_CS, rflags=IF_CLEAR, rsp=KERNEL_STACK, ss=KERNEL_DS))
    assert frames.seen[0][0]["icount"] == 1 and frames.blocked == [True]
    assert r.trace.records[2]["nmi_unblocked"] is True
    assert (r.outcome, r.icount) == ("hlt", 4)
    assert m.nmi_blocked is False


@pytest.mark.parametrize("mode", MODES)
def test_an_nmi_goes_before_an_interrupt_at_the_same_boundary_which_waits_for_the_nmi_handlers_iretq(mode: str) -> None:
    m, sym = build("""
    start:
        nop
    both:                   # an NMI and vector 0x30 arrive here together
        nop
        hlt
    nmi_handler:            # IST1, interrupt gate: IF = 0 inside
        nop
    nmi_iret:
        iretq
    h30:
        iretq
    """, gates={NMI: gate("nmi_handler", ist=1), 0x30: gate("h30")}, mode=mode)
    m.inject("interrupt", vector=0x30, before="both")
    m.inject("nmi", before="both")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "nmi_pending", "deliver", "iret", "deliver",
                                      "iret", "end"]
    _, _, _, nmi_iret, _, _, _ = r.trace.records
    at_both = Frame(rip=sym["both"], cs=KERNEL_CS, rflags=START_RFLAGS, rsp=KERNEL_STACK, ss=KERNEL_DS)
    expect(frames.seen[0], vector=NMI, frame=at_both, stack="ist1", stack_top=IST1_TOP, source="nmi",
           handler=sym["nmi_handler"])
    # Held by IF = 0 for the whole NMI handler (the nop), not lost: the NMI handler's
    # IRETQ restores IF = 1 and the interrupt is taken at its target, with no shadow.
    assert m.apic is not None and (nmi_iret["to_rip"], nmi_iret["nmi_unblocked"]) == (sym["both"], True)
    expect(frames.seen[1], vector=0x30, frame=at_both, stack="current", stack_top=KERNEL_STACK,
           source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["icount"] == 1 and frames.seen[1][0]["icount"] == 3
    assert frames.blocked == [True, False]
    assert (r.outcome, r.icount) == ("hlt", 6)
    assert m.apic.isr == [0x30] and m.apic.irr == []  # acknowledged; the handler sent no EOI
