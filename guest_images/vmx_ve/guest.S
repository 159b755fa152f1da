/* The guest part of the #VE image: what runs in VMX non-root operation on Bochs, and
 * alone on idtlab (guest.toml), where idtlab's host model plays the hypervisor.
 *
 * It assumes what hyp.S sets up (and guest.toml declares): 64-bit mode, CS 0x08, SS
 * 0x10, RFLAGS 0x2, RSP = guest_stack_top; IDT vector 20 (#VE) -> guest_ve_handler on
 * IST1 (ve_stack_top), vector 3 (#BP) -> guest_bp_handler on IST2 (bp_stack_top), vector
 * 2 (NMI) -> guest_nmi_handler on the current stack (IST NMI_IST: see vmx_ve.inc), every
 * other vector not present;
 * the local APIC at 0xFEE00000 (identity mapped, not behind any EPT restriction); guest paging identity except linear alias_page -> guest-
 * physical page_a; "EPT-violation #VE" on, the VE-information page at ve_info, EPTP
 * index EPTP_INDEX; EPT identity RWX except (SDM Vol. 3C "EPT Translation Mechanism"):
 *
 *     page_a              not present, suppress-#VE 0     (ve_read: #VE)
 *     page_b              not present, suppress-#VE 0     (ve_busy: VM exit, busy set)
 *     page_c              read-only,   suppress-#VE 0     (ve_rearm: write -> #VE)
 *     page_d              not present, suppress-#VE 1     (ve_suppress: VM exit)
 *     page_e              read/write,  suppress-#VE 0     (ve_fetch: fetch -> #VE)
 *     bp_stack_top_page   read-only,   suppress-#VE 0     (ve_delivery: VM exit)
 *     page_f              not present, suppress-#VE 0     (ve_iret_nmi: #VE, then VM exit)
 *
 * and a hypervisor that answers every EPT-violation VM exit by making the page RWX and
 * resuming (re-injecting the event if the violation hit an event delivery).
 *
 * The tests run in order and share the busy word (SDM Vol. 3C "Virtualization
 * Exceptions": the CPU sets the dword at offset 4 of the information area to
 * 0xFFFFFFFF on every conversion; while it is not 0, convertible violations are VM
 * exits; software re-arms by writing 0):
 *
 *   ve_read      read through alias_page (GLA != GPA): #VE. The handler logs the frame
 *                and the area and does NOT re-arm.
 *   ve_busy      read page_b with the busy word still set: VM exit (a host_ line on
 *                Bochs), the host maps the page, the load completes; no #VE, the area
 *                still describes ve_read.
 *   ve_rearm     re-arm, then write to the read-only page_c: #VE again (qualification:
 *                write, page readable); the store never happens. Re-arms afterwards.
 *   ve_suppress  read page_d, whose leaf has suppress-#VE: VM exit although the busy
 *                word is 0; the load completes after the host's fix.
 *   ve_fetch     jump into the non-executable page_e: #VE with the fetch bit. Re-arms.
 *   ve_delivery  INT3 whose IST2 stack top page is read-only: the violation happens while
 *                delivering #BP, so it is a VM exit whatever the busy word says; the host
 *                re-injects #BP, which is then delivered as if nothing had happened.
 *   ve_iret_nmi  an NMI to ourselves (APIC ICR); the NMI handler returns through a frame
 *                whose SS slot lies on page_f. The IRETQ unblocks NMIs, then its read of
 *                that slot is a convertible violation: a #VE whose qualification has bit
 *                12 ("NMI unblocking due to IRET"). The #VE handler returns to the IRETQ
 *                without re-arming, so the second try is a VM exit (bit 12 clear now:
 *                NMIs were no longer blocked); the host maps page_f and the IRETQ
 *                completes. On Bochs the NMI itself is a VM exit too ("NMI exiting") and
 *                the hypervisor injects it as a virtual NMI; on idtlab it arrives directly.
 *
 * Every handler prints one idtlog1 event record (docs/idtlog-format.md) with the #VE
 * information area as extras; every test checks its values against the SDM's and prints
 * its verdict. The #VE handler resumes at the address the test put in ve_resume.
 */
    .intel_syntax noprefix
    .include "vmx_ve.inc"

    .set VE_VECTOR, 20
    .set BP_VECTOR, 3
    .set NMI_VECTOR, 2
    .set RFLAGS_FIXED, 0x2          /* bit 1 is always set */
    .set RFLAGS_RF, 0x10000         /* resume flag: set in the frame of a fault */
    .set EXIT_EPT_VIOLATION, 48     /* basic exit reason, also offset 0 of the area */
    .set BUSY, 0xffffffff

    /* VE-information area (SDM Vol. 3C "Virtualization-Exception Information") */
    .set VE_REASON, 0x00            /* dword */
    .set VE_BUSY, 0x04              /* dword */
    .set VE_QUAL, 0x08              /* qword: EPT-violation exit qualification */
    .set VE_GLA, 0x10               /* qword */
    .set VE_GPA, 0x18               /* qword */
    .set VE_EPTP_INDEX, 0x20        /* word */

    /* EPT-violation exit qualification (SDM Vol. 3C "Exit Qualification for EPT
     * Violations"): the access, then the page's R/W/X rights, GLA valid, and bit 8 =
     * the access was to the final translation (not a guest paging-structure entry). */
    .set Q_READ, 0x1
    .set Q_WRITE, 0x2
    .set Q_FETCH, 0x4
    .set Q_READABLE, 0x8
    .set Q_WRITABLE, 0x10
    .set Q_GLA_VALID, 0x80
    .set Q_FINAL, 0x100
    .set Q_NMI_UNBLOCKED_BY_IRET, 0x1000

    /* Local xAPIC (SDM Vol. 3A "Advanced Programmable Interrupt Controller") */
    .set APIC_BASE, 0xfee00000
    .set APIC_ID, 0x20              /* bits 31:24: this APIC's ID */
    .set APIC_SVR, 0xf0             /* bit 8: APIC software enable */
    .set APIC_ICR_LO, 0x300         /* a write sends the IPI */
    .set APIC_ICR_HI, 0x310         /* bits 31:24: destination */
    .set ICR_NMI, 0x4400            /* delivery mode NMI, level assert, physical, no
                                       shorthand ("self" is not valid with NMI) */

    .set PAGE_A_VALUE, 0xa5a5a5a5a5a5a5a5
    .set PAGE_B_VALUE, 0x1122334455667788
    .set PAGE_C_VALUE, 0xc0c0c0c0c0c0c0c0
    .set PAGE_D_VALUE, 0xd00dfeedd00dfeed
    .set STORE_VALUE, 0x5555

