# Lab 7, the classic mistake: re-arm in the #VE handler itself, then IRETQ. Between the
# store and the IRETQ the handler still runs on IST1: an NMI there whose handler touches
# convertible memory is a second #VE, delivered on IST1 over the live frame.

ve_handler:                             # IST1
    push rax
    inc qword ptr [ve_count]
    add qword ptr [rsp + 8], 3
    mov dword ptr [ve_info + 4], 0      # re-arm now
    pop rax
    iretq

rearm_handler:
    iretq
