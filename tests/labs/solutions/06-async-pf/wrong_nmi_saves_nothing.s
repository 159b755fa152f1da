# Lab 6, a mistake: the NMI handler saves nothing: an NMI before the #PF handler read
# CR2 changes CR2 under it.
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
    call nmi_body
    iretq