/* EXPECT what, actual, expected: record the first mismatch of the current test. */
.macro EXPECT reason, actual, expected:vararg
    mov rax, \actual
    mov rdx, \expected
    lea rsi, [rip + .Lreason\@]
    call expect_eq
    .pushsection .rodata
.Lreason\@: .asciz "\reason"
    .popsection
.endm

/* SET_FLAGS: RFLAGS := 0x2 right before an access, so the pushed RFLAGS is exact. */
.macro SET_FLAGS
    push RFLAGS_FIXED
    popfq
.endm

    .text
    .code64
    .globl guest_entry, guest_ve_handler, guest_bp_handler, guest_nmi_handler
    .globl ve_read_access, ve_busy_access, ve_rearm_access, ve_suppress_access
    .globl ve_fetch_jump, ve_delivery_int3, ve_delivery_after, guest_pass, guest_fail
    .globl ve_iret_nmi_spin, guest_nmi_iret

guest_entry:
    lea rsi, [rip + s_begin]
    call log_puts
    call t_ve_read
    call t_ve_busy
    call t_ve_rearm
    call t_ve_suppress
    call t_ve_fetch
    call t_ve_delivery
    call t_ve_iret_nmi
    lea rsi, [rip + s_end]
    call log_puts
    mov rax, [rip + guest_pass]
    lea rsi, [rip + s_pass]
    call log_kv
    mov rax, [rip + guest_fail]
    lea rsi, [rip + s_fail]
    call log_kv
    call log_nl
    xor eax, eax
    cmp qword ptr [rip + guest_fail], 0
    setne al
    jmp guest_exit

/* guest_exit: AL = 0 (pass) or 1 (fail) to isa-debug-exit (0xF4), then "Shutdown" to
 * Bochs' port 0x8900, then stop. */
    .globl guest_exit
