# Lab 5 reference solution: a simplified Linux x86-64 NMI entry (arch/x86/entry/entry_64.S,
# "NMI executing" / "iret frame" / "outermost frame" / repeat_nmi).
#
#   NMI_STACK_TOP        +----------------------+
#                        | hardware frame       |  every NMI's: a nested one overwrites it
#   NMI_STACK_TOP - 0x28 +----------------------+
#                        | (nested: its RAX)    |
#                        |         ...          |
#   IRET_FRAME           +----------------------+  = NMI_STACK_TOP - 0x100
#                        | iret frame           |  what the outer NMI's last IRETQ uses;
#                        | (RIP CS RFLAGS RSP SS)|  a nested NMI points it at repeat_nmi
#                        +----------------------+
#                        | nmi_body's stack     |
#
#   nmi_scratch + 0..39  outermost frame: the first NMI's hardware frame, copied
#   nmi_scratch + 40     the interrupted RAX
#
# A nested NMI is one whose interrupted RSP is on the NMI stack (only an NMI handler
# runs there). It cannot come before the first NMI's handler has copied its frame: NMIs
# stay blocked until the first IRET, and the first IRET is nmi_body's INT3 returning.

.equ IRET_FRAME, NMI_STACK_TOP - 0x100
.equ OUTERMOST, nmi_scratch
.equ NMI_RAX, nmi_scratch + 40

nmi_handler:
    push rax
    mov rax, qword ptr [rsp + 32]       # the interrupted RSP
    cmp rax, NMI_STACK_BOTTOM
    jb first_nmi
    cmp rax, NMI_STACK_TOP
    ja first_nmi
    # Nested: the outer NMI is somewhere in its handler. If it is (re)building its iret
    # frame it runs the body afterwards anyway; otherwise make its final IRETQ go to
    # repeat_nmi, on the NMI stack, so that it runs the body once more.
    mov rax, qword ptr [rsp + 8]        # the interrupted RIP
    cmp rax, offset repeat_nmi
    jb nested_repeat
    cmp rax, offset end_repeat_nmi
    jb nested_return
nested_repeat:
    lea rax, [rip + repeat_nmi]
    mov qword ptr [IRET_FRAME], rax         # RIP
    mov qword ptr [IRET_FRAME + 8], 0x08    # CS
    mov qword ptr [IRET_FRAME + 16], 0x2    # RFLAGS (IF = 0)
    mov qword ptr [IRET_FRAME + 24], IRET_FRAME  # RSP: stay on the NMI stack
    mov qword ptr [IRET_FRAME + 32], 0      # SS
nested_return:
    pop rax
    iretq

first_nmi:
    mov rax, qword ptr [rsp]            # the interrupted RAX
    mov qword ptr [NMI_RAX], rax
    mov rax, qword ptr [rsp + 8]        # copy the hardware frame: the outermost frame
    mov qword ptr [OUTERMOST], rax
    mov rax, qword ptr [rsp + 16]
    mov qword ptr [OUTERMOST + 8], rax
    mov rax, qword ptr [rsp + 24]
    mov qword ptr [OUTERMOST + 16], rax
    mov rax, qword ptr [rsp + 32]
    mov qword ptr [OUTERMOST + 24], rax
    mov rax, qword ptr [rsp + 40]
    mov qword ptr [OUTERMOST + 32], rax
repeat_nmi:                             # (re)build the iret frame from the outermost one
    mov rax, qword ptr [OUTERMOST]
    mov qword ptr [IRET_FRAME], rax
    mov rax, qword ptr [OUTERMOST + 8]
    mov qword ptr [IRET_FRAME + 8], rax
    mov rax, qword ptr [OUTERMOST + 16]
    mov qword ptr [IRET_FRAME + 16], rax
    mov rax, qword ptr [OUTERMOST + 24]
    mov qword ptr [IRET_FRAME + 24], rax
    mov rax, qword ptr [OUTERMOST + 32]
    mov qword ptr [IRET_FRAME + 32], rax
    mov rsp, IRET_FRAME
end_repeat_nmi:
    call nmi_body
    mov rax, qword ptr [NMI_RAX]
    iretq                               # through the iret frame
