"""Maskable interrupts through the local APIC: TPR/PPR, ISR and EOI, self-IPIs, the
timer waking HLT, and APIC usage the model refuses (SDM Vol. 3A chapter "Advanced
Programmable Interrupt Controller (APIC)"; cpu/devices/apic.py).

The rules the expected values below come from:

* "Task and Processor Priorities": PPR = TPR if TPR[7:4] >= ISRV[7:4], else ISRV[7:4]:0;
  the highest IRR vector is dispatched only if its class (bits 7:4) is above PPR[7:4].
* "Interrupt Acceptance for Fixed Interrupts": dispatch moves the vector from IRR to
  ISR; "Signaling Interrupt Servicing Completion": an EOI write retires the highest ISR
  vector. So the highest vector goes first, and while it is in service a lower class
  waits even with IF = 1, but a higher class nests.
* "Issuing Interprocessor Interrupts": a write to ICR low sends; a fixed self-IPI
  (shorthand self) and an NMI to the own APIC ID (no shorthand) reach this CPU, and the
  machine sees the event at the boundary after the writing instruction.
* "APIC Timer": the count drops by one every divisor * timer_ratio cycles (timer_ratio
  is 1) from the cycle the initial count is written; periodic mode reloads, one-shot
  stops. HLT waits for the next event; IF = 0 means a timer interrupt cannot end it.

Cycle arithmetic (fast mode): every retired instruction costs cycles_per_instruction;
each APIC register access adds apic_access during the instruction; a delivery adds
deliver_same_cpl after its record; an IRETQ adds iret_same_cpl after its record; a wake
from HLT adds hlt_wake before the delivery. A timer starts at the cycle its initial-count
write completes (instruction + access cost). In timed mode each instruction costs its
class's figure instead (kit.cost).

Every test runs in both counting modes: APIC accesses are emulated at the accessing
instruction (the APIC page is never mapped in the engine), so their effects are exact in
fast mode too.
"""

from __future__ import annotations

import pytest

from tests.delivery.rig import (
    CODE,
    IST1_TOP,
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
    DIVIDE_BY_2,
    EOI,
    ICR_HIGH,
    ICR_INIT,
    ICR_LOW,
    ICR_NMI,
    ICR_SELF,
    LVT_PERIODIC,
    LVT_TIMER,
    SVR,
    SVR_ENABLED,
    TIMER_DIVIDE,
    TIMER_INITIAL,
    TPR,
    Frames,
    build,
    cost,
    expect,
    kinds,
    of_kind,
)

NMI = 2
IF_CLEAR = 0x002
TIMER_VEC = 0x40

BOTH = ["fast", "timed"]

PRELUDE = f"""
start:
    mov rbx, {APIC_BASE:#x}
    mov dword ptr [rbx+{SVR:#x}], {SVR_ENABLED:#x}
"""


def handler(label: str) -> str:
    """An interrupt handler that signals EOI and returns (RBX = the APIC page)."""
    return f"""
{label}:
    mov dword ptr [rbx+{EOI:#x}], 0
{label}_iret:
    iretq
"""


def at(rip: int, rflags: int = START_RFLAGS, rsp: int = KERNEL_STACK) -> Frame:
    return Frame(rip=rip, cs=KERNEL_CS, rflags=rflags, rsp=rsp, ss=KERNEL_DS)


def writes(records: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(w["offset"], w["value"]) for w in of_kind(records, "apic_write")]


@pytest.mark.parametrize("mode", BOTH)
def test_an_apic_write_record_is_stamped_with_the_writing_instruction_retired(mode: str) -> None:
    m, _ = build(PRELUDE + """
    nop
    nop
    hlt
""", gates={}, mode=mode)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["apic_write", "end"]
    write = r.trace.records[0]
    # mov rbx and the SVR write have retired; the write's access cost is included.
    assert (write["icount"], write["cycle"]) == (
        2, cost(m, "alu") + cost(m, "store") + m.profile.event("apic_access"))
    assert (r.outcome, r.icount) == ("hlt", 5)


