"""IRETQ faults and NMI unblocking (SDM Vol. 2A IRET, Vol. 3A "NMI Handling", "Handling
Multiple NMIs").

Any IRET clears NMI blocking, *before* its checks: an IRET that faults still unblocks.
"""

from __future__ import annotations

from tests.delivery.rig import (
    CODE,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_RF,
    START_RFLAGS,
    Frame,
    assert_delivered,
    build,
    deliveries,
    gate,
)

NON_CANONICAL = 0x0000_8000_0000_0000  # bit 47 set, bits 63:48 clear

# Builds a CPL0 -> CPL0 IRET frame by hand on the current stack and executes it; the
# frame's RIP is `target`.
IRET_TO = """
start:
    mov rax, rsp
    push 0x10
    push rax
    pushfq
    push 0x8
    mov rbx, {target:#x}
    push rbx
the_iret:
    iretq
gp_handler:
    hlt
"""


def test_iretq_to_a_non_canonical_rip_raises_gp_0_with_the_iretq_address_saved() -> None:
    m, sym = build(IRET_TO.format(target=NON_CANONICAL), gates={13: gate("gp_handler")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["gp_handler"] + 1
    (fault,) = [x for x in r.trace.records if x["kind"] == "iret_fault"]
    assert (fault["rip"], fault["vector"], fault["error_code"]) == (sym["the_iret"], 13, 0)
    (rec,) = deliveries(r.trace.records)
    # The IRET did not complete: RSP is still at the 5-slot frame it tried to pop
    # (0x70000 - 40 = 0x6ffd8, aligned to 0x6ffd0 for the #GP frame), RIP is the IRETQ.
    rsp_at_iret = KERNEL_STACK - 40
    assert_delivered(m, rec, vector=13, stack="current", stack_top=rsp_at_iret, cpl=0,
                     frame=Frame(error_code=0, rip=sym["the_iret"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=rsp_at_iret,
                                 ss=KERNEL_DS))
    assert rec["icount"] == 7  # the seven instructions before the IRETQ retired
    assert m.engine.read_reg("rsp") == 0x6FFD0 - 48


def test_a_faulting_iretq_still_clears_nmi_blocking() -> None:
    m, sym = build(IRET_TO.format(target=NON_CANONICAL), gates={13: gate("gp_handler")})
    m.nmi_blocked = True  # as if inside an NMI handler

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt"
    (fault,) = [x for x in r.trace.records if x["kind"] == "iret_fault"]
    assert fault["nmi_unblocked"] is True
    assert m.nmi_blocked is False
    (rec,) = deliveries(r.trace.records)
    rsp_at_iret = KERNEL_STACK - 40
    assert_delivered(m, rec, vector=13, stack="current", stack_top=rsp_at_iret, cpl=0,
                     frame=Frame(error_code=0, rip=sym["the_iret"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=rsp_at_iret,
                                 ss=KERNEL_DS))


def test_a_successful_iretq_clears_nmi_blocking() -> None:
    m, sym = build(IRET_TO.format(target=0) .replace("mov rbx, 0x0", "lea rbx, [rip + back]")
                   + "back:\n    hlt\n", gates={13: gate("gp_handler")})
    m.nmi_blocked = True

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["back"] + 1
    (iret,) = [x for x in r.trace.records if x["kind"] == "iret"]
    assert iret["nmi_unblocked"] is True
    assert (iret["to_rip"], iret["to_rsp"], iret["to_cpl"]) == (sym["back"], KERNEL_STACK, 0)
    assert m.nmi_blocked is False
    assert deliveries(r.trace.records) == []
