/* shadow_chain: interrupt shadows of consecutive shadow-opening instructions (STI, MOV SS).
 *
 * SDM Vol. 2 STI: "If IF = 0, maskable hardware interrupts remain inhibited on the
 * instruction boundary following an execution of STI." "The STI instruction delays
 * recognition of interrupts only if it is executed with EFLAGS.IF = 0. In a sequence of
 * instructions that individually delay interrupts past the following instruction, only
 * the first instruction in the sequence is guaranteed to delay the interrupt, but
 * subsequent interrupt-delaying instructions may not delay the interrupt. Thus, in the
 * following instruction sequence: STI; MOV SS, AX; MOV ESP, EBP; interrupts may be
 * recognized before MOV ESP, EBP executes, even though MOV SS, AX normally delays
 * interrupts for one instruction." Vol. 3A "Masking Exceptions and Interrupts When
 * Switching Stacks": MOV SS inhibits interrupts, debug exceptions and single-step traps
 * until the boundary after the next instruction; "If a sequence of consecutive
 * instructions each loads the SS register (using MOV or POP), only the first is
 * guaranteed to inhibit or suppress events in this way."
 *
 * So the SDM allows both outcomes for the second instruction of a chain, and each test's
 * verdict accepts both (the event record shows which one happened): the fixed interrupt
 * (a self-IPI pending while IF = 0) is taken at X (the second instruction did not delay
 * it) or at Y (it did) in `STI; MOV SS; X; Y` and `MOV SS; STI; X; Y`. Not allowed: before
 * X or after Y. `STI; STI; X` is decided (the second STI runs with IF = 1: no shadow):
 * the interrupt comes at X. Single-step: `MOV SS; MOV SS; X` traps at X or at Y (only the
 * first MOV SS is guaranteed); `MOV SS; STI; X`: STI does not hold debug traps, so the
 * trap suppressed after the MOV SS is followed by the one after the STI, at X.
 * idtlab's decision (docs/sdm-map.md, "Chained shadows") is what Bochs and KVM's
 * instruction emulator do: each instruction's own rule applies, except that a MOV SS
 * inside a MOV-SS shadow (and an STI with IF = 1) opens none.
 */
    .include "idtlog.inc"
    IMAGE_NAME "shadow_chain"

    .set VEC_IPI, 0x40
    .set RFLAGS_TF, 0x100

    .text
image_main:
    call ipi_mov_ss_after_sti
    call ipi_sti_after_mov_ss
    call ipi_sti_after_sti
    call tf_mov_ss_after_mov_ss
    call tf_sti_after_mov_ss
    ret

eoi_hook:
    jmp apic_eoi

db_hook:
    xor eax, eax
    mov dr6, rax
    btr qword ptr [rsi + 16], 8         /* TF in the pushed RFLAGS: one #DB per test */
    ret

/* pend_ipi: vector 0x40 pending in the IRR with IF = 0 (see nmi_apic.S ipi_sti_shadow). */
pend_ipi:
    FLAGS RFLAGS_FIXED
    mov edi, ICR_FIXED | VEC_IPI
    call apic_send_self
    mov esi, APIC_BASE
    mov ecx, 1000000
1:  mov eax, dword ptr [rsi + APIC_IRR + (VEC_IPI / 32) * 0x10]
    test eax, 1 << (VEC_IPI % 32)
    jnz 2f
    pause
    dec ecx
    jnz 1b
    FAIL "the ipi never became pending in the irr"
2:  ret

    .macro IPI_TEST name
    TEST_BEGIN "\name"
    ACTION VEC_IPI, ACT_RETURN
    HOOK VEC_IPI, eoi_hook
    SET_RESUME 1f
    call pend_ipi
    mov eax, KDATA
    .endm

/* TAKEN_AT_X_OR_Y x, y: one interrupt, at x or at y. */
    .macro TAKEN_AT_X_OR_Y x, y
    EXPECT_COUNT VEC_IPI, 1, "expected exactly one interrupt"
    mov rcx, qword ptr [rip + last_ev + EV_RIP]
    lea rax, [rip + \x]
    cmp rcx, rax
    je 3f
    lea rax, [rip + \y]
    cmp rcx, rax
    je 3f
    FAIL "the interrupt was taken neither after the first nor after the second shadow"
3:
    .endm

ipi_mov_ss_after_sti:
    IPI_TEST "ipi_mov_ss_after_sti"
    sti
    mov ss, ax
chain1_x:
    nop
chain1_y:
    nop
    cli
1:  TAKEN_AT_X_OR_Y chain1_x, chain1_y
    TEST_END
    ret

ipi_sti_after_mov_ss:
    IPI_TEST "ipi_sti_after_mov_ss"
    mov ss, ax
    sti
chain2_x:
    nop
chain2_y:
    nop
    cli
1:  TAKEN_AT_X_OR_Y chain2_x, chain2_y
    TEST_END
    ret

ipi_sti_after_sti:
    IPI_TEST "ipi_sti_after_sti"
    sti
    sti
chain3_x:
    nop
    nop
    cli
1:  EXPECT_COUNT VEC_IPI, 1, "expected exactly one interrupt"
    EXPECT_EV EV_RIP, "OFFSET chain3_x", "an sti with if = 1 delayed the interrupt"
    TEST_END
    ret

    .macro TF_TEST name
    TEST_BEGIN "\name"
    ACTION 1, ACT_RETURN
    HOOK 1, db_hook
    SET_RESUME 1f
    xor eax, eax
    mov dr6, rax
    mov eax, KDATA
    .endm

tf_mov_ss_after_mov_ss:
    TF_TEST "tf_mov_ss_after_mov_ss"
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    mov ss, ax
    mov ss, ax
chain4_x:
    nop
chain4_y:
    nop
1:  EXPECT_COUNT 1, 1, "expected exactly one db"
    mov rcx, qword ptr [rip + last_ev + EV_RIP]
    lea rax, [rip + chain4_x]
    cmp rcx, rax
    je 3f
    lea rax, [rip + chain4_y]
    cmp rcx, rax
    je 3f
    FAIL "the single-step trap was taken neither after the first nor after the second mov ss"
3:  TEST_END
    ret

tf_sti_after_mov_ss:
    TF_TEST "tf_sti_after_mov_ss"
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    mov ss, ax
    sti
chain5_x:
    cli
    nop
1:  FLAGS RFLAGS_FIXED
    EXPECT_COUNT 1, 1, "expected exactly one db"
    EXPECT_EV EV_RIP, "OFFSET chain5_x", "the single-step trap after sti was held"
    TEST_END
    ret