@pytest.mark.parametrize("mode", BOTH)
def test_tpr_0x40_holds_vector_0x35_but_not_0x55_and_lowering_it_lets_0x35_in_after_the_write(mode: str) -> None:
    m, sym = build(PRELUDE + f"""
    mov dword ptr [rbx+{TPR:#x}], 0x40
held:                   # 0x35 arrives: class 3 <= TPR class 4, held
    nop
open:                   # 0x55 arrives: class 5 > 4, taken at once
    nop
    mov dword ptr [rbx+{TPR:#x}], 0
after_lower:            # 0x35 is taken here, at the boundary after the TPR write
    nop
    hlt
""" + handler("h35") + handler("h55"), gates={0x35: gate("h35"), 0x55: gate("h55")}, mode=mode)
    m.inject("interrupt", vector=0x35, before="held")
    m.inject("interrupt", vector=0x55, before="open")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == [
        "apic_write", "apic_write", "interrupt_pending", "interrupt_pending", "deliver", "apic_write",
        "iret", "apic_write", "deliver", "apic_write", "iret", "end"]
    assert writes(r.trace.records) == [(SVR, SVR_ENABLED), (TPR, 0x40), (EOI, 0), (TPR, 0), (EOI, 0)]
    pend35, pend55 = of_kind(r.trace.records, "interrupt_pending")
    assert (pend35["vector"], pend35["icount"], pend55["vector"], pend55["icount"]) == (0x35, 3, 0x55, 4)
    expect(frames.seen[0], vector=0x55, frame=at(sym["open"]), stack="current", stack_top=KERNEL_STACK,
           source="interrupt", handler=sym["h55"])
    assert frames.seen[0][0]["icount"] == 4
    tpr_write = of_kind(r.trace.records, "apic_write")[3]
    expect(frames.seen[1], vector=0x35, frame=at(sym["after_lower"]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h35"])
    assert frames.seen[1][0]["icount"] == tpr_write["icount"] == 8
    assert m.apic is not None
    assert (m.apic.tpr, m.apic.ppr, m.apic.irr, m.apic.isr) == (0, 0, [], [])
    assert (r.outcome, r.icount) == ("hlt", 12)


@pytest.mark.parametrize("mode", BOTH)
def test_two_vectors_at_one_boundary_go_highest_first_and_the_lower_one_after_the_first_eoi_and_iretq(mode: str) -> None:
    m, sym = build(PRELUDE + """
both:                   # 0x40 and 0x60 arrive here together, IF = 1
    nop
    hlt
""" + handler("h40") + handler("h60"), gates={0x40: gate("h40"), 0x60: gate("h60")}, mode=mode)
    m.inject("interrupt", vector=0x40, before="both")
    m.inject("interrupt", vector=0x60, before="both")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == [
        "apic_write", "interrupt_pending", "interrupt_pending", "deliver", "apic_write", "iret",
        "deliver", "apic_write", "iret", "end"]
    # 0x60 first; the handler runs with IF = 0 (interrupt gate), so 0x40 waits through
    # the EOI and is taken at the IRETQ's target, `both` again.
    expect(frames.seen[0], vector=0x60, frame=at(sym["both"]), stack="current", stack_top=KERNEL_STACK,
           source="interrupt", handler=sym["h60"])
    iret60 = of_kind(r.trace.records, "iret")[0]
    assert (iret60["rip"], iret60["to_rip"]) == (sym["h60_iret"], sym["both"])
    expect(frames.seen[1], vector=0x40, frame=at(sym["both"]), stack="current", stack_top=KERNEL_STACK,
           source="interrupt", handler=sym["h40"])
    assert [f[0]["icount"] for f in frames.seen] == [2, 4]
    assert m.apic is not None and (m.apic.irr, m.apic.isr) == ([], [])


@pytest.mark.parametrize("mode", BOTH)
def test_while_0x60_is_in_service_0x40_waits_even_with_if_1_but_0x70_nests(mode: str) -> None:
    m, sym = build(PRELUDE + f"""
both:                   # 0x40 and 0x60 arrive here together
    nop
    hlt
h60:
    sti                 # IF = 1 inside the handler; PPR = 0x60 still holds 0x40
    nop
in_service:             # 0x70 arrives here: class 7 > 6, nests at once
    nop
    nop
    mov dword ptr [rbx+{EOI:#x}], 0
h60_iret:               # after the EOI, PPR = 0 and IF = 1: 0x40 is taken here
    iretq
""" + handler("h40") + handler("h70"),
        gates={0x40: gate("h40"), 0x60: gate("h60"), 0x70: gate("h70")}, mode=mode)
    m.inject("interrupt", vector=0x40, before="both")
    m.inject("interrupt", vector=0x60, before="both")
    m.inject("interrupt", vector=0x70, before="in_service")
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == [
        "apic_write", "interrupt_pending", "interrupt_pending", "deliver", "interrupt_pending", "deliver",
        "apic_write", "iret", "apic_write", "deliver", "apic_write", "iret", "iret", "end"]
    expect(frames.seen[0], vector=0x60, frame=at(sym["both"]), stack="current", stack_top=KERNEL_STACK,
           source="interrupt", handler=sym["h60"])
    nested_top = KERNEL_STACK - 40  # h60's RSP
    expect(frames.seen[1], vector=0x70, frame=at(sym["in_service"], rsp=nested_top), stack="current",
           stack_top=nested_top, source="interrupt", handler=sym["h70"])
    # 0x70's EOI retires 0x70 only; 0x40 still waits (0x60 in service) through the two
    # nops until h60's own EOI, then is taken before h60's IRETQ.
    h60_eoi = of_kind(r.trace.records, "apic_write")[2]
    expect(frames.seen[2], vector=0x40, frame=at(sym["h60_iret"], rsp=nested_top), stack="current",
           stack_top=nested_top, source="interrupt", handler=sym["h40"])
    assert [f[0]["icount"] for f in frames.seen] == [2, 4, 9]
    assert h60_eoi["icount"] == 9 and frames.seen[2][0]["depth"] == 1
    assert of_kind(r.trace.records, "iret")[-1]["to_rip"] == sym["both"]
    assert m.apic is not None and (m.apic.irr, m.apic.isr) == ([], [])


@pytest.mark.parametrize("mode", BOTH)
def test_a_fixed_self_ipi_arrives_at_the_boundary_after_the_icr_write(mode: str) -> None:
    m, sym = build(PRELUDE + f"""
    mov dword ptr [rbx+{ICR_LOW:#x}], {ICR_SELF | 0x31:#x}
after_ipi:
    nop
    hlt
""" + handler("h31"), gates={0x31: gate("h31")}, mode=mode)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["apic_write", "apic_write", "apic_ipi", "deliver", "apic_write",
                                      "iret", "end"]
    ipi = r.trace.records[2]
    assert {k: ipi[k] for k in ("mode", "vector", "shorthand", "destination", "delivered", "icount")} == {
        "mode": "fixed", "vector": 0x31, "shorthand": "self", "destination": 0, "delivered": True,
        "icount": 3}
    expect(frames.seen[0], vector=0x31, frame=at(sym["after_ipi"]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h31"])
    assert frames.seen[0][0]["icount"] == 3  # mov rbx, SVR write, ICR write


SELF_NMI = PRELUDE + f"""
    mov dword ptr [rbx+{ICR_HIGH:#x}], 0
    mov dword ptr [rbx+{ICR_LOW:#x}], {ICR_NMI:#x}
after_nmi:
    nop
    hlt
nmi_handler:            # IST1
    nop
nmi_iret:
    iretq
"""


@pytest.mark.parametrize("mode", BOTH)
def test_a_self_nmi_through_the_icr_arrives_at_the_boundary_after_the_icr_write(mode: str) -> None:
    m, sym = build(SELF_NMI, gates={NMI: gate("nmi_handler", ist=1)}, mode=mode)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["apic_write", "apic_write", "apic_write", "apic_ipi", "nmi_pending",
                                      "deliver", "iret", "end"]
    assert writes(r.trace.records) == [(SVR, SVR_ENABLED), (ICR_HIGH, 0), (ICR_LOW, ICR_NMI)]
    ipi, pending = r.trace.records[3:5]
    assert (ipi["mode"], ipi["vector"], ipi["shorthand"], ipi["destination"], ipi["delivered"]) == (
        "nmi", NMI, "none", 0, True)
    assert (pending["source"], pending["nmi_blocked"], pending["icount"]) == ("apic", False, 4)
    expect(frames.seen[0], vector=NMI, frame=at(sym["after_nmi"]), stack="ist1", stack_top=IST1_TOP,
           source="nmi", handler=sym["nmi_handler"])
    assert frames.seen[0][0]["icount"] == 4 and frames.blocked == [True]
    assert r.trace.records[6]["nmi_unblocked"] is True and m.nmi_blocked is False


@pytest.mark.parametrize("mode", BOTH)
def test_a_self_nmi_sent_from_the_nmi_handler_is_latched_until_its_iretq(mode: str) -> None:
    m, sym = build(PRELUDE + f"""
    mov dword ptr [rbx+{ICR_HIGH:#x}], 0
work:                   # an injected NMI arrives here
    nop
    hlt
nmi_handler:
    mov dword ptr [rbx+{ICR_LOW:#x}], {ICR_NMI:#x}
    nop
    iretq
""", gates={NMI: gate("nmi_handler", ist=1)}, mode=mode)
    m.inject("nmi", before="work", hit=1)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    # Pass 1 sends a self-NMI (latched); pass 2, the latched one, sends another (latched
    # again); pass 3 sends a third ... so bound the run and look at the first two passes.
    assert kinds(r.trace.records)[:9] == [
        "apic_write", "apic_write", "nmi_pending", "deliver", "apic_write", "apic_ipi", "nmi_latched",
        "iret", "deliver"]
    latched = r.trace.records[6]
    assert (latched["source"], latched["nmi_blocked"]) == ("apic", True)
    work = at(sym["work"])
    for got in frames.seen[:2]:
        expect(got, vector=NMI, frame=work, stack="ist1", stack_top=IST1_TOP, source="nmi",
               handler=sym["nmi_handler"])
    assert frames.seen[1][0]["icount"] == r.trace.records[7]["icount"] == 6
    assert frames.blocked[:2] == [True, True]
    assert r.outcome == "max_insns"


@pytest.mark.parametrize("mode", BOTH)
def test_a_periodic_timer_wakes_hlt_at_each_expiry(mode: str) -> None:
    m, sym = build(PRELUDE + f"""
    mov ecx, 2
    mov dword ptr [rbx+{TIMER_DIVIDE:#x}], {DIVIDE_BY_2:#x}
    mov dword ptr [rbx+{LVT_TIMER:#x}], {LVT_PERIODIC | TIMER_VEC:#x}
    mov dword ptr [rbx+{TIMER_INITIAL:#x}], 10000
idle:
    hlt
after_hlt:
    dec ecx
    jnz idle
    mov dword ptr [rbx+{TIMER_INITIAL:#x}], 0
    hlt
""" + handler("h40"), gates={TIMER_VEC: gate("h40")}, mode=mode)
    frames = Frames(m)
    p = m.profile
    alu, store, event = cost(m, "alu"), cost(m, "store"), cost(m, "event_instruction")
    a, d = p.event("apic_access"), p.event("deliver_same_cpl")
    w, i = p.event("hlt_wake"), p.event("iret_same_cpl")
    assert m.apic is not None and m.apic.timer_ratio == 1

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)

    # mov rbx, the SVR write, mov ecx, then three timer register writes: the countdown
    # starts when the initial-count write completes.
    start = 2 * alu + 4 * (store + a)
    period = 10000 * 2 * 1  # initial count * divisor * timer_ratio
    expiry1, expiry2 = start + period, start + 2 * period
    assert kinds(r.trace.records) == [
        "apic_write", "apic_write", "apic_write", "apic_write",
        "hlt", "interrupt_pending", "wake", "deliver", "apic_write", "iret",
        "hlt", "interrupt_pending", "wake", "deliver", "apic_write", "iret",
        "apic_write", "end"]
    hlt1, hlt2 = of_kind(r.trace.records, "hlt")
    pend1, pend2 = of_kind(r.trace.records, "interrupt_pending")
    assert (hlt1["rip"], hlt1["cycle"], hlt1["until"]) == (sym["idle"], start + event, expiry1)
    assert (pend1["source"], pend1["vector"], pend1["expiry"], pend1["cycle"]) == (
        "apic_timer", TIMER_VEC, expiry1, expiry1)
    # Handler: delivery, EOI write, IRETQ; then dec, jnz, hlt.
    assert hlt2["cycle"] == (expiry1 + w + d + (store + a) + event + i + alu + cost(m, "branch")
                             + event)
    assert (hlt2["rip"], hlt2["until"]) == (sym["idle"], expiry2)
    assert (pend2["expiry"], pend2["cycle"]) == (expiry2, expiry2)
    assert [f[0]["cycle"] for f in frames.seen] == [expiry1 + w, expiry2 + w]
    for got in frames.seen:
        expect(got, vector=TIMER_VEC, frame=at(sym["after_hlt"]), stack="current",
               stack_top=KERNEL_STACK, source="interrupt", handler=sym["h40"])
    assert [x["by"] for x in of_kind(r.trace.records, "wake")] == ["intr", "intr"]
    assert (r.outcome, r.reason) == ("hlt", "HLT with no event that can wake the CPU")


@pytest.mark.parametrize("mode", BOTH)
def test_a_one_shot_timer_wakes_hlt_once_then_reads_0_and_the_next_hlt_ends_the_run(mode: str) -> None:
    m, sym = build(PRELUDE + f"""
    mov dword ptr [rbx+{TIMER_DIVIDE:#x}], {DIVIDE_BY_1:#x}
    mov dword ptr [rbx+{LVT_TIMER:#x}], {TIMER_VEC:#x}
    mov dword ptr [rbx+{TIMER_INITIAL:#x}], 3000
idle:
    hlt
after_hlt:
    mov eax, dword ptr [rbx+0x390]
    hlt
""" + handler("h40"), gates={TIMER_VEC: gate("h40")}, mode=mode)
    frames = Frames(m)
    p = m.profile

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, regs={"rax": 0xDEAD}, max_insns=100)

    # mov rbx and four APIC writes, then 3000 ticks of divisor 1 * timer_ratio 1.
    expiry = cost(m, "alu") + 4 * (cost(m, "store") + p.event("apic_access")) + 3000 * 1 * 1
    assert kinds(r.trace.records) == [
        "apic_write", "apic_write", "apic_write", "apic_write",
        "hlt", "interrupt_pending", "wake", "deliver", "apic_write", "iret", "end"]
    (hlt,) = of_kind(r.trace.records, "hlt")
    (pend,) = of_kind(r.trace.records, "interrupt_pending")
    assert (hlt["until"], pend["expiry"], pend["cycle"]) == (expiry, expiry, expiry)
    assert frames.seen[0][0]["cycle"] == expiry + p.event("hlt_wake")
    expect(frames.seen[0], vector=TIMER_VEC, frame=at(sym["after_hlt"]), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h40"])
    assert m.engine.read_reg("rax") == 0  # current count after the one-shot expiry
    assert (r.outcome, r.reason) == ("hlt", "HLT with no event that can wake the CPU")


TIMER_THEN_CLI_HLT = PRELUDE + f"""
    mov dword ptr [rbx+{TIMER_DIVIDE:#x}], {DIVIDE_BY_1:#x}
    mov dword ptr [rbx+{LVT_TIMER:#x}], {{lvt:#x}}
    mov dword ptr [rbx+{TIMER_INITIAL:#x}], 1000
    cli
idle:
    hlt
after_hlt:
    hlt
h40:
    iretq
nmi_handler:
    iretq
"""


@pytest.mark.parametrize("mode", BOTH)
def test_hlt_with_if_0_and_only_a_periodic_timer_left_ends_the_run(mode: str) -> None:
    m, sym = build(TIMER_THEN_CLI_HLT.format(lvt=LVT_PERIODIC | TIMER_VEC),
                   gates={TIMER_VEC: gate("h40"), NMI: gate("nmi_handler")}, mode=mode)
    p = m.profile
    start = cost(m, "alu") + 4 * (cost(m, "store") + p.event("apic_access"))

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)

    # The first expiry sets IRR (held by IF = 0); the second only merges into it, so
    # nothing can change any more and the run ends instead of sleeping forever.
    assert kinds(r.trace.records) == ["apic_write"] * 4 + [
        "hlt", "interrupt_pending", "hlt", "interrupt_pending", "end"]
    pend1, pend2 = of_kind(r.trace.records, "interrupt_pending")
    assert (pend1["expiry"], pend2["expiry"]) == (start + 1000, start + 2000)
    assert r.trace.records[4]["cycle"] == start + cost(m, "interrupt_control") + cost(m, "event_instruction")
    assert (r.outcome, r.rip) == ("hlt", sym["after_hlt"])
    assert r.reason == "HLT with every wake source held (IF = 0 or masked)"
    assert of_kind(r.trace.records, "deliver") == []
    assert m.apic is not None and (m.apic.irr, m.apic.isr) == ([TIMER_VEC], [])


@pytest.mark.parametrize("mode", BOTH)
def test_hlt_with_if_0_is_woken_by_an_nmi_injected_by_cycle_with_the_rip_after_the_hlt(mode: str) -> None:
    m, sym = build(TIMER_THEN_CLI_HLT.format(lvt=TIMER_VEC),  # one-shot
                   gates={TIMER_VEC: gate("h40"), NMI: gate("nmi_handler")}, mode=mode)
    p = m.profile
    start = cost(m, "alu") + 4 * (cost(m, "store") + p.event("apic_access"))
    nmi_at = start + 5000
    m.inject("nmi", cycle=nmi_at)
    frames = Frames(m)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)

    assert kinds(r.trace.records) == ["apic_write"] * 4 + [
        "hlt", "interrupt_pending", "hlt", "nmi_pending", "wake", "deliver", "iret", "end"]
    hlt1, _, hlt2, pending, wake, _, iret, _ = r.trace.records[4:]
    assert (hlt1["until"], hlt2["until"]) == (start + 1000, nmi_at)
    assert (pending["cycle"], pending["at_cycle"], pending["nmi_blocked"]) == (nmi_at, nmi_at, False)
    assert (wake["by"], wake["cycle"]) == ("nmi", nmi_at + p.event("hlt_wake"))
    expect(frames.seen[0], vector=NMI, frame=at(sym["after_hlt"], rflags=IF_CLEAR), stack="current",
           stack_top=KERNEL_STACK, source="nmi", handler=sym["nmi_handler"])
    assert frames.seen[0][0]["cycle"] == nmi_at + p.event("hlt_wake") and frames.blocked == [True]
    assert (iret["to_rip"], iret["nmi_unblocked"]) == (sym["after_hlt"], True)
    # Back at the second HLT: still IF = 0, the timer IRR bit can never be taken.
    assert (r.outcome, r.rip) == ("hlt", sym["after_hlt"] + 1)
    assert m.apic is not None and m.apic.irr == [TIMER_VEC]


@pytest.mark.parametrize(("offset", "value", "names"), [
    (ICR_LOW, ICR_INIT, ("ICR", "INIT")),
    (ICR_LOW, ICR_NMI | ICR_SELF, ("ICR", "NMI", "self")),  # invalid combination (SDM table)
    (LVT_TIMER, (0b10 << 17) | TIMER_VEC, ("LVT timer", "TSC-deadline")),
])
@pytest.mark.parametrize("mode", BOTH)
def test_unsupported_apic_usage_ends_the_run_naming_the_register(offset: int, value: int,
                                                                 names: tuple[str, ...], mode: str) -> None:
    m, sym = build(PRELUDE + f"""
the_write:
    mov dword ptr [rbx+{offset:#x}], {value:#x}
    nop
    hlt
""", gates={}, mode=mode)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=50)

    assert kinds(r.trace.records) == ["apic_write", "apic_write", "end"]
    assert (r.trace.records[1]["offset"], r.trace.records[1]["value"]) == (offset, value)
    end = r.trace.records[-1]
    # The run ends *at* the writing instruction, which did not retire.
    assert (r.outcome, end["reason"], r.rip, end["rip"]) == (
        "unsupported", "unsupported", sym["the_write"], sym["the_write"])
    assert end["detail"] == r.reason
    for name in names:
        assert name in r.reason
    assert r.icount == 2
