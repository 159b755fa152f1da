/* mini.S: a tiny kvm-unit-tests-style test kernel for testing `idtlab suite`.
 *
 * It speaks the protocol of a kvm-unit-tests x86 .flat file, nothing more: it is a
 * multiboot v1 kernel (ELF32, what QEMU's -kernel takes), reads its arguments from the
 * multiboot command line ("PROGRAM ARGS", the program name first, as QEMU passes
 * `-kernel FILE -append ARGS`), prints `PASS:`/`FAIL:`/`SKIP:`/`INFO:` lines and a
 * `SUMMARY:` line on COM1 like kvm-unit-tests' lib/report.c, and ends by writing its exit
 * code to the isa-debug-exit port 0xF4 as lib/x86/io.c's exit() does (QEMU then exits
 * with status (code << 1) | 1; a test whose checks all skipped exits with 77 >> 1 = 38,
 * so that QEMU's status is 77, the autotools "skipped").
 *
 * The first argument chooses what it does:
 *   pass     two PASS lines, SUMMARY, exit 0
 *   fail     a PASS and a FAIL line, SUMMARY, exit 1
 *   skip     a SKIP line, SUMMARY, exit 38
 *   lie      a FAIL line but exit 0 (a PASS needs both: exit 0 and no FAIL line)
 *   loader   PASS when the multiboot boot loader name (Multiboot 0.6.96, "Boot
 *            information format", flags bit 9) starts with "idtlab", FAIL otherwise:
 *            the one check whose result depends on the emulator (QEMU says "qemu")
 *   hang     an INFO line, then a jump to itself (a timeout)
 *   triple   an IDT with limit 0, then UD2: #UD, #DF and a triple fault (shutdown)
 *   anything else, or none: an ABORT line and exit 1
 *
 * Everything runs in the 32-bit protected mode the loader enters in (Multiboot 0.6.96,
 * "Machine state": flat CS/DS/SS, paging and interrupts off); no GDT, no IDT, no stack
 * frames beyond `call`.
 */
    .intel_syntax noprefix

    .set MB_MAGIC, 0x1badb002
    .set MB_FLAGS, 0
    .set MBI_FLAGS, 0            /* multiboot information: flags */
    .set MBI_CMDLINE, 16         /* command line (flags bit 2) */
    .set MBI_LOADER_NAME, 64     /* boot loader name (flags bit 9) */
    .set MBI_HAS_CMDLINE, 1 << 2
    .set MBI_HAS_LOADER_NAME, 1 << 9
    .set UART, 0x3f8
    .set UART_LSR, UART + 5
    .set LSR_THRE, 0x20
    .set EXIT_PORT, 0xf4
    .set EXIT_SKIP, 77 >> 1

    .section .multiboot, "a"
    .balign 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long (-(MB_MAGIC + MB_FLAGS)) & 0xffffffff

    .text
    .code32
    .globl _start
_start:
    cli
    cld
    mov esp, offset stack_top
    mov [mbi], ebx
    call first_argument          /* esi = the mode word (or an empty string) */
    mov edi, offset w_pass
    call word_is
    je mode_pass
    mov edi, offset w_fail
    call word_is
    je mode_fail
    mov edi, offset w_skip
    call word_is
    je mode_skip
    mov edi, offset w_lie
    call word_is
    je mode_lie
    mov edi, offset w_loader
    call word_is
    je mode_loader
    mov edi, offset w_hang
    call word_is
    je mode_hang
    mov edi, offset w_triple
    call word_is
    je mode_triple
    mov esi, offset s_abort
    call puts
    mov eax, 1
    jmp exit

mode_pass:
    mov esi, offset s_pass
    call puts
    xor eax, eax
    jmp exit

mode_fail:
    mov esi, offset s_fail
    call puts
    mov eax, 1
    jmp exit

mode_skip:
    mov esi, offset s_skip
    call puts
    mov eax, EXIT_SKIP
    jmp exit

mode_lie:
    mov esi, offset s_lie
    call puts
    xor eax, eax
    jmp exit

mode_loader:
    mov ebx, [mbi]
    test dword ptr [ebx + MBI_FLAGS], MBI_HAS_LOADER_NAME
    jz 1f
    mov esi, [ebx + MBI_LOADER_NAME]
    mov edi, offset w_idtlab
