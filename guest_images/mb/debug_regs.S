/* debug_regs: the debug registers DR0-DR3, DR6, DR7 (SDM Vol. 3B, "Debug Registers",
 * "Debug Exceptions").
 *
 * - DR7: L0-L3 enable a breakpoint; R/Wn 00 = instruction execution, 01 = data writes,
 *   11 = data reads and writes, 10 = I/O reads and writes (only with CR4.DE = 1); LENn
 *   00 = 1 byte, 01 = 2, 11 = 4, 10 = 8 bytes (the address aligned to the length); a data
 *   access matches when any of its bytes is in the breakpoint's range.
 * - An instruction breakpoint is a fault (the pushed RIP is the instruction, RF pushed as
 *   it was, 0); RF = 1 (set by an IRETQ) lets the instruction run once without it. Data
 *   and I/O breakpoints are traps (the pushed RIP is the next instruction).
 * - DR6: B0-B3 say which breakpoint matched ("may" be cleared by the processor on a
 *   #DB); BD (bit 13, general detect), BS (bit 14, single step) are never cleared by the
 *   processor ("the remaining contents of the DR6 register are never cleared"). One #DB
 *   reports a single step and a data breakpoint of the same instruction together.
 * - DR7.GD (bit 13): the next MOV to or from a debug register is a #DB fault with
 *   DR6.BD = 1; the processor clears GD when it enters the #DB handler.
 * - Vol. 3A "Masking Exceptions and Interrupts When Switching Stacks": a data breakpoint
 *   hit by MOV SS is held until the instruction after the MOV SS has executed.
 *
 * The handler prints DR6 and DR7 as it finds them; unless the test keeps them, it then
 * clears DR6 and, for an instruction breakpoint, sets RF in the pushed RFLAGS.
 */
    .include "idtlog.inc"
    IMAGE_NAME "debug_regs"

    .set DR6_INIT, 0xffff0ff0
    .set DR6_BD, 0x2000
    .set DR6_BS, 0x4000
    .set DR7_FIXED, 0x400
    .set DR7_GD, 0x2000
    .set RFLAGS_TF, 0x100
    .set CR4_DE, 0x8

    .text
image_main:
    call dr1_instruction_breakpoint_fault
    call dr0_write_breakpoint_trap
    call dr0_write_breakpoint_ignores_reads
    call dr2_read_write_breakpoint_on_a_read
    call dr3_two_byte_range_overlap
    call dr2_io_breakpoint_with_cr4_de
    call rf_from_iretq_suppresses_breakpoint
    call single_step_and_data_breakpoint_together
    call dr6_bs_is_sticky
    call dr7_gd_faults_the_next_mov_dr
    call mov_ss_delays_a_data_breakpoint
    ret

extra_dr:
    mov rax, dr6
    KV "dr6", rax
    mov rax, dr7
    KV "dr7", rax
    ret

/* db_hook: remember DR6 and the pushed RIP, clear DR6 (unless keep_dr6), set RF if the
 * #DB is an instruction breakpoint at the pushed RIP (so that it runs once), clear TF. */
db_hook:
    mov rax, dr6
    mov qword ptr [rip + dr6_seen], rax
    mov rax, qword ptr [rsi]
    mov qword ptr [rip + db_rip], rax
    cmp qword ptr [rip + keep_dr6], 0
    jne 1f
    mov eax, DR6_INIT
    mov dr6, rax
1:  btr qword ptr [rsi + 16], 8
    cmp qword ptr [rip + set_rf], 0
    je 2f
    bts qword ptr [rsi + 16], 16
2:  ret

    .macro DR_TEST name
    TEST_BEGIN "\name"
    ACTION 1, ACT_RETURN
    HOOK 1, db_hook
    EXTRA extra_dr
    call dr_clear
    mov qword ptr [rip + dr6_seen], 0
    mov qword ptr [rip + db_rip], 0
    mov qword ptr [rip + keep_dr6], 0
    mov qword ptr [rip + set_rf], 0
    mov qword ptr [rip + runs], 0
    SET_RESUME 1f
    .endm

dr_clear:
    xor eax, eax
    mov dr7, rax
    mov dr0, rax
    mov dr1, rax
    mov dr2, rax
    mov dr3, rax
    mov eax, DR6_INIT
    mov dr6, rax
    ret

