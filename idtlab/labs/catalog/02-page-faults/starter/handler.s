# Lab 2: page faults.  Read lesson.md first.
#
# The checks load this file at 0x108000 and send #PF (vector 14) to pf_handler through
# an interrupt gate. Keep the label pf_handler. The checks define:
#     DEMAND_START, DEMAND_END   the demand-zero region (not present until touched)
#     pool_next                  8 bytes: the next free page of the page pool (the
#                                pool's pages are zero already)
#     killed_addr, killed_error  8 bytes each: what a killed user access was
#     user_killed                jump here after filling killed_*: ends the user program
#     kernel_oops                jump here for a fault the kernel cannot handle
#
# What pf_handler must do (lesson: "What you build"):
#   * a not-present fault inside [DEMAND_START, DEMAND_END): take a page from the pool,
#     map it there (present, writable, user), and return so the access runs again;
#   * any other fault from user mode (CPL 3): fill killed_addr/killed_error, jump to
#     user_killed;
#   * any other fault from the kernel: jump to kernel_oops.

pf_handler:
    push rax
    push rcx
    push rdx
    push rdi
    # TODO 1: the error code is on the stack, above the registers you pushed; the
    #         faulting address is in CR2 (lesson: "CR2 and the error code").
    # TODO 2: turn interrupts back on with STI, as Linux does, once it is safe
    #         (lesson: "Interrupts in the #PF handler").
    # TODO 3: decide: map a page, kill the user program, or oops.
    # TODO 4: map: pte_address gives the address of the page-table entry; write
    #         page | P | W | U into it, then INVLPG the address (lesson: "Mapping a page").
    # TODO 5: return: pop what you pushed, drop the error code, IRETQ.
    jmp kernel_oops


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
