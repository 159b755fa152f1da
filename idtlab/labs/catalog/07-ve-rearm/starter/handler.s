# Lab 7: #VE re-arm.  Read lesson.md first.
#
# The guest runs in a VMX virtual machine whose host converts EPT violations into #VE
# (vector 20). The checks load this file at 0x108000. Keep the labels ve_handler (#VE,
# on IST1) and rearm_handler (vector 0x31, an ordinary interrupt gate). The checks
# define:
#     ve_info        the VE-information area (4 KiB); its busy word is at ve_info + 4
#     ve_count       8 bytes, zero at the start
#     APIC_BASE      0xfee00000 (the local APIC is on)
# Every access the checks make to a convertible page is a 3-byte load; the handler
# "handles" the violation by skipping it.

ve_handler:                             # IST1
    push rax
    inc qword ptr [ve_count]
    add qword ptr [rsp + 8], 3          # skip the 3-byte load that faulted
    # TODO: #VE delivery is off until the busy word is 0 again: re-arm it, safely
    #       (lesson: "The busy word", "Re-arm later").
    pop rax
    iretq

rearm_handler:                          # vector 0x31
    # TODO (lesson: "Re-arm later")
    iretq
