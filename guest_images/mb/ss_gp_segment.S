/* ss_gp_segment: a non-canonical address raises #SS(0) or #GP(0) by the segment the
 * access goes through, not by the mnemonic.
 *
 * SDM Vol. 1, "Canonical Addressing": "If a linear-memory reference is not in canonical
 * form ... In most cases, a general-protection exception (#GP) is generated. However, in
 * the case of explicit or implied stack references, a stack fault (#SS) is generated.
 * Instructions that have implied stack references, by default, use the SS segment
 * register. These include PUSH/POP-related instructions and instructions using RSP/RBP as
 * base registers. ... If an instruction uses base registers RSP/RBP and uses a segment
 * override prefix to specify a non-SS segment, a canonical fault generates a #GP ... In
 * 64-bit mode, only FS and GS segment-overrides are applicable in this situation. Other
 * segment override prefixes (CS, DS, ES and SS) are ignored." Vol. 2 PUSH/POP/MOV, "64-Bit
 * Mode Exceptions": "#SS(0) If a memory address referencing the SS segment is in a
 * non-canonical form. #GP(0) If the memory address is in a non-canonical form."
 *
 * So: the memory operand of PUSH m / POP m / CALL m through RBX is a DS reference (#GP);
 * an RSP or RBP *base* is an SS reference (#SS) unless FS/GS overrides it (#GP); an RBP
 * *index* does not make the reference SS-relative; an `ss:` prefix is ignored in 64-bit
 * mode (an RBX-based `ss:` operand is #GP) and so is `ds:` (an RBP-based one is #SS).
 * Every fault leaves RSP as it was.
 */
    .include "idtlog.inc"
    IMAGE_NAME "ss_gp_segment"

    .set NONCANON, 0x8000000000000000

    .text
image_main:
    call push_mem_rbx_gp
    call pop_mem_rbx_gp
    call call_mem_rbx_gp
    call push_mem_rbp_ss
    call mov_rbp_base_ss
    call mov_rsp_base_ss
    call mov_rbp_index_gp
    call mov_ss_override_rbx_gp
    call mov_ds_override_rbp_ss
    call mov_fs_override_rbp_gp
    call mov_gs_override_rsp_gp
    call push_noncanonical_rsp_ss
    ret

/* FAULT_AT vec, rip: exactly one `vec`(0) at `rip`, the other one not at all, RSP as it
 * was before the instruction (saved_rsp). */
    .macro FAULT_AT vec, other, rip
    EXPECT_COUNT \other, 0, "wrong vector: the segment decides between ss and gp"
    EXPECT_COUNT \vec, 1, "expected exactly one fault"
    EXPECT_EV EV_ERR, 0, "error code is not 0"
    EXPECT_EV EV_RIP, "\rip", "pushed rip is not the faulting instruction"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "rsp changed: the faulting instruction pushed or popped"
    .endm

/* ARM: the test's registers: RBX, RBP and RCX non-canonical, a scratch stack (so that an
 * implementation that pops anyway does not overwrite the test's frame). */
    .macro ARM
    SET_RESUME 1f
    lea rsp, [rip + scratch_stack_top]
    push 0x1234
    mov rbx, NONCANON + 0x100
    mov rbp, NONCANON + 0x200
    mov rcx, NONCANON
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
    .endm

push_mem_rbx_gp:
    TEST_BEGIN "push_mem_rbx_gp"
    ARM
push_mem_rbx_insn:
    push qword ptr [rbx]
1:  FAULT_AT 13, 12, "OFFSET push_mem_rbx_insn"
    TEST_END
    ret

pop_mem_rbx_gp:
    TEST_BEGIN "pop_mem_rbx_gp"
    ARM
pop_mem_rbx_insn:
    pop qword ptr [rbx]
1:  FAULT_AT 13, 12, "OFFSET pop_mem_rbx_insn"
    TEST_END
    ret

call_mem_rbx_gp:
    TEST_BEGIN "call_mem_rbx_gp"
    ARM
