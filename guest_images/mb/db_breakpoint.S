/* db_breakpoint: a #DB from an instruction breakpoint (DR0/DR7) is a fault that pushes
 * RF unchanged (0), unlike every other fault-class exception (see rf_frames.S).
 *
 * SDM Vol. 3B, "Debug Exception Conditions", "Instruction-Breakpoint Exception
 * Condition": an instruction breakpoint is reported before the instruction executes
 * (the pushed RIP is the instruction); "the processor does not set the RF flag prior to
 * calling the debug exception handler for debug exceptions resulting from instruction
 * breakpoints", so the handler sets RF in the pushed RFLAGS image itself and the IRET
 * then lets the instruction execute once without a second #DB. DR6.B0 says DR0 hit.
 * Kept apart from rf_frames because it needs the debug registers.
 */
    .include "idtlog.inc"
    IMAGE_NAME "db_breakpoint"

    .text
image_main:
    call db_code_breakpoint_pushes_rf_0
    ret

extra_dr6:
    mov rax, dr6
    and eax, 0xf                        /* B0-B3: which breakpoint hit */
    KV "dr6_b", rax
    ret

/* The handler: remember B0-B3, clear DR6, set RF in the frame so that the instruction
 * can execute; after a few repeats (RF ignored), disarm DR7 so that the test ends. */
db_hook:
    mov rax, dr6
    and eax, 0xf
    mov qword ptr [rip + dr6_seen], rax
    xor eax, eax
    mov dr6, rax
    bts qword ptr [rsi + 16], 16        /* RFLAGS.RF in the pushed frame */
    cmp qword ptr [rip + ev_count + 8 * 1], 3
    jb 1f
    xor eax, eax
    mov dr7, rax
1:  ret

db_code_breakpoint_pushes_rf_0:
    TEST_BEGIN "db_code_breakpoint_pushes_rf_0"
    ACTION 1, ACT_RETURN
    HOOK 1, db_hook
    EXTRA extra_dr6
    mov qword ptr [rip + dr6_seen], 0
    mov qword ptr [rip + target_runs], 0
    lea rax, [rip + db_target]
    mov dr0, rax
    mov eax, 0x1                        /* DR7: L0, R/W0 = 00 (execute), LEN0 = 00 */
    mov dr7, rax
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
db_target:
    inc qword ptr [rip + target_runs]
    xor eax, eax
    mov dr7, rax
1:  EXPECT_COUNT 1, 1, "expected exactly one db"
    EXPECT_EV EV_RIP, "OFFSET db_target", "pushed rip is not the breakpoint instruction"
    EXPECT_EV EV_RFLAGS, RFLAGS_FIXED, "rf is set in the instruction breakpoint db frame"
    EXPECT "qword ptr [rip + dr6_seen]", 1, "dr6 does not say dr0 hit"
    EXPECT "qword ptr [rip + target_runs]", 1, "the instruction did not run once after iret with rf"
    TEST_END
    ret

    .data
    .balign 8
dr6_seen:       .quad 0
target_runs:    .quad 0
