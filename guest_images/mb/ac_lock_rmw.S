/* ac_lock_rmw: alignment check (#AC), LOCK on instructions that cannot be locked (#UD),
 * and the write intent of read-modify-write instructions in the #PF error code.
 *
 * SDM Vol. 3A, "Interrupt 17—Alignment Check Exception (#AC)": an unaligned memory
 * reference raises #AC(0) when CR0.AM = 1, RFLAGS.AC = 1 and CPL = 3 ("Alignment
 * checking ... is only performed in data (or stack) accesses ... at privilege level
 * 3"); it is a fault (the pushed RIP is the access), the error code is 0.
 *
 * SDM Vol. 2 LOCK: "The LOCK prefix can be prepended only to the following instructions
 * and only to those forms of the instructions where the destination operand is a memory
 * operand: ADD, ADC, AND, BTC, BTR, BTS, CMPXCHG, CMPXCH8B, CMPXCHG16B, DEC, INC, NEG,
 * NOT, OR, SBB, SUB, XOR, XADD, and XCHG. If the LOCK prefix is used with one of these
 * instructions and the source operand is a memory operand, an undefined opcode exception
 * (#UD) may be generated. An undefined opcode exception will also be generated if the
 * LOCK prefix is used with any instruction not in the above list."
 *
 * SDM Vol. 3A, "Page-Fault Exceptions", error code bit 1 W/R: "0 The access causing the
 * fault was a read. 1 The access causing the fault was a write." An instruction that
 * reads and writes its destination (ADD, INC, XCHG, CMPXCHG, any LOCKed form) accesses
 * it with write intent: a not-present destination gives W = 1 (Bochs read_RMW_virtual_*
 * checks write access before reading); a CMP of the same address gives W = 0.
 */
    .include "idtlog.inc"
    IMAGE_NAME "ac_lock_rmw"

    .set VEC_BACK, 0x80                 /* DPL3 gate: the user code's way back */
    .set CR0_AM, 0x40000
    .set RFLAGS_AC, 0x40000

    .text
image_main:
    call ac_unaligned_load_at_cpl3
    call ac_unaligned_push_at_cpl3
    call ac_not_at_cpl0
    call ac_needs_cr0_am
    call ac_needs_rflags_ac
    call lock_mov_is_ud
    call lock_register_destination_is_ud
    call lock_cmp_is_ud
    call lock_add_memory_runs
    call rmw_add_not_present_is_write
    call rmw_inc_not_present_is_write
    call rmw_xchg_not_present_is_write
    call rmw_cmpxchg_not_present_is_write
    call rmw_lock_add_not_present_is_write
    call rmw_add_read_only_is_write
    call cmp_not_present_is_read
    ret

/* ---- #AC */

set_am:
    mov rax, cr0
    or rax, CR0_AM
    mov cr0, rax
    ret

clear_am:
    mov rax, cr0
    and rax, ~CR0_AM
    mov cr0, rax
    ret

/* USER label: run `label` at CPL3 (RFLAGS 0x2, the runtime's user stack); it ends with
 * INT 0x80 (DPL3 gate) or a fault, either of which resumes at 1: (ACT_RESUME). */
    .macro USER label
    GATE VEC_BACK, 0, 3
    SET_RESUME 1f
    lea rdi, [rip + \label]
    lea rsi, [rip + user_stack_top]
    call enter_user
    .endm

ac_unaligned_load_at_cpl3:
    TEST_BEGIN "ac_unaligned_load_at_cpl3"
    call set_am
    USER user_ac_load
1:  call clear_am
    EXPECT_COUNT VEC_BACK, 0, "the unaligned load did not fault"
    EXPECT_COUNT 17, 1, "expected exactly one ac"
    EXPECT_EV EV_ERR, 0, "ac error code is not 0"
    EXPECT_EV EV_RIP, "OFFSET user_ac_load_insn", "pushed rip is not the unaligned load"
    EXPECT_EV EV_CS, UCODE, "pushed cs is not the user code selector"
    EXPECT_RFLAGS_NO_RF "RFLAGS_FIXED | RFLAGS_AC", "pushed rflags differ from the user rflags"
    TEST_END
    ret

ac_unaligned_push_at_cpl3:
    TEST_BEGIN "ac_unaligned_push_at_cpl3"
    call set_am
    USER user_ac_push
1:  call clear_am
    EXPECT_COUNT VEC_BACK, 0, "the push to an unaligned rsp did not fault"
    EXPECT_COUNT 17, 1, "expected exactly one ac"
    EXPECT_EV EV_RIP, "OFFSET user_ac_push_insn", "pushed rip is not the push"
    EXPECT_EV EV_SP, "OFFSET user_stack_top - 4", "pushed rsp is not the unaligned user rsp"
    TEST_END
    ret

/* CPL0 with CR0.AM = 1 and RFLAGS.AC = 1: no alignment checking. */
ac_not_at_cpl0:
    TEST_BEGIN "ac_not_at_cpl0"
    call set_am
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED | RFLAGS_AC
    mov eax, dword ptr [rip + data + 1]
    FLAGS RFLAGS_FIXED
1:  call clear_am
    EXPECT_COUNT 17, 0, "an unaligned load at cpl0 raised ac"
    TEST_END
    ret

ac_needs_cr0_am:
    TEST_BEGIN "ac_needs_cr0_am"
    USER user_ac_load
1:  EXPECT_COUNT 17, 0, "ac without cr0.am"
    EXPECT_COUNT VEC_BACK, 1, "the user code did not finish"
    TEST_END
    ret

