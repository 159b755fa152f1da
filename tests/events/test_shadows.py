"""Interrupt shadows and IF (SDM Vol. 2B STI, MOV; Vol. 3A "Masking Maskable Hardware
Interrupts"; Vol. 3C "Interruptibility State").

The rules the expected values below come from:

* STI that *sets* IF (IF was 0) holds maskable interrupts for one more instruction: a
  pending interrupt is taken at the boundary after the instruction that follows the
  STI. STI with IF already 1 opens no shadow.
* Whether the STI shadow also holds NMIs is model-specific ("may be inhibited");
  `Machine(sti_blocks_nmi=...)` chooses, default True (Bochs, KVM).
* MOV SS holds maskable interrupts and NMIs for exactly one instruction.
* IF = 0 holds a maskable interrupt until STI, POPF or IRET sets IF; POPF and IRET open
  no shadow, so the interrupt is taken at the boundary right after them.
* A shadow lasts one boundary and ends when any event is delivered.

Every delivery here is at CPL0 through an interrupt gate without IST, on the
interrupted stack (KERNEL_STACK, already 16-byte aligned): the frame is RIP = the next
instruction, CS 0x08, the interrupted RFLAGS, RSP = KERNEL_STACK, SS 0x10.

Every test runs in both counting modes: fast (per translation block) and timed (per
instruction); none of these events comes from inside a block, so both must agree.
"""

from __future__ import annotations

import pytest

from tests.delivery.rig import (
    CODE,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    START_RFLAGS,
    Frame,
    gate,
)
from tests.events.kit import Frames, build, cost, expect, kinds

NMI = 2
MODES = ["fast", "timed"]  # fast counts per translation block, timed per instruction
IF_CLEAR = 0x002
VEC = 0x30


def at(rip: int, rflags: int = START_RFLAGS) -> Frame:
    """The frame of an event taken at `rip` in the main code (see the module docstring)."""
    return Frame(rip=rip, cs=KERNEL_CS, rflags=rflags, rsp=KERNEL_STACK, ss=KERNEL_DS)


STI_AFTER_CLI = """
start:
    cli
held:                   # with IF = 0 here, an interrupt is only pending
    nop
the_sti:
    sti
first_nop:              # in the STI shadow
    nop
second_nop:
    nop
    hlt
h30:
    iretq
nmi_handler:
    iretq
"""