guest_exit:
    call log_flush
    mov dx, 0xf4
    out dx, al
    lea rsi, [rip + s_shutdown]
    mov dx, 0x8900
1:  mov al, [rsi]
    test al, al
    jz 2f
    out dx, al
    inc rsi
    jmp 1b
2:  cli
    hlt
    jmp 2b

/* ---------------------------------------------------------------------------------- */

/* ve_read: a read through alias_page (guest paging maps it to page_a, whose EPT entry is
 * not present with suppress-#VE 0) is a convertible EPT violation with the busy word 0:
 * a #VE (vector 20, a fault without error code: saved RIP = the load, RF = 1). The
 * qualification has no rights (the entry is not present). */
t_ve_read:
    lea rax, [rip + n_ve_read]
    call test_begin
    lea rax, [rip + 1f]
    mov [rip + ve_resume], rax
    mov rcx, offset alias_page + 0x18
    mov [rip + sp_at_access], rsp
    SET_FLAGS
ve_read_access:
    mov rax, [rcx]
1:  EXPECT "ves", [rip + ve_count], 1
    mov r8, offset ve_read_access
    mov r9, Q_READ | Q_GLA_VALID | Q_FINAL
    mov r10, offset alias_page + 0x18
    mov r11, offset page_a + 0x18
    call check_ve
    jmp test_end

/* ve_busy: page_b is as convertible as page_a, but nobody cleared the busy word: the
 * violation is an EPT-violation VM exit. The hypervisor maps the page and resumes at the
 * load, which completes. The information area is not written. */
t_ve_busy:
    lea rax, [rip + n_ve_busy]
    call test_begin
    lea rax, [rip + 1f]
    mov [rip + ve_resume], rax
    mov rcx, offset page_b + 0x20
    xor eax, eax
    SET_FLAGS
ve_busy_access:
    mov rax, [rcx]
1:  mov [rip + loaded], rax
    call snapshot_area
    lea rdi, [rip + busy_check]
    call log_check
    EXPECT "value", [rip + loaded], PAGE_B_VALUE
    EXPECT "ves", [rip + ve_count], 0
    EXPECT "busy", [rip + busy_now], BUSY
    EXPECT "info_gpa", [rip + info_gpa_now], offset page_a + 0x18
    jmp test_end

/* ve_rearm: write 0 to the busy word, then store to the read-only page_c: a #VE again,
 * and the CPU rewrites the whole area. Qualification: write, readable. The handler
 * skips the store. */
t_ve_rearm:
    lea rax, [rip + n_ve_rearm]
    call test_begin
    mov dword ptr [rip + ve_info + VE_BUSY], 0
    lea rax, [rip + 1f]
    mov [rip + ve_resume], rax
    mov rcx, offset page_c + 0x8
    mov rdx, STORE_VALUE
    mov [rip + sp_at_access], rsp
    SET_FLAGS
ve_rearm_access:
    mov [rcx], rdx
1:  EXPECT "ves", [rip + ve_count], 1
    mov r8, offset ve_rearm_access
    mov r9, Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL
    mov r10, offset page_c + 0x8
    mov r11, r10
    call check_ve
    mov rcx, PAGE_C_VALUE
    EXPECT "store_skipped", [rip + page_c + 0x8], rcx
    mov dword ptr [rip + ve_info + VE_BUSY], 0
    jmp test_end

/* ve_suppress: page_d's EPT leaf is not present with suppress-#VE (bit 63) set. That
 * entry is the one whose bit 63 counts, so the violation is not convertible: a VM exit
 * although the busy word is 0. The load completes after the hypervisor's fix. */
t_ve_suppress:
    lea rax, [rip + n_ve_suppress]
    call test_begin
    lea rax, [rip + 1f]
    mov [rip + ve_resume], rax
    mov rcx, offset page_d + 0x30
    xor eax, eax
    SET_FLAGS
ve_suppress_access:
    mov rax, [rcx]
1:  mov [rip + loaded], rax
    call snapshot_area
    lea rdi, [rip + suppress_check]
    call log_check
    mov rcx, PAGE_D_VALUE
    EXPECT "value", [rip + loaded], rcx
    EXPECT "ves", [rip + ve_count], 0
    EXPECT "busy", [rip + busy_now], 0
    jmp test_end

