/* Native fast paths for instructions idtlab emulates: RDTSC and RDTSCP in their code hook.
 *
 * A delay loop (kvm-unit-tests' `delay()`: `pause; rdtsc` until a TSC goal) runs one
 * RDTSC every few instructions; emulating each one in Python costs ~10 us even without
 * stopping the engine (cpu/emulated.py `rdtsc_in_hook`). This hook, registered at each
 * RDTSC/RDTSCP site in place of the Python site hook, executes the instruction itself
 * when Python has vouched for the plain case, and calls Python (`fallback`, the site
 * hook) for everything else:
 *
 *   - `armed`: Python found the boundary after an RDTSC quiet (nothing pending, no
 *     stepping, no debug trap, no #AC check, no injection point there), CPL 0 or
 *     CR4.TSD = 0, and the TSC counting the machine's cycles; `if_clear`: that held only
 *     because IF = 0 kept a pending interrupt waiting, so IF = 0 is required here too. Python clears it at the
 *     start of every run and whenever a Python hook runs (anything may have changed),
 *     and sets it again only from `rdtsc_in_hook`, after checking all of it.
 *   - the site's `generation` equals the shared one: Python checked this site in this
 *     run (no injection point or breakpoint at it or after it).
 *   - fast mode (block counting): the current translation block is the one Python saw
 *     this site in (`block_addr`, `block_size`), so `index` is the RDTSC's position in
 *     it; the counter counted the whole block when it started, and is settled here to
 *     just after the RDTSC (count = block_before + index + 1, cycles less the default
 *     cost of each instruction after it) as the engine's stop would settle it.
 *   - the counter is not stopping (`stopped`), not running a split block (`stop_at` =
 *     UINT64_MAX), not checking #AC, and RFLAGS.TF = 0 (read here: POPF changes it
 *     natively).
 *
 * The TSC read is the cycles of the instructions before this one plus `tsc_offset`,
 * exactly what Python's path reads. Then EAX/EDX (and ECX = IA32_TSC_AUX[31:0] for
 * RDTSCP) are written and RIP moves past the instruction with a single-register write
 * (Unicorn then leaves the translation block; the rest of it runs as a new block).
 */
#include <stdint.h>
#include <string.h>

struct idtlab_counter_view { /* the head of struct idtlab_counter (counter.c) */
    uint64_t count;
    uint64_t stop_at;
    void *stop;
    uint64_t stopped;
    uint64_t cycles;
    uint64_t stop_cycle;
    uint64_t last_cost;
    uint64_t default_cost;
    uint64_t timed;
    void *keys;
    void *vals;
    uint64_t mask;
    uint64_t used;
    void *miss;
    uint64_t block_addr;
    uint64_t block_size;
    uint64_t block_before;
    uint64_t block_cycles_before;
    uint64_t split;
    void *bkeys;
    void *bvals;
    uint64_t bmask;
    uint64_t bused;
    void *bmiss;
    uint64_t last_addr;
    uint64_t ac_check;
    uint64_t ac_pass;
    uint64_t ac_stopped;
    void *reg_read;
    int32_t rid_eflags;
    uint64_t block_n;
};

struct idtlab_paths {
    struct idtlab_counter_view *counter;
    int (*reg_read)(void *uc, int regid, void *value);
    int (*reg_write)(void *uc, int regid, const void *value);
    void (*fallback)(uint64_t address);
    uint64_t armed;
    uint64_t generation;
    uint64_t block_counting;
    uint64_t tsc_offset;
    uint64_t tsc_aux;
    uint64_t hits;
    uint64_t if_clear; /* plain only while IF = 0 (an interrupt is pending) */
    int32_t rid_rax, rid_rcx, rid_rdx, rid_rip, rid_rflags;
};

struct idtlab_rdtsc_site {
    struct idtlab_paths *paths;
    uint64_t length;
    uint64_t rdtscp;
    uint64_t generation;
    uint64_t block_addr;
    uint64_t block_size;
    uint64_t index;
};

#define RFLAGS_TF (1u << 8)
#define RFLAGS_IF (1u << 9)

