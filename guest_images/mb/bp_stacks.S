/* bp_stacks: #BP (INT3, a trap) delivered on IST1 and on the current stack.
 *
 * SDM Vol. 3A, "Interrupt and Exception Handling", 64-bit mode stack frame: in IA-32e
 * mode the RSP is aligned down to 16 bytes before the frame is pushed, whichever stack
 * is used (an IST slot or the current stack), and SS:RSP is pushed unconditionally; the
 * pushed RSP is the value before alignment. INT3 is a trap: the pushed RIP is the next
 * instruction, and RF is pushed unchanged (0).
 */
    .include "idtlog.inc"
    IMAGE_NAME "bp_stacks"

    .text
image_main:
    call bp_ist1
    call bp_ist1_misaligned
    call bp_current_stack_misaligned
    call bp_current_stack_aligned
    ret

/* #BP through an IST1 gate: the handler starts at TSS.IST1 - 40. */
bp_ist1:
    TEST_BEGIN "bp_ist1"
    GATE 3, 1, 0
    ACTION 3, ACT_RETURN
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
    int3
bp_ist1_next:
1:  EXPECT_COUNT 3, 1, "expected exactly one bp"
    mov rbx, qword ptr [rip + tss + TSS_IST1]
    sub rbx, 40
    EXPECT_EV EV_RSP, rbx, "handler rsp is not ist1 minus 40"
    EXPECT_EV EV_RIP, "OFFSET bp_ist1_next", "pushed rip is not the instruction after int3"
    EXPECT_EV EV_CS, KCODE, "pushed cs is not the kernel code selector"
    EXPECT_EV EV_RFLAGS, RFLAGS_FIXED, "pushed rflags differ from the interrupted rflags"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "pushed rsp is not the interrupted rsp"
    EXPECT_EV EV_SS, KDATA, "pushed ss is not the interrupted ss"
    TEST_END
    ret

/* IST1 holds a value with RSP % 16 == 8: it is aligned down before the pushes. */
bp_ist1_misaligned:
    TEST_BEGIN "bp_ist1_misaligned"
    GATE 3, 1, 0
    ACTION 3, ACT_RETURN
    lea rax, [rip + ist1_stack_top - 8]
    mov qword ptr [rip + tss + TSS_IST1], rax
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
    int3
bp_ist1_misaligned_next:
1:  EXPECT_COUNT 3, 1, "expected exactly one bp"
    lea rbx, [rip + ist1_stack_top - 16 - 40]
    EXPECT_EV EV_RSP, rbx, "handler rsp is not ist1 aligned down to 16 minus 40"
    EXPECT_EV EV_RIP, "OFFSET bp_ist1_misaligned_next", "pushed rip is not the instruction after int3"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "pushed rsp is not the interrupted rsp"
    TEST_END
    ret

/* No IST, no privilege change, RSP % 16 == 8 at the INT3: the frame starts at
 * (RSP & ~15) - 40 and the pushed RSP is the unaligned value. */
bp_current_stack_misaligned:
    push rbp
    mov rbp, rsp
    TEST_BEGIN "bp_current_stack_misaligned"
    ACTION 3, ACT_RETURN
    and rsp, -16
    sub rsp, 8
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
    int3
bp_current_misaligned_next:
1:  EXPECT_COUNT 3, 1, "expected exactly one bp"
    mov rbx, qword ptr [rip + saved_rsp]
    and rbx, -16
    sub rbx, 40
    EXPECT_EV EV_RSP, rbx, "handler rsp is not the stack aligned down to 16 minus 40"
    EXPECT_EV EV_RIP, "OFFSET bp_current_misaligned_next", "pushed rip is not the instruction after int3"
    EXPECT_EV EV_CS, KCODE, "pushed cs is not the kernel code selector"
    EXPECT_EV EV_RFLAGS, RFLAGS_FIXED, "pushed rflags differ from the interrupted rflags"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "pushed rsp is not the unaligned interrupted rsp"
    EXPECT_EV EV_SS, KDATA, "pushed ss is not the interrupted ss"
    mov rsp, rbp
    TEST_END
    pop rbp
    ret

/* The same with RSP % 16 == 0: the frame sits right below the interrupted RSP. */
bp_current_stack_aligned:
    push rbp
    mov rbp, rsp
    TEST_BEGIN "bp_current_stack_aligned"
    ACTION 3, ACT_RETURN
    and rsp, -16
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
    int3
1:  EXPECT_COUNT 3, 1, "expected exactly one bp"
    mov rbx, qword ptr [rip + saved_rsp]
    sub rbx, 40
    EXPECT_EV EV_RSP, rbx, "handler rsp is not the interrupted rsp minus 40"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "pushed rsp is not the interrupted rsp"
    mov rsp, rbp
    TEST_END
    pop rbp
    ret

    .data
    .balign 8
saved_rsp:  .quad 0