/* ve_fetch: jump into page_e, readable and writable but not executable in EPT: the
 * instruction fetch is a #VE whose saved RIP is the jump target. */
t_ve_fetch:
    lea rax, [rip + n_ve_fetch]
    call test_begin
    lea rax, [rip + 1f]
    mov [rip + ve_resume], rax
    mov rcx, offset ve_fetch_target
    mov [rip + sp_at_access], rsp
    SET_FLAGS
ve_fetch_jump:
    jmp rcx
1:  EXPECT "ves", [rip + ve_count], 1
    mov r8, offset ve_fetch_target
    mov r9, Q_FETCH | Q_READABLE | Q_WRITABLE | Q_GLA_VALID | Q_FINAL
    mov r10, r8
    mov r11, r8
    call check_ve
    mov dword ptr [rip + ve_info + VE_BUSY], 0
    jmp test_end

/* ve_delivery: INT3 through a gate on IST2. The first push of the #BP frame writes the
 * read-only top page of the IST2 stack: a convertible violation (suppress-#VE 0, busy
 * word 0) but "in the middle of delivering an event through the IDT", so a VM exit. The
 * hypervisor maps the page and re-injects #BP (from the IDT-vectoring information), which
 * is delivered normally: a trap, saved RIP = after the INT3. The area is untouched. */
t_ve_delivery:
    lea rax, [rip + n_ve_delivery]
    call test_begin
    mov [rip + sp_at_access], rsp
    SET_FLAGS
ve_delivery_int3:
    int3
ve_delivery_after:
    call snapshot_area
    lea rdi, [rip + delivery_check]
    call log_check
    EXPECT "bps", [rip + bp_count], 1
    EXPECT "ves", [rip + ve_count], 0
    EXPECT "busy", [rip + busy_now], 0
    EXPECT "rsp", [rip + bp_seen_rsp], offset bp_stack_top - 40
    EXPECT "rip", [rip + bp_seen_rip], offset ve_delivery_after
    EXPECT "cs", [rip + bp_seen_cs], SEL_CODE
    EXPECT "rflags", [rip + bp_seen_rflags], RFLAGS_FIXED
    EXPECT "sp", [rip + bp_seen_sp], [rip + sp_at_access]
    EXPECT "ss", [rip + bp_seen_ss], SEL_DATA
    jmp test_end

/* ve_iret_nmi: an NMI handler's IRETQ reads its frame's SS slot from page_f (not present,
 * suppress-#VE 0). IRET clears NMI blocking before anything can fault (here: virtual-NMI
 * blocking, "virtual NMIs" being on; SDM Vol. 3C "Changes to Instruction Behavior in VMX
 * Non-Root Operation", IRET), and the violation's qualification says so in bit 12 (SDM
 * Vol. 3C "Exit Qualification for EPT Violations"), in the #VE information area as in a
 * VM exit. The #VE handler sends the IRETQ round again with the busy word still set: a
 * VM exit, whose qualification has no bit 12 (nothing was blocked any more); the host
 * maps page_f and the IRETQ completes, back to this test. The NMI is sent from a
 * `jmp .` loop, so its saved RIP is the loop whatever the delivery latency. */
t_ve_iret_nmi:
    lea rax, [rip + n_ve_iret_nmi]
    call test_begin
    mov qword ptr [rip + nmi_count], 0
    mov esi, APIC_BASE
    mov dword ptr [rsi + APIC_SVR], 0x1ff
    mov eax, [rsi + APIC_ID]
    and eax, 0xff000000
    mov [rsi + APIC_ICR_HI], eax
    lea rax, [rip + 1f]
    mov [rip + nmi_resume], rax
    lea rax, [rip + guest_nmi_iret]
    mov [rip + ve_resume], rax          /* the #VE handler retries the IRETQ */
    mov [rip + sp_at_access], rsp
    SET_FLAGS
    mov dword ptr [rsi + APIC_ICR_LO], ICR_NMI
ve_iret_nmi_spin:
    jmp ve_iret_nmi_spin
