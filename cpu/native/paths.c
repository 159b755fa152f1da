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
