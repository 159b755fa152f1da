# Lab 3, the classic mistake: "NMI and #DF both need a good stack: IST1 for both". An NMI
# during the #DF handler lands on the #DF frame.

setup:
    push rdi
    push rsi
    push rdx
    mov qword ptr [tss + 4], KERNEL_STACK_TOP       # TSS.RSP0
    mov qword ptr [tss + 0x24], DF_STACK_TOP        # TSS.IST1
    mov qword ptr [tss + 0x2c], NMI_STACK_TOP       # TSS.IST2
    mov edi, 0x80
    lea rsi, [rip + syscall_handler]
    mov edx, 0x00ee                     # interrupt gate, DPL 3, IST 0
    call set_gate
    mov edi, 8
    lea rsi, [rip + df_handler]
    mov edx, 0x018e                     # interrupt gate, DPL 0, IST 1
    call set_gate
    mov edi, 2
    lea rsi, [rip + nmi_handler]
    mov edx, 0x018e                     # interrupt gate, DPL 0, IST 1 (shared!)
    call set_gate
    pop rdx
    pop rsi
    pop rdi
    ret

syscall_handler:
    cmp rax, NR_SYSCALLS                # unsigned: a negative number is out of range
    jae syscall_bad
    call qword ptr [syscall_table + rax*8]
    iretq
syscall_bad:
    mov rax, -1
    iretq

df_handler:
    inc qword ptr [df_count]
    mov rax, qword ptr [rsp + 32]       # error code, RIP, CS, RFLAGS, then RSP
    mov qword ptr [df_rsp], rax
    jmp df_stop

nmi_handler:
    inc qword ptr [nmi_count]
    iretq


# Given (you wrote it in lab 1): install a gate.
#   RDI = vector, RSI = handler, DL = byte 5 (P | DPL << 5 | type), DH = IST.
set_gate:
    push rax
    push rsi
    mov rax, rdi
    shl rax, 4
    add rax, idt
    mov word ptr [rax], si              # offset 15:0
    mov word ptr [rax + 2], 0x08        # kernel code selector
    mov byte ptr [rax + 4], dh          # IST
    mov byte ptr [rax + 5], dl          # P, DPL, type
    shr rsi, 16
    mov word ptr [rax + 6], si          # offset 31:16
    shr rsi, 16
    mov dword ptr [rax + 8], esi        # offset 63:32
    mov dword ptr [rax + 12], 0
    pop rsi
    pop rax
    ret