/* DB_SEEN rip, dr6: exactly one #DB, at `rip`, with DR6 = `dr6`. */
    .macro DB_SEEN rip, dr6
    EXPECT_COUNT 1, 1, "expected exactly one db"
    EXPECT "qword ptr [rip + db_rip]", "\rip", "pushed rip is wrong for this kind of breakpoint"
    EXPECT "qword ptr [rip + dr6_seen]", "\dr6", "dr6 does not name the breakpoint"
    .endm

dr1_instruction_breakpoint_fault:
    DR_TEST "dr1_instruction_breakpoint_fault"
    mov qword ptr [rip + set_rf], 1
    lea rax, [rip + dr1_target]
    mov dr1, rax
    mov eax, DR7_FIXED | 0x4            /* L1, R/W1 = 00, LEN1 = 00 */
    mov dr7, rax
    FLAGS RFLAGS_FIXED
dr1_target:
    inc qword ptr [rip + runs]
    call dr_clear
1:  DB_SEEN "OFFSET dr1_target", "DR6_INIT | 0x2"
    EXPECT_EV EV_RFLAGS, RFLAGS_FIXED, "rf is set in the instruction breakpoint frame"
    EXPECT "qword ptr [rip + runs]", 1, "the instruction did not run once after iretq with rf"
    TEST_END
    ret

dr0_write_breakpoint_trap:
    DR_TEST "dr0_write_breakpoint_trap"
    lea rax, [rip + data]
    mov dr0, rax
    mov eax, DR7_FIXED | 0x1 | (0x1 << 16) | (0x2 << 18)    /* L0, write, 8 bytes */
    mov dr7, rax
    FLAGS RFLAGS_FIXED
    mov qword ptr [rip + data], rax
dr0_write_next:
    nop
    call dr_clear
1:  DB_SEEN "OFFSET dr0_write_next", "DR6_INIT | 0x1"
    TEST_END
    ret

dr0_write_breakpoint_ignores_reads:
    DR_TEST "dr0_write_breakpoint_ignores_reads"
    lea rax, [rip + data]
    mov dr0, rax
    mov eax, DR7_FIXED | 0x1 | (0x1 << 16) | (0x2 << 18)
    mov dr7, rax
    FLAGS RFLAGS_FIXED
    mov rax, qword ptr [rip + data]
    nop
    call dr_clear
1:  EXPECT_COUNT 1, 0, "a write breakpoint fired on a read"
    TEST_END
    ret

dr2_read_write_breakpoint_on_a_read:
    DR_TEST "dr2_read_write_breakpoint_on_a_read"
    lea rax, [rip + data + 8]
    mov dr2, rax
    mov eax, DR7_FIXED | 0x10 | (0x3 << 24) | (0x3 << 26)   /* L2, read/write, 4 bytes */
    mov dr7, rax
    FLAGS RFLAGS_FIXED
    mov eax, dword ptr [rip + data + 8]
dr2_read_next:
    nop
    call dr_clear
1:  DB_SEEN "OFFSET dr2_read_next", "DR6_INIT | 0x4"
    TEST_END
    ret

/* DR3 covers data+18..data+19; a 4-byte store at data+16 overlaps it, a 1-byte store at
 * data+20 does not. */
dr3_two_byte_range_overlap:
    DR_TEST "dr3_two_byte_range_overlap"
    lea rax, [rip + data + 18]
    mov dr3, rax
    mov eax, DR7_FIXED | 0x40 | (0x1 << 28) | (0x1 << 30)   /* L3, write, 2 bytes */
    mov dr7, rax
    FLAGS RFLAGS_FIXED
    mov byte ptr [rip + data + 20], al
    mov dword ptr [rip + data + 16], eax
dr3_next:
    nop
    call dr_clear
1:  DB_SEEN "OFFSET dr3_next", "DR6_INIT | 0x8"
    TEST_END
    ret

dr2_io_breakpoint_with_cr4_de:
    DR_TEST "dr2_io_breakpoint_with_cr4_de"
    mov rax, cr4
    or rax, CR4_DE
    mov cr4, rax
    mov eax, 0x80
    mov dr2, rax
    mov eax, DR7_FIXED | 0x10 | (0x2 << 24)                 /* L2, I/O, 1 byte */
    mov dr7, rax
    xor eax, eax
    FLAGS RFLAGS_FIXED
    out 0x80, al
dr2_io_next:
    nop
    call dr_clear
    mov rax, cr4
    and rax, ~CR4_DE
    mov cr4, rax
1:  DB_SEEN "OFFSET dr2_io_next", "DR6_INIT | 0x4"
    TEST_END
    ret

