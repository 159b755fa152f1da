"""Stack selection, alignment and the 64-bit frame (SDM Vol. 3A "Stack Switching in IA-32e
Mode", "Interrupt Stack Table", "64-Bit Mode Stack Frame", "Exception Classifications").

Every frame is the five (or six) 8-byte slots SS, RSP, RFLAGS, CS, RIP [, error code],
pushed below the 16-byte-aligned new RSP, with the *unaligned* old RSP in its slot.
"""

from __future__ import annotations

from tests.delivery.rig import (
    CODE,
    DATA,
    IST1_TOP,
    IST2_TOP,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_IF,
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

IST2_TOP_UNALIGNED = 0xA0008


def test_int3_through_an_ist1_gate_at_cpl0_pushes_a_five_slot_frame_on_ist1() -> None:
    m, sym = build("""
        nop
        int3
    after_int3:
        hlt
    bp_handler:
        hlt
    """, gates={3: gate("bp_handler", ist=1)})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["bp_handler"] + 1
    (rec,) = deliveries(r.trace.records)
    # INT3 is a trap: the saved RIP is the next instruction, RF is pushed unchanged
    # (0), no error code; the IST switch happens at the same CPL.
    assert_delivered(m, rec, vector=3, stack="ist1", stack_top=IST1_TOP, cpl=0,
                     frame=Frame(rip=sym["after_int3"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=KERNEL_STACK, ss=KERNEL_DS))
    assert rec["icount"] == 2  # nop and int3 retired
    assert m.engine.read_reg("rsp") == IST1_TOP - 40
    assert m.cpl == 0 and m.engine.read_reg("cs") == KERNEL_CS
    # Interrupt gate: IF cleared in the handler.
    assert m.engine.read_reg("rflags") & RFLAGS_IF == 0


def test_int3_with_rsp_8_mod_16_and_an_unaligned_ist_aligns_the_new_rsp_but_pushes_the_old_one() -> None:
    m, sym = build("""
        push rax
        int3
    after_int3:
        hlt
    bp_handler:
        hlt
    """, gates={3: gate("bp_handler", ist=2)}, tss={"ist2": IST2_TOP_UNALIGNED})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt"
    (rec,) = deliveries(r.trace.records)
    old_rsp = KERNEL_STACK - 8  # 0x6fff8: RSP % 16 == 8 at the INT3
    # New RSP = IST2 & ~0xF = 0xA0000, frame at 0xA0000 - 40; the RSP slot keeps the
    # interrupted RSP exactly as it was (not aligned).
    assert_delivered(m, rec, vector=3, stack="ist2", stack_top=IST2_TOP_UNALIGNED, cpl=0,
                     frame=Frame(rip=sym["after_int3"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=old_rsp, ss=KERNEL_DS))
    assert m.engine.read_reg("rsp") == 0xA0000 - 40


def test_int3_through_a_non_ist_gate_with_rsp_8_mod_16_aligns_the_current_stack_first() -> None:
    m, sym = build("""
        push rax
        int3
    after_int3:
        hlt
    bp_handler:
        hlt
    """, gates={3: gate("bp_handler")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt"
    (rec,) = deliveries(r.trace.records)
    old_rsp = KERNEL_STACK - 8  # 0x6fff8
    # Same CPL, IST 0: the current stack, aligned down to 0x6fff0 before the pushes, so
    # the frame sits at 0x6fff0 - 40 = 0x6ffc8 (not 0x6fff8 - 40).
    assert_delivered(m, rec, vector=3, stack="current", stack_top=old_rsp, cpl=0,
                     frame=Frame(rip=sym["after_int3"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=old_rsp, ss=KERNEL_DS))
    assert m.engine.read_reg("rsp") == 0x6FFC8
    assert m.engine.read_reg("ss") == KERNEL_DS  # no stack switch: SS unchanged


def test_int_0x80_from_cpl3_through_a_dpl3_gate_switches_to_rsp0_and_iretq_returns_to_cpl3() -> None:
    m, sym = build("""
        int 0x80
    after_int:
        cli
        hlt
    syscall_handler:
        mov rax, rsp
        mov [DATA], rax
        mov rax, ss
        mov [DATA + 8], rax
        mov rax, cs
        mov [DATA + 16], rax
        iretq
    gp_handler:
        hlt
    """, gates={0x80: gate("syscall_handler", dpl=3), 13: gate("gp_handler", ist=2)})

    r = m.run(entry=CODE, rsp=USER_STACK, cpl=3, rflags=START_RFLAGS)

    assert r.outcome == "hlt"
    int_rec, gp_rec = deliveries(r.trace.records)
    # CPL3 -> CPL0 through a non-IST gate: RSP from TSS.RSP0, the user SS:RSP pushed.
    assert_delivered(m, int_rec, vector=0x80, stack="rsp0", stack_top=RSP0_TOP, cpl=0,
                     frame=Frame(rip=sym["after_int"], cs=USER_CS, rflags=START_RFLAGS,
                                 rsp=USER_STACK, ss=USER_DS))
    assert int_rec["error_code"] is None  # INT n never pushes an error code
    # What the handler saw: RSP = RSP0 - 40, SS = NULL selector with RPL 0, CS = 0x08.
    assert m.phys.read_u64(DATA) == RSP0_TOP - 40
    assert m.phys.read_u64(DATA + 8) & 0xFFFF == 0
    assert m.phys.read_u64(DATA + 16) & 0xFFFF == KERNEL_CS

    (iret,) = [x for x in r.trace.records if x["kind"] == "iret"]
    assert (iret["to_rip"], iret["to_cpl"], iret["to_rsp"]) == (sym["after_int"], 3, USER_STACK)
    # Back at CPL3, CLI (IOPL 0) is privileged: #GP(0), a fault on the CLI, delivered
    # through the IST2 #GP gate (a privilege change: SS becomes NULL). RF=1 is pushed.
    assert_delivered(m, gp_rec, vector=13, stack="ist2", stack_top=IST2_TOP, cpl=0,
                     frame=Frame(error_code=0, rip=sym["after_int"], cs=USER_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=USER_STACK, ss=USER_DS))
    assert m.cpl == 0 and m.engine.read_reg("ss") & 0xFFFF == 0


def test_a_trap_gate_leaves_if_set_in_the_handler() -> None:
    m, sym = build("""
        int3
    after_int3:
        hlt
    bp_handler:
        hlt
    """, gates={3: gate("bp_handler", gate_type="trap")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt"
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=3, stack="current", stack_top=KERNEL_STACK, cpl=0,
                     frame=Frame(rip=sym["after_int3"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=KERNEL_STACK, ss=KERNEL_DS))
    assert m.engine.read_reg("rflags") & RFLAGS_IF == RFLAGS_IF


def test_an_interrupt_gate_clears_if_in_the_handler() -> None:
    m, sym = build("""
        int3
    after_int3:
        hlt
    bp_handler:
        hlt
    """, gates={3: gate("bp_handler", gate_type="interrupt")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt"
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=3, stack="current", stack_top=KERNEL_STACK, cpl=0,
                     frame=Frame(rip=sym["after_int3"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=KERNEL_STACK, ss=KERNEL_DS))
    # IF is cleared, but the pushed RFLAGS still has it.
    assert m.engine.read_reg("rflags") & RFLAGS_IF == 0


def test_ud2_after_two_nops_is_delivered_with_icount_2_and_the_ud2_address_saved() -> None:
    m, sym = build("""
        nop
        nop
    the_ud2:
        ud2
        hlt
    ud_handler:
        hlt
    """, gates={6: gate("ud_handler")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt"
    (rec,) = deliveries(r.trace.records)
    # #UD is a fault: saved RIP = the UD2 itself, RF=1 pushed, no error code; UD2 did
    # not retire, so two instructions had.
    assert rec["icount"] == 2
    assert_delivered(m, rec, vector=6, stack="current", stack_top=KERNEL_STACK, cpl=0,
                     frame=Frame(rip=sym["the_ud2"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=KERNEL_STACK,
                                 ss=KERNEL_DS))


def test_an_int3_after_an_instruction_that_followed_an_rf_setting_iretq_pushes_rf_clear() -> None:
    # The #DE handler returns with RF=1 in the image (a fault frame); IRETQ loads it. RF
    # lasts only until the next instruction runs, so by the INT3 after the NOP it is 0
    # again, and a trap pushes RF as it is (SDM Vol. 3A "Instruction-Breakpoint Exception
    # Condition"; Bochs exception.cc: RF is set for faults other than #DB).
    m, sym = build("""
        mov ecx, 0
        div ecx
        nop
        int3
    after_int3:
        hlt
    de_handler:
        add qword ptr [rsp], 2
        iretq
    bp_handler:
        hlt
    """, gates={0: gate("de_handler"), 3: gate("bp_handler")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["bp_handler"] + 1
    de, bp = deliveries(r.trace.records)
    assert de["rflags"] == START_RFLAGS | RFLAGS_RF
    assert_delivered(m, bp, vector=3, stack="current", stack_top=KERNEL_STACK, cpl=0,
                     frame=Frame(rip=sym["after_int3"], cs=KERNEL_CS, rflags=START_RFLAGS,
                                 rsp=KERNEL_STACK, ss=KERNEL_DS))
