/* canon_branch: branches to non-canonical targets fault on the branch; accesses that
 * straddle the canonical boundary are #GP/#SS, never #PF.
 *
 * SDM Vol. 2 JMP, CALL, RET, Jcc, LOOP ("64-Bit Mode Exceptions: #GP(0) If the target
 * offset is non-canonical" / "If the return instruction pointer is non-canonical"):
 * the check is part of the branch, so the branch faults and, as for every fault (Vol. 3A
 * "Exception Classifications": "the state of the processor ... as it was before the
 * faulting instruction"), the pushed RIP is the branch itself, a CALL has not pushed
 * (the RSP in the frame is the RSP before the CALL), a RET has not popped, a LOOP has not
 * decremented RCX.
 *
 * SDM Vol. 1 "Canonical Addressing" / Vol. 3A "Interrupt 13" and "Interrupt 12": a
 * linear address that is not canonical is #GP(0), or #SS(0) for a stack reference; the
 * check is on the address of every byte of the access, before paging. An 8-byte access
 * at 0x7ffffffffffc reaches 0x800000000003: #GP(0) (#SS(0) for a PUSH), even though its
 * first page is not present.
 *
 * Direct branches need code near the top of the lower canonical half: the image maps the
 * last canonical page, TOP = 0x7ffffffff000, to a copy of `top_template` (raw branch
 * encodings whose rel32/rel8 lands past 0x800000000000).
 */
    .include "idtlog.inc"
    IMAGE_NAME "canon_branch"

    .set TOP, 0x7ffffffff000
    .set NONCANON, 0x8000000000000000
    .set PTE_URWP, 0x7

    .text
image_main:
    call map_top_page
    call jmp_rel32_noncanonical
    call jcc_rel32_noncanonical
    call jcc_not_taken_noncanonical
    call loop_rel8_noncanonical
    call call_rel32_noncanonical
    call jmp_reg_noncanonical
    call jmp_mem_noncanonical
    call call_reg_noncanonical
    call call_mem_noncanonical
    call ret_noncanonical
    call ret_imm_noncanonical
    call straddle_load_gp
    call straddle_store_gp
    call straddle_push_ss
    ret

/* map_top_page: TOP -> top_page (a copy of top_template), through tables of our own
 * hung below PML4[255]. */
map_top_page:
    lea rsi, [rip + top_template]
    lea rdi, [rip + top_page]
    mov ecx, 4096
    rep movsb
    mov rax, cr3
    and rax, -4096
    lea rcx, [rip + pdpt_hi]
    or rcx, PTE_URWP
    mov qword ptr [rax + 255 * 8], rcx
    lea rcx, [rip + pd_hi]
    or rcx, PTE_URWP
    mov qword ptr [rip + pdpt_hi + 511 * 8], rcx
    lea rcx, [rip + pt_hi]
    or rcx, PTE_URWP
    mov qword ptr [rip + pd_hi + 511 * 8], rcx
    /* fall through */
top_present:
    lea rcx, [rip + top_page]
    or rcx, PTE_URWP
    mov qword ptr [rip + pt_hi + 511 * 8], rcx
    mov rax, TOP
    invlpg [rax]
    ret

top_not_present:
    mov qword ptr [rip + pt_hi + 511 * 8], 0
    mov rax, TOP
    invlpg [rax]
    ret

/* GP_AT rip: exactly one #GP(0), at `rip`, with the interrupted RSP (saved_rsp). */
    .macro GP_AT rip
    EXPECT_COUNT 13, 1, "expected exactly one gp"
    EXPECT_EV EV_ERR, 0, "gp error code is not 0"
    EXPECT_EV EV_RIP, "\rip", "pushed rip is not the branch"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "rsp changed: the faulting branch pushed or popped"
    .endm

/* TO_TOP off: jump to TOP + off with the current stack, RSP saved in saved_rsp. */
    .macro TO_TOP off
    mov rax, TOP + \off
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
    jmp rax
    .endm

jmp_rel32_noncanonical:
    TEST_BEGIN "jmp_rel32_noncanonical"
    SET_RESUME 1f
    TO_TOP 0x100
1:  GP_AT "TOP + 0x100"
    TEST_END
    ret