void idtlab_rdtsc_site(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct idtlab_rdtsc_site *s = (struct idtlab_rdtsc_site *)user_data;
    struct idtlab_paths *p = s->paths;
    struct idtlab_counter_view *c = p->counter;
    uint64_t rflags = 0, count = c->count, cycles = c->cycles, cost = c->last_cost, v;
    (void)size;
    if (!p->armed || s->generation != p->generation || c->stopped || c->stop_at == UINT64_MAX
            || c->ac_check)
        goto slow;
    if (p->block_counting) {
        if (c->block_addr != s->block_addr || c->block_size != s->block_size)
            goto slow;
        uint64_t at = c->block_before + s->index + 1;
        if (count < at)
            goto slow;
        cycles -= (count - at) * c->default_cost;
        count = at;
        cost = c->default_cost;
    }
    if (p->reg_read(uc, p->rid_rflags, &rflags) != 0 || (rflags & RFLAGS_TF)
            || (p->if_clear && (rflags & RFLAGS_IF)))
        goto slow;
    c->count = count;
    c->cycles = cycles;
    c->last_cost = cost;
    uint64_t tsc = cycles - cost + p->tsc_offset;
    v = tsc & 0xFFFFFFFFu;
    p->reg_write(uc, p->rid_rax, &v);
    v = tsc >> 32;
    p->reg_write(uc, p->rid_rdx, &v);
    if (s->rdtscp) {
        v = p->tsc_aux & 0xFFFFFFFFu;
        p->reg_write(uc, p->rid_rcx, &v);
    }
    v = address + s->length;
    p->reg_write(uc, p->rid_rip, &v);
    p->hits++;
    return;
slow:
    p->fallback(address);
}

/* IRETQ, the plain case, in its code hook.
 *
 * An IRET chain (a handler that returns into another return, a frame walked up the
 * stack by a clobbered IRET) costs one Python call per IRET even in its code hook
 * (cpu/emulated.py `iret_in_hook`, ~25 us). This hook executes an IRETQ that Python
 * would execute there the same way, and calls Python (`fallback`, the site hook) for
 * everything else. Python vouches (`idtlab_iret` is armed by `NativePaths.learn_iret`,
 * right after `iret_in_hook` executed an IRETQ) for what only Python can see — the
 * boundary after it is quiet (no NMI latched: an IRET that unblocks NMIs is logged as
 * such, and Python clears the blocking when it takes the log), no injection point or
 * breakpoint is at the site, no EPT, no VMX controls — and for the memory the IRET reads:
 * the stack page's translation and the CS and SS descriptors, as physical words that
 * must still hold what they held then (paging-structure entries, descriptor qwords),
 * re-read here from guest memory. Control registers, GDTR and EFER change only in
 * Python hooks (they are sites), and any Python hook disarms this path.
 *
 * Up to IRET_CONTEXTS such vouches are kept, one per (CS, SS, frame page, frame SS): a
 * handler entered through an IST returns from another stack than one entered without,
 * at the same IRETQ. The IRETQ takes the one matching its CS, SS, RSP's page and the SS
 * in its frame, among those Python marked `live`: vouched under the paging controls and
 * GDT base in force. A frame SS other than SS (an IST handler's null SS returning to a
 * selector, at the same level, in 64-bit code) loads the SS cache with the descriptor
 * vouched for, by patching the engine's saved context as Python does.
 *
 * Checked here, as `iret64` and `iret_in_hook` check them: the count (fast mode: the
 * IRET is the last instruction of the block running, all of which was counted),
 * RFLAGS.TF and NT = 0 now, the
 * frame (40 bytes at RSP) on the vouched page, CS popped equal to CS now and SS to the
 * context's (a return to the same privilege level with the descriptors vouched for), a canonical
 * RIP, no TF in the loaded RFLAGS, RIP not an injection point. RFLAGS is merged with
 * the writable mask of the CPL and IOPL in force. The no-progress check of
 * cpu/progress.py is kept here while this path runs (the same signature, then the same
 * general registers, counted), and an IRET that would end the run by it is Python's.
 * Each IRET done here is logged; Python turns the log into the same trace records and
 * bookkeeping its own path makes (`Engine` drains it at every Python hook and when the
 * engine stops), in order, and takes the no-progress state back.
 */
#define IRET_LOG 64
#define IRET_WORDS 16
#define IRET_CONTEXTS 4
#define RFLAGS_NT (1ull << 14)
#define RFLAGS_RF (1ull << 16)
#define RFLAGS_IOPL (3ull << 12)
#define RFLAGS_VIF (1ull << 19)
#define RFLAGS_VIP (1ull << 20)
/* CF, bit 2, AF, ZF, SF, OF | TF IF DF IOPL NT RF AC VIF VIP ID (idt/iret.py _WRITABLE) */
#define IRET_WRITABLE (0x1ull | 0x4 | 0x10 | 0x40 | 0x80 | 0x800 | (1ull << 8) | (1ull << 9) \
                       | (1ull << 10) | RFLAGS_IOPL | RFLAGS_NT | RFLAGS_RF | (1ull << 18) \
                       | RFLAGS_VIF | RFLAGS_VIP | (1ull << 21))

struct idtlab_iret_record {
    uint64_t address, icount, cycles, rip, rsp, rflags, nmi_unblocked;
};

