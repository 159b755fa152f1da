# Lab 1 reference solution: an interrupt gate for #BP, an atomic count, the pushed RIP.

install_gates:
    lea rax, [rip + bp_handler]
    mov word ptr [idt + 0x30], ax       # offset 15:0
    mov word ptr [idt + 0x32], 0x08     # selector: kernel code
    mov byte ptr [idt + 0x34], 0        # IST 0: no stack switch
    mov byte ptr [idt + 0x35], 0x8e     # P=1, DPL=0, type 0xE: 64-bit interrupt gate
    shr rax, 16
    mov word ptr [idt + 0x36], ax       # offset 31:16
    shr rax, 16
    mov dword ptr [idt + 0x38], eax     # offset 63:32
    mov dword ptr [idt + 0x3c], 0       # reserved
    ret

bp_handler:
    inc qword ptr [bp_count]            # one instruction: nothing can come in between
    push rax
    mov rax, qword ptr [rsp + 8]        # the pushed RIP (above the RAX we just pushed)
    mov qword ptr [last_bp_rip], rax
    pop rax
    iretq
