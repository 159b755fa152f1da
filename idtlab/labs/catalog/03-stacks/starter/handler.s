# Lab 3: stacks.  Read lesson.md first.
#
# The checks load this file at 0x108000. Their main program calls `setup` once at CPL 0,
# then drops to a user program at CPL 3, which makes system calls with INT 0x80
# (RAX = the call's number, RDI = its argument). Keep these labels:
#     setup            fill in the TSS and install the gates
#     syscall_handler  vector 0x80
#     df_handler       vector 8, #DF
#     nmi_handler      vector 2, NMI
# The checks define:
#     KERNEL_STACK_TOP, DF_STACK_TOP, NMI_STACK_TOP   three stacks (the kernel stack is
#                      1 KiB, with a not-present guard page right below it)
#     syscall_table, NR_SYSCALLS   the system calls (they keep every register but RAX)
#     df_count, df_rsp, nmi_count  8 bytes each, zero at the start
#     df_stop          jump here at the end of df_handler: a #DF never returns
# and `tss` (the 64-bit TSS) and `idt`.

setup:
    # TODO 1: TSS.RSP0 = KERNEL_STACK_TOP (lesson: "The TSS": RSP0 is at tss + 4).
    # TODO 2: TSS.IST1 = DF_STACK_TOP and TSS.IST2 = NMI_STACK_TOP (tss + 0x24, + 0x2c).
    # TODO 3: gates, with set_gate below:
    #   0x80 -> syscall_handler, interrupt gate, DPL 3 (user code may INT 0x80)
    #   8    -> df_handler, on IST 1
    #   2    -> nmi_handler, on IST 2
    ret

syscall_handler:
    # TODO 4: RAX < NR_SYSCALLS: call qword ptr [syscall_table + rax*8]; else RAX = -1.
    #         Then return to the user program (lesson: "Entering the kernel from CPL 3").
    iretq

df_handler:
    # TODO 5: count it in df_count, and store the RSP the CPU pushed in the #DF frame
    #         into df_rsp (lesson: "A double fault on its own stack").
    jmp df_stop

nmi_handler:
    # TODO 6: count it in nmi_count and return.
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