@pytest.mark.parametrize("mode", MODES)
def test_an_interrupt_held_by_if_0_is_taken_one_instruction_after_the_sti_that_sets_if(mode: str) -> None:
    m, sym = build(STI_AFTER_CLI, gates={VEC: gate("h30"), NMI: gate("nmi_handler")}, mode=mode)
    m.inject("interrupt", vector=VEC, before="held")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "deliver", "iret", "end"]
    assert r.trace.records[0]["icount"] == 1
    # Not after the STI (its shadow), but after the first nop: RIP = second_nop.
    expect(frames.seen[0], vector=VEC, frame=at(sym["second_nop"]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["icount"] == 4  # cli, nop, sti, nop
    assert (r.outcome, r.icount) == ("hlt", 7)


@pytest.mark.parametrize("mode", MODES)
def test_sti_with_if_already_1_opens_no_shadow(mode: str) -> None:
    m, sym = build(STI_AFTER_CLI.replace("    cli\n", "    nop\n"),
                   gates={VEC: gate("h30"), NMI: gate("nmi_handler")}, mode=mode)
    m.inject("interrupt", vector=VEC, before="first_nop")  # right after the STI
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "deliver", "iret", "end"]
    expect(frames.seen[0], vector=VEC, frame=at(sym["first_nop"]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["icount"] == r.trace.records[0]["icount"] == 3  # nop, nop, sti


@pytest.mark.parametrize(("sti_blocks_nmi", "taken_at", "icount"), [
    (True, "second_nop", 4),   # held one instruction, like a maskable interrupt
    (False, "first_nop", 3),   # taken at once, inside the STI shadow
])
@pytest.mark.parametrize("mode", MODES)
def test_an_nmi_right_after_an_sti_that_sets_if_follows_the_sti_blocks_nmi_choice(
        sti_blocks_nmi: bool, taken_at: str, icount: int, mode: str) -> None:
    m, sym = build(STI_AFTER_CLI, gates={VEC: gate("h30"), NMI: gate("nmi_handler")},
                   sti_blocks_nmi=sti_blocks_nmi, mode=mode)
    m.inject("nmi", before="first_nop")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["nmi_pending", "deliver", "iret", "end"]
    assert (r.trace.records[0]["icount"], r.trace.records[0]["nmi_blocked"]) == (3, False)
    expect(frames.seen[0], vector=NMI, frame=at(sym[taken_at]), stack="current",
           stack_top=KERNEL_STACK, source="nmi", handler=sym["nmi_handler"])
    assert frames.seen[0][0]["icount"] == icount and frames.blocked == [True]
    assert r.trace.records[2]["nmi_unblocked"] is True
    assert m.nmi_blocked is False


@pytest.mark.parametrize("mode", MODES)
def test_sti_then_hlt_takes_the_held_interrupt_after_the_hlt_and_saves_the_rip_after_it(mode: str) -> None:
    m, sym = build("""
    start:
        cli
    held:
        nop
        sti
    idle:                   # the STI shadow covers the HLT: it executes, then wakes
        hlt
    after_hlt:
        nop
        hlt
    h30:
        iretq
    """, gates={VEC: gate("h30")}, mode=mode)
    m.inject("interrupt", vector=VEC, before="held")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "wake", "deliver", "iret", "end"]
    assert (r.trace.records[1]["by"], r.trace.records[1]["vector"]) == ("intr", VEC)
    expect(frames.seen[0], vector=VEC, frame=at(sym["after_hlt"]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["icount"] == 4  # cli, nop, sti, hlt
    # Waking costs hlt_wake on top of the four instructions (cli and sti are of class
    # interrupt_control, hlt an event_instruction).
    four = 2 * cost(m, "interrupt_control") + cost(m, "nop") + cost(m, "event_instruction")
    assert frames.seen[0][0]["cycle"] == four + m.profile.event("hlt_wake")
    assert (r.outcome, r.rip) == ("hlt", sym["after_hlt"] + 2)


MOV_SS = """
start:
    mov eax, 0x10
    mov ss, ax
in_shadow:              # the event arrives here, at the boundary after MOV SS
    nop
after:
    nop
    hlt
h30:
    iretq
nmi_handler:
    iretq
"""


@pytest.mark.parametrize("event", ["nmi", "interrupt"])
@pytest.mark.parametrize("mode", MODES)
def test_mov_ss_holds_an_nmi_or_an_interrupt_for_exactly_one_instruction(event: str, mode: str) -> None:
    m, sym = build(MOV_SS, gates={VEC: gate("h30"), NMI: gate("nmi_handler")}, mode=mode)
    m.inject(event, vector=VEC if event == "interrupt" else None, before="in_shadow")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    pending = "nmi_pending" if event == "nmi" else "interrupt_pending"
    assert kinds(r.trace.records) == [pending, "deliver", "iret", "end"]
    assert r.trace.records[0]["icount"] == 2  # mov eax, mov ss
    vector, source, handler = (NMI, "nmi", "nmi_handler") if event == "nmi" else (VEC, "interrupt", "h30")
    expect(frames.seen[0], vector=vector, frame=at(sym["after"]), stack="current",
           stack_top=KERNEL_STACK, source=source, handler=sym[handler])
    assert frames.seen[0][0]["icount"] == 3  # one instruction (the nop) later, not two
    assert (r.outcome, r.icount) == ("hlt", 6)


@pytest.mark.parametrize("mode", MODES)
def test_popf_that_sets_if_lets_a_held_interrupt_in_at_the_very_next_boundary(mode: str) -> None:
    m, sym = build("""
    start:
        cli
    held:                   # the interrupt arrives here, IF = 0
        nop
        push 0x202
        popfq
    after_popf:             # no shadow after POPF: taken here
        nop
        hlt
    h30:
        iretq
    """, gates={VEC: gate("h30")}, mode=mode)
    m.inject("interrupt", vector=VEC, before="held")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "deliver", "iret", "end"]
    assert r.trace.records[0]["icount"] == 1
    # The pushed RSP is KERNEL_STACK again: the POPF popped what the PUSH pushed.
    expect(frames.seen[0], vector=VEC, frame=at(sym["after_popf"]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["icount"] == 4  # cli, nop, push, popfq
    assert (r.outcome, r.icount) == ("hlt", 7)


@pytest.mark.parametrize("mode", MODES)
def test_an_iretq_that_sets_if_lets_a_held_interrupt_in_at_its_target(mode: str) -> None:
    m, sym = build("""
    start:
        cli
    held:                   # the interrupt arrives here, IF = 0
        mov rax, rsp
        push 0x10
        push rax
        push 0x202          # RFLAGS image with IF = 1
        push 0x8
        lea rbx, [rip + target]
        push rbx
        iretq
    target:                 # no shadow after IRET: taken here
        nop
        hlt
    h30:
        iretq
    """, gates={VEC: gate("h30")}, mode=mode)
    m.inject("interrupt", vector=VEC, before="held")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "iret", "deliver", "iret", "end"]
    first_iret = r.trace.records[1]
    assert (first_iret["to_rip"], first_iret["to_rsp"], first_iret["nmi_unblocked"]) == (
        sym["target"], KERNEL_STACK, False)
    expect(frames.seen[0], vector=VEC, frame=at(sym["target"]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["icount"] == first_iret["icount"] == 9  # cli, 7 to build, iretq


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_delivered_in_the_sti_shadow_ends_it(mode: str) -> None:
    # The INT3 is the instruction in the shadow; the #BP handler is a *trap* gate, so IF
    # stays 1 in it. The shadow ended with the #BP delivery, so the held interrupt is
    # taken at the #BP handler's first instruction, before it runs.
    m, sym = build("""
    start:
        cli
    held:
        nop
        sti
        int3
    after_int3:
        hlt
    h30:
        iretq
    bp_handler:
        nop
        iretq
    """, gates={VEC: gate("h30"), 3: gate("bp_handler", gate_type="trap")}, mode=mode)
    m.inject("interrupt", vector=VEC, before="held")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "deliver", "deliver", "iret", "iret", "end"]
    expect(frames.seen[0], vector=3, frame=at(sym["after_int3"]), stack="current",
           stack_top=KERNEL_STACK, source="software", handler=sym["bp_handler"])
    bp_rsp = KERNEL_STACK - 40
    expect(frames.seen[1], vector=VEC, stack="current", stack_top=bp_rsp, source="interrupt",
           handler=sym["h30"],
           frame=Frame(rip=sym["bp_handler"], cs=KERNEL_CS, rflags=START_RFLAGS, rsp=bp_rsp, ss=KERNEL_DS))
    assert frames.seen[0][0]["icount"] == frames.seen[1][0]["icount"] == 4  # cli, nop, sti, int3
    assert (r.outcome, r.rip) == ("hlt", sym["after_int3"] + 1)


# -- chained shadows (docs/sdm-map.md, "Chained shadows"; idt.blocking.shadow_after) ------
CHAIN = """
start:
    cli
held:                   # the interrupt arrives here, IF = 0
    nop
    mov eax, 0x10
    {first}
    {second}
at_x:                   # the boundary after the second shadow-opener
    nop
at_y:                   # one instruction later
    nop
    hlt
h30:
    iretq
"""


@pytest.mark.parametrize(("first", "second", "taken_at"), [
    ("sti", "mov ss, ax", "at_y"),   # MOV SS after STI opens its own (MOV-SS) shadow
    ("mov ss, ax", "sti", "at_y"),   # STI with IF = 0 after MOV SS opens its own shadow
    ("sti", "sti", "at_x"),          # the second STI runs with IF = 1: no shadow after it
])
@pytest.mark.parametrize("mode", MODES)
def test_each_instruction_of_a_shadow_chain_opens_its_own_shadow(
        first: str, second: str, taken_at: str, mode: str) -> None:
    # Interrupts are enabled by the STI of the chain; the MOV SS keeps IF = 0 only in
    # the "mov ss, sti" order until the STI. Taken at the boundary after the instruction
    # that follows the last shadow (Bochs: guest_images/mb/shadow_chain.S).
    m, sym = build(CHAIN.format(first=first, second=second), gates={VEC: gate("h30")}, mode=mode)
    m.inject("interrupt", vector=VEC, before="held")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["interrupt_pending", "deliver", "iret", "end"]
    expect(frames.seen[0], vector=VEC, frame=at(sym[taken_at]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h30"])
    # cli, nop, mov eax, the two shadow-openers, and the nop at at_x when taken at at_y.
    assert frames.seen[0][0]["icount"] == (6 if taken_at == "at_y" else 5)


TF_CHAIN = """
start:
    mov eax, 0x10
    pushfq
    or qword ptr [rsp], 0x100
    popfq                   # TF = 1 from the next instruction on
    {chain}
at_x:
    nop
at_y:
    nop
    hlt
db_handler:                 # one #DB per test: clear TF in the pushed RFLAGS
    and qword ptr [rsp + 16], ~0x100
    iretq
"""
DB = 1
RFLAGS_TF = 0x100
DR6_BS = 0xFFFF4FF0  # DR6_INIT | BS


@pytest.mark.parametrize(("chain", "trap_at", "icount"), [
    # MOV SS suppresses the single-step trap after it: the trap follows the next instruction.
    ("mov ss, ax", "at_y", 6),
    # A MOV SS right after a MOV SS opens no shadow: its own trap comes right after it
    # (the engine, like QEMU, would suppress it again; Bochs traps at at_x).
    ("mov ss, ax\n    mov ss, ax", "at_x", 6),
])
@pytest.mark.parametrize("mode", MODES)
def test_the_single_step_trap_after_a_mov_ss_chain_comes_where_the_shadow_ends(
        chain: str, trap_at: str, icount: int, mode: str) -> None:
    m, sym = build(TF_CHAIN.format(chain=chain), gates={DB: gate("db_handler")}, mode=mode)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["deliver", "iret", "end"]
    expect(frames.seen[0], vector=DB, frame=at(sym[trap_at], START_RFLAGS | RFLAGS_TF),
           stack="current", stack_top=KERNEL_STACK, source="exception",
           handler=sym["db_handler"])
    assert frames.seen[0][0]["icount"] == icount
    assert m.engine.read_reg("dr6") == DR6_BS
    assert (r.outcome, r.rip) == ("hlt", sym["db_handler"])


@pytest.mark.parametrize("mode", MODES)
def test_code_run_with_if_0_and_an_interrupt_pending_is_not_stepped_and_sti_still_lets_it_in_exactly(
        mode: str) -> None:
    # The interrupt waits for IF: the 2 000-instruction loop runs in a few engine runs,
    # not one per instruction; the STI is stopped at and run alone, its shadow holds the
    # interrupt for the NOP, and it is taken at `after`.
    m, sym = build("""
    start:
        cli
    held:                   # the interrupt arrives here, IF = 0
        mov ecx, 1000
    spin:
        dec ecx
        jnz spin
        sti
    in_shadow:
        nop
    after:
        nop
        hlt
    h30:
        iretq
    """, gates={VEC: gate("h30")}, mode=mode)
    m.inject("interrupt", vector=VEC, before="held")
    frames = Frames(m)
    runs = 0
    engine_run = m.engine.run

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal runs
        runs += 1
        return engine_run(*args, **kwargs)  # type: ignore[arg-type]

    m.engine.run = counting  # type: ignore[method-assign]
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=5000)

    zf_pf = 0x44  # from the last DEC, to 0
    expect(frames.seen[0], vector=VEC, frame=at(sym["after"], START_RFLAGS | zf_pf),
           stack="current", stack_top=KERNEL_STACK, source="interrupt", handler=sym["h30"])
    assert frames.seen[0][0]["icount"] == 1 + 1 + 2000 + 1 + 1  # cli, mov, loop, sti, nop
    assert (r.outcome, r.icount) == ("hlt", 2007)  # + iretq, nop, hlt
    assert runs <= 12
