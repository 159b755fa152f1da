# Lab 5: NMIs on IST.  Read lesson.md first.
#
# The checks load this file at 0x108000. The NMI gate (vector 2) uses IST1: every NMI's
# frame is pushed at the top of the NMI stack. Keep the label nmi_handler. The checks
# define:
#     NMI_STACK_BOTTOM, NMI_STACK_TOP   the NMI stack (8 KiB; TSS.IST1 = NMI_STACK_TOP)
#     nmi_body       call it once per NMI: it handles the NMI's sources. It keeps every
#                    register, and it executes INT3 (a breakpoint in NMI context): the
#                    #BP handler's IRETQ unblocks NMIs (lesson: "Any IRET unblocks NMIs")
#     nmi_scratch    64 bytes of memory for your handler
#
# This handler is correct for one NMI at a time. Run the checks: it is not enough.
# TODO: make it survive an NMI that nests (lesson: "Surviving the nested NMI").

nmi_handler:
    call nmi_body
    iretq
