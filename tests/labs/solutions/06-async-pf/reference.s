# Lab 6 reference solution: the #PF handler reads the reason and CR2 first; the NMI saves
# CR2 and the reason, clears the reason for its own #PF, and restores both (what
# Lutomirski proposed in the 2020 thread; Linux's nmi.c restores CR2 as `nmi_cr2`).

pf_handler:
    push rax
    push rbx
    push rcx
    mov eax, dword ptr [APF_REASON]     # the reason ...
    mov dword ptr [APF_REASON], 0       # ... consumed ...
    mov rbx, cr2                        # ... and the address (the token, if async)
    test eax, eax
    jz pf_ordinary
    mov qword ptr [sleep_token], rbx
    inc qword ptr [sleep_count]
    jmp pf_out
pf_ordinary:
    lea rax, [rip + nmi_copy]
    cmp qword ptr [rsp + 32], rax
    jne pf_out
    add qword ptr [rsp + 32], 3
    inc qword ptr [fixups]
pf_out:
    pop rcx
    pop rbx
    pop rax
    add rsp, 8
    iretq

nmi_handler:
    push rax
    push rbx
    mov rax, cr2                        # the interrupted #PF's CR2 ...
    mov ebx, dword ptr [APF_REASON]     # ... and reason, if it has not read them yet
    mov dword ptr [APF_REASON], 0       # our own #PF is an ordinary one
    call nmi_body
    mov dword ptr [APF_REASON], ebx     # give them back
    mov cr2, rax
    pop rbx
    pop rax
    iretq
