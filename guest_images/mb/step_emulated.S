/* step_emulated: single-step (RFLAGS.TF) traps after every instruction, including the
 * ones an emulator or hypervisor typically emulates: IRETQ, HLT, RDMSR, WRMSR, CPUID,
 * IN/OUT, a local APIC register access; and not after a MOV SS.
 *
 * SDM Vol. 3B, "Single-Step Exception Condition": "The processor generates a
 * single-step debug exception if (while an instruction is being executed) it detects
 * that the TF flag in the EFLAGS register is set. The exception is a trap-class
 * exception, because the exception is generated after the instruction is executed."
 * DR6.BS (bit 14) says so. TF is the value *when the instruction starts*: an IRETQ
 * executed with TF = 1 traps after it (at the IRETQ's target, with the popped RFLAGS),
 * an IRETQ that loads TF = 1 does not (the trap follows the next instruction). HLT
 * (Vol. 2 HLT; the trap follows the instruction, delivered when the processor resumes):
 * the #DB is taken after the wake-up, at the instruction after the HLT, before the
 * interrupt that woke it (Vol. 3A "Priority Among Concurrent Events": traps on the
 * previous instruction come before external interrupts). MOV SS (Vol. 3A "Masking
 * Exceptions and Interrupts When Switching Stacks"): the single-step trap after it is
 * suppressed; the next instruction's trap is taken, with BS set.
 *
 * Every #DB handler prints DR6, then clears DR6 and TF in the pushed RFLAGS, so each
 * test sees one #DB.
 */
    .include "idtlog.inc"
    IMAGE_NAME "step_emulated"

    .set RFLAGS_TF, 0x100
    .set DR6_INIT, 0xffff0ff0
    .set DR6_BS, 0x4000
    .set VEC_TIMER, 0x41
    .set APIC_VERSION, 0x30
    .set APIC_LVT_TIMER, 0x320
    .set APIC_TIMER_INIT, 0x380
    .set APIC_TIMER_DIV, 0x3e0
    .set MSR_APIC_BASE, 0x1b
    .set MSR_KERNEL_GS_BASE, 0xc0000102

    .text
image_main:
    call tf_over_iretq
    call tf_loaded_by_iretq
    call tf_over_rdmsr
    call tf_over_wrmsr
    call tf_over_cpuid
    call tf_over_out
    call tf_over_in
    call tf_over_apic_read
    call tf_over_hlt_wake
    call tf_over_mov_ss
    ret

extra_dr6:
    mov rax, dr6
    KV "dr6", rax
    ret

db_hook:
    mov rax, dr6
    mov qword ptr [rip + dr6_seen], rax
    xor eax, eax
    mov dr6, rax
    btr qword ptr [rsi + 16], 8         /* TF in the pushed RFLAGS: one #DB per test */
    ret

    .macro DB_TEST name
    TEST_BEGIN "\name"
    ACTION 1, ACT_RETURN
    HOOK 1, db_hook
    EXTRA extra_dr6
    xor eax, eax
    mov dr6, rax
    mov qword ptr [rip + dr6_seen], 0
    SET_RESUME 1f
    .endm

/* DB_AFTER label: exactly one #DB, a single-step trap whose pushed RIP is `label`. */
    .macro DB_AFTER rip
    EXPECT_COUNT 1, 1, "expected exactly one db"
    EXPECT_EV EV_RIP, "\rip", "the single-step trap is not right after the instruction"
    EXPECT "qword ptr [rip + dr6_seen]", "DR6_INIT | DR6_BS", "dr6 is not bs alone"
    .endm

tf_over_iretq:
    DB_TEST "tf_over_iretq"
    mov rax, rsp
    push KDATA
    push rax
    push RFLAGS_FIXED                   /* the popped RFLAGS: TF = 0 */
    push KCODE
    lea rax, [rip + iretq_target]
    push rax
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    iretq
iretq_target:
    nop
iretq_target_next:
    nop
1:  DB_AFTER "OFFSET iretq_target"
    EXPECT_EV EV_RFLAGS, RFLAGS_FIXED, "pushed rflags are not the popped image"
    TEST_END
    ret

tf_loaded_by_iretq:
    DB_TEST "tf_loaded_by_iretq"
    mov rax, rsp
    push KDATA
    push rax
    push RFLAGS_FIXED | RFLAGS_TF       /* the popped RFLAGS: TF = 1 */
    push KCODE
    lea rax, [rip + loaded_target]
    push rax
    FLAGS RFLAGS_FIXED
    iretq
loaded_target:
    nop
loaded_target_next:
    nop
1:  DB_AFTER "OFFSET loaded_target_next"
    TEST_END
    ret