/* One vouched context: the CS, SS and CPL an IRETQ runs with, the linear page its frame is
 * on and that page's physical page, and the physical words that must still hold. `live`:
 * vouched under the paging controls and GDT base in force now (Python sets it). */
struct idtlab_iret_context {
    uint64_t live;
    uint64_t cs, ss, cpl;
    uint64_t stack_page, stack_paddr; /* linear page of the frame, its physical page */
    uint64_t nwords;
    uint64_t addr[IRET_WORDS], val[IRET_WORDS];
    /* The SS the frame holds (`ss`: the same stack segment), and when it is another one
     * (a handler entered through an IST, SS null, returning to a selector) the high
     * dword of its descriptor, which the SS cache takes (as Python's `patch_context`). */
    uint64_t frame_ss, frame_ss_flags;
};

struct idtlab_iret {
    struct idtlab_counter_view *counter;
    int (*reg_read)(void *uc, int regid, void *value);
    int (*reg_write)(void *uc, int regid, const void *value);
    void (*fallback)(uint64_t address);
    uint8_t *mem;
    uint64_t mem_size;
    uint64_t armed;
    uint64_t generation;
    uint64_t block_counting;
    struct idtlab_iret_context ctx[IRET_CONTEXTS];
    uint64_t cost;
    uint64_t nmi_blocked; /* NMIs blocked (none latched): the next IRET unblocks them */
    uint64_t words_failed; /* a vouched word no longer held (Python vouches afresh) */
    /* cpu/progress.py's state: the previous IRET's signature (without the events, which
     * only Python changes), the count at it, the registers of a candidate loop */
    uint64_t last_address, last_rip, last_rsp, last_rflags, last_delta, last_icount;
    uint64_t have_regs, repeats, repeat_limit;
    uint64_t regs[15];
    uint64_t hits;
    uint64_t logged;
    struct idtlab_iret_record log[IRET_LOG];
    int32_t rid_rsp, rid_rflags, rid_rip, rid_cs, rid_ss;
    int32_t rid_gpr[15]; /* the general registers but RSP, in cpu/progress.py's order */
    /* Loading another SS: the engine's CPU context is saved into `cpu_ctx`, its SS cache
     * patched at `off_ss` (QEMU's SegmentCache: selector, base, limit, flags) and
     * `off_old_exception` reset, and restored; only in 64-bit code (`off_hflags`: CS64
     * set), where the SS cache's B bit does not size the stack. */
    int (*ctx_save)(void *uc, void *ctx);
    int (*ctx_restore)(void *uc, void *ctx);
    uint8_t *cpu_ctx;
    uint64_t off_ss, off_hflags, off_old_exception;
};

#define HF_CS64 (1u << 15)

struct idtlab_iret_site {
    struct idtlab_iret *iret;
    uint64_t generation;
};

static int canonical(uint64_t a)
{
    uint64_t top = a >> 47;
    return top == 0 || top == 0x1FFFF;
}

