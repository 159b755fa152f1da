# Lab 1, a classic mistake: "#BP is a trap, so a trap gate" (IF stays 1 in the handler)
# and a count done as load / add / store. An interrupt between the load and the store
# whose handler hits a breakpoint of its own: its count is overwritten, one is lost.

install_gates:
    lea rax, [rip + bp_handler]
    mov word ptr [idt + 0x30], ax
    mov word ptr [idt + 0x32], 0x08
    mov byte ptr [idt + 0x34], 0
    mov byte ptr [idt + 0x35], 0x8f     # type 0xF: trap gate
    shr rax, 16
    mov word ptr [idt + 0x36], ax
    shr rax, 16
    mov dword ptr [idt + 0x38], eax
    mov dword ptr [idt + 0x3c], 0
    ret

bp_handler:
    push rax
    mov rax, qword ptr [bp_count]
    add rax, 1
    mov qword ptr [bp_count], rax
    mov rax, qword ptr [rsp + 8]
    mov qword ptr [last_bp_rip], rax
    pop rax
    iretq
