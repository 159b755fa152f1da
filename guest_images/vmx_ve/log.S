/* idtlog1 output on the 16550 UART at 0x3F8 (format: docs/idtlog-format.md).
 *
 * Used by both the hypervisor and the guest part. Every routine preserves every
 * general-purpose register (flags are clobbered). Numbers are lowercase hex with a 0x
 * prefix and no leading zeros ("0x0", "0x10"); log_hex2 prints the two-digit event
 * vector without a prefix.
 */
    .intel_syntax noprefix
    .text
    .code64
    .globl log_putc, log_puts, log_hex, log_hex2, log_kv, log_nl, log_flush

    .set UART_THR, 0x3f8            /* transmitter holding register */
    .set UART_LSR, 0x3fd            /* line status register */
    .set LSR_THRE, 0x20             /* bit 5: transmitter holding register empty */
    .set LSR_TEMT, 0x40             /* bit 6: transmitter empty (last bit sent) */

/* log_putc: write the byte in AL, polling LSR for "transmitter holding register empty"
 * first (on idtlab an unknown port reads all ones, so the poll passes at once). */
log_putc:
    push rax
    push rdx
    mov ah, al
    mov dx, UART_LSR
1:  in al, dx
    test al, LSR_THRE
    jz 1b
    mov al, ah
    mov dx, UART_THR
    out dx, al
    pop rdx
    pop rax
    ret

/* log_puts: write the NUL-terminated string at RSI. */
log_puts:
    push rax
    push rsi
1:  mov al, [rsi]
    test al, al
    jz 2f
    call log_putc
    inc rsi
    jmp 1b
2:  pop rsi
    pop rax
    ret

/* log_hex: write RAX as 0x<digits>, no leading zeros. */
log_hex:
    push rax
    push rcx
    push rdx
    mov rdx, rax
    mov al, '0'
    call log_putc
    mov al, 'x'
    call log_putc
    mov ecx, 60                     /* skip leading zero nibbles, keep the last one */
1:  test ecx, ecx
    jz 2f
    mov rax, rdx
    shr rax, cl
    and eax, 0xf
    jnz 2f
    sub ecx, 4
    jmp 1b
2:  mov rax, rdx
    shr rax, cl
    and eax, 0xf
    call put_nibble
    sub ecx, 4
    jns 2b
    pop rdx
    pop rcx
    pop rax
    ret

/* log_hex2: write AL as exactly two hex digits (the ev= field). */
log_hex2:
    push rax
    push rdx
    movzx edx, al
    mov eax, edx
    shr eax, 4
    call put_nibble
    mov eax, edx
    and eax, 0xf
    call put_nibble
    pop rdx
    pop rax
    ret

put_nibble:                         /* AL = 0..15 -> '0'..'9', 'a'..'f' */
    cmp al, 10
    jb 1f
    add al, 'a' - '0' - 10
1:  add al, '0'
    jmp log_putc

/* log_kv: write the string at RSI (" key=") then RAX in hex. */
log_kv:
    call log_puts
    jmp log_hex

/* log_nl: end the record. */
log_nl:
    push rax
    mov al, 10
    call log_putc
    pop rax
    ret

/* log_flush: wait until the UART has sent the last bit (LSR.TEMT). Bochs stops as soon
 * as the image writes its shutdown port, dropping whatever is still in the UART. */
log_flush:
    push rax
    push rdx
    mov dx, UART_LSR
1:  in al, dx
    test al, LSR_TEMT
    jz 1b
    pop rdx
    pop rax
    ret