call_mem_rbx_insn:
    call qword ptr [rbx]
1:  FAULT_AT 13, 12, "OFFSET call_mem_rbx_insn"
    TEST_END
    ret

push_mem_rbp_ss:
    TEST_BEGIN "push_mem_rbp_ss"
    ARM
push_mem_rbp_insn:
    push qword ptr [rbp]
1:  FAULT_AT 12, 13, "OFFSET push_mem_rbp_insn"
    TEST_END
    ret

mov_rbp_base_ss:
    TEST_BEGIN "mov_rbp_base_ss"
    ARM
mov_rbp_base_insn:
    mov rax, qword ptr [rbp + 8]
1:  FAULT_AT 12, 13, "OFFSET mov_rbp_base_insn"
    TEST_END
    ret

mov_rsp_base_ss:
    TEST_BEGIN "mov_rsp_base_ss"
    ARM
mov_rsp_base_insn:
    mov rax, qword ptr [rsp + rcx]
1:  FAULT_AT 12, 13, "OFFSET mov_rsp_base_insn"
    TEST_END
    ret

/* [rbx + rbp]: RBX is the base, RBP only the index: a DS reference. */
mov_rbp_index_gp:
    TEST_BEGIN "mov_rbp_index_gp"
    ARM
    xor ebx, ebx
mov_rbp_index_insn:
    mov rax, qword ptr [rbx + rbp * 1]
1:  FAULT_AT 13, 12, "OFFSET mov_rbp_index_insn"
    TEST_END
    ret

mov_ss_override_rbx_gp:
    TEST_BEGIN "mov_ss_override_rbx_gp"
    ARM
mov_ss_override_rbx_insn:
    .byte 0x36                          /* ss: (ignored in 64-bit mode) */
    mov rax, qword ptr [rbx]
1:  FAULT_AT 13, 12, "OFFSET mov_ss_override_rbx_insn"
    TEST_END
    ret

mov_ds_override_rbp_ss:
    TEST_BEGIN "mov_ds_override_rbp_ss"
    ARM
mov_ds_override_rbp_insn:
    .byte 0x3e                          /* ds: (ignored in 64-bit mode) */
    mov rax, qword ptr [rbp]
1:  FAULT_AT 12, 13, "OFFSET mov_ds_override_rbp_insn"
    TEST_END
    ret

mov_fs_override_rbp_gp:
    TEST_BEGIN "mov_fs_override_rbp_gp"
    ARM
mov_fs_override_rbp_insn:
    mov rax, qword ptr fs:[rbp]
1:  FAULT_AT 13, 12, "OFFSET mov_fs_override_rbp_insn"
    TEST_END
    ret

mov_gs_override_rsp_gp:
    TEST_BEGIN "mov_gs_override_rsp_gp"
    ARM
mov_gs_override_rsp_insn:
    mov rax, qword ptr gs:[rsp + rcx]
1:  FAULT_AT 13, 12, "OFFSET mov_gs_override_rsp_insn"
    TEST_END
    ret

/* The stack access itself, with a non-canonical RSP: #SS(0), on IST1 (and a #GP or #PF
 * an implementation might raise instead on IST2, so that the image goes on). */
push_noncanonical_rsp_ss:
    TEST_BEGIN "push_noncanonical_rsp_ss"
    GATE 12, 1, 0
    GATE 13, 2, 0
    GATE 14, 2, 0
    GATE 8, 3, 0
    SET_RESUME 1f
    mov rax, NONCANON + 0x1000
    mov qword ptr [rip + saved_rsp], rax
    FLAGS RFLAGS_FIXED
    mov rsp, rax
push_noncanonical_rsp_insn:
    push rax
1:  FAULT_AT 12, 13, "OFFSET push_noncanonical_rsp_insn"
    TEST_END
    ret

    .data
    .balign 8
saved_rsp:      .quad 0

    .bss
    .balign 4096
                .fill 1024, 1, 0
scratch_stack_top:
                .fill 256, 1, 0