1:  call snapshot_area
    lea rdi, [rip + nmi_check]
    call log_check
    EXPECT "nmis", [rip + nmi_count], 1
    EXPECT "ves", [rip + ve_count], 1
    EXPECT "busy", [rip + busy_now], BUSY
    .if NMI_IST
    EXPECT "rsp", [rip + nmi_seen_rsp], offset nmi_stack_top - 40
    .else
    mov rdx, [rip + sp_at_access]       /* the current stack, aligned down to 16 */
    and rdx, -16
    sub rdx, 40
    EXPECT "rsp", [rip + nmi_seen_rsp], rdx
    .endif
    EXPECT "rip", [rip + nmi_seen_rip], offset ve_iret_nmi_spin
    EXPECT "cs", [rip + nmi_seen_cs], SEL_CODE
    EXPECT "rflags", [rip + nmi_seen_rflags], RFLAGS_FIXED
    EXPECT "sp", [rip + nmi_seen_sp], [rip + sp_at_access]
    EXPECT "ss", [rip + nmi_seen_ss], SEL_DATA
    mov r8, offset guest_nmi_iret
    mov r9, Q_READ | Q_GLA_VALID | Q_FINAL | Q_NMI_UNBLOCKED_BY_IRET
    mov r10, offset page_f
    mov r11, r10
    mov rax, offset nmi_frame           /* the #VE interrupted the IRETQ: RSP = the frame */
    mov [rip + sp_at_access], rax
    call check_ve
    mov dword ptr [rip + ve_info + VE_BUSY], 0
    jmp test_end

/* check_ve: the #VE the handler saw. R8 = saved RIP, R9 = qualification, R10 = guest-
 * linear address, R11 = guest-physical address. The frame is on IST1 (aligned top minus
 * five slots), CS/SS are the interrupted ones, RFLAGS has RF set (a fault). */
check_ve:
    EXPECT "rsp", [rip + ve_seen_rsp], offset ve_stack_top - 40
    EXPECT "rip", [rip + ve_seen_rip], r8
    EXPECT "cs", [rip + ve_seen_cs], SEL_CODE
    EXPECT "rflags", [rip + ve_seen_rflags], RFLAGS_FIXED | RFLAGS_RF
    EXPECT "sp", [rip + ve_seen_sp], [rip + sp_at_access]
    EXPECT "ss", [rip + ve_seen_ss], SEL_DATA
    EXPECT "reason", [rip + ve_seen_reason], EXIT_EPT_VIOLATION
    EXPECT "busy", [rip + ve_seen_busy], BUSY
    EXPECT "qual", [rip + ve_seen_qual], r9
    EXPECT "gla", [rip + ve_seen_gla], r10
    EXPECT "gpa", [rip + ve_seen_gpa], r11
    EXPECT "eptp", [rip + ve_seen_eptp], EPTP_INDEX
    ret

/* ---------------------------------------------------------------------------------- */

/* #VE handler (IST1). Frame at entry: RIP, CS, RFLAGS, RSP, SS (no error code). Copies
 * the frame and the information area, prints the event record, and returns to
 * ve_resume. It never writes the busy word: the tests decide when to re-arm. */
guest_ve_handler:
    mov [rip + ve_seen_rsp], rsp
    push rax
    push rsi
    push rdi
    mov rax, [rsp + 24]
    mov [rip + ve_seen_rip], rax
    mov rax, [rsp + 32]
    mov [rip + ve_seen_cs], rax
    mov rax, [rsp + 40]
    mov [rip + ve_seen_rflags], rax
    mov rax, [rsp + 48]
    mov [rip + ve_seen_sp], rax
    mov rax, [rsp + 56]
    mov [rip + ve_seen_ss], rax
    mov eax, dword ptr [rip + ve_info + VE_REASON]
    mov [rip + ve_seen_reason], rax
    mov eax, dword ptr [rip + ve_info + VE_BUSY]
    mov [rip + ve_seen_busy], rax
    mov rax, [rip + ve_info + VE_QUAL]
    mov [rip + ve_seen_qual], rax
    mov rax, [rip + ve_info + VE_GLA]
    mov [rip + ve_seen_gla], rax
    mov rax, [rip + ve_info + VE_GPA]
    mov [rip + ve_seen_gpa], rax
    movzx eax, word ptr [rip + ve_info + VE_EPTP_INDEX]
    mov [rip + ve_seen_eptp], rax
    inc qword ptr [rip + ve_count]
    mov al, VE_VECTOR
    lea rdi, [rip + ve_record]
    call log_event
    mov rax, [rip + ve_resume]
    mov [rsp + 24], rax
    pop rdi
    pop rsi
    pop rax
    iretq