2:  mov al, [edi]
    test al, al
    jz 3f                        /* every byte of "idtlab" matched */
    cmp al, [esi]
    jne 1f
    inc esi
    inc edi
    jmp 2b
3:  mov esi, offset s_loader_pass
    call puts
    xor eax, eax
    jmp exit
1:  mov esi, offset s_loader_fail
    call puts
    mov eax, 1
    jmp exit

mode_hang:
    mov esi, offset s_hang
    call puts
1:  jmp 1b

mode_triple:
    mov esi, offset s_triple
    call puts
    lidt [empty_idt]
    ud2
1:  jmp 1b

/* exit(eax): the test device's exit port, then stop for good. */
exit:
    out EXIT_PORT, eax
1:  hlt
    jmp 1b

/* first_argument() -> esi: the second word of the command line ("" if none). */
first_argument:
    mov esi, offset empty
    mov ebx, [mbi]
    test dword ptr [ebx + MBI_FLAGS], MBI_HAS_CMDLINE
    jz 9f
    mov esi, [ebx + MBI_CMDLINE]
1:  mov al, [esi]                /* skip the program name */
    test al, al
    jz 9f
    inc esi
    cmp al, ' '
    jne 1b
2:  cmp byte ptr [esi], ' '      /* and the spaces after it */
    jne 9f
    inc esi
    jmp 2b
9:  ret

/* word_is(esi = word ending in a space or NUL, edi = NUL-terminated name): ZF = 1 when
 * they are equal. Preserves esi. */
word_is:
    push esi
1:  mov al, [esi]
    mov ah, [edi]
    test ah, ah
    jz 2f
    cmp al, ah
    jne 3f                       /* ZF = 0 */
    inc esi
    inc edi
    jmp 1b
2:  cmp al, ' '                  /* the name ended: so must the word */
    je 3f                        /* ZF = 1 */
    test al, al                  /* ZF = 1 at the end of the command line */
3:  pop esi
    ret

/* puts(esi): a NUL-terminated string to COM1, waiting for the transmitter each byte. */
puts:
    mov dx, UART_LSR
1:  in al, dx
    test al, LSR_THRE
    jz 1b
    lodsb
    test al, al
    jz 2f
    mov dx, UART
    out dx, al
    jmp puts
2:  ret

    .section .rodata
empty:      .asciz ""
w_pass:     .asciz "pass"
w_fail:     .asciz "fail"
w_skip:     .asciz "skip"
w_lie:      .asciz "lie"
w_loader:   .asciz "loader"
w_hang:     .asciz "hang"
w_triple:   .asciz "triple"
w_idtlab:   .asciz "idtlab"
s_pass:     .ascii "PASS: mini: first check\n"
            .ascii "PASS: mini: second check\n"
            .asciz "SUMMARY: 2 tests\n"
s_fail:     .ascii "PASS: mini: first check\n"
            .ascii "FAIL: mini: second check\n"
            .asciz "SUMMARY: 2 tests, 1 unexpected failures\n"
s_skip:     .ascii "SKIP: mini: nothing to test here\n"
            .asciz "SUMMARY: 1 tests, 1 skipped\n"
s_lie:      .ascii "FAIL: mini: a failure the exit code hides\n"
            .asciz "SUMMARY: 1 tests, 1 unexpected failures\n"
s_loader_pass:
            .ascii "PASS: mini: booted by idtlab\n"
            .asciz "SUMMARY: 1 tests\n"
s_loader_fail:
            .ascii "FAIL: mini: booted by idtlab\n"
            .asciz "SUMMARY: 1 tests, 1 unexpected failures\n"
s_hang:     .asciz "INFO: mini: spinning forever\n"
s_triple:   .asciz "INFO: mini: UD2 with an empty IDT\n"
s_abort:    .asciz "ABORT: mini: no known mode (pass, fail, skip, lie, loader, hang, triple)\n"
    .balign 8
empty_idt:  .word 0
            .long 0

    .bss
    .balign 16
mbi:        .long 0
stack:      .skip 1024
stack_top:
