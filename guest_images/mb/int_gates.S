/* int_gates: INT n from CPL3 through a DPL3 gate and through a DPL0 gate.
 *
 * SDM Vol. 3A, "Interrupt and Exception Handling": for a software interrupt the
 * processor checks the gate's DPL against the CPL; DPL < CPL gives #GP with the error
 * code in selector format naming the IDT entry: (vector << 3) | IDT (bit 1), EXT = 0
 * for INT n ("Error Code"). A permitted INT n from CPL3 to a CPL0 handler switches to
 * TSS.RSP0 (aligned down to 16), loads SS with a NULL selector (RPL = new CPL = 0), and
 * pushes the user SS:RSP, RFLAGS, CS:RIP ("64-Bit Mode Stack Frame"; "Stack Switching in
 * IA-32e Mode"). INT n is a trap-like software interrupt: the pushed RIP is the next
 * instruction; the #GP is a fault: the pushed RIP is the INT instruction.
 */
    .include "idtlog.inc"
    IMAGE_NAME "int_gates"

    .set VEC_DPL3, 0x80
    .set VEC_DPL0, 0x81
    .set VEC_BACK, 0x8f                 /* DPL3 gate: back to CPL0, not logged */

    .text
image_main:
    call int_dpl3_gate_from_cpl3
    call int_dpl0_gate_from_cpl3
    ret

/* extra: the SS selector the handler runs with. */
extra_ss_now:
    xor eax, eax
    mov ax, ss
    KV "ss_now", rax
    ret

hook_save_ss:
    xor eax, eax
    mov ax, ss
    mov qword ptr [rip + handler_ss], rax
    ret

int_dpl3_gate_from_cpl3:
    TEST_BEGIN "int_dpl3_gate_from_cpl3"
    GATE VEC_DPL3, 0, 3
    GATE VEC_BACK, 0, 3
    ACTION VEC_DPL3, ACT_RETURN
    ACTION VEC_BACK, ACT_RESUME_QUIET
    HOOK VEC_DPL3, hook_save_ss
    EXTRA extra_ss_now
    mov qword ptr [rip + handler_ss], -1
    SET_RESUME 1f
    lea rdi, [rip + user_int_dpl3]
    lea rsi, [rip + user_stack_top]
    call enter_user
1:  EXPECT_COUNT VEC_DPL3, 1, "expected exactly one int 0x80"
    EXPECT_COUNT 13, 0, "unexpected gp"
    lea rbx, [rip + rsp0_stack_top - 40]
    EXPECT_EV EV_RSP, rbx, "handler rsp is not rsp0 minus 40"
    EXPECT_EV EV_RIP, "OFFSET user_int_dpl3_next", "pushed rip is not the instruction after int"
    EXPECT_EV EV_CS, UCODE, "pushed cs is not the user code selector"
    EXPECT_EV EV_RFLAGS, RFLAGS_FIXED, "pushed rflags differ from the user rflags"
    EXPECT_EV EV_SP, "OFFSET user_stack_top", "pushed rsp is not the user rsp"
    EXPECT_EV EV_SS, UDATA, "pushed ss is not the user data selector"
    EXPECT "qword ptr [rip + handler_ss]", 0, "handler ss is not the null selector"
    TEST_END
    ret

int_dpl0_gate_from_cpl3:
    TEST_BEGIN "int_dpl0_gate_from_cpl3"
    GATE VEC_DPL0, 0, 0
    GATE VEC_BACK, 0, 3
    ACTION VEC_DPL0, ACT_RETURN
    ACTION VEC_BACK, ACT_RESUME_QUIET
    SET_RESUME 1f
    lea rdi, [rip + user_int_dpl0]
    lea rsi, [rip + user_stack_top]
    call enter_user
1:  EXPECT_COUNT VEC_DPL0, 0, "int 0x81 reached its dpl0 gate from cpl3"
    EXPECT_COUNT 13, 1, "expected exactly one gp"
    EXPECT_EV EV_ERR, "(VEC_DPL0 << 3) | 2", "gp error code is not (vector << 3) | 2"
    lea rbx, [rip + rsp0_stack_top - 48]
    EXPECT_EV EV_RSP, rbx, "handler rsp is not rsp0 minus 48"
    EXPECT_EV EV_RIP, "OFFSET user_int_dpl0", "pushed rip is not the int instruction"
    EXPECT_EV EV_CS, UCODE, "pushed cs is not the user code selector"
    EXPECT_RFLAGS_NO_RF RFLAGS_FIXED, "pushed rflags differ from the user rflags"
    EXPECT_EV EV_SP, "OFFSET user_stack_top", "pushed rsp is not the user rsp"
    EXPECT_EV EV_SS, UDATA, "pushed ss is not the user data selector"
    TEST_END
    ret

user_int_dpl3:                          /* runs at CPL3 */
    int VEC_DPL3
user_int_dpl3_next:
    int VEC_BACK

user_int_dpl0:                          /* runs at CPL3 */
    int VEC_DPL0
    int VEC_BACK

    .data
    .balign 8
handler_ss: .quad 0