/* IRETQ to an instruction breakpoint with RF = 1 in the popped RFLAGS: no #DB. */
rf_from_iretq_suppresses_breakpoint:
    DR_TEST "rf_from_iretq_suppresses_breakpoint"
    lea rax, [rip + rf_target]
    mov dr0, rax
    mov eax, DR7_FIXED | 0x1
    mov dr7, rax
    mov rax, rsp
    push KDATA
    push rax
    push RFLAGS_FIXED | RFLAGS_RF
    push KCODE
    lea rax, [rip + rf_target]
    push rax
    iretq
rf_target:
    inc qword ptr [rip + runs]
    call dr_clear
1:  EXPECT_COUNT 1, 0, "rf = 1 did not suppress the instruction breakpoint"
    EXPECT "qword ptr [rip + runs]", 1, "the instruction did not run once"
    TEST_END
    ret

/* TF = 1 and a write breakpoint on the same instruction: one #DB with B0 and BS. */
single_step_and_data_breakpoint_together:
    DR_TEST "single_step_and_data_breakpoint_together"
    lea rax, [rip + data]
    mov dr0, rax
    mov eax, DR7_FIXED | 0x1 | (0x1 << 16) | (0x2 << 18)
    mov dr7, rax
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    mov qword ptr [rip + data], rax
both_next:
    nop
    call dr_clear
1:  DB_SEEN "OFFSET both_next", "DR6_INIT | DR6_BS | 0x1"
    TEST_END
    ret

/* A single-step #DB, DR6 left as it is, then an instruction breakpoint: BS is still set
 * (never cleared by the processor), B1 is added. */
dr6_bs_is_sticky:
    DR_TEST "dr6_bs_is_sticky"
    mov qword ptr [rip + keep_dr6], 1
    mov qword ptr [rip + set_rf], 1
    lea rax, [rip + sticky_target]
    mov dr1, rax
    mov eax, DR7_FIXED | 0x4
    mov dr7, rax
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    nop                                 /* single-step #DB here: BS */
    nop
sticky_target:                          /* instruction breakpoint #DB here: B1 (+ BS) */
    nop
    call dr_clear
1:  EXPECT_COUNT 1, 2, "expected two db"
    EXPECT "qword ptr [rip + db_rip]", "OFFSET sticky_target", "the second db is not at the breakpoint"
    EXPECT "qword ptr [rip + dr6_seen]", "DR6_INIT | DR6_BS | 0x2", "dr6.bs was cleared by the second db"
    TEST_END
    ret

dr7_gd_faults_the_next_mov_dr:
    DR_TEST "dr7_gd_faults_the_next_mov_dr"
    ACTION 1, ACT_RESUME
    mov eax, DR7_FIXED | DR7_GD
    mov dr7, rax
    FLAGS RFLAGS_FIXED
gd_insn:
    mov rax, dr0
    FAIL "mov from dr0 with dr7.gd = 1 did not fault"
1:  call dr_clear
    EXPECT_COUNT 1, 1, "expected exactly one db"
    EXPECT "qword ptr [rip + db_rip]", "OFFSET gd_insn", "pushed rip is not the mov dr"
    EXPECT "qword ptr [rip + dr6_seen]", "DR6_INIT | DR6_BD", "dr6.bd is not set"
    TEST_END
    ret

/* MOV SS reads a word under a read/write breakpoint: the #DB comes after the next
 * instruction, not after the MOV SS. */
mov_ss_delays_a_data_breakpoint:
    DR_TEST "mov_ss_delays_a_data_breakpoint"
    mov word ptr [rip + ss_sel], KDATA
    lea rax, [rip + ss_sel]
    mov dr0, rax
    mov eax, DR7_FIXED | 0x1 | (0x3 << 16) | (0x1 << 18)    /* L0, read/write, 2 bytes */
    mov dr7, rax
    FLAGS RFLAGS_FIXED
    mov ss, word ptr [rip + ss_sel]
    nop
mov_ss_next2:
    nop
    call dr_clear
1:  DB_SEEN "OFFSET mov_ss_next2", "DR6_INIT | 0x1"
    TEST_END
    ret

    .data
    .balign 16
data:           .fill 32, 1, 0
ss_sel:         .word 0
    .balign 8
dr6_seen:       .quad 0
db_rip:         .quad 0
keep_dr6:       .quad 0
set_rf:         .quad 0
runs:           .quad 0
