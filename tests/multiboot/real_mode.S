# real_mode: a multiboot v1 kernel that drops to real-address mode and takes events
# through the interrupt vector table there (cpu/real_mode.py, idt/real_mode.py):
#
#   1. INT 0x30 with FLAGS = 0x0203 (IF and CF set) and SP = 0x7000;
#   2. INT 0x31 with SP = 0: the frame wraps to 0xFFFA-0xFFFF;
#   3. DIV by zero: #DE, a fault, whose handler sets the divisor to 2 so that the
#      re-executed DIV completes;
#   4. ISA IRQ 11 raised and lowered on pc-testdev's port 0x200B with IF = 0 (the
#      8259A latches the edge), then `sti; hlt`: the interrupt (slave base 0x70 + 3 =
#      vector 0x73) wakes the HLT, and its handler returns after it.
#
# Each handler stores what it saw at RESULTS (SP, the three frame words, FLAGS inside the
# handler); then the kernel exits through port 0xF4 with value 0.
#
# The real-mode part is linked with the rest (at 1 MiB) and copied to RM_BASE (below
# 64 KiB, where CS = 0 reaches it); its labels are used as (label - rm_start + RM_BASE).

    .set RM_BASE, 0x8000
    .set RESULTS, 0x600                 # 5 words per event, events 0x30, 0x31, #DE, IRQ
    .set CODE16, 0x08
    .set DATA16, 0x10

    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002, 0, -0x1BADB002

    .text
    .code32
    .globl start
start:
    lgdt gdt_desc
    movl $rm_start, %esi
    movl $RM_BASE, %edi
    movl $(rm_end - rm_start), %ecx
    cld
    rep movsb
    ljmp $CODE16, $(rm_pm16 - rm_start + RM_BASE)

    .code16
    .globl rm_start
rm_start:
rm_pm16:                                # 16-bit protected mode: load 16-bit data segments
    movw $DATA16, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr0, %eax
    andl $~1, %eax                      # CR0.PE = 0
    movl %eax, %cr0
    ljmp $0, $(rm_real - rm_start + RM_BASE)
rm_real:
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7000, %sp
    lidt (ivt_desc - rm_start + RM_BASE)
    movw $(handler_30 - rm_start + RM_BASE), 0x30 * 4      # the IVT: offset, then segment 0
    movw $0, 0x30 * 4 + 2
    movw $(handler_31 - rm_start + RM_BASE), 0x31 * 4
    movw $0, 0x31 * 4 + 2
    movw $(handler_de - rm_start + RM_BASE), 0
    movw $0, 2
    movw $(handler_irq - rm_start + RM_BASE), 0x73 * 4
    movw $0, 0x73 * 4 + 2

    pushw $0x0203
    popfw                               # FLAGS = IF | bit 1 | CF
    .globl int_30
int_30:
    int $0x30
    .globl after_int_30

after_int_30:
    cli
    movw $0, %sp
    .globl int_31
int_31:
    int $0x31
    .globl after_int_31
after_int_31:
    movw $0x7000, %sp
    movw $10, %ax
    xorb %cl, %cl
    .globl div_site
div_site:
    divb %cl                            # #DE; the handler makes CL = 2
    movw %ax, RESULTS + 40              # 10 / 2: AL = 5, AH = 0

    cli
    movw $0x200b, %dx
    movl $1, %eax
    outl %eax, %dx                      # IRQ 11 up (a 32-bit write: one byte per line)
    movl $0, %eax
    outl %eax, %dx                      # and down again: the edge stays latched
    sti
    .globl halt
halt:
    hlt
    .globl after_hlt
after_hlt:
    movb $0, %al
    outb %al, $0xf4
1:  hlt
    jmp 1b

# A handler stores SP, the frame (IP, CS, FLAGS) and its own FLAGS at RESULTS + 10 * n.
.macro RECORD n
    movw %sp, RESULTS + 10 * \n
    movw %sp, %bx
    movw %ss:0(%bx), %si
    movw %si, RESULTS + 10 * \n + 2
    movw %ss:2(%bx), %si
    movw %si, RESULTS + 10 * \n + 4
    movw %ss:4(%bx), %si
    movw %si, RESULTS + 10 * \n + 6
    pushfw
    popw RESULTS + 10 * \n + 8
.endm

handler_30:
    RECORD 0
    iret
handler_31:
    RECORD 1
    iret
handler_de:
    RECORD 2
    movb $2, %cl
    iret
handler_irq:
    RECORD 3
    iret

ivt_desc:
    .word 0x3FF
    .long 0
    .globl rm_end
rm_end:

    .data
    .balign 8
gdt:
    .quad 0
    .quad 0x00009B000000FFFF            # 0x08: 16-bit code, base 0, limit 0xFFFF
    .quad 0x000093000000FFFF            # 0x10: 16-bit data, base 0, limit 0xFFFF
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
