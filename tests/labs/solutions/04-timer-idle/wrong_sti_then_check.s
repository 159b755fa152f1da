# Lab 4, the classic mistake: interrupts on, check, then sleep. An interrupt between the
# check and the HLT sets work_pending after it was checked: HLT sleeps with work pending.

start_timer:
    push rax
    mov rax, APIC_BASE
    mov dword ptr [rax + 0xf0], 0x1ff   # spurious-vector register: APIC software-enabled
    mov dword ptr [rax + 0x3e0], 0x3    # divide configuration: by 16
    mov dword ptr [rax + 0x320], 0x20040    # LVT timer: periodic (bit 17), vector 0x40
    mov dword ptr [rax + 0x380], 1250   # initial count: 1250 * 16 = 20000 cycles
    pop rax
    ret

timer_handler:
    push rax
    inc qword ptr [ticks]
    mov rax, APIC_BASE
    mov dword ptr [rax + 0xb0], 0       # EOI: the ISR bit of 0x40 goes, the next tick can come
    pop rax
    iretq

idle_loop:
    sti
    cmp qword ptr [work_pending], 0
    jne idle_work
    hlt                                 # an interrupt just before this is a lost wake-up
    jmp idle_loop
idle_work:
    mov qword ptr [work_pending], 0
    sti
    call do_work
    jmp idle_loop
