/* iret_rules: what IRETQ does to DS/ES/FS/GS on a return to CPL3, and IRETQ with NT = 1.
 *
 * SDM Vol. 2 IRET, "Operation", RETURN-TO-OUTER-PRIVILEGE-LEVEL: "FOR each SegReg in (ES,
 * FS, GS, and DS) DO tempDesc <- descriptor cache for SegReg; IF (SegmentSelector ==
 * NULL) OR (tempDesc(DPL) < CPL AND tempDesc(Type) is (data or non-conforming code))
 * THEN SegReg <- NULL; FI; OD;" (CPL being the new one, 3). A DPL3 data segment and a
 * conforming code segment stay; a DPL0 or DPL1 data segment and a DPL0 non-conforming
 * code segment become NULL (selector 0). A return to the same CPL changes none of them.
 *
 * SDM Vol. 2 IRET: "IF EFLAGS.NT = 1 and IA32_EFER.LMA = 1 (* IA-32e mode *) THEN
 * #GP(0)", checked on the RFLAGS in force when IRETQ executes (not the popped image):
 * the #GP is a fault on the IRETQ (the pushed RFLAGS still has NT = 1) and the stack is
 * not popped. An NT = 1 in the popped image is simply loaded.
 *
 * The conforming and DPL1 segments live in a copy of the runtime's GDT with two more
 * descriptors, loaded for the test that needs them.
 */
    .include "idtlog.inc"
    IMAGE_NAME "iret_rules"

    .set VEC_BACK, 0x80                 /* DPL3 gate: the user code's way back */
    .set RFLAGS_NT, 0x4000
    .set CONF_CODE, 0x40                /* conforming code, DPL0 (our GDT copy) */
    .set DATA_DPL1, 0x49                /* data, DPL1, RPL1 (our GDT copy) */

    .text
image_main:
    call iret_to_cpl3_nulls_dpl0_segments
    call iret_to_cpl3_keeps_conforming_code
    call iret_same_cpl_keeps_segments
    call iret_with_nt_is_gp
    call iret_loads_nt_from_frame
    ret

/* extra: the data segment selectors the handler runs with (delivery changes none). */
extra_segs:
    xor eax, eax
    mov ax, ds
    KV "ds", rax
    xor eax, eax
    mov ax, es
    KV "es", rax
    xor eax, eax
    mov ax, fs
    KV "fs", rax
    xor eax, eax
    mov ax, gs
    KV "gs", rax
    ret

hook_save_segs:
    mov word ptr [rip + seen_ds], ds
    mov word ptr [rip + seen_es], es
    mov word ptr [rip + seen_fs], fs
    mov word ptr [rip + seen_gs], gs
    ret

restore_segs:
    mov ax, KDATA
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    ret

    .macro EXPECT_SEG slot, value, reason
    movzx ecx, word ptr [rip + \slot]
    EXPECT rcx, "\value", "\reason"
    .endm

    .macro USER_TEST
    GATE VEC_BACK, 0, 3
    HOOK VEC_BACK, hook_save_segs
    EXTRA extra_segs
    mov qword ptr [rip + seen_ds], -1
    SET_RESUME 1f
    lea rdi, [rip + user_back]
    lea rsi, [rip + user_stack_top]
    call enter_user
1:  call restore_segs
    EXPECT_COUNT VEC_BACK, 1, "the user code did not run"
    .endm

iret_to_cpl3_nulls_dpl0_segments:
    TEST_BEGIN "iret_to_cpl3_nulls_dpl0_segments"
    mov ax, KDATA
    mov ds, ax
    mov ax, UDATA
    mov es, ax
    mov ax, KDATA
    mov fs, ax
    mov ax, KCODE                       /* readable non-conforming code, DPL0 */
    mov gs, ax
    USER_TEST
    EXPECT_SEG seen_ds, 0, "ds (dpl0 data) was not nulled"
    EXPECT_SEG seen_es, UDATA, "es (dpl3 data) was nulled"
    EXPECT_SEG seen_fs, 0, "fs (dpl0 data) was not nulled"
    EXPECT_SEG seen_gs, 0, "gs (dpl0 non-conforming code) was not nulled"
    TEST_END
    ret

iret_to_cpl3_keeps_conforming_code:
    TEST_BEGIN "iret_to_cpl3_keeps_conforming_code"
    call load_gdt_copy
    mov ax, UDATA
    mov ds, ax
    mov ax, KDATA
    mov es, ax
    mov ax, DATA_DPL1
    mov fs, ax
    mov ax, CONF_CODE
    mov gs, ax
    USER_TEST
    call load_runtime_gdt
    EXPECT_SEG seen_ds, UDATA, "ds (dpl3 data) was nulled"
    EXPECT_SEG seen_es, 0, "es (dpl0 data) was not nulled"
    EXPECT_SEG seen_fs, 0, "fs (dpl1 data) was not nulled"
    EXPECT_SEG seen_gs, CONF_CODE, "gs (conforming code) was nulled"
    TEST_END
    ret

