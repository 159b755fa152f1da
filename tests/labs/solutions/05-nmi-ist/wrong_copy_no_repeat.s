# Lab 5, a mistake: the frame is copied off the IST top and the outer NMI returns through
# the copy, so a nested NMI no longer breaks the return. But the nested NMI just returns:
# if it came after the body looked at the NMI sources, it is lost.

.equ IRET_FRAME, NMI_STACK_TOP - 0x100

nmi_handler:
    push rax
    mov rax, qword ptr [rsp + 32]       # the interrupted RSP
    cmp rax, NMI_STACK_BOTTOM
    jb first_nmi
    cmp rax, NMI_STACK_TOP
    ja first_nmi
    pop rax                             # nested: ignore it
    iretq
first_nmi:
    mov rax, qword ptr [rsp]
    mov qword ptr [nmi_scratch + 40], rax
    mov rax, qword ptr [rsp + 8]
    mov qword ptr [IRET_FRAME], rax
    mov rax, qword ptr [rsp + 16]
    mov qword ptr [IRET_FRAME + 8], rax
    mov rax, qword ptr [rsp + 24]
    mov qword ptr [IRET_FRAME + 16], rax
    mov rax, qword ptr [rsp + 32]
    mov qword ptr [IRET_FRAME + 24], rax
    mov rax, qword ptr [rsp + 40]
    mov qword ptr [IRET_FRAME + 32], rax
    mov rsp, IRET_FRAME
    call nmi_body
    mov rax, qword ptr [nmi_scratch + 40]
    iretq
