/* rf_frames: the RF flag in the RFLAGS image pushed for fault-class vs trap-class events.
 *
 * SDM Vol. 3B, "Debug Exception Conditions", "Instruction-Breakpoint Exception
 * Condition": when calling an event handler the processor pushes RF = 1 for any
 * fault-class exception except a #DB raised by an instruction breakpoint; for other
 * events (trap-class exceptions after the instruction completes, software interrupts,
 * hardware interrupts between instructions) it pushes the current RF, and software
 * interrupts push RF = 0 because RF was cleared at the start of the instruction.
 * Fault-class here: #GP (a non-canonical data address), #UD (UD2), #PF. Trap-class:
 * #BP (INT3) and INT n. Every interrupted RFLAGS is 0x2 (RF = 0), so the pushed RFLAGS
 * must be exactly 0x10002 for the faults and 0x2 for the traps.
 */
    .include "idtlog.inc"
    IMAGE_NAME "rf_frames"

    .text
image_main:
    call rf_gp_fault_frame
    call rf_ud_fault_frame
    call rf_pf_fault_frame
    call rf_int3_trap_frame
    call rf_int_n_trap_frame
    ret

rf_gp_fault_frame:
    TEST_BEGIN "rf_gp_fault_frame"
    SET_RESUME 1f
    mov rbx, 0x8000000000001000         /* non-canonical: #GP(0) */
    FLAGS RFLAGS_FIXED
rf_gp_insn:
    mov rax, qword ptr [rbx]
1:  EXPECT_COUNT 13, 1, "expected exactly one gp"
    EXPECT_EV EV_ERR, 0, "gp error code is not 0"
    EXPECT_EV EV_RIP, "OFFSET rf_gp_insn", "pushed rip is not the faulting instruction"
    EXPECT_EV EV_RFLAGS, "RFLAGS_FIXED | RFLAGS_RF", "rf is not set in the gp fault frame"
    TEST_END
    ret

rf_ud_fault_frame:
    TEST_BEGIN "rf_ud_fault_frame"
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
rf_ud_insn:
    ud2
1:  EXPECT_COUNT 6, 1, "expected exactly one ud"
    EXPECT_EV EV_RIP, "OFFSET rf_ud_insn", "pushed rip is not the faulting instruction"
    EXPECT_EV EV_RFLAGS, "RFLAGS_FIXED | RFLAGS_RF", "rf is not set in the ud fault frame"
    TEST_END
    ret

rf_pf_fault_frame:
    TEST_BEGIN "rf_pf_fault_frame"
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
rf_pf_insn:
    mov rax, qword ptr [PAGE_NP + 0x8]
1:  EXPECT_COUNT 14, 1, "expected exactly one pf"
    EXPECT_EV EV_RIP, "OFFSET rf_pf_insn", "pushed rip is not the faulting instruction"
    EXPECT_EV EV_RFLAGS, "RFLAGS_FIXED | RFLAGS_RF", "rf is not set in the pf fault frame"
    TEST_END
    ret

rf_int3_trap_frame:
    TEST_BEGIN "rf_int3_trap_frame"
    ACTION 3, ACT_RETURN
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
    int3
rf_int3_next:
1:  EXPECT_COUNT 3, 1, "expected exactly one bp"
    EXPECT_EV EV_RIP, "OFFSET rf_int3_next", "pushed rip is not the instruction after int3"
    EXPECT_EV EV_RFLAGS, RFLAGS_FIXED, "rf is set in the bp trap frame"
    TEST_END
    ret

rf_int_n_trap_frame:
    TEST_BEGIN "rf_int_n_trap_frame"
    ACTION 0x40, ACT_RETURN
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
    int 0x40
rf_int_n_next:
1:  EXPECT_COUNT 0x40, 1, "expected exactly one int 0x40"
    EXPECT_EV EV_RIP, "OFFSET rf_int_n_next", "pushed rip is not the instruction after int"
    EXPECT_EV EV_RFLAGS, RFLAGS_FIXED, "rf is set in the software interrupt frame"
    TEST_END
    ret
