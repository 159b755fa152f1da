# Lab 7 reference solution: the #VE handler never clears the busy word; it sends itself
# an IPI (vector 0x31), taken once it has returned (IF = 1 again), whose handler re-arms.
# (Lutomirski's suggestion in the 2020 "#VE on IST" thread.)

ve_handler:                             # IST1
    push rax
    inc qword ptr [ve_count]
    add qword ptr [rsp + 8], 3          # skip the 3-byte load that faulted
    mov rax, APIC_BASE
    mov dword ptr [rax + 0x300], 0x40031    # ICR: fixed, self, vector 0x31: re-arm later
    pop rax
    iretq

rearm_handler:                          # vector 0x31: the #VE frame is gone by now
    push rax
    mov dword ptr [ve_info + 4], 0      # re-arm: #VE can be delivered again
    mov rax, APIC_BASE
    mov dword ptr [rax + 0xb0], 0       # EOI
    pop rax
    iretq
