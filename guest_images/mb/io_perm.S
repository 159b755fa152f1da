/* io_perm: IN/OUT/INS/OUTS at CPL3 with IOPL 0 consult the TSS I/O permission bitmap.
 *
 * SDM Vol. 1, "I/O Permission Bit Map" (and Vol. 2 IN, INS, "Operation": "IF ((PE = 1)
 * and ((CPL > IOPL) or (VM = 1))) THEN IF (Any I/O Permission Bit for I/O port being
 * accessed = 1) THEN #GP(0)"): with CPL > IOPL, the processor reads the bitmap at the
 * TSS offset given by the I/O map base (TSS offset 0x66); an access of N bytes at port P
 * is allowed only if the bits of ports P .. P+N-1 are all 0. The processor reads two
 * bytes of the bitmap for every access (the byte holding P's bit and the next); if they
 * are not both within the TSS limit, the access is #GP(0) ("...any attempt to access an
 * I/O port whose bit lies beyond the limit ... causes a general-protection exception";
 * hence the extra 0xff byte after the bitmap). A TSS whose I/O map base is beyond the
 * limit (the runtime's: base 0x68, limit 0x67) allows no port at all. With CPL <= IOPL
 * (IOPL 3 here) the bitmap is not consulted.
 *
 * The tests load a TSS of their own (a copy of the runtime's, I/O map base 0x68, a
 * bitmap for ports 0..0x3ff, then the 0xff byte: limit 0xe8) into the TSS descriptor and
 * load TR; the runtime's TSS comes back after each test. Only IN and INS are used, so
 * that a wrongly allowed access has no effect on a device.
 */
    .include "idtlog.inc"
    IMAGE_NAME "io_perm"

    .set VEC_BACK, 0x80                 /* DPL3 gate: the user code's way back */
    .set IOMAP, 0x68
    .set BIG_LIMIT, IOMAP + 0x80        /* the 0xff byte after the bitmap */
    .set RFLAGS_IOPL3, 0x3000

    .text
image_main:
    call io_no_bitmap_is_gp
    call io_iopl3_skips_the_bitmap
    call io_allowed_port
    call io_denied_port_is_gp
    call io_word_with_one_denied_byte_is_gp
    call io_word_both_allowed
    call io_port_beyond_the_limit_is_gp
    call io_last_byte_within_the_limit
    call io_second_bitmap_byte_beyond_the_limit_is_gp
    call io_ins_denied_port_is_gp
    ret

/* set_tss_desc(rdi = base, esi = limit): rewrite the TSS descriptor (available 64-bit
 * TSS) and load TR with it. */
set_tss_desc:
    lea rax, [rip + gdt + TSS_SEL]
    mov word ptr [rax], si
    mov word ptr [rax + 2], di
    mov rcx, rdi
    shr rcx, 16
    mov byte ptr [rax + 4], cl
    mov byte ptr [rax + 5], 0x89
    shr esi, 16
    and esi, 0xf
    mov byte ptr [rax + 6], sil
    mov byte ptr [rax + 7], ch
    shr rcx, 16
    mov dword ptr [rax + 8], ecx
    mov dword ptr [rax + 12], 0
    mov ax, TSS_SEL
    ltr ax
    ret

runtime_tss:
    lea rdi, [rip + tss]
    mov esi, 0x67
    jmp set_tss_desc

/* big_tss(esi = limit): the copy with the bitmap: every port denied except 0x80, 0x84,
 * 0x86, 0x87 and 0x3f8..0x3ff. */
big_tss:
    push rsi
    lea rsi, [rip + tss]
    lea rdi, [rip + tss_big]
    mov ecx, 0x68
    rep movsb
    mov word ptr [rip + tss_big + 0x66], IOMAP
    lea rdi, [rip + tss_big + IOMAP]
    mov al, 0xff
    mov ecx, 0x81
    rep stosb
    and byte ptr [rip + tss_big + IOMAP + 0x10], ~((1 << 0) | (1 << 4) | (1 << 6) | (1 << 7))
    mov byte ptr [rip + tss_big + IOMAP + 0x7f], 0
    pop rsi
    lea rdi, [rip + tss_big]
    jmp set_tss_desc

/* enter_user_flags(rdi = RIP, rsi = RSP, rdx = RFLAGS) */
enter_user_flags:
    push UDATA
    push rsi
    push rdx
    push UCODE
    push rdi
    iretq