tf_over_rdmsr:
    DB_TEST "tf_over_rdmsr"
    mov ecx, MSR_APIC_BASE
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    rdmsr
rdmsr_next:
    nop
1:  DB_AFTER "OFFSET rdmsr_next"
    TEST_END
    ret

tf_over_wrmsr:
    DB_TEST "tf_over_wrmsr"
    mov ecx, MSR_KERNEL_GS_BASE
    rdmsr
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    wrmsr
wrmsr_next:
    nop
1:  DB_AFTER "OFFSET wrmsr_next"
    TEST_END
    ret

tf_over_cpuid:
    DB_TEST "tf_over_cpuid"
    mov eax, 1
    xor ecx, ecx
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    cpuid
cpuid_next:
    nop
1:  DB_AFTER "OFFSET cpuid_next"
    TEST_END
    ret

tf_over_out:
    DB_TEST "tf_over_out"
    xor eax, eax
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    out 0x80, al                        /* the POST-code port: no device here */
out_next:
    nop
1:  DB_AFTER "OFFSET out_next"
    TEST_END
    ret

tf_over_in:
    DB_TEST "tf_over_in"
    mov dx, 0x3fd                       /* the UART's line-status register */
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    in al, dx
in_next:
    nop
1:  DB_AFTER "OFFSET in_next"
    TEST_END
    ret

tf_over_apic_read:
    DB_TEST "tf_over_apic_read"
    mov esi, APIC_BASE
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    mov eax, dword ptr [rsi + APIC_VERSION]
apic_next:
    nop
1:  DB_AFTER "OFFSET apic_next"
    TEST_END
    ret

/* HLT with TF = 1 and IF = 1, woken by the local APIC timer (one-shot, vector 0x41): the
 * #DB (after the HLT) comes first, then the timer interrupt, at the same RIP. */
tf_over_hlt_wake:
    DB_TEST "tf_over_hlt_wake"
    HOOK 1, db_hook_hlt
    mov qword ptr [rip + first_vector], 0
    mov qword ptr [rip + db_rip], 0
    ACTION VEC_TIMER, ACT_RETURN
    HOOK VEC_TIMER, eoi_hook
    mov esi, APIC_BASE
    mov dword ptr [rsi + APIC_TIMER_DIV], 0xb          /* divide by 1 */
    mov dword ptr [rsi + APIC_LVT_TIMER], VEC_TIMER    /* one-shot, not masked */
    mov dword ptr [rsi + APIC_TIMER_INIT], 0x40000
    FLAGS RFLAGS_FIXED | RFLAGS_TF | RFLAGS_IF
hlt_insn:
    hlt
hlt_next:
    nop
    cli
    mov esi, APIC_BASE
    mov dword ptr [rsi + APIC_LVT_TIMER], 0x10000      /* masked */
1:  CHECK "first_vector", "qword ptr [rip + first_vector]"
    EXPECT "qword ptr [rip + first_vector]", 1, "the timer interrupt came before the hlt's single-step trap"
    EXPECT_COUNT VEC_TIMER, 1, "expected exactly one timer interrupt"
    EXPECT_COUNT 1, 1, "expected exactly one db"
    EXPECT "qword ptr [rip + dr6_seen]", "DR6_INIT | DR6_BS", "dr6 is not bs alone"
    EXPECT "qword ptr [rip + db_rip]", "OFFSET hlt_next", "the single-step trap is not right after the hlt"
    EXPECT_EV EV_RIP, "OFFSET hlt_next", "the timer interrupt is not at the instruction after the hlt"
    TEST_END
    ret

/* A timer that expires before the HLT would leave it waiting forever: return past it. */
eoi_hook:
    lea rax, [rip + hlt_insn]
    cmp qword ptr [rsi], rax
    jne 2f
    inc qword ptr [rsi]
2:  cmp qword ptr [rip + first_vector], 0
    jne 1f
    mov qword ptr [rip + first_vector], rdi
1:  jmp apic_eoi

db_hook_hlt:
    cmp qword ptr [rip + first_vector], 0
    jne 1f
    mov qword ptr [rip + first_vector], rdi
1:  mov rax, qword ptr [rsi]
    mov qword ptr [rip + db_rip], rax
    jmp db_hook

/* MOV SS with TF = 1: no trap after it; the trap after the next instruction. */
tf_over_mov_ss:
    DB_TEST "tf_over_mov_ss"
    mov eax, KDATA
    FLAGS RFLAGS_FIXED | RFLAGS_TF
    mov ss, ax
    nop
mov_ss_next2:
    nop
1:  DB_AFTER "OFFSET mov_ss_next2"
    TEST_END
    ret

    .data
    .balign 8
dr6_seen:       .quad 0
first_vector:   .quad 0
db_rip:         .quad 0
