# Lab 1, a mistake: the handler uses RAX without saving it.

install_gates:
    lea rax, [rip + bp_handler]
    mov word ptr [idt + 0x30], ax
    mov word ptr [idt + 0x32], 0x08
    mov byte ptr [idt + 0x34], 0
    mov byte ptr [idt + 0x35], 0x8e
    shr rax, 16
    mov word ptr [idt + 0x36], ax
    shr rax, 16
    mov dword ptr [idt + 0x38], eax
    mov dword ptr [idt + 0x3c], 0
    ret

bp_handler:
    inc qword ptr [bp_count]
    mov rax, qword ptr [rsp]
    mov qword ptr [last_bp_rip], rax
    iretq