/* USER label, rflags: run `label` at CPL3; it ends with INT 0x80 or a #GP. */
    .macro USER label, rflags=RFLAGS_FIXED
    GATE VEC_BACK, 0, 3
    SET_RESUME 1f
    lea rdi, [rip + \label]
    lea rsi, [rip + user_stack_top]
    mov edx, \rflags
    call enter_user_flags
    .endm

    .macro ALLOWED
    EXPECT_COUNT 13, 0, "the access was refused"
    EXPECT_COUNT VEC_BACK, 1, "the user code did not finish"
    .endm

    .macro DENIED rip
    EXPECT_COUNT VEC_BACK, 0, "the access was allowed"
    EXPECT_COUNT 13, 1, "expected exactly one gp"
    EXPECT_EV EV_ERR, 0, "gp error code is not 0"
    EXPECT_EV EV_RIP, "\rip", "pushed rip is not the i/o instruction"
    .endm

io_no_bitmap_is_gp:
    TEST_BEGIN "io_no_bitmap_is_gp"
    USER user_in_80
1:  DENIED "OFFSET user_in_80"
    TEST_END
    ret

io_iopl3_skips_the_bitmap:
    TEST_BEGIN "io_iopl3_skips_the_bitmap"
    USER user_in_81, "RFLAGS_FIXED | RFLAGS_IOPL3"
1:  ALLOWED
    TEST_END
    ret

io_allowed_port:
    TEST_BEGIN "io_allowed_port"
    mov esi, BIG_LIMIT
    call big_tss
    USER user_in_80
1:  call runtime_tss
    ALLOWED
    TEST_END
    ret

io_denied_port_is_gp:
    TEST_BEGIN "io_denied_port_is_gp"
    mov esi, BIG_LIMIT
    call big_tss
    USER user_in_81
1:  call runtime_tss
    DENIED "OFFSET user_in_81"
    TEST_END
    ret

io_word_with_one_denied_byte_is_gp:
    TEST_BEGIN "io_word_with_one_denied_byte_is_gp"
    mov esi, BIG_LIMIT
    call big_tss
    USER user_in_word_84
1:  call runtime_tss
    DENIED "OFFSET user_in_word_84_insn"
    TEST_END
    ret

io_word_both_allowed:
    TEST_BEGIN "io_word_both_allowed"
    mov esi, BIG_LIMIT
    call big_tss
    USER user_in_word_86
1:  call runtime_tss
    ALLOWED
    TEST_END
    ret

io_port_beyond_the_limit_is_gp:
    TEST_BEGIN "io_port_beyond_the_limit_is_gp"
    mov esi, BIG_LIMIT
    call big_tss
    USER user_in_400
1:  call runtime_tss
    DENIED "OFFSET user_in_400_insn"
    TEST_END
    ret

/* Port 0x3fd: its bitmap byte is the last one (offset 0xe7), the next one (0xe8, the
 * 0xff byte) is within the limit. */
io_last_byte_within_the_limit:
    TEST_BEGIN "io_last_byte_within_the_limit"
    mov esi, BIG_LIMIT
    call big_tss
    USER user_in_3fd
1:  call runtime_tss
    ALLOWED
    TEST_END
    ret

/* The same with the limit one byte lower: the second byte read is beyond it. */
io_second_bitmap_byte_beyond_the_limit_is_gp:
    TEST_BEGIN "io_second_bitmap_byte_beyond_the_limit_is_gp"
    mov esi, BIG_LIMIT - 1
    call big_tss
    USER user_in_3fd
1:  call runtime_tss
    DENIED "OFFSET user_in_3fd_insn"
    TEST_END
    ret

io_ins_denied_port_is_gp:
    TEST_BEGIN "io_ins_denied_port_is_gp"
    mov esi, BIG_LIMIT
    call big_tss
    USER user_ins_81
1:  call runtime_tss
    DENIED "OFFSET user_ins_81_insn"
    TEST_END
    ret

/* ---- user code (CPL3) */

user_in_80:
    in al, 0x80
    int VEC_BACK

user_in_81:
    in al, 0x81
    int VEC_BACK

user_in_word_84:
    mov dx, 0x84
user_in_word_84_insn:
    in ax, dx
    int VEC_BACK

user_in_word_86:
    mov dx, 0x86
    in ax, dx
    int VEC_BACK

user_in_400:
    mov dx, 0x400
user_in_400_insn:
    in al, dx
    int VEC_BACK

user_in_3fd:
    mov dx, 0x3fd
user_in_3fd_insn:
    in al, dx
    int VEC_BACK

user_ins_81:
    mov dx, 0x81
    lea rdi, [rip + buffer]
user_ins_81_insn:
    insb
    int VEC_BACK

    .data
    .balign 16
buffer:     .fill 16, 1, 0
tss_big:    .fill IOMAP + 0x81, 1, 0
