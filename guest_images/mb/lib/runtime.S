/* runtime.S: boot and runtime of the self-logging multiboot images (guest_images/mb/).
 *
 * Boot (32-bit, entered by a multiboot v1 loader: QEMU -kernel, GRUB, idtlab, or our
 * Bochs boot sector, with EAX = 0x2BADB002 and EBX = the multiboot information):
 *   own GDT -> zero .bss -> 4-level identity paging (2 MiB pages for 0..4 GiB, 4 KiB
 *   pages for the test region 0x200000..0x3fffff) -> CR4.PAE, EFER.LME|NXE, CR0.PG|WP
 *   -> far jump to 64-bit code.
 * Runtime (64-bit): TSS, IDT with 256 logging stubs, 8259 PICs masked, local APIC
 * software-enabled, then image_main (the image's tests), then the `end` record and the
 * exit sequence: port 0xF4 (isa-debug-exit), "Shutdown" to port 0x8900 (Bochs),
 * cli; hlt.
 *
 * Every interrupt or exception goes through one stub per vector into common_handler,
 * which prints the event record (docs/idtlog-format.md), remembers it in `last_ev`,
 * calls the test's hook and then performs the test's action for that vector.
 */

    .include "idtlog.inc"

    .set MB_MAGIC, 0x1badb002
    .set MB_FLAGS, 0x0
    .set MB_BOOT_MAGIC, 0x2badb002
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 0x100
    .set EFER_NXE, 0x800
    .set CR0_PE, 0x1
    .set CR0_WP, 0x10000
    .set CR0_PG, 0x80000000
    .set CR4_PAE, 0x20
    .set PTE_P, 0x1
    .set PTE_RW, 0x2
    .set PTE_US, 0x4
    .set PTE_PWT, 0x8
    .set PTE_PCD, 0x10
    .set PTE_PS, 0x80
    .set PTE_XD_HI, 0x80000000  /* bit 63, in the upper dword */
    .set UART, 0x3f8
    .set UART_LSR, 0x3fd
    .set LSR_THRE, 0x20
    .set LSR_TEMT, 0x40
    /* Vectors that push an error code when raised as exceptions (SDM Vol. 3A,
       "Exception and Interrupt Reference"): 8, 10-14, 17, 21, 29, 30. */
    .set ERR_VECTORS, (1 << 8) | (0x1f << 10) | (1 << 17) | (1 << 21) | (1 << 29) | (1 << 30)

/* ---------------------------------------------------------------- multiboot header */
    .section .multiboot, "a"
    .balign 4
multiboot_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

/* ---------------------------------------------------------------- 32-bit boot */
    .text
    .code32
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    mov dword ptr [boot_eax], eax
    mov dword ptr [boot_ebx], ebx
    mov esp, OFFSET boot_stack_top
    lgdt [gdt_ptr]
    /* ljmp CODE32:1f (the loader's GDT may be gone: use ours from here on) */
    .byte 0xea
    .long 1f
    .word CODE32
1:  mov ax, KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax

    /* Zero .bss (a loader that copies only the file image, like a flat-binary boot
       sector, leaves it as it was). The stack is in .bss; nothing is on it yet. */
    mov edi, OFFSET __bss_start
    mov ecx, OFFSET __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb

    /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3 (contiguous); PDs: 2048 2 MiB pages. */
    mov eax, OFFSET pdpt
    or eax, PTE_P | PTE_RW | PTE_US
    mov dword ptr [pml4], eax
    xor ecx, ecx
