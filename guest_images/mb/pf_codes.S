/* pf_codes: #PF error codes and CR2 for reads, writes and fetches.
 *
 * SDM Vol. 3A, "Paging", "Page-Fault Exceptions": error code bit 0 P (0 = a not-present
 * entry, 1 = a protection violation), bit 1 W/R (write), bit 2 U/S (CPL3 access), bit 4
 * I/D (instruction fetch; reported because EFER.NXE = 1); CR2 = the faulting linear
 * address. #PF is a fault: the pushed RIP is the faulting instruction. The runtime maps
 * PAGE_NP not present, PAGE_RO read-only (CR0.WP = 1, so supervisor writes fault too),
 * PAGE_NX execute-disable and PAGE_SUPER supervisor-only.
 */
    .include "idtlog.inc"
    IMAGE_NAME "pf_codes"

    .text
image_main:
    call pf_read_not_present
    call pf_write_not_present
    call pf_write_read_only
    call pf_fetch_not_present
    call pf_fetch_execute_disable
    call pf_user_read_supervisor_page
    ret

/* PF_CHECKS err, cr2, rip: the checks every kernel-mode #PF test makes. */
    .macro PF_CHECKS err, cr2, rip
    EXPECT_COUNT 14, 1, "expected exactly one pf"
    EXPECT_EV EV_ERR, "\err", "wrong error code"
    EXPECT_EV EV_CR2, "\cr2", "cr2 is not the faulting address"
    EXPECT_EV EV_RIP, "\rip", "pushed rip is not the faulting instruction"
    EXPECT_EV EV_CS, KCODE, "pushed cs is not the kernel code selector"
    EXPECT_RFLAGS_NO_RF RFLAGS_FIXED, "pushed rflags differ from the interrupted rflags"
    EXPECT_EV EV_SP, "qword ptr [rip + saved_rsp]", "pushed rsp is not the interrupted rsp"
    mov rbx, qword ptr [rip + saved_rsp]
    and rbx, -16
    sub rbx, 48
    EXPECT_EV EV_RSP, rbx, "handler rsp is not the aligned stack minus 48"
    .endm

pf_read_not_present:
    TEST_BEGIN "pf_read_not_present"
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
pf_read_np_insn:
    mov rax, qword ptr [PAGE_NP + 0x123]
1:  PF_CHECKS 0x0, "PAGE_NP + 0x123", "OFFSET pf_read_np_insn"
    TEST_END
    ret

pf_write_not_present:
    TEST_BEGIN "pf_write_not_present"
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    FLAGS RFLAGS_FIXED
pf_write_np_insn:
    mov qword ptr [PAGE_NP + 0x458], rax
1:  PF_CHECKS 0x2, "PAGE_NP + 0x458", "OFFSET pf_write_np_insn"
    TEST_END
    ret

pf_write_read_only:
    TEST_BEGIN "pf_write_read_only"
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    mov rax, qword ptr [PAGE_RO + 0x10]     /* reading the page is allowed */
    FLAGS RFLAGS_FIXED
pf_write_ro_insn:
    mov qword ptr [PAGE_RO + 0x10], rax
1:  PF_CHECKS 0x3, "PAGE_RO + 0x10", "OFFSET pf_write_ro_insn"
    TEST_END
    ret

/* A fetch fault on the first byte: the pushed RIP and CR2 are the jump's target. */
pf_fetch_not_present:
    TEST_BEGIN "pf_fetch_not_present"
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    mov eax, PAGE_NP + 0x20
    FLAGS RFLAGS_FIXED
    jmp rax
1:  PF_CHECKS 0x10, "PAGE_NP + 0x20", "PAGE_NP + 0x20"
    TEST_END
    ret

pf_fetch_execute_disable:
    TEST_BEGIN "pf_fetch_execute_disable"
    SET_RESUME 1f
    mov qword ptr [rip + saved_rsp], rsp
    mov eax, PAGE_NX + 0x40
    FLAGS RFLAGS_FIXED
    jmp rax
1:  PF_CHECKS 0x11, "PAGE_NX + 0x40", "PAGE_NX + 0x40"
    TEST_END
    ret

/* CPL3 reads a supervisor-only page: P = 1, U/S = 1; the frame is on TSS.RSP0 and holds
 * the user CS:RIP and SS:RSP. */
pf_user_read_supervisor_page:
    TEST_BEGIN "pf_user_read_supervisor_page"
    SET_RESUME 1f
    lea rdi, [rip + user_read_super]
    lea rsi, [rip + user_stack_top]
    call enter_user
1:  EXPECT_COUNT 14, 1, "expected exactly one pf"
    EXPECT_EV EV_ERR, 0x5, "wrong error code"
    EXPECT_EV EV_CR2, "PAGE_SUPER + 0x80", "cr2 is not the faulting address"
    EXPECT_EV EV_RIP, "OFFSET user_read_super", "pushed rip is not the faulting instruction"
    EXPECT_EV EV_CS, UCODE, "pushed cs is not the user code selector"
    EXPECT_RFLAGS_NO_RF RFLAGS_FIXED, "pushed rflags differ from the user rflags"
    EXPECT_EV EV_SP, "OFFSET user_stack_top", "pushed rsp is not the user rsp"
    EXPECT_EV EV_SS, UDATA, "pushed ss is not the user data selector"
    lea rbx, [rip + rsp0_stack_top - 48]
    EXPECT_EV EV_RSP, rbx, "handler rsp is not rsp0 minus 48"
    TEST_END
    ret

user_read_super:                        /* runs at CPL3 */
    mov rax, qword ptr [PAGE_SUPER + 0x80]
    ud2

    .data
    .balign 8
saved_rsp:  .quad 0