/* An IRETQ to CPL0 leaves the data segment registers alone. */
iret_same_cpl_keeps_segments:
    TEST_BEGIN "iret_same_cpl_keeps_segments"
    mov ax, KDATA
    mov ds, ax
    mov ax, UDATA
    mov es, ax
    mov ax, KCODE
    mov gs, ax
    mov rax, rsp
    push KDATA
    push rax
    push RFLAGS_FIXED
    push KCODE
    lea rax, [rip + 1f]
    push rax
    iretq
1:  call hook_save_segs
    call restore_segs
    movzx eax, word ptr [rip + seen_gs]
    CHECK "gs", rax
    EXPECT_SEG seen_ds, KDATA, "ds changed by an iret to the same cpl"
    EXPECT_SEG seen_es, UDATA, "es changed by an iret to the same cpl"
    EXPECT_SEG seen_gs, KCODE, "gs changed by an iret to the same cpl"
    TEST_END
    ret

iret_with_nt_is_gp:
    TEST_BEGIN "iret_with_nt_is_gp"
    SET_RESUME 1f
    lea rax, [rip + iret_nt_target]
    mov rcx, rsp
    push KDATA
    push rcx
    push RFLAGS_FIXED
    push KCODE
    push rax
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED | RFLAGS_NT
iret_nt_insn:
    iretq
iret_nt_target:
    FLAGS RFLAGS_FIXED
    FAIL "iretq with nt = 1 returned"
1:  EXPECT_COUNT 13, 1, "expected exactly one gp"
    EXPECT_EV EV_ERR, 0, "gp error code is not 0"
    EXPECT_EV EV_RIP, "OFFSET iret_nt_insn", "pushed rip is not the iretq"
    EXPECT_RFLAGS_NO_RF "RFLAGS_FIXED | RFLAGS_NT", "pushed rflags do not have nt set"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "the faulting iretq popped its frame"
    TEST_END
    ret

/* NT = 0 when IRETQ executes, NT = 1 in the popped image: no fault, NT loaded. */
iret_loads_nt_from_frame:
    TEST_BEGIN "iret_loads_nt_from_frame"
    mov rax, rsp
    push KDATA
    push rax
    push RFLAGS_FIXED | RFLAGS_NT
    push KCODE
    lea rax, [rip + 1f]
    push rax
    FLAGS RFLAGS_FIXED
    iretq
1:  pushfq
    pop rbx
    FLAGS RFLAGS_FIXED                  /* the next IRETQ (any handler's) must not fault */
    CHECK "rflags", rbx
    EXPECT rbx, "RFLAGS_FIXED | RFLAGS_NT", "nt was not loaded from the popped rflags"
    EXPECT_COUNT 13, 0, "unexpected gp"
    TEST_END
    ret

/* load_gdt_copy: the runtime's GDT (8 descriptors: null .. TSS) plus CONF_CODE and
 * DATA_DPL1. load_runtime_gdt: back to the runtime's. */
load_gdt_copy:
    sgdt [rip + runtime_gdtr]
    mov rsi, qword ptr [rip + runtime_gdtr + 2]
    lea rdi, [rip + gdt_copy]
    mov ecx, 0x40
    rep movsb
    mov rax, 0x00af9e000000ffff         /* conforming code, DPL0, 64-bit */
    mov qword ptr [rip + gdt_copy + CONF_CODE], rax
    mov rax, 0x00cfb2000000ffff         /* data, DPL1 */
    mov qword ptr [rip + gdt_copy + (DATA_DPL1 & ~7)], rax
    mov word ptr [rip + gdt_copy_ptr], 0x4f
    lea rax, [rip + gdt_copy]
    mov qword ptr [rip + gdt_copy_ptr + 2], rax
    lgdt [rip + gdt_copy_ptr]
    ret

load_runtime_gdt:
    lgdt [rip + runtime_gdtr]
    ret

user_back:                              /* runs at CPL3 */
    int VEC_BACK

    .data
    .balign 8
saved_rsp:      .quad 0
seen_ds:        .word 0
seen_es:        .word 0
seen_fs:        .word 0
seen_gs:        .word 0
    .balign 8
runtime_gdtr:   .fill 10, 1, 0
    .balign 8
gdt_copy_ptr:   .fill 10, 1, 0
    .balign 16
gdt_copy:       .fill 0x50, 1, 0
