/* bootsect.S: a 512-byte boot sector that starts a multiboot image under Bochs.
 *
 * Bochs has no multiboot loader, so idtlab/ref.py builds a disk: this sector, then the
 * image's memory image (the PT_LOAD segments laid out flat from the lowest load address,
 * .bss included as zeros) from sector 1 on. The BIOS loads this sector at 0x7c00 and
 * jumps to it in real mode with DL = the boot drive. It then:
 *   1. enables A20 (port 0x92),
 *   2. reads the image with INT 13h AH=42h (extended read, LBA) into 0x10000.. in
 *      chunks of 64 sectors,
 *   3. enters 32-bit protected mode with flat segments,
 *   4. copies the image to its load address (1 MiB or above),
 *   5. jumps to the multiboot entry with EAX = 0x2BADB002 and EBX = a minimal multiboot
 *      information structure (flags = 1: mem_lower/mem_upper), interrupts disabled,
 *      as the multiboot specification's "Machine state" section requires.
 * The parameter block at offset 0x1f0 (load address, entry, sector count) is patched by
 * idtlab/ref.py; the build checks that the sector is exactly 512 bytes.
 * On a disk error it prints "boot: disk error" on the UART at 0x3f8 and halts.
 */
    .intel_syntax noprefix
    .code16
    .text
    .globl start
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov byte ptr [drive], dl

    in al, 0x92                         /* fast A20 */
    or al, 2
    and al, 0xfe
    out 0x92, al

    mov cx, word ptr [param_sectors]
read_loop:
    mov ax, cx
    cmp ax, 64
    jbe 1f
    mov ax, 64
1:  mov word ptr [dap_count], ax
    push ax
    push cx
    mov si, OFFSET dap
    mov dl, byte ptr [drive]
    mov ah, 0x42
    int 0x13
    jc disk_error
    pop cx
    pop ax
    sub cx, ax
    add word ptr [dap_lba], ax
    shl ax, 5                           /* sectors * 512 / 16 paragraphs */
    add word ptr [dap_segment], ax
    test cx, cx
    jnz read_loop

    cli
    lgdt [gdt_desc]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0xea                          /* ljmp 0x08:pm32 */
    .word pm32
    .word 0x08

    .code32
pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esp, 0x7c00
    cld
    mov esi, 0x10000
    mov edi, dword ptr [param_load]
    movzx ecx, word ptr [param_sectors]
    shl ecx, 7                          /* dwords */
    rep movsd
    mov eax, 0x2badb002
    mov ebx, OFFSET mbi
    jmp dword ptr [param_entry]

    .code16
disk_error:
    mov si, OFFSET msg_error
2:  lodsb
    test al, al
    jz 4f
    mov ah, al
    mov dx, 0x3fd
3:  in al, dx
    test al, 0x20
    jz 3b
    mov dx, 0x3f8
    mov al, ah
    out dx, al
    jmp 2b
4:  cli
    hlt
    jmp 4b

msg_error:
    .asciz "boot: disk error\n"

    .balign 4
dap:                                    /* INT 13h AH=42h disk address packet */
    .byte 16, 0
dap_count:
    .word 0
    .word 0                             /* buffer offset */
dap_segment:
    .word 0x1000                        /* buffer segment: 0x10000 */
dap_lba:
    .quad 1

    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x08: 32-bit flat code */
    .quad 0x00cf92000000ffff            /* 0x10: flat data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

mbi:                                    /* multiboot information: flags, mem_lower, mem_upper */
    .long 1
    .long 639
    .long 64512                         /* KiB above 1 MiB: 64 MiB of RAM */

drive:
    .byte 0

    .org 0x1f0
param_load:
    .long 0x100000
param_entry:
    .long 0x100000
param_sectors:
    .word 0
    .org 0x1fe
    .byte 0x55, 0xaa
