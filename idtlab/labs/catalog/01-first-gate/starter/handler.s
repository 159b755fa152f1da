# Lab 1: a first gate.  Read lesson.md first.
#
# The checks load this file at 0x108000, next to a small main program that calls
# install_gates once and then executes INT3s. Keep these labels (the checks use them):
#     install_gates   called once, before any INT3
#     bp_handler      the #BP (vector 3) handler
# The checks define these for you (8 bytes each, zero at the start):
#     bp_count        how many #BP the handler saw
#     last_bp_rip     the RIP the CPU pushed for the last #BP
# and `idt`, the address of the IDT (256 gates of 16 bytes, all not present).

install_gates:
    # TODO 1: write the 16-byte gate for vector 3 at idt + 3*16 (lesson: "The IDT gate"):
    #   offset 15:0 of bp_handler, selector 0x08, IST 0, type/DPL/P,
    #   offset 31:16, offset 63:32, 4 reserved zero bytes.
    ret

bp_handler:
    # TODO 2: add 1 to bp_count.
    # TODO 3: store the RIP the CPU pushed into last_bp_rip (lesson: "The frame and IRETQ").
    # TODO 4: return to the interrupted code.
    hlt