ac_needs_rflags_ac:
    TEST_BEGIN "ac_needs_rflags_ac"
    call set_am
    USER user_unaligned_no_ac
1:  call clear_am
    EXPECT_COUNT 17, 0, "ac without rflags.ac"
    EXPECT_COUNT VEC_BACK, 1, "the user code did not finish"
    TEST_END
    ret

user_ac_load:                           /* CPL3: set AC, an aligned then an unaligned load */
    pushfq
    or dword ptr [rsp], RFLAGS_AC
    popfq
    mov rax, qword ptr [rip + data]
user_ac_load_insn:
    mov eax, dword ptr [rip + data + 1]
    int VEC_BACK

user_ac_push:                           /* CPL3: set AC, RSP % 8 = 4, push */
    pushfq
    or dword ptr [rsp], RFLAGS_AC
    popfq
    sub rsp, 4
user_ac_push_insn:
    push rax
    int VEC_BACK

user_unaligned_no_ac:                   /* CPL3, AC = 0 */
    mov eax, dword ptr [rip + data + 1]
    int VEC_BACK

/* ---- LOCK */

/* UD_AT label: exactly one #UD, at `label` (the LOCK prefix starts the instruction). */
    .macro UD_AT rip
    EXPECT_COUNT 6, 1, "expected exactly one ud"
    EXPECT_EV EV_RIP, "\rip", "pushed rip is not the locked instruction"
    .endm

lock_mov_is_ud:
    TEST_BEGIN "lock_mov_is_ud"
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
lock_mov_insn:
    .byte 0xf0                          /* lock */
    mov dword ptr [rip + data], eax
1:  UD_AT "OFFSET lock_mov_insn"
    TEST_END
    ret

lock_register_destination_is_ud:
    TEST_BEGIN "lock_register_destination_is_ud"
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
lock_reg_insn:
    .byte 0xf0                          /* lock */
    add eax, ebx
1:  UD_AT "OFFSET lock_reg_insn"
    TEST_END
    ret

lock_cmp_is_ud:
    TEST_BEGIN "lock_cmp_is_ud"
    SET_RESUME 1f
    FLAGS RFLAGS_FIXED
lock_cmp_insn:
    .byte 0xf0                          /* lock */
    cmp dword ptr [rip + data], eax
1:  UD_AT "OFFSET lock_cmp_insn"
    TEST_END
    ret

lock_add_memory_runs:
    TEST_BEGIN "lock_add_memory_runs"
    SET_RESUME 1f
    mov qword ptr [rip + data], 5
    mov eax, 2
    FLAGS RFLAGS_FIXED
    lock add qword ptr [rip + data], rax
    lock xchg qword ptr [rip + data + 8], rax
    xchg qword ptr [rip + data + 8], rax   /* implicitly locked */
1:  EXPECT_COUNT 6, 0, "a lockable form raised ud"
    EXPECT "qword ptr [rip + data]", 7, "lock add did not add"
    TEST_END
    ret

/* ---- read-modify-write error codes */

/* PF_W err, cr2, rip: exactly one #PF with these values. */
    .macro PF_W err, cr2, rip
    EXPECT_COUNT 14, 1, "expected exactly one pf"
    EXPECT_EV EV_ERR, "\err", "the error code does not say write"
    EXPECT_EV EV_CR2, "\cr2", "cr2 is not the destination"
    EXPECT_EV EV_RIP, "\rip", "pushed rip is not the instruction"
    .endm

    .macro RMW_TEST name, insn, off, err
    TEST_BEGIN "\name"
    SET_RESUME 1f
    xor eax, eax
    FLAGS RFLAGS_FIXED
.Lrmw\@:
    \insn
1:  PF_W \err, "PAGE_NP + \off", "OFFSET .Lrmw\@"
    TEST_END
    ret
    .endm

rmw_add_not_present_is_write:
    RMW_TEST "rmw_add_not_present_is_write", "add dword ptr [PAGE_NP + 0x10], eax", 0x10, 0x2
rmw_inc_not_present_is_write:
    RMW_TEST "rmw_inc_not_present_is_write", "inc qword ptr [PAGE_NP + 0x18]", 0x18, 0x2
rmw_xchg_not_present_is_write:
    RMW_TEST "rmw_xchg_not_present_is_write", "xchg qword ptr [PAGE_NP + 0x20], rax", 0x20, 0x2
rmw_cmpxchg_not_present_is_write:
    RMW_TEST "rmw_cmpxchg_not_present_is_write", "cmpxchg dword ptr [PAGE_NP + 0x28], ecx", 0x28, 0x2
rmw_lock_add_not_present_is_write:
    RMW_TEST "rmw_lock_add_not_present_is_write", "lock add dword ptr [PAGE_NP + 0x30], eax", 0x30, 0x2
cmp_not_present_is_read:
    RMW_TEST "cmp_not_present_is_read", "cmp dword ptr [PAGE_NP + 0x38], eax", 0x38, 0x0

rmw_add_read_only_is_write:
    TEST_BEGIN "rmw_add_read_only_is_write"
    SET_RESUME 1f
    xor eax, eax
    FLAGS RFLAGS_FIXED
rmw_ro_insn:
    add dword ptr [PAGE_RO + 0x40], eax
1:  PF_W 0x3, "PAGE_RO + 0x40", "OFFSET rmw_ro_insn"
    TEST_END
    ret

    .data
    .balign 16
data:       .fill 32, 1, 0