/* #BP handler (IST2): copies the frame, prints the event record, returns (a trap). */
guest_bp_handler:
    mov [rip + bp_seen_rsp], rsp
    push rax
    push rdi
    mov rax, [rsp + 16]
    mov [rip + bp_seen_rip], rax
    mov rax, [rsp + 24]
    mov [rip + bp_seen_cs], rax
    mov rax, [rsp + 32]
    mov [rip + bp_seen_rflags], rax
    mov rax, [rsp + 40]
    mov [rip + bp_seen_sp], rax
    mov rax, [rsp + 48]
    mov [rip + bp_seen_ss], rax
    inc qword ptr [rip + bp_count]
    mov al, BP_VECTOR
    lea rdi, [rip + bp_record]
    call log_event
    pop rdi
    pop rax
    iretq

/* NMI handler (IST NMI_IST, 0 by default): copies the frame, prints the event record, then returns through
 * nmi_frame, a frame whose first four slots it writes (RIP = nmi_resume, CS, RFLAGS 0x2,
 * the interrupted RSP) at the end of nmi_frame_page and whose SS slot is the first qword
 * of page_f (0x10 in the image; the guest cannot write it: EPT says not present). */
guest_nmi_handler:
    mov [rip + nmi_seen_rsp], rsp
    push rax
    push rdi
    mov rax, [rsp + 16]
    mov [rip + nmi_seen_rip], rax
    mov rax, [rsp + 24]
    mov [rip + nmi_seen_cs], rax
    mov rax, [rsp + 32]
    mov [rip + nmi_seen_rflags], rax
    mov rax, [rsp + 40]
    mov [rip + nmi_seen_sp], rax
    mov rax, [rsp + 48]
    mov [rip + nmi_seen_ss], rax
    inc qword ptr [rip + nmi_count]
    mov al, NMI_VECTOR
    lea rdi, [rip + nmi_record]
    call log_event
    mov rax, [rip + nmi_resume]
    mov [rip + nmi_frame], rax
    mov qword ptr [rip + nmi_frame + 8], SEL_CODE
    mov qword ptr [rip + nmi_frame + 16], RFLAGS_FIXED
    mov rax, [rip + nmi_seen_sp]
    mov [rip + nmi_frame + 24], rax
    pop rdi
    pop rax
    SET_FLAGS
    lea rsp, [rip + nmi_frame]
guest_nmi_iret:
    iretq

/* ---------------------------------------------------------------------------------- */
/* Test bookkeeping and records. */

/* snapshot_area: the busy word and the area's GPA as they are now, for check records. */
snapshot_area:
    push rax
    mov eax, dword ptr [rip + ve_info + VE_BUSY]
    mov [rip + busy_now], rax
    mov rax, [rip + ve_info + VE_GPA]
    mov [rip + info_gpa_now], rax
    pop rax
    ret

/* test_begin: RAX = the test's name. */
test_begin:
    mov [rip + cur_test], rax
    mov qword ptr [rip + fail_reason], 0
    mov qword ptr [rip + ve_count], 0
    mov qword ptr [rip + bp_count], 0
    ret

/* expect_eq: RAX = actual, RDX = expected, RSI = what; the first mismatch is kept. */
expect_eq:
    cmp rax, rdx
    je 1f
    cmp qword ptr [rip + fail_reason], 0
    jne 1f
    mov [rip + fail_reason], rsi
    mov [rip + fail_got], rax
    mov [rip + fail_want], rdx
1:  ret

/* test_end: "idtlog1 <test> PASS" or "idtlog1 <test> FAIL <what> got=.. want=..". */
test_end:
    call log_test_prefix
    mov rsi, [rip + fail_reason]
    test rsi, rsi
    jnz 1f
    lea rsi, [rip + s_verdict_pass]
    call log_puts
    call log_nl
    inc qword ptr [rip + guest_pass]
    ret
1:  push rsi
    lea rsi, [rip + s_verdict_fail]
    call log_puts
    pop rsi
    call log_puts
    mov rax, [rip + fail_got]
    lea rsi, [rip + s_got]
    call log_kv
    mov rax, [rip + fail_want]
    lea rsi, [rip + s_want]
    call log_kv
    call log_nl
    inc qword ptr [rip + guest_fail]
    ret

