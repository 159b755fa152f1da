# Lab 2, a mistake: the error code is left on the stack, so IRETQ pops it as the RIP.

pf_handler:
    push rax
    push rcx
    push rdx
    push rdi
    mov rdx, cr2                        # the faulting address: before anything else
    mov rcx, qword ptr [rsp + 32]       # the error code, above the 4 registers
    test qword ptr [rsp + 56], 0x200    # the interrupted RFLAGS.IF
    jz pf_decide
    sti                                 # as Linux: interrupts back on (CR2 is safe now)
pf_decide:
    test ecx, 1                         # P = 1: a protection violation
    jnz pf_refuse
    cmp rdx, DEMAND_START
    jb pf_refuse
    cmp rdx, DEMAND_END
    jae pf_refuse
    mov rcx, 0x1000
    xadd qword ptr [pool_next], rcx     # rcx = the page; one instruction, no boundary inside
    mov rdi, rdx
    call pte_address
    or rcx, 7                           # present, writable, user
    mov qword ptr [rax], rcx
    invlpg [rdx]                        # the not-present translation must go
    pop rdi
    pop rdx
    pop rcx
    pop rax
    iretq
pf_refuse:
    test qword ptr [rsp + 48], 3        # the interrupted CS: from CPL 3?
    jz kernel_oops
    mov qword ptr [killed_addr], rdx
    mov rcx, qword ptr [rsp + 32]
    mov qword ptr [killed_error], rcx
    jmp user_killed


# Given: the address of the 4-KiB page-table entry that maps the linear address in RDI,
# returned in RAX (a walk of the 4-level page tables from CR3; the demand region is
# mapped with 4-KiB pages). Clobbers nothing else.
pte_address:
    push rcx
    push rdx
    mov rdx, 0x000ffffffffff000     # the address bits of an entry
    mov rax, cr3
    and rax, rdx                    # the PML4
    mov rcx, rdi
    shr rcx, 39
    and rcx, 0x1ff
    mov rax, qword ptr [rax + rcx*8]
    and rax, rdx                    # the page-directory-pointer table
    mov rcx, rdi
    shr rcx, 30
    and rcx, 0x1ff
    mov rax, qword ptr [rax + rcx*8]
    and rax, rdx                    # the page directory
    mov rcx, rdi
    shr rcx, 21
    and rcx, 0x1ff
    mov rax, qword ptr [rax + rcx*8]
    and rax, rdx                    # the page table
    mov rcx, rdi
    shr rcx, 12
    and rcx, 0x1ff
    lea rax, [rax + rcx*8]          # the entry
    pop rdx
    pop rcx
    ret
