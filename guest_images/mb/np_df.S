/* np_df: faults during event delivery: #NP for a not-present gate, #DF for a #PF while
 * delivering a #PF.
 *
 * SDM Vol. 3A, "Interrupt and Exception Handling":
 * - a gate with P = 0 gives #NP with the selector-format error code naming the IDT entry:
 *   (vector << 3) | IDT (bit 1) | EXT (bit 0); EXT is set when the event being delivered
 *   was external to the program: an earlier exception (here #UD) sets it, INT n does not
 *   ("Error Code"; "Interrupt 11—Segment Not Present"). #NP is a fault: the pushed RIP
 *   is the instruction that caused the delivery.
 * - a #PF raised while the processor delivers a #PF (here: its IST stack is not present)
 *   is a double fault ("Interrupt 8—Double Fault Exception", the page-fault/page-fault
 *   row of the #DF conditions table): #DF is delivered with error code 0; the saved
 *   CS:RIP is undefined, so only the handler's stack and the error code are checked.
 *   CR2 holds the address of the second fault, somewhere in the not-present stack page.
 */
    .include "idtlog.inc"
    IMAGE_NAME "np_df"

    .set VEC_NP_GATE, 0x50

    .text
image_main:
    call np_int_through_not_present_gate
    call np_exception_through_not_present_gate
    call df_pf_while_delivering_pf
    ret

np_int_through_not_present_gate:
    TEST_BEGIN "np_int_through_not_present_gate"
    mov edi, VEC_NP_GATE
    call gate_not_present
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
np_int_insn:
    int VEC_NP_GATE
1:  EXPECT_COUNT VEC_NP_GATE, 0, "int 0x50 reached a not-present gate"
    EXPECT_COUNT 11, 1, "expected exactly one np"
    EXPECT_EV EV_ERR, "(VEC_NP_GATE << 3) | 2", "np error code is not (vector << 3) | 2"
    EXPECT_EV EV_RIP, "OFFSET np_int_insn", "pushed rip is not the int instruction"
    EXPECT_EV EV_CS, KCODE, "pushed cs is not the kernel code selector"
    EXPECT_RFLAGS_NO_RF RFLAGS_FIXED, "pushed rflags differ from the interrupted rflags"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "pushed rsp is not the interrupted rsp"
    TEST_END
    ret

np_exception_through_not_present_gate:
    TEST_BEGIN "np_exception_through_not_present_gate"
    mov edi, 6
    call gate_not_present
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
np_ud_insn:
    ud2
1:  EXPECT_COUNT 6, 0, "ud reached a not-present gate"
    EXPECT_COUNT 11, 1, "expected exactly one np"
    EXPECT_EV EV_ERR, "(6 << 3) | 2 | 1", "np error code is not (6 << 3) | 2 | ext"
    EXPECT_EV EV_RIP, "OFFSET np_ud_insn", "pushed rip is not the ud2 instruction"
    EXPECT_EV EV_CS, KCODE, "pushed cs is not the kernel code selector"
    EXPECT_RFLAGS_NO_RF RFLAGS_FIXED, "pushed rflags differ from the interrupted rflags"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "pushed rsp is not the interrupted rsp"
    TEST_END
    ret

extra_cr2:
    mov rax, cr2
    KV "cr2", rax
    ret

df_pf_while_delivering_pf:
    TEST_BEGIN "df_pf_while_delivering_pf"
    GATE 14, 2, 0
    GATE 8, 3, 0
    mov eax, PAGE_IST_NP + 0x1000
    mov qword ptr [rip + tss + TSS_IST2], rax
    EXTRA extra_cr2
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
    mov rax, qword ptr [PAGE_NP + 0x123]
1:  EXPECT_COUNT 14, 0, "a pf was delivered"
    EXPECT_COUNT 8, 1, "expected exactly one df"
    EXPECT_EV EV_ERR, 0, "df error code is not 0"
    lea rbx, [rip + ist3_stack_top - 48]
    EXPECT_EV EV_RSP, rbx, "df handler rsp is not ist3 minus 48"
    mov rcx, qword ptr [rip + last_ev + EV_CR2]
    shr rcx, 12
    EXPECT rcx, "PAGE_IST_NP >> 12", "cr2 is not in the not-present stack page"
    TEST_END
    ret

    .data
    .balign 8
saved_rsp:  .quad 0
