# Lab 6, the classic (2020) fix that is not enough: the NMI saves and restores CR2 but
# not the async-PF reason. An NMI before the #PF handler read the reason: the NMI's own
# #PF takes the reason meant for the outer one (and sleeps on a token nobody issued),
# and the outer async #PF sees reason 0.
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
    call nmi_body
    mov cr2, rax
    pop rbx
    pop rax
    iretq
