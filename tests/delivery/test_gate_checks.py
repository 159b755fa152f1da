"""Gate checks for software interrupts: the DPL check, the present check, EXT, and the
fact that INT 2 is not an NMI (SDM Vol. 3A "64-Bit Mode IDT", "Error Code",
"Nonmaskable Interrupt (NMI)"; Bochs exception.cc `long_mode_int`).

Selector-format error codes name IDT entries by vector: (v << 3) | IDT(2) | EXT(1).
"""

from __future__ import annotations

from tests.delivery.rig import (
    CODE,
    IST1_TOP,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_RF,
    RSP0_TOP,
    START_RFLAGS,
    USER_CS,
    USER_DS,
    USER_STACK,
    Frame,
    assert_delivered,
    build,
    deliveries,
    gate,
)

IDT_BIT = 1 << 1
EXT_BIT = 1 << 0


def test_int_0x80_from_cpl3_through_a_dpl0_gate_raises_gp_0x402_with_ext_clear_on_rsp0() -> None:
    m, sym = build("""
    the_int:
        int 0x80
        hlt
    syscall_handler:
        hlt
    gp_handler:
        hlt
    """, gates={0x80: gate("syscall_handler", dpl=0), 13: gate("gp_handler")})

    r = m.run(entry=CODE, rsp=USER_STACK, cpl=3, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["gp_handler"] + 1
    (rec,) = deliveries(r.trace.records)
    expected_ec = (0x80 << 3) | IDT_BIT  # 0x402, EXT=0: INT n is a software event
    assert expected_ec == 0x402 and expected_ec & EXT_BIT == 0
    # The #GP is a fault on the INT instruction: saved RIP = the INT, RF=1. The #GP
    # gate is DPL0 and reached from CPL3, so the stack is TSS.RSP0.
    assert_delivered(m, rec, vector=13, stack="rsp0", stack_top=RSP0_TOP, cpl=0,
                     frame=Frame(error_code=expected_ec, rip=sym["the_int"], cs=USER_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=USER_STACK,
                                 ss=USER_DS))
    (nested,) = [x for x in r.trace.records if x["kind"] == "delivery_fault"]
    assert (nested["vector"], nested["fault"], nested["error_code"], nested["action"]) == (
        0x80, 13, 0x402, "serial")
    assert rec["icount"] == 0  # the INT did not complete
    assert m.cpl == 0 and m.engine.read_reg("ss") & 0xFFFF == 0  # NULL SS, RPL 0
    assert m.engine.read_reg("rsp") == RSP0_TOP - 48


def test_int_n_from_cpl3_into_a_not_present_dpl0_gate_raises_gp_not_np() -> None:
    m, sym = build("""
    the_int:
        int 0x81
        hlt
    gp_handler:
        hlt
    np_handler:
        hlt
    """, gates={0x81: gate(0, dpl=0, present=False), 13: gate("gp_handler"),
                11: gate("np_handler")})

    r = m.run(entry=CODE, rsp=USER_STACK, cpl=3, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["gp_handler"] + 1
    (rec,) = deliveries(r.trace.records)
    # The DPL check comes before the present check.
    assert_delivered(m, rec, vector=13, stack="rsp0", stack_top=RSP0_TOP, cpl=0,
                     frame=Frame(error_code=(0x81 << 3) | IDT_BIT, rip=sym["the_int"],
                                 cs=USER_CS, rflags=START_RFLAGS | RFLAGS_RF,
                                 rsp=USER_STACK, ss=USER_DS))


def test_int_2_at_cpl0_with_the_nmi_gate_not_present_raises_np_0x12_with_ext_clear() -> None:
    m, sym = build("""
        push rax
    the_int:
        int 2
        hlt
    np_handler:
        hlt
    """, gates={2: gate(0, present=False), 11: gate("np_handler")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["np_handler"] + 1
    (rec,) = deliveries(r.trace.records)
    old_rsp = KERNEL_STACK - 8
    expected_ec = (2 << 3) | IDT_BIT  # 0x12: EXT=0, INT 2 is software, not an NMI
    assert expected_ec == 0x12
    assert_delivered(m, rec, vector=11, stack="current", stack_top=old_rsp, cpl=0,
                     frame=Frame(error_code=expected_ec, rip=sym["the_int"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=old_rsp,
                                 ss=KERNEL_DS))
    assert m.nmi_blocked is False
    assert m.engine.read_reg("rsp") == (old_rsp & ~0xF) - 48


def test_int_2_through_a_present_nmi_gate_runs_the_handler_without_blocking_nmis() -> None:
    m, sym = build("""
        int 2
    after_int:
        hlt
    nmi_handler:
        hlt
    """, gates={2: gate("nmi_handler", ist=1)})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["nmi_handler"] + 1
    (rec,) = deliveries(r.trace.records)
    assert rec["source"] == "software"
    # A software interrupt: a trap (next RIP), no error code, RF pushed as is.
    assert_delivered(m, rec, vector=2, stack="ist1", stack_top=IST1_TOP, cpl=0,
                     frame=Frame(rip=sym["after_int"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=KERNEL_STACK, ss=KERNEL_DS))
    # SDM "NMI Handling": INT 2 executes the NMI handler but does not block NMIs.
    assert m.nmi_blocked is False