jcc_rel32_noncanonical:
    TEST_BEGIN "jcc_rel32_noncanonical"
    SET_RESUME 1f
    mov rax, TOP + 0x200
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED | 0x40                /* ZF = 1: JE is taken */
    jmp rax
1:  GP_AT "TOP + 0x200"
    TEST_END
    ret

/* A Jcc that is not taken does not check its target: it falls through to UD2. */
jcc_not_taken_noncanonical:
    TEST_BEGIN "jcc_not_taken_noncanonical"
    SET_RESUME 1f
    mov rax, TOP + 0x206
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED | 0x40                /* ZF = 1: JNE is not taken */
    jmp rax
1:  EXPECT_COUNT 13, 0, "a jcc that is not taken faulted on its target"
    EXPECT_COUNT 6, 1, "expected the ud2 after the jcc"
    EXPECT_EV EV_RIP, "TOP + 0x20c", "pushed rip is not the ud2 after the jcc"
    TEST_END
    ret

extra_rcx_gp:                           /* the interrupted RCX (the #GP pushes an error code) */
    mov rax, qword ptr [rsi - 32]
    KV "rcx", rax
    ret

hook_save_rcx:
    mov rax, qword ptr [rsi - 32]
    mov qword ptr [rip + gp_rcx], rax
    ret

loop_rel8_noncanonical:
    TEST_BEGIN "loop_rel8_noncanonical"
    SET_RESUME 1f
    EXTRA extra_rcx_gp
    HOOK 13, hook_save_rcx
    mov qword ptr [rip + gp_rcx], -1
    TO_TOP 0xff0
1:  GP_AT "TOP + 0xff5"
    EXPECT "qword ptr [rip + gp_rcx]", 2, "the faulting loop decremented rcx"
    TEST_END
    ret

call_rel32_noncanonical:
    TEST_BEGIN "call_rel32_noncanonical"
    SET_RESUME 1f
    TO_TOP 0x300
1:  GP_AT "TOP + 0x300"
    TEST_END
    ret

jmp_reg_noncanonical:
    TEST_BEGIN "jmp_reg_noncanonical"
    SET_RESUME 1f
    mov rax, NONCANON
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
jmp_reg_insn:
    jmp rax
1:  GP_AT "OFFSET jmp_reg_insn"
    TEST_END
    ret

jmp_mem_noncanonical:
    TEST_BEGIN "jmp_mem_noncanonical"
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
jmp_mem_insn:
    jmp qword ptr [rip + noncanon_ptr]
1:  GP_AT "OFFSET jmp_mem_insn"
    TEST_END
    ret

call_reg_noncanonical:
    TEST_BEGIN "call_reg_noncanonical"
    SET_RESUME 1f
    mov rax, NONCANON + 0x40
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
call_reg_insn:
    call rax
1:  GP_AT "OFFSET call_reg_insn"
    TEST_END
    ret

call_mem_noncanonical:
    TEST_BEGIN "call_mem_noncanonical"
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
call_mem_insn:
    call qword ptr [rip + noncanon_ptr]
1:  GP_AT "OFFSET call_mem_insn"
    TEST_END
    ret

ret_noncanonical:
    TEST_BEGIN "ret_noncanonical"
    SET_RESUME 1f
    lea rsp, [rip + scratch_stack_top]   /* a RET that pops anyway lands in the pad */
    mov rax, NONCANON + 0x80
    push rax
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
ret_insn:
    ret
1:  GP_AT "OFFSET ret_insn"
    TEST_END
    ret

ret_imm_noncanonical:
    TEST_BEGIN "ret_imm_noncanonical"
    SET_RESUME 1f
    lea rsp, [rip + scratch_stack_top]
    mov rax, NONCANON + 0xc0
    push rax
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
ret_imm_insn:
    ret 16
1:  GP_AT "OFFSET ret_imm_insn"
    TEST_END
    ret

/* ---- straddling the canonical boundary: the last canonical page is not present, so an
        implementation that pages before the canonical check reports #PF at TOP */

straddle_load_gp:
    TEST_BEGIN "straddle_load_gp"
    call top_not_present
    SET_RESUME 1f
    mov rbx, TOP + 0xffc
    FLAGS RFLAGS_FIXED
