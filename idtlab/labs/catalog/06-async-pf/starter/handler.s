# Lab 6: async page faults.  Read lesson.md first.
#
# The guest runs under a KVM host that swaps its pages out and tells it with async page
# faults (main has already enabled them: the data area is at APF_AREA). The checks load
# this file at 0x108000. Keep the labels pf_handler (#PF, vector 14) and nmi_handler
# (NMI, vector 2, on IST1). The checks define:
#     APF_REASON     the 32-bit "reason" word of the async-PF area (1: page not present;
#                    0: an ordinary #PF); the host writes it before it injects
#     nmi_body       call it once per NMI; it copies from an address that faults
#                    (at nmi_copy: an ordinary #PF the #PF handler must fix up)
#     nmi_copy       the faulting load in nmi_body: a #PF there is fixed up by skipping
#                    its 3 bytes (an exception-table entry)
#     sleep_token, sleep_count, fixups   8 bytes each, zero at the start

pf_handler:
    push rax
    push rbx
    push rcx
    # TODO 1: EAX = the reason (APF_REASON, 32 bits), then clear it (write 0), then
    #         RBX = CR2 (lesson: "The async #PF protocol").
    test eax, eax
    jz pf_ordinary
    mov qword ptr [sleep_token], rbx    # async: "sleep" until token RBX's page is in,
    inc qword ptr [sleep_count]         #   here: return and retry the access
    jmp pf_out
pf_ordinary:
    lea rax, [rip + nmi_copy]
    cmp qword ptr [rsp + 32], rax       # the faulting RIP: an exception-table fixup?
    jne pf_out                          # no: spurious, retry
    add qword ptr [rsp + 32], 3         # yes: skip the 3-byte load
    inc qword ptr [fixups]
pf_out:
    pop rcx
    pop rbx
    pop rax
    add rsp, 8                          # the error code
    iretq

nmi_handler:
    # TODO 2: the NMI can arrive anywhere in pf_handler, before it has read the reason
    #         and CR2, and nmi_body takes a #PF of its own (lesson: "The race").
    call nmi_body
    iretq
