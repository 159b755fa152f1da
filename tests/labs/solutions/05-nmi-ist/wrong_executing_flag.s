# Lab 5, a classic mistake: an "NMI executing" flag, and a nested NMI just returns. But
# the nested NMI's frame has already landed on IST1, on top of the outer one's: the outer
# IRETQ returns through the nested frame, into its own handler.

nmi_handler:
    cmp qword ptr [nmi_scratch], 0
    jne nmi_nested
    mov qword ptr [nmi_scratch], 1
    call nmi_body
    mov qword ptr [nmi_scratch], 0
    iretq
nmi_nested:
    iretq