2:  mov eax, ecx
    shl eax, 12
    add eax, OFFSET pd
    or eax, PTE_P | PTE_RW | PTE_US
    mov dword ptr [pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jb 2b
    xor ecx, ecx
3:  mov eax, ecx
    shl eax, 21
    or eax, PTE_P | PTE_RW | PTE_US | PTE_PS
    mov dword ptr [pd + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jb 3b
    /* The local APIC page is uncacheable. */
    or dword ptr [pd + (APIC_BASE >> 21) * 8], PTE_PCD | PTE_PWT
    /* PD[1] (0x200000..0x3fffff) -> a page table of 4 KiB pages, then the test pages. */
    mov eax, OFFSET pt_test
    or eax, PTE_P | PTE_RW | PTE_US
    mov dword ptr [pd + 8], eax
    xor ecx, ecx
4:  mov eax, ecx
    shl eax, 12
    add eax, 0x200000 | PTE_P | PTE_RW | PTE_US
    mov dword ptr [pt_test + ecx * 8], eax
    inc ecx
    cmp ecx, 512
    jb 4b
    mov dword ptr [pt_test + ((PAGE_NP - 0x200000) >> 12) * 8], 0
    and dword ptr [pt_test + ((PAGE_RO - 0x200000) >> 12) * 8], ~PTE_RW
    or dword ptr [pt_test + ((PAGE_NX - 0x200000) >> 12) * 8 + 4], PTE_XD_HI
    and dword ptr [pt_test + ((PAGE_SUPER - 0x200000) >> 12) * 8], ~PTE_US
    mov dword ptr [pt_test + ((PAGE_IST_NP - 0x200000) >> 12) * 8], 0

    /* Long mode: PAE, CR3, EFER.LME (and NXE for execute-disable), then paging. */
    mov eax, cr4
    or eax, CR4_PAE
    mov cr4, eax
    mov eax, OFFSET pml4
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME | EFER_NXE
    wrmsr
    mov eax, cr0
    or eax, CR0_PE | CR0_WP | CR0_PG
    mov cr0, eax
    /* ljmp KCODE:long_entry */
    .byte 0xea
    .long long_entry
    .word KCODE

/* ---------------------------------------------------------------- 64-bit runtime */
    .code64
long_entry:
    mov ax, KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + boot_stack_top]
    lgdt [rip + gdt_ptr]
    /* The TSS descriptor's base is a link-time address: fill it in here. */
    lea rax, [rip + tss]
    mov word ptr [rip + gdt + TSS_SEL + 2], ax
    shr rax, 16
    mov byte ptr [rip + gdt + TSS_SEL + 4], al
    mov byte ptr [rip + gdt + TSS_SEL + 7], ah
    shr rax, 16
    mov dword ptr [rip + gdt + TSS_SEL + 8], eax
    call reset_tss
    mov ax, TSS_SEL
    ltr ax
    lidt [rip + idt_ptr]
    /* Mask both 8259 PICs: the firmware left the PIT running on IRQ0. */
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    call uart_init
    call apic_init
    lea rdi, [rip + s_begin]
    call puts
    lea rdi, [rip + image_name]
    call puts
    call put_nl
    call boot_test
    call image_main
    /* fall through */
finish:
    lea rsp, [rip + boot_stack_top]
    lea rdi, [rip + s_end]
    call puts
    lea rdi, [rip + image_name]
    call puts
    lea rdi, [rip + s_pass]
    mov rsi, qword ptr [rip + n_pass]
    call put_kv
    lea rdi, [rip + s_fail]
    mov rsi, qword ptr [rip + n_fail]
    call put_kv
    call put_nl
    /* Wait until the UART has sent the last bit (LSR.TEMT): Bochs stops at once. */
    mov dx, UART_LSR
    mov ecx, 1000000
7:  in al, dx
    test al, LSR_TEMT
    jnz 8f
    pause
    dec ecx
    jnz 7b
8:
    /* isa-debug-exit: 0 = every test passed, 1 = some test failed; QEMU exits with
       (value << 1) | 1. Then Bochs' shutdown port. Then stop. */
    xor eax, eax
    cmp qword ptr [rip + n_fail], 0
    setne al
    out 0xf4, al
    mov dx, 0x8900
    lea rsi, [rip + s_shutdown]
5:  lodsb
    test al, al
    jz 6f
    out dx, al
    jmp 5b
6:  cli
    hlt
    jmp 6b

/* An event arrived under ACT_RESUME with no resume point: the image cannot continue. */
abort_image:
    lea rsp, [rip + boot_stack_top]
    FAIL "unexpected event with no resume point"
    call test_end
    jmp finish

/* boot: the loader entered us as the multiboot specification says. */
boot_test:
    TEST_BEGIN "boot"
    mov esi, dword ptr [rip + boot_eax]
    CHECK "eax", rsi
    mov ecx, dword ptr [rip + boot_eax]
    EXPECT rcx, MB_BOOT_MAGIC, "eax is not the multiboot magic 0x2badb002"
    TEST_END
    ret

/* ---------------------------------------------------------------- tests */

/* test_begin(rdi = name): reset the IDT, the TSS, the actions, hooks and counters. */
    .globl test_begin
    .type test_begin, @function
test_begin:
    push rbx
    mov qword ptr [rip + cur_test], rdi
    mov qword ptr [rip + fail_reason], 0
    lea rax, [rip + abort_image]
    mov qword ptr [rip + resume_rip], rax
    lea rax, [rip + boot_stack_top]
    mov qword ptr [rip + resume_rsp], rax
    mov qword ptr [rip + extra_fn], 0
    mov qword ptr [rip + depth], 0
    xor ebx, ebx
1:  mov edi, ebx
    xor esi, esi
    xor edx, edx
    call set_gate
    lea rax, [rip + ev_action]
    mov byte ptr [rax + rbx], ACT_RESUME
    lea rax, [rip + ev_hook]
    mov qword ptr [rax + rbx * 8], 0
    lea rax, [rip + ev_count]
    mov qword ptr [rax + rbx * 8], 0
    inc ebx
    cmp ebx, 256
    jb 1b
    lea rdi, [rip + last_ev]
    mov ecx, EV_SIZE / 8
    xor eax, eax
    rep stosq
    mov qword ptr [rip + last_ev + EV_VEC], -1
    call reset_tss
    pop rbx
    ret

/* test_fail(rdi = reason): the test fails; the first reason is the one printed. */
    .globl test_fail
    .type test_fail, @function
test_fail:
    cmp qword ptr [rip + fail_reason], 0
    jne 1f
    mov qword ptr [rip + fail_reason], rdi
1:  ret

/* test_end(): print "idtlog1 <test> PASS" or "idtlog1 <test> FAIL <reason>". */
    .globl test_end
    .type test_end, @function
test_end:
    call log_prefix
    mov rax, qword ptr [rip + fail_reason]
    test rax, rax
    jnz 1f
    inc qword ptr [rip + n_pass]
    lea rdi, [rip + s_verdict_pass]
    call puts
    jmp put_nl
1:  inc qword ptr [rip + n_fail]
    lea rdi, [rip + s_verdict_fail]
    call puts
    mov rdi, qword ptr [rip + fail_reason]
    call puts
    jmp put_nl

/* reset_tss(): RSP0 and IST1..IST3 back to the runtime's stacks, no I/O bitmap. */
reset_tss:
    lea rax, [rip + rsp0_stack_top]
    mov qword ptr [rip + tss + TSS_RSP0], rax
    lea rax, [rip + ist1_stack_top]
    mov qword ptr [rip + tss + TSS_IST1], rax
    lea rax, [rip + ist2_stack_top]
    mov qword ptr [rip + tss + TSS_IST2], rax
    lea rax, [rip + ist3_stack_top]
    mov qword ptr [rip + tss + TSS_IST3], rax
    mov word ptr [rip + tss + 0x66], 0x68
    ret

/* set_gate(rdi = vector, rsi = IST index, rdx = DPL): a present 64-bit interrupt gate
 * (type 0xE) through KCODE to the vector's logging stub. */
    .globl set_gate
    .type set_gate, @function
set_gate:
    mov rax, rdi
    shl rax, 4                          /* 16 * vector: gates and stubs are 16 bytes */
    lea rdi, [rip + idt]
    add rdi, rax                        /* rdi = &idt[vector] */
    lea rcx, [rip + idt_stubs]
    add rcx, rax                        /* rcx = the vector's stub */
    mov word ptr [rdi], cx              /* offset 15:0 */
    mov word ptr [rdi + 2], KCODE
    and esi, 7
    mov byte ptr [rdi + 4], sil         /* IST */
    and edx, 3
    shl edx, 5
    or edx, 0x8e                        /* P = 1, DPL, type 0xE */
    mov byte ptr [rdi + 5], dl
    shr rcx, 16
    mov word ptr [rdi + 6], cx          /* offset 31:16 */
    shr rcx, 16
    mov dword ptr [rdi + 8], ecx        /* offset 63:32 */
    mov dword ptr [rdi + 12], 0
    ret

/* gate_not_present(rdi = vector): clear the gate's P bit. */
    .globl gate_not_present
    .type gate_not_present, @function
gate_not_present:
    shl rdi, 4
    lea rax, [rip + idt]
    and byte ptr [rax + rdi + 5], 0x7f
    ret

/* enter_user(rdi = RIP, rsi = RSP): IRETQ to CPL3 with RFLAGS = 0x2. The user code gets
 * back to CPL0 through an event whose action is ACT_RESUME or ACT_RESUME_QUIET. */
    .globl enter_user
    .type enter_user, @function
enter_user:
    push UDATA
    push rsi
    push RFLAGS_FIXED
    push UCODE
    push rdi
    iretq

/* ---------------------------------------------------------------- local APIC */

/* apic_init(): software-enable the local APIC (SVR bit 8, spurious vector 0xff), TPR 0,
 * remember the APIC ID. */
apic_init:
    mov ecx, 0x1b                       /* IA32_APIC_BASE */
    rdmsr
    mov dword ptr [rip + apic_base_msr], eax
    mov esi, APIC_BASE
    mov dword ptr [rsi + APIC_SVR], 0x1ff
    mov dword ptr [rsi + APIC_TPR], 0
    mov eax, dword ptr [rsi + APIC_ID]
    shr eax, 24
    mov qword ptr [rip + apic_id], rax
    ret

/* apic_send_self(rdi = ICR low dword): an IPI to our own APIC ID (destination field, no
 * shorthand: the SDM lists NMI with the "self" shorthand as invalid), then wait until the
 * delivery status says it was sent. */
    .globl apic_send_self
    .type apic_send_self, @function
apic_send_self:
    mov esi, APIC_BASE
    mov rax, qword ptr [rip + apic_id]
    shl eax, 24
    mov dword ptr [rsi + APIC_ICR_HI], eax
    mov dword ptr [rsi + APIC_ICR_LO], edi
    /* fall through */
    .globl apic_wait_icr
    .type apic_wait_icr, @function
apic_wait_icr:
    mov esi, APIC_BASE
    mov ecx, 1000000
1:  mov eax, dword ptr [rsi + APIC_ICR_LO]  /* APIC registers: plain 32-bit MOVs only */
    test eax, ICR_PENDING
    jz 2f
    pause
    dec ecx
    jnz 1b
2:  ret

/* apic_eoi(): end of interrupt. */
    .globl apic_eoi
    .type apic_eoi, @function
apic_eoi:
    mov esi, APIC_BASE
    mov dword ptr [rsi + APIC_EOI], 0
    ret

/* ---------------------------------------------------------------- event handling */

/* 256 stubs, 16 bytes apart: push the vector, join common_entry. */
    .balign 16
idt_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .byte 0x68                          /* push imm32 (sign-extended; < 0x80000000) */
    .long vec
    jmp common_entry
    .set vec, vec + 1
    .endr

/* Stack on entry: the vector, then the CPU's frame ([error code,] RIP, CS, RFLAGS, RSP,
 * SS). common_handler returns how many bytes to drop before IRETQ (the vector slot, plus
 * the error code if there is one) and may have rewritten the frame. */
common_entry:
    push rax
    push rcx
    push rdx
    push rbx
    push rbp
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    cld
    inc qword ptr [rip + depth]
    mov rdi, qword ptr [rsp + 15 * 8]   /* vector */
    lea rsi, [rsp + 16 * 8]             /* RSP at handler entry */
    call common_handler
    mov qword ptr [rsp + 15 * 8], rax
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rbp
    pop rbx
    pop rdx
    pop rcx
    pop rax
    dec qword ptr [rip + depth]
    add rsp, qword ptr [rsp]
    iretq

/* common_handler(rdi = vector, rsi = RSP at handler entry) -> rax = bytes to drop. */
common_handler:
    push rbx
    push r12
    push r13
    push r14
    push r15
    mov r12, rdi                        /* vector */
    mov r13, rsi                        /* RSP at entry */
    mov r14, cr2
    xor ebx, ebx                        /* rbx = 1 if an error code was pushed */
    cmp r12, 32
    jae 1f
    mov eax, ERR_VECTORS
    bt eax, r12d
    adc ebx, 0
1:  lea r15, [r13 + rbx * 8]            /* r15 = &pushed RIP */
    lea rax, [rip + ev_action]
    movzx eax, byte ptr [rax + r12]
    cmp eax, ACT_RESUME_QUIET
    je 9f

    call log_prefix
    lea rdi, [rip + s_ev]
    call puts
    mov rdi, r12
    call puthex2
    lea rdi, [rip + s_rsp]
    mov rsi, r13
    call put_kv
    test ebx, ebx
    jz 2f
    lea rdi, [rip + s_err]
    mov rsi, qword ptr [r13]
    call put_kv
2:  lea rdi, [rip + s_rip]
    mov rsi, qword ptr [r15]
    call put_kv
    lea rdi, [rip + s_cs]
    mov rsi, qword ptr [r15 + 8]
    call put_kv
    lea rdi, [rip + s_rflags]
    mov rsi, qword ptr [r15 + 16]
    call put_kv
    lea rdi, [rip + s_sp]
    mov rsi, qword ptr [r15 + 24]
    call put_kv
    lea rdi, [rip + s_ss]
    mov rsi, qword ptr [r15 + 32]
    call put_kv
    cmp r12, 14
    jne 3f
    lea rdi, [rip + s_cr2]
    mov rsi, r14
    call put_kv
3:  mov rax, qword ptr [rip + extra_fn]
    test rax, rax
    jz 4f
    mov rdi, r12
    mov rsi, r15
    call rax
4:  call put_nl

    /* Remember the event. */
    mov qword ptr [rip + last_ev + EV_VEC], r12
    mov qword ptr [rip + last_ev + EV_RSP], r13
    xor eax, eax
    test ebx, ebx
    jz 5f
    mov rax, qword ptr [r13]
5:  mov qword ptr [rip + last_ev + EV_ERR], rax
    mov rax, qword ptr [r15]
    mov qword ptr [rip + last_ev + EV_RIP], rax
    mov rax, qword ptr [r15 + 8]
    mov qword ptr [rip + last_ev + EV_CS], rax
    mov rax, qword ptr [r15 + 16]
    mov qword ptr [rip + last_ev + EV_RFLAGS], rax
    mov rax, qword ptr [r15 + 24]
    mov qword ptr [rip + last_ev + EV_SP], rax
    mov rax, qword ptr [r15 + 32]
    mov qword ptr [rip + last_ev + EV_SS], rax
    mov qword ptr [rip + last_ev + EV_CR2], r14
    mov rax, qword ptr [rip + depth]
    mov qword ptr [rip + last_ev + EV_DEPTH], rax
    lea rax, [rip + ev_count]
    inc qword ptr [rax + r12 * 8]

    lea rax, [rip + ev_hook]
    mov rax, qword ptr [rax + r12 * 8]
    test rax, rax
    jz 6f
    mov rdi, r12
    mov rsi, r15
    call rax

6:  lea rax, [rip + ev_action]
    movzx eax, byte ptr [rax + r12]
    cmp eax, ACT_RETURN
    je 8f
    cmp eax, ACT_SKIP_SPIN
    jne 9f
    mov rax, qword ptr [r15]
    cmp word ptr [rax], 0xfeeb          /* jmp . */
    jne 8f
    add qword ptr [r15], 2
    jmp 8f

    /* ACT_RESUME(_QUIET): return at CPL0 to the test's resume point. Every enclosing
       handler is abandoned, so the depth becomes 0 after the stub's decrement. */
9:  mov rax, qword ptr [rip + resume_rip]
    mov qword ptr [r15], rax
    mov qword ptr [r15 + 8], KCODE
    mov qword ptr [r15 + 16], RFLAGS_FIXED
    mov rax, qword ptr [rip + resume_rsp]
    mov qword ptr [r15 + 24], rax
    mov qword ptr [r15 + 32], KDATA
    mov qword ptr [rip + depth], 1

8:  lea rax, [rbx * 8 + 8]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

/* ---------------------------------------------------------------- UART output */

/* uart_init(): 115200 baud (divisor 1), 8 data bits, no parity, 1 stop bit, no
 * interrupts. The reset value of LCR selects 5-bit words, which Bochs honours. */
uart_init:
    mov dx, UART + 1
    xor eax, eax
    out dx, al                          /* IER = 0 */
    mov dx, UART + 3
    mov al, 0x80
    out dx, al                          /* LCR: DLAB = 1 */
    mov dx, UART
    mov al, 1
    out dx, al                          /* DLL = 1 */
    mov dx, UART + 1
    xor eax, eax
    out dx, al                          /* DLM = 0 */
    mov dx, UART + 3
    mov al, 0x03
    out dx, al                          /* LCR: 8N1, DLAB = 0 */
    ret

/* putc(dil): polled 16550 output; clobbers rax and rdx only. */
putc:
    mov dx, UART_LSR
1:  in al, dx
    test al, LSR_THRE
    jz 1b
    mov dx, UART
    mov eax, edi
    out dx, al
    ret

/* puts(rdi = NUL-terminated string). */
    .globl puts
    .type puts, @function
puts:
    push rbx
    mov rbx, rdi
1:  movzx edi, byte ptr [rbx]
    test edi, edi
    jz 2f
    call putc
    inc rbx
    jmp 1b
2:  pop rbx
    ret

    .globl put_nl
    .type put_nl, @function
put_nl:
    mov edi, 10
    jmp putc

/* puthex(rdi): "0x" and the value in lowercase hex without leading zeros. */
    .globl puthex
    .type puthex, @function
puthex:
    push rbx
    push r12
    mov rbx, rdi
    mov edi, '0'
    call putc
    mov edi, 'x'
    call putc
    mov r12d, 60
1:  test r12d, r12d                     /* skip leading zero digits, keep the last */
    jz 2f
    mov rax, rbx
    mov ecx, r12d
    shr rax, cl
    test eax, 0xf
    jnz 2f
    sub r12d, 4
    jmp 1b
2:  mov rax, rbx
    mov ecx, r12d
    shr rax, cl
    and eax, 0xf
    lea rdx, [rip + hex_digits]
    movzx edi, byte ptr [rdx + rax]
    call putc
    sub r12d, 4
    jns 2b
    pop r12
    pop rbx
    ret

/* puthex2(rdi): two hex digits, no prefix (the ev= field). */
puthex2:
    push rbx
    mov rbx, rdi
    mov eax, ebx
    shr eax, 4
    and eax, 0xf
    lea rdx, [rip + hex_digits]
    movzx edi, byte ptr [rdx + rax]
    call putc
    mov eax, ebx
    and eax, 0xf
    lea rdx, [rip + hex_digits]
    movzx edi, byte ptr [rdx + rax]
    call putc
    pop rbx
    ret

/* put_kv(rdi = " key=", rsi = value). */
    .globl put_kv
    .type put_kv, @function
put_kv:
    push rbx
    mov rbx, rsi
    call puts
    mov rdi, rbx
    call puthex
    pop rbx
    ret

/* log_prefix(): "idtlog1 <test> ". */
log_prefix:
    lea rdi, [rip + s_idtlog]
    call puts
    mov rdi, qword ptr [rip + cur_test]
    call puts
    mov edi, ' '
    jmp putc

/* log_check(rdi = key, rsi = value): the record "idtlog1 <test> check key=value". */
    .globl log_check
    .type log_check, @function
log_check:
    push rbx
    push r12
    mov rbx, rdi
    mov r12, rsi
    call log_prefix
    lea rdi, [rip + s_check]
    call puts
    mov rdi, rbx
    call puts
    mov edi, '='
    call putc
    mov rdi, r12
    call puthex
    call put_nl
    pop r12
    pop rbx
    ret

/* ---------------------------------------------------------------- read-only data */
    .section .rodata
hex_digits:     .ascii "0123456789abcdef"
s_idtlog:       .asciz "idtlog1 "
s_begin:        .asciz "idtlog1 begin "
s_end:          .asciz "idtlog1 end "
s_pass:         .asciz " pass="
s_fail:         .asciz " fail="
s_verdict_pass: .asciz "PASS"
s_verdict_fail: .asciz "FAIL "
s_check:        .asciz "check "
s_ev:           .asciz "ev="
s_rsp:          .asciz " rsp="
s_err:          .asciz " err="
s_rip:          .asciz " rip="
s_cs:           .asciz " cs="
s_rflags:       .asciz " rflags="
s_sp:           .asciz " sp="
s_ss:           .asciz " ss="
s_cr2:          .asciz " cr2="
s_shutdown:     .asciz "Shutdown"

/* ---------------------------------------------------------------- data */
    .data
    .balign 16
    .globl gdt
gdt:
    .quad 0                             /* 0x00 null */
    .quad 0x00af9a000000ffff            /* 0x08 KCODE: 64-bit code, DPL0 */
    .quad 0x00cf92000000ffff            /* 0x10 KDATA: flat data, DPL0 */
    .quad 0x00cf9a000000ffff            /* 0x18 CODE32: 32-bit flat code, DPL0 */
    .quad 0x00affa000000ffff            /* 0x20 UCODE: 64-bit code, DPL3 */
    .quad 0x00cff2000000ffff            /* 0x28 UDATA: flat data, DPL3 */
    .quad 0x0000890000000067            /* 0x30 TSS: 64-bit available TSS, limit 0x67 */
    .quad 0                             /*      (base 63:32, filled in at boot) */
gdt_end:
    .balign 8
    .word 0
gdt_ptr:                                /* lgdt: 32-bit base in 32-bit mode, 64 in 64 */
    .word gdt_end - gdt - 1
    .quad gdt
    .word 0
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

    .balign 16
    .globl tss
tss:
    .fill 0x68, 1, 0

    .balign 8
boot_eax:       .quad 0
boot_ebx:       .quad 0

/* ---------------------------------------------------------------- bss */
    .bss
    .balign 4096
pml4:           .fill 4096, 1, 0
pdpt:           .fill 4096, 1, 0
pd:             .fill 4 * 4096, 1, 0
pt_test:        .fill 4096, 1, 0
    .globl idt
idt:            .fill 256 * 16, 1, 0

    .balign 4096
                .fill 16384, 1, 0
    .globl boot_stack_top
boot_stack_top:
                .fill 8192, 1, 0
    .globl rsp0_stack_top
rsp0_stack_top:
                .fill 4096, 1, 0
    .globl ist1_stack_top
ist1_stack_top:
                .fill 4096, 1, 0
    .globl ist2_stack_top
ist2_stack_top:
                .fill 4096, 1, 0
    .globl ist3_stack_top
ist3_stack_top:
                .fill 4096, 1, 0
    .globl user_stack_top
user_stack_top:

    .balign 8
    .globl last_ev, ev_count, ev_hook, ev_action, resume_rip, resume_rsp, extra_fn, depth
    .globl apic_id, cur_test
last_ev:        .fill EV_SIZE, 1, 0
ev_count:       .fill 256 * 8, 1, 0
ev_hook:        .fill 256 * 8, 1, 0
ev_action:      .fill 256, 1, 0
resume_rip:     .quad 0
resume_rsp:     .quad 0
extra_fn:       .quad 0
depth:          .quad 0
cur_test:       .quad 0
fail_reason:    .quad 0
n_pass:         .quad 0
n_fail:         .quad 0
apic_id:        .quad 0
apic_base_msr:  .quad 0