void idtlab_iret_site(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct idtlab_iret_site *s = (struct idtlab_iret_site *)user_data;
    struct idtlab_iret *p = s->iret;
    struct idtlab_counter_view *c = p->counter;
    uint64_t rflags = 0, rsp = 0, cs = 0, ss = 0, frame[5], i, writable, new_rflags, delta, v;
    struct idtlab_iret_record *r;
    struct idtlab_iret_context *x = NULL;
    if (!p->armed || s->generation != p->generation || p->logged >= IRET_LOG || c->stopped
            || c->stop_at == UINT64_MAX || c->ac_check)
        goto slow;
    if (p->block_counting) {
        /* IRETQ ends its translation block, so it is the block's last instruction and
         * the block's whole count is the count after it (whichever instruction the
         * block started at: a run may enter the handler anywhere). */
        if (address < c->block_addr || address + size != c->block_addr + c->block_size
                || c->block_n == 0 || c->count != c->block_before + c->block_n)
            goto slow;
    } else {
        goto slow; /* timed mode: Python's path (counts per instruction) */
    }
    if (p->reg_read(uc, p->rid_rflags, &rflags) != 0 || (rflags & (RFLAGS_TF | RFLAGS_NT)))
        goto slow;
    if (p->reg_read(uc, p->rid_rsp, &rsp) != 0 || p->reg_read(uc, p->rid_cs, &cs) != 0
            || p->reg_read(uc, p->rid_ss, &ss) != 0)
        goto slow;
    cs &= 0xFFFF;
    ss &= 0xFFFF;
    if ((rsp & 0xFFF) + 40 > 4096)
        goto slow;
    for (i = 0; i < IRET_CONTEXTS; i++) {
        struct idtlab_iret_context *k = &p->ctx[i];
        uint64_t frame_ss;
        if (!k->live || k->cs != cs || k->ss != ss || k->stack_page != (rsp >> 12)
                || k->stack_paddr + 4096 > p->mem_size)
            continue;
        memcpy(&frame_ss, p->mem + k->stack_paddr + (rsp & 0xFFF) + 32, 8);
        if ((frame_ss & 0xFFFF) == k->frame_ss) {
            x = k; /* the context of this frame's SS */
            break;
        }
    }
    if (x == NULL)
        goto slow;
    for (i = 0; i < x->nwords; i++) {
        if (x->addr[i] + 8 > p->mem_size)
            goto slow;
        memcpy(&v, p->mem + x->addr[i], 8);
        if (v != x->val[i]) {
            p->words_failed = 1;
            goto slow;
        }
    }
    if (x->stack_paddr + 4096 > p->mem_size)
        goto slow;
    memcpy(frame, p->mem + x->stack_paddr + (rsp & 0xFFF), 40);
    if ((frame[1] & 0xFFFF) != cs || (frame[4] & 0xFFFF) != x->frame_ss || !canonical(frame[0]))
        goto slow;
    if (x->frame_ss != ss) {
        uint32_t hflags;
        if (p->cpu_ctx == NULL || p->ctx_save(uc, p->cpu_ctx) != 0)
            goto slow;
        memcpy(&hflags, p->cpu_ctx + p->off_hflags, 4);
        if (!(hflags & HF_CS64))
            goto slow;
    }
    writable = IRET_WRITABLE;
    if (x->cpl > 0)
        writable &= ~(RFLAGS_IOPL | RFLAGS_VIF | RFLAGS_VIP);
    if (x->cpl > ((rflags & RFLAGS_IOPL) >> 12))
        writable &= ~RFLAGS_IF;
    new_rflags = (rflags & ~writable) | (frame[2] & writable) | 2;
    if (new_rflags & RFLAGS_TF)
        goto slow;
    delta = c->count - p->last_icount;
    if (address == p->last_address && frame[0] == p->last_rip && frame[3] == p->last_rsp
            && new_rflags == p->last_rflags && delta == p->last_delta) {
        /* `Progress.observe`: the same signature; then the registers decide */
        uint64_t regs[15];
        int same = p->have_regs;
        for (i = 0; i < 15; i++) {
            regs[i] = 0;
            if (p->reg_read(uc, p->rid_gpr[i], &regs[i]) != 0)
                goto slow;
            if (regs[i] != p->regs[i])
                same = 0;
        }
        if (!same) {
            memcpy(p->regs, regs, sizeof regs);
            p->have_regs = 1;
            p->repeats = 1;
        } else if (p->repeats + 1 >= p->repeat_limit) {
            goto slow; /* the loop ends the run: Python's path */
        } else {
            p->repeats++;
        }
    } else {
        p->last_address = address;
        p->last_rip = frame[0];
        p->last_rsp = frame[3];
        p->last_rflags = new_rflags;
        p->last_delta = delta;
        p->have_regs = 0;
        p->repeats = 0;
    }
    p->last_icount = c->count;
    if (x->frame_ss != ss) {
        /* The SS cache as `Registers.load_segments` leaves it; the context was saved
         * above, after every check that can refuse. */
        uint32_t sel = (uint32_t)x->frame_ss, zero = 0, flags = (uint32_t)x->frame_ss_flags;
        uint32_t limit = (sel & 0xFFFC) ? 0xFFFFFFFFu : 0;
        int32_t none = -1;
        uint64_t base = 0;
        memcpy(p->cpu_ctx + p->off_ss, &sel, 4);
        memcpy(p->cpu_ctx + p->off_ss + 4, &zero, 4);
        memcpy(p->cpu_ctx + p->off_ss + 8, &base, 8);
        memcpy(p->cpu_ctx + p->off_ss + 16, &limit, 4);
        memcpy(p->cpu_ctx + p->off_ss + 20, &flags, 4);
        memcpy(p->cpu_ctx + p->off_old_exception, &none, 4);
        p->ctx_restore(uc, p->cpu_ctx);
    }
    r = &p->log[p->logged++];
    r->address = address;
    r->icount = c->count;
    r->cycles = c->cycles;
    r->rip = frame[0];
    r->rsp = frame[3];
    r->rflags = new_rflags;
    r->nmi_unblocked = p->nmi_blocked;
    p->nmi_blocked = 0;
    c->last_cost = c->default_cost;
    c->cycles += p->cost;
    p->reg_write(uc, p->rid_rsp, &frame[3]);
    p->reg_write(uc, p->rid_rflags, &new_rflags);
    p->reg_write(uc, p->rid_rip, &frame[0]);
    p->hits++;
    return;
slow:
    p->fallback(address);
}
