# pf_demo: a page fault on a read from a not-present page, and a handler that skips
# the faulting instruction by resuming elsewhere.
#
# main reads 0x400000, which pf_demo.toml maps not-present. pf_handler records CR2,
# the error code and the faulting RIP, then rewrites the saved RIP to `recover`
# (re-executing the load would fault forever, and computing the length of the faulting
# instruction in the handler is fragile), drops the error code and returns.

    .intel_syntax noprefix

    .text
    .globl main, faulting_load, recover, pf_handler

    .type main, @function
main:
faulting_load:
    mov rax, qword ptr [0x400000]
    ud2                         # never reached: the handler resumes at recover

recover:
    hlt
    jmp recover                 # halt again if anything wakes the CPU

    .type pf_handler, @function
pf_handler:
    push rax
    mov rax, cr2
    mov [rip + pf_cr2], rax
    mov rax, [rsp + 8]          # error code (8 bytes up while rax is pushed)
    mov [rip + pf_error], rax
    mov rax, [rsp + 16]         # saved RIP: the faulting instruction (a fault)
    mov [rip + pf_rip], rax
    lea rax, [rip + recover]
    mov [rsp + 16], rax         # resume at recover
    inc qword ptr [rip + pf_count]
    pop rax
    add rsp, 8                  # drop the error code: iretq expects RIP on top
    iretq

    .data
    .balign 8
    .globl pf_cr2, pf_error, pf_rip, pf_count
    .type pf_cr2, @object
pf_cr2:
    .quad 0
    .type pf_error, @object
pf_error:
    .quad 0xdead                # overwritten with the error code
    .type pf_rip, @object
pf_rip:
    .quad 0
    .type pf_count, @object
pf_count:
    .quad 0
