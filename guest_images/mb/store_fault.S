/* store_fault: a store that faults on its second page writes nothing on the first.
 *
 * SDM Vol. 3A, "Exception Classifications": a fault is reported "in such a way that the
 * instruction can be restarted", the processor state restored to what it was before the
 * faulting instruction; "Page-Fault Exceptions": CR2 is the linear address that caused
 * the fault, here the first byte of the second page. A store of 8 bytes at 4 bytes
 * before a not-present (or read-only) page therefore faults with CR2 = that page and
 * leaves the 4 bytes on the first page as they were. The same for a PUSH. A REP STOS
 * is different: each iteration is an instruction-like step, so the iterations done
 * before the faulting one stay done (RCX and RDI say how far it got: Vol. 2 REP,
 * "...the processor ... updates the registers so that the instruction can be
 * resumed").
 *
 * The first two tests use the runtime's not-present page (PAGE_NP, after the writable
 * 0x2ff000); the read-only case makes 0x306000 read-only for the test (its page-table
 * entry, found through CR3).
 */
    .include "idtlog.inc"
    IMAGE_NAME "store_fault"

    .set PAGE_A, 0x305000               /* writable */
    .set PAGE_B, 0x306000               /* made read-only by the test */
    .set FILL, 0x1111111111111111
    .set VALUE, 0xaaaaaaaabbbbbbbb

    .text
image_main:
    call store_into_not_present_leaves_first_page
    call store_into_read_only_leaves_first_page
    call push_into_not_present_leaves_first_page
    call rep_stosb_keeps_completed_iterations
    ret

/* pte_of(rdi = linear address in 0x200000..0x3fffff) -> rax = &PTE (identity paging:
 * CR3 -> PML4[0] -> PDPT[0] -> PD[1] -> the runtime's test page table). */
pte_of:
    mov rax, cr3
    and rax, -4096
    mov rax, qword ptr [rax]            /* PML4[0] */
    and rax, -4096
    mov rax, qword ptr [rax]            /* PDPT[0] */
    and rax, -4096
    mov rax, qword ptr [rax + 8]        /* PD[1] */
    and rax, -4096
    sub rdi, 0x200000
    shr rdi, 12
    lea rax, [rax + rdi * 8]
    ret

/* PF_AT err, cr2, rip: exactly one #PF with these values. */
    .macro PF_AT err, cr2, rip
    EXPECT_COUNT 14, 1, "expected exactly one pf"
    EXPECT_EV EV_ERR, "\err", "wrong error code"
    EXPECT_EV EV_CR2, "\cr2", "cr2 is not the first byte of the faulting page"
    EXPECT_EV EV_RIP, "\rip", "pushed rip is not the store"
    .endm

store_into_not_present_leaves_first_page:
    TEST_BEGIN "store_into_not_present_leaves_first_page"
    mov rax, FILL
    mov qword ptr [PAGE_NP - 8], rax
    SET_RESUME 1f                       /* (clobbers rax) */
    mov rax, VALUE
    FLAGS RFLAGS_FIXED
np_store_insn:
    mov qword ptr [PAGE_NP - 4], rax
1:  mov rbx, qword ptr [PAGE_NP - 8]
    CHECK "first_page", rbx
    PF_AT 0x2, PAGE_NP, "OFFSET np_store_insn"
    EXPECT rbx, FILL, "the faulting store wrote its first page"
    TEST_END
    ret

store_into_read_only_leaves_first_page:
    TEST_BEGIN "store_into_read_only_leaves_first_page"
    mov edi, PAGE_B
    call pte_of
    and qword ptr [rax], ~2             /* R/W = 0 */
    mov eax, PAGE_B
    invlpg [rax]
    mov rax, FILL
    mov qword ptr [PAGE_B - 8], rax
    SET_RESUME 1f                       /* (clobbers rax) */
    mov rax, VALUE
    FLAGS RFLAGS_FIXED
ro_store_insn:
    mov qword ptr [PAGE_B - 4], rax
1:  mov edi, PAGE_B
    call pte_of
    or qword ptr [rax], 2
    mov eax, PAGE_B
    invlpg [rax]
    mov rbx, qword ptr [PAGE_B - 8]
    CHECK "first_page", rbx
    PF_AT 0x3, PAGE_B, "OFFSET ro_store_insn"
    EXPECT rbx, FILL, "the faulting store wrote its first page"
    TEST_END
    ret

/* PUSH with RSP = PAGE_NP + 4 writes PAGE_NP - 4 .. PAGE_NP + 3. The #PF goes to IST2
 * (the interrupted stack is the faulting one). */
push_into_not_present_leaves_first_page:
    TEST_BEGIN "push_into_not_present_leaves_first_page"
    GATE 14, 2, 0
    mov rax, FILL
    mov qword ptr [PAGE_NP - 8], rax
    SET_RESUME 1f                       /* (clobbers rax) */
    mov rax, VALUE
    FLAGS RFLAGS_FIXED
    mov rsp, PAGE_NP + 4
push_insn:
    push rax
1:  mov rbx, qword ptr [PAGE_NP - 8]
    CHECK "first_page", rbx
    PF_AT 0x2, PAGE_NP, "OFFSET push_insn"
    EXPECT_EV EV_SP, "PAGE_NP + 4", "the faulting push changed rsp"
    EXPECT rbx, FILL, "the faulting push wrote its first page"
    TEST_END
    ret

extra_rcx_rdi:                          /* the interrupted RCX and RDI (#PF: error code) */
    push rbx
    mov rbx, rsi                        /* KV clobbers rsi */
    mov rax, qword ptr [rbx - 32]
    KV "rcx", rax
    mov rax, qword ptr [rbx - 72]
    KV "rdi", rax
    pop rbx
    ret

/* REP STOSB of 8 bytes from PAGE_NP - 4: four iterations complete, the fifth faults
 * with RCX = 4, RDI = PAGE_NP. */
rep_stosb_keeps_completed_iterations:
    TEST_BEGIN "rep_stosb_keeps_completed_iterations"
    EXTRA extra_rcx_rdi
    mov rax, FILL
    mov qword ptr [PAGE_NP - 8], rax
    SET_RESUME 1f
    mov eax, 0xaa
    mov edi, PAGE_NP - 4
    mov ecx, 8
    FLAGS RFLAGS_FIXED
rep_insn:
    rep stosb
1:  mov rbx, qword ptr [PAGE_NP - 8]
    CHECK "first_page", rbx
    PF_AT 0x2, PAGE_NP, "OFFSET rep_insn"
    EXPECT rbx, 0xaaaaaaaa11111111, "the completed iterations of rep stosb were not kept"
    TEST_END
    ret
