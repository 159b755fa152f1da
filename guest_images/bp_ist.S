# bp_ist: a breakpoint delivered on an IST stack without a privilege change.
#
# main executes int3. The #BP gate selects IST1 (see bp_ist.toml), so the CPU loads
# RSP from the TSS's ist1 slot even though CPL stays 0, aligns it down to 16 and pushes
# the five-slot frame (#BP has no error code). bp_handler records the RSP it starts
# with and the frame, counts itself, and returns; main then halts.

    .intel_syntax noprefix

    .text
    .globl main, after_int3, bp_handler

    .type main, @function
main:
    int3
after_int3:                     # the RIP that #BP pushes: int3 is a trap
    hlt
    jmp after_int3              # halt again if anything wakes the CPU

    .type bp_handler, @function
bp_handler:
    mov [rip + bp_seen_rsp], rsp
    push rax
    mov rax, [rsp + 8]          # frame slots sit 8 bytes higher while rax is pushed
    mov [rip + bp_frame], rax           # RIP
    mov rax, [rsp + 16]
    mov [rip + bp_frame + 8], rax       # CS
    mov rax, [rsp + 24]
    mov [rip + bp_frame + 16], rax      # RFLAGS
    mov rax, [rsp + 32]
    mov [rip + bp_frame + 24], rax      # RSP
    mov rax, [rsp + 40]
    mov [rip + bp_frame + 32], rax      # SS
    inc qword ptr [rip + bp_count]
    pop rax
    iretq

    .data
    .balign 8
    .globl bp_seen_rsp, bp_frame, bp_count
    .type bp_seen_rsp, @object
bp_seen_rsp:
    .quad 0
    .type bp_frame, @object
bp_frame:
    .quad 0, 0, 0, 0, 0
    .type bp_count, @object
bp_count:
    .quad 0
