# Lab 4: timer and idle.  Read lesson.md first.
#
# The checks load this file at 0x108000. Keep these labels:
#     start_timer     program the local APIC timer: periodic, vector 0x40, every 20000
#                     cycles; called once, with interrupts off
#     timer_handler   vector 0x40 (an interrupt gate): count ticks, EOI, return
#     idle_loop       the kernel's idle loop: called once, never returns. It waits with
#                     HLT until work_pending is set (by a device interrupt), then
#                     clears work_pending and calls do_work
# The checks define:
#     APIC_BASE       0xfee00000, the local APIC's registers
#     ticks           8 bytes: your tick count
#     work_pending    8 bytes: set to 1 by the device's interrupt handler (vector 0x41)
#     do_work         call it (interrupts on) when there was work

start_timer:
    # TODO 1: the local APIC (lesson: "The local APIC timer"):
    #   spurious-vector register (APIC_BASE + 0xf0): 0x1ff (APIC on, spurious vector 0xff)
    #   divide configuration (+ 0x3e0): divide by 16
    #   LVT timer (+ 0x320): periodic, vector 0x40
    #   initial count (+ 0x380): 20000 cycles / 16
    ret

timer_handler:
    # TODO 2: add 1 to ticks, write 0 to the EOI register (APIC_BASE + 0xb0), return.
    #         Keep every register (lesson: "EOI").
    iretq

idle_loop:
    # TODO 3: check work_pending; if set: clear it, call do_work, and loop; if not:
    #         sleep with HLT until an interrupt, and loop. Without losing a wake-up
    #         (lesson: "The lost wake-up").
    hlt
    jmp idle_loop