/* log_test_prefix: "idtlog1 <current test>". */
log_test_prefix:
    push rsi
    lea rsi, [rip + s_idtlog]
    call log_puts
    mov rsi, [rip + cur_test]
    call log_puts
    pop rsi
    ret

/* log_event: AL = vector, RDI = a field table; "idtlog1 <test> ev=<vv>" + the fields. */
log_event:
    push rsi
    call log_test_prefix
    lea rsi, [rip + s_ev]
    call log_puts
    call log_hex2
    call log_fields
    call log_nl
    pop rsi
    ret

/* log_check: RDI = a field table; "idtlog1 <test> check" + the fields. */
log_check:
    push rsi
    call log_test_prefix
    lea rsi, [rip + s_check]
    call log_puts
    call log_fields
    call log_nl
    pop rsi
    ret

/* log_fields: RDI = table of (" key=" string, address of a qword) pairs, ending in 0. */
log_fields:
    push rax
    push rsi
    push rdi
1:  mov rsi, [rdi]
    test rsi, rsi
    jz 2f
    mov rax, [rdi + 8]
    mov rax, [rax]
    call log_kv
    add rdi, 16
    jmp 1b
2:  pop rdi
    pop rsi
    pop rax
    ret

/* ---------------------------------------------------------------------------------- */

    .section .rodata
s_begin:        .asciz "idtlog1 begin vmx_ve\n"
s_end:          .asciz "idtlog1 end vmx_ve"
s_pass:         .asciz " pass="
s_fail:         .asciz " fail="
s_shutdown:     .asciz "Shutdown"
s_idtlog:       .asciz "idtlog1 "
s_ev:           .asciz " ev="
s_check:        .asciz " check"
s_verdict_pass: .asciz " PASS"
s_verdict_fail: .asciz " FAIL "
s_got:          .asciz " got="
s_want:         .asciz " want="
n_ve_read:      .asciz "ve_read"
n_ve_busy:      .asciz "ve_busy"
n_ve_rearm:     .asciz "ve_rearm"
n_ve_suppress:  .asciz "ve_suppress"
n_ve_fetch:     .asciz "ve_fetch"
n_ve_delivery:  .asciz "ve_delivery"
n_ve_iret_nmi:  .asciz "ve_iret_nmi"
k_rsp:          .asciz " rsp="
k_rip:          .asciz " rip="
k_cs:           .asciz " cs="
k_rflags:       .asciz " rflags="
k_sp:           .asciz " sp="
k_ss:           .asciz " ss="
k_reason:       .asciz " reason="
k_busy:         .asciz " busy="
k_qual:         .asciz " qual="
k_gla:          .asciz " gla="
k_gpa:          .asciz " gpa="
k_eptp:         .asciz " eptp="
k_value:        .asciz " value="
k_ves:          .asciz " ves="
k_info_gpa:     .asciz " info_gpa="
k_bps:          .asciz " bps="
k_nmis:         .asciz " nmis="

    .balign 8
/* Event record of a #VE: the frame, then the information area. */
ve_record:
    .quad k_rsp, ve_seen_rsp
    .quad k_rip, ve_seen_rip
    .quad k_cs, ve_seen_cs
    .quad k_rflags, ve_seen_rflags
    .quad k_sp, ve_seen_sp
    .quad k_ss, ve_seen_ss
    .quad k_reason, ve_seen_reason
    .quad k_busy, ve_seen_busy
    .quad k_qual, ve_seen_qual
    .quad k_gla, ve_seen_gla
    .quad k_gpa, ve_seen_gpa
    .quad k_eptp, ve_seen_eptp
    .quad 0
bp_record:
    .quad k_rsp, bp_seen_rsp
    .quad k_rip, bp_seen_rip
    .quad k_cs, bp_seen_cs
    .quad k_rflags, bp_seen_rflags
    .quad k_sp, bp_seen_sp
    .quad k_ss, bp_seen_ss
    .quad 0