straddle_load_insn:
    mov rax, qword ptr [rbx]
1:  EXPECT_COUNT 14, 0, "a straddling load page-faulted before the canonical check"
    EXPECT_COUNT 13, 1, "expected exactly one gp"
    EXPECT_EV EV_ERR, 0, "gp error code is not 0"
    EXPECT_EV EV_RIP, "OFFSET straddle_load_insn", "pushed rip is not the load"
    call top_present
    TEST_END
    ret

straddle_store_gp:
    TEST_BEGIN "straddle_store_gp"
    call top_not_present
    SET_RESUME 1f
    mov rbx, TOP + 0xffe
    FLAGS RFLAGS_FIXED
straddle_store_insn:
    mov dword ptr [rbx], eax
1:  EXPECT_COUNT 14, 0, "a straddling store page-faulted before the canonical check"
    EXPECT_COUNT 13, 1, "expected exactly one gp"
    EXPECT_EV EV_ERR, 0, "gp error code is not 0"
    EXPECT_EV EV_RIP, "OFFSET straddle_store_insn", "pushed rip is not the store"
    call top_present
    TEST_END
    ret

/* PUSH with RSP = 0x800000000004 writes 0x7ffffffffffc..0x800000000003: #SS(0). The
 * #SS goes to IST1 (the interrupted stack is the faulting one), and so do a #PF or #GP
 * an implementation might raise instead. */
straddle_push_ss:
    TEST_BEGIN "straddle_push_ss"
    GATE 12, 1, 0
    GATE 14, 2, 0                       /* a wrong #PF must not take the image down */
    GATE 13, 2, 0
    GATE 8, 3, 0
    call top_not_present
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp2], rsp
    FLAGS RFLAGS_FIXED
    mov rsp, 0x800000000004
straddle_push_insn:
    push rax
1:  mov rsp, qword ptr [rip + saved_rsp2]
    EXPECT_COUNT 14, 0, "a straddling push page-faulted before the canonical check"
    EXPECT_COUNT 12, 1, "expected exactly one ss"
    EXPECT_EV EV_ERR, 0, "ss error code is not 0"
    EXPECT_EV EV_RIP, "OFFSET straddle_push_insn", "pushed rip is not the push"
    EXPECT_EV EV_SP, 0x800000000004, "pushed rsp is not the interrupted rsp"
    call top_present
    TEST_END
    ret

/* The code that runs at TOP (copied there): raw encodings, so that the displacements are
 * relative to where the copy runs. Unused bytes are INT3. */
    .section .rodata
    .balign 16
top_template:
    .org top_template + 0x100, 0xcc
    .byte 0xe9                          /* TOP+0x100: jmp rel32 -> 0x800000001105 */
    .long 0x1000
    .org top_template + 0x200, 0xcc
    .byte 0x0f, 0x84                    /* TOP+0x200: je rel32 -> 0x800000001206 */
    .long 0x1000
    .byte 0x0f, 0x85                    /* TOP+0x206: jne rel32 (not taken) */
    .long 0x1000
    ud2                                 /* TOP+0x20c */
    .org top_template + 0x300, 0xcc
    .byte 0xe8                          /* TOP+0x300: call rel32 -> 0x800000001305 */
    .long 0x1000
    .org top_template + 0xff0, 0xcc
    .byte 0xb9                          /* TOP+0xff0: mov ecx, 2 */
    .long 2
    .byte 0xe2, 0x7f                    /* TOP+0xff5: loop rel8 -> 0x800000000076 */
    .org top_template + 0x1000, 0xcc

    .data
    .balign 8
saved_rsp:      .quad 0
saved_rsp2:     .quad 0
noncanon_ptr:   .quad NONCANON + 0x20
gp_rcx:         .quad 0

    .bss
    .balign 4096
pdpt_hi:        .fill 4096, 1, 0
pd_hi:          .fill 4096, 1, 0
pt_hi:          .fill 4096, 1, 0
top_page:       .fill 4096, 1, 0
                .fill 1024, 1, 0
scratch_stack_top:
                .fill 256, 1, 0
