/* nmi_apic: NMI blocking and the STI shadow, with NMIs and interrupts sent to ourselves
 * through the local APIC's ICR (delivery mode NMI or fixed, destination = our own APIC
 * ID, no shorthand: the SDM lists NMI with the "self" shorthand as invalid).
 *
 * SDM Vol. 3A, "Interrupt and Exception Handling", "Handling Multiple NMIs": while an NMI
 * handler runs, NMIs are blocked until the next IRET; one further NMI is latched and is
 * delivered right after that IRET, before the instruction it returns to. The IRET that
 * unblocks may be any IRET, e.g. that of a #BP handler running inside the NMI handler,
 * so an NMI latched there nests inside the NMI handler. STI's entry (Vol. 2B): with
 * IF = 0 before STI, maskable interrupts are recognised only after the instruction that
 * follows STI (the STI shadow).
 *
 * The first NMI of each test is sent just before a `jmp .` loop, so it is taken with
 * the loop as the pushed RIP whatever the implementation's delivery latency; the
 * handler then returns past the loop (ACT_SKIP_SPIN). The NMI gate uses no IST.
 */
    .include "idtlog.inc"
    IMAGE_NAME "nmi_apic"

    .text
image_main:
    call nmi_latched_until_iret
    call nmi_nested_after_bp_iret
    call ipi_sti_shadow
    ret

/* SEND_NMI_AND_SPIN label: NMI ourselves, then wait in `label: jmp label`. */
    .macro SEND_NMI_AND_SPIN spin
    mov esi, APIC_BASE
    mov rax, qword ptr [rip + apic_id]
    shl eax, 24
    mov dword ptr [rsi + APIC_ICR_HI], eax
    FLAGS RFLAGS_FIXED
    mov dword ptr [rsi + APIC_ICR_LO], ICR_NMI
\spin:
    jmp \spin
    .endm

extra_depth:
    KV "depth", "qword ptr [rip + depth]"
    ret

/* ---- an NMI sent from the NMI handler is latched and taken right after its IRETQ */

nmi_latched_until_iret:
    TEST_BEGIN "nmi_latched_until_iret"
    ACTION 2, ACT_SKIP_SPIN
    HOOK 2, latch_nmi_hook
    EXTRA extra_depth
    mov qword ptr [rip + nmi_seen], 0
    mov qword ptr [rip + nmi1_rip], 0
    mov qword ptr [rip + nmi2_rip], 0
    mov qword ptr [rip + nmi2_depth], 0
    SET_RESUME 1f
    SEND_NMI_AND_SPIN latch_spin
latch_after_spin:
1:  CHECK "latched_rip", "qword ptr [rip + nmi2_rip]"
    CHECK "latched_depth", "qword ptr [rip + nmi2_depth]"
    EXPECT_COUNT 2, 2, "expected two nmis"
    EXPECT "qword ptr [rip + nmi1_rip]", "OFFSET latch_spin", "the first nmi did not arrive in the spin loop"
    EXPECT "qword ptr [rip + nmi2_rip]", "OFFSET latch_after_spin", "the latched nmi did not arrive right after iret"
    EXPECT "qword ptr [rip + nmi2_depth]", 1, "the latched nmi nested inside the nmi handler"
    TEST_END
    ret

latch_nmi_hook:
    inc qword ptr [rip + nmi_seen]
    cmp qword ptr [rip + nmi_seen], 1
    jne 1f
    mov rax, qword ptr [rsi]
    mov qword ptr [rip + nmi1_rip], rax
    mov edi, ICR_NMI                    /* NMIs are blocked here: this one is latched */
    jmp apic_send_self
1:  mov rax, qword ptr [rsi]
    mov qword ptr [rip + nmi2_rip], rax
    mov rax, qword ptr [rip + depth]
    mov qword ptr [rip + nmi2_depth], rax
    ret

/* ---- an NMI latched while a #BP handler runs inside the NMI handler is taken right
        after the #BP handler's IRETQ, nested inside the NMI handler */

nmi_nested_after_bp_iret:
    TEST_BEGIN "nmi_nested_after_bp_iret"
    ACTION 2, ACT_SKIP_SPIN
    ACTION 3, ACT_RETURN
    HOOK 2, nest_nmi_hook
    HOOK 3, nest_bp_hook
    EXTRA extra_depth
    mov qword ptr [rip + nmi_seen], 0
    mov qword ptr [rip + nmi1_rip], 0
    mov qword ptr [rip + nmi2_rip], 0
    mov qword ptr [rip + nmi2_depth], 0
    SET_RESUME 1f
    SEND_NMI_AND_SPIN nest_spin
1:  CHECK "nested_rip", "qword ptr [rip + nmi2_rip]"
    CHECK "nested_depth", "qword ptr [rip + nmi2_depth]"
    EXPECT_COUNT 2, 2, "expected two nmis"
    EXPECT_COUNT 3, 1, "expected one bp"
    EXPECT "qword ptr [rip + nmi2_rip]", "OFFSET nest_after_int3", "the second nmi did not arrive right after the bp handler iret"
    EXPECT "qword ptr [rip + nmi2_depth]", 2, "the second nmi did not nest inside the nmi handler"
    TEST_END
    ret

nest_nmi_hook:
    inc qword ptr [rip + nmi_seen]
    cmp qword ptr [rip + nmi_seen], 1
    jne 1f
    FLAGS RFLAGS_FIXED
    int3
nest_after_int3:
    ret
1:  mov rax, qword ptr [rsi]
    mov qword ptr [rip + nmi2_rip], rax
    mov rax, qword ptr [rip + depth]
    mov qword ptr [rip + nmi2_depth], rax
    ret

nest_bp_hook:
    mov edi, ICR_NMI                    /* still inside the NMI handler: latched */
    jmp apic_send_self

/* ---- a fixed interrupt pending while IF = 0 is taken after the instruction after STI */

ipi_sti_shadow:
    TEST_BEGIN "ipi_sti_shadow"
    ACTION 0x40, ACT_RETURN
    HOOK 0x40, eoi_hook
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
    mov edi, ICR_FIXED | 0x40
    call apic_send_self
    mov esi, APIC_BASE                  /* wait until vector 0x40 is pending in the IRR */
    mov ecx, 1000000
2:  mov eax, dword ptr [rsi + APIC_IRR + (0x40 / 32) * 0x10]
    test eax, 1 << (0x40 % 32)
    jnz 3f
    pause
    dec ecx
    jnz 2b
    FAIL "the ipi never became pending in the irr"
3:  mov eax, dword ptr [rsi + APIC_IRR + (0x40 / 32) * 0x10]
    and eax, 1 << (0x40 % 32)
    CHECK "irr_before_sti", rax
    FLAGS RFLAGS_FIXED
    sti
    nop
ipi_after_shadow:
    nop
    cli
1:  EXPECT_COUNT 0x40, 1, "expected exactly one interrupt 0x40"
    EXPECT_EV EV_RIP, "OFFSET ipi_after_shadow", "the interrupt was not taken after the instruction after sti"
    EXPECT_EV EV_RFLAGS, "RFLAGS_FIXED | RFLAGS_IF", "pushed rflags do not have if set"
    TEST_END
    ret

eoi_hook:
    jmp apic_eoi

    .data
    .balign 8
nmi_seen:   .quad 0
nmi1_rip:   .quad 0
nmi2_rip:   .quad 0
nmi2_depth: .quad 0