nmi_record:
    .quad k_rsp, nmi_seen_rsp
    .quad k_rip, nmi_seen_rip
    .quad k_cs, nmi_seen_cs
    .quad k_rflags, nmi_seen_rflags
    .quad k_sp, nmi_seen_sp
    .quad k_ss, nmi_seen_ss
    .quad 0
busy_check:
    .quad k_value, loaded
    .quad k_ves, ve_count
    .quad k_busy, busy_now
    .quad k_info_gpa, info_gpa_now
    .quad 0
suppress_check:
    .quad k_value, loaded
    .quad k_ves, ve_count
    .quad k_busy, busy_now
    .quad 0
delivery_check:
    .quad k_bps, bp_count
    .quad k_ves, ve_count
    .quad k_busy, busy_now
    .quad 0
nmi_check:
    .quad k_nmis, nmi_count
    .quad k_ves, ve_count
    .quad k_busy, busy_now
    .quad 0

/* ---------------------------------------------------------------------------------- */

    .data
    .balign 8
    .globl ve_count, bp_count
guest_pass:     .quad 0
guest_fail:     .quad 0
cur_test:       .quad 0
fail_reason:    .quad 0
fail_got:       .quad 0
fail_want:      .quad 0
ve_resume:      .quad 0
ve_count:       .quad 0
bp_count:       .quad 0
sp_at_access:   .quad 0
loaded:         .quad 0
busy_now:       .quad 0
info_gpa_now:   .quad 0
ve_seen_rsp:    .quad 0
ve_seen_rip:    .quad 0
ve_seen_cs:     .quad 0
ve_seen_rflags: .quad 0
ve_seen_sp:     .quad 0
ve_seen_ss:     .quad 0
ve_seen_reason: .quad 0
ve_seen_busy:   .quad 0
ve_seen_qual:   .quad 0
ve_seen_gla:    .quad 0
ve_seen_gpa:    .quad 0
ve_seen_eptp:   .quad 0
bp_seen_rsp:    .quad 0
bp_seen_rip:    .quad 0
bp_seen_cs:     .quad 0
bp_seen_rflags: .quad 0
bp_seen_sp:     .quad 0
bp_seen_ss:     .quad 0
nmi_count:      .quad 0
nmi_resume:     .quad 0
nmi_seen_rsp:   .quad 0
nmi_seen_rip:   .quad 0
nmi_seen_cs:    .quad 0
nmi_seen_rflags: .quad 0
nmi_seen_sp:    .quad 0
nmi_seen_ss:    .quad 0

/* The test pages: one 4-KiB page each, so that EPT can give each its own rights. */
    .section .guest_pages, "aw"
    .balign 4096
    .globl page_a, page_b, page_c, page_d, page_e, page_f, ve_fetch_target, nmi_frame
page_a:
    .skip 0x18
    .quad PAGE_A_VALUE
    .balign 4096
page_b:
    .skip 0x20
    .quad PAGE_B_VALUE
    .balign 4096
page_c:
    .skip 0x8
    .quad PAGE_C_VALUE
    .balign 4096
page_d:
    .skip 0x30
    .quad PAGE_D_VALUE
    .balign 4096
page_e:
    .skip 0x40
ve_fetch_target:                    /* never executes: the fetch is a #VE */
    ud2
    .balign 4096
nmi_frame_page:                     /* ordinary memory: the NMI handler writes RIP..RSP */
    .skip 4096 - 32
nmi_frame:
    .skip 32
page_f:                             /* not present in EPT: the frame's SS slot */
    .quad SEL_DATA
    .balign 4096

/* The VE-information page (the linker script pins it at 0x210000), the alias page, the
 * stacks. */
    .section .bss.ve_info, "aw", @nobits
    .balign 4096
    .globl ve_info
ve_info:
    .skip 4096

    .bss
    .balign 4096
    .globl alias_page, guest_stack_top, ve_stack_top, bp_stack_top, bp_stack_top_page
    .globl nmi_stack_top
alias_page:                         /* guest paging maps this linear page to page_a */
    .skip 4096
guest_stack:
    .skip 0x4000
guest_stack_top:
ve_stack:
    .skip 0x1000
ve_stack_top:
bp_stack:
    .skip 0x1000
bp_stack_top_page:                  /* read-only in EPT until the host fixes it */
    .skip 0x1000
bp_stack_top:
nmi_stack:
    .skip 0x1000
nmi_stack_top:
