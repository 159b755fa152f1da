# boot64: a multiboot v1 kernel that enters long mode by itself, owns its GDT, IDT and
# TSS, prints on the 16550 UART at 0x3F8 (polling LSR bit 5), takes a #BP through its
# own IDT on IST1, and exits through port 0xF4 (value 0), then Bochs' port 0x8900.
#
# The 32-bit part (start .. the far jump) is straight-line code: every instruction in
# it runs exactly once, so a test can count them by decoding it.

    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003           # bit 0: page-aligned modules, bit 1: memory info
    .set KERNEL_CS32, 0x08
    .set KERNEL_DS, 0x10
    .set KERNEL_CS64, 0x18
    .set TSS_SEL, 0x20

    .section .multiboot, "a"
    .balign 4
    .globl mb_header
mb_header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl start
start:
    movl %eax, boot_magic               # what the loader passed
    movl %ebx, boot_info
    movl $stack_top, %esp
    movl %cr4, %eax
    orl $0x20, %eax                     # CR4.PAE
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx              # IA32_EFER
    rdmsr
    orl $0x100, %eax                    # EFER.LME
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax               # CR0.PG | CR0.PE: long mode is active (LMA)
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmp $KERNEL_CS64, $start64         # CS.L = 1: 64-bit mode

    .code64
    .globl start64
start64:
    movw $KERNEL_DS, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movq $stack_top, %rsp

    # The TSS descriptor (16 bytes at GDT offset 0x20): base = tss, limit 0x67.
    leaq tss(%rip), %rax
    movw $0x67, gdt_tss(%rip)
    movw %ax, gdt_tss+2(%rip)
    shrq $16, %rax
    movb %al, gdt_tss+4(%rip)
    movb $0x89, gdt_tss+5(%rip)         # present, type 9: available 64-bit TSS
    movb %ah, gdt_tss+7(%rip)
    leaq ist1_top(%rip), %rax
    movq %rax, tss+0x24(%rip)           # IST1
    movw $TSS_SEL, %ax
    ltr %ax

    # IDT gate 3 (#BP): 64-bit interrupt gate, DPL 0, IST1, handler bp_handler.
    leaq bp_handler(%rip), %rax
    leaq idt+3*16(%rip), %rdi
    movw %ax, (%rdi)
    movw $KERNEL_CS64, 2(%rdi)
    movb $1, 4(%rdi)
    movb $0x8e, 5(%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    lidt idt_ptr(%rip)

    leaq hello(%rip), %rsi
    call puts
    pushq $0x2
    popfq
    .globl bp_site
bp_site:
    int3
    .globl after_bp
after_bp:
    movq %rsp, rsp_after(%rip)
    leaq bye(%rip), %rsi
    call puts
    movb $0, %al
    outb %al, $0xf4                     # isa-debug-exit: pass
    leaq shutdown(%rip), %rsi
    movw $0x8900, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  cli
    hlt
    jmp 2b

    .globl bp_handler
bp_handler:
    movq %rsp, bp_rsp(%rip)
    leaq in_bp(%rip), %rsi
    call puts
    iretq

# puts: print the NUL-terminated string at RSI (clobbers RAX, RBX, RDX, RSI).
    .globl puts
puts:
    lodsb
    testb %al, %al
    jz 3f
    movb %al, %bl
    movw $0x3fd, %dx
2:  inb %dx, %al                        # LSR
    testb $0x20, %al                    # THR empty
    jz 2b
    movb %bl, %al
    movw $0x3f8, %dx
    outb %al, %dx
    jmp puts
3:  ret

    .section .rodata
hello:      .asciz "boot64: in long mode\n"
in_bp:      .asciz "boot64: #BP\n"
bye:        .asciz "boot64: done\n"
shutdown:   .asciz "Shutdown"

    .data
    .balign 4096
    .globl pml4
pml4:   .quad pdpt + 3
        .fill 511, 8, 0
pdpt:   .quad pd + 3
        .fill 511, 8, 0
pd:     .quad 0x000083, 0x200083        # 2 x 2-MiB pages: identity map of 0..4 MiB
        .fill 510, 8, 0
    .balign 4096
    .globl idt
idt:    .fill 512, 8, 0                 # 256 16-byte gates

    .balign 16
    .globl gdt
gdt:    .quad 0
        .quad 0x00cf9a000000ffff        # 0x08 flat 32-bit code
        .quad 0x00cf92000000ffff        # 0x10 flat data
        .quad 0x00af9a000000ffff        # 0x18 64-bit code
gdt_tss: .quad 0, 0                     # 0x20 TSS (filled in 64-bit mode)
gdt_end:
gdt_ptr: .word gdt_end - gdt - 1
        .long gdt
    .balign 8
idt_ptr: .word 256 * 16 - 1
        .quad idt
    .balign 8
    .globl boot_magic, boot_info, bp_rsp, rsp_after
boot_magic: .long 0
boot_info:  .long 0
bp_rsp:     .quad 0
rsp_after:  .quad 0
    .balign 16
    .globl tss
tss:    .fill 0x68, 1, 0

    .bss
    .balign 16
    .skip 4096
    .globl stack_top
stack_top:
    .skip 4096
    .globl ist1_top
ist1_top:
