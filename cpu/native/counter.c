/* Instruction and cycle counter for idtlab: a native UC_HOOK_CODE callback.
 *
 * A Python per-instruction hook runs at ~1.4 MIPS; this one keeps exact instruction and
 * cycle counts at native speed. It counts every instruction *before* it executes and
 * stops the engine when the instruction count reaches `stop_at` or when the cycles of
 * the instructions already retired reach `stop_cycle`; the instruction that triggered
 * the stop has been counted (count and cost) but not executed, so the machine takes it
 * back (`last_cost` says how many cycles).
 *
 * Cost per instruction:
 *   fast mode  (timed == 0): `default_cost` for every instruction, no lookup.
 *   timed mode (timed == 1): a per-address cost from an open-addressing hash table owned
 *   by this file; a miss calls `miss(address, size)` (Python: decode the instruction
 *   once with capstone, classify it, return its cost) and caches the answer.
 * uc_emu_stop is passed in as a pointer so this file needs no Unicorn headers.
 */
#include <stdint.h>
#include <stdlib.h>

struct idtlab_counter {
    uint64_t count;
    uint64_t stop_at;
    int (*stop)(void *uc);
    uint64_t stopped;
    uint64_t cycles;
    uint64_t stop_cycle;
    uint64_t last_cost;
    uint64_t default_cost;
    uint64_t timed;
    uint64_t *keys; /* address + 1; 0 marks an empty slot */
    uint32_t *vals;
    uint64_t mask;  /* capacity - 1 (capacity is a power of two) */
    uint64_t used;
    uint32_t (*miss)(uint64_t address, uint32_t size);
    /* Block counting (fast mode): see idtlab_count_block. */
    uint64_t block_addr;
    uint64_t block_size;
    uint64_t block_before;        /* count when the current block started */
    uint64_t block_cycles_before; /* cycles when the current block started */
    uint64_t split;               /* NO_SPLIT, or the index in the block to stop before */
    uint64_t *bkeys;              /* block address + 1 */
    uint64_t *bvals;              /* (size << 32) | instructions */
    uint64_t bmask;
    uint64_t bused;
    uint32_t (*bmiss)(uint64_t address, uint32_t size);
    /* Timed mode: the address of the last instruction counted (the machine decodes it
     * when a branch turned out to jump to a non-canonical address). */
    uint64_t last_addr;
    /* Alignment checking (#AC), see ac_stop: armed by the machine while CPL = 3 and
     * CR0.AM = 1; then RFLAGS.AC is read (through reg_read) before each block (fast
     * mode) or instruction (timed mode), except at the boundary where `count` equals
     * `ac_pass` (the machine let that one instruction run). */
    uint64_t ac_check;
    uint64_t ac_pass;
    uint64_t ac_stopped;
    int (*reg_read)(void *uc, int regid, void *value);
    int32_t rid_eflags;
    /* Fast mode: the instructions the current block added to `count` when it started
     * (0 when it stopped before running): an IRETQ, which ends its block, is the last. */
    uint64_t block_n;
};

#define NO_SPLIT UINT64_MAX

static uint64_t slot_of(uint64_t key, uint64_t mask)
{
    return (key * 0x9E3779B97F4A7C15ull >> 20) & mask;
}

static int table_put(struct idtlab_counter *c, uint64_t key, uint32_t val);

static int table_grow(struct idtlab_counter *c)
{
    uint64_t old_cap = c->keys ? c->mask + 1 : 0;
    uint64_t *old_keys = c->keys;
    uint32_t *old_vals = c->vals;
    uint64_t cap = old_cap ? old_cap * 2 : 1024;
    uint64_t *keys = calloc(cap, sizeof *keys);
    uint32_t *vals = calloc(cap, sizeof *vals);
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return -1;
    }
    c->keys = keys;
    c->vals = vals;
    c->mask = cap - 1;
    c->used = 0;
    for (uint64_t i = 0; i < old_cap; i++)
        if (old_keys[i])
            table_put(c, old_keys[i], old_vals[i]);
    free(old_keys);
    free(old_vals);
    return 0;
}

static int table_put(struct idtlab_counter *c, uint64_t key, uint32_t val)
{
    if (!c->keys || (c->used + 1) * 2 > c->mask + 1)
        if (table_grow(c) != 0)
            return -1;
    uint64_t i = slot_of(key, c->mask);
    while (c->keys[i] && c->keys[i] != key)
        i = (i + 1) & c->mask;
    if (!c->keys[i])
        c->used++;
    c->keys[i] = key;
    c->vals[i] = val;
    return 0;
}

static uint32_t cost_of(struct idtlab_counter *c, uint64_t address, uint32_t size)
{
    uint64_t key = address + 1;
    if (c->keys) {
        uint64_t i = slot_of(key, c->mask);
        while (c->keys[i]) {
            if (c->keys[i] == key)
                return c->vals[i];
            i = (i + 1) & c->mask;
        }
    }
    uint32_t cost = c->miss ? c->miss(address, size) : (uint32_t)c->default_cost;
    table_put(c, key, cost); /* on allocation failure: not cached, asked again */
    return cost;
}

#define RFLAGS_AC (1u << 18)

/* Alignment checking: with CPL = 3 and CR0.AM = 1 (`ac_check`), RFLAGS.AC = 1 turns every
 * unaligned data access into #AC (SDM Vol. 3A "Alignment Check Exception"). QEMU does not
 * check alignment, and a memory hook sees an access only while it happens, too late for a
 * fault. So while AC = 1 the engine stops before each instruction and the machine checks
 * the instruction's accesses itself, then lets it run alone (`ac_pass`). AC changes only
 * where QEMU ends a translation block (POPF ends one "because TF/AC flag may change";
 * IRET and SYSRET are the machine's), so one look per block is exact in fast mode. With
 * AC = 0, the cost is one register read per block; with CR0.AM = 0 or CPL < 3, one test. */
static int ac_stop(struct idtlab_counter *c, void *uc)
{
    uint64_t rflags = 0;
    if (!c->ac_check || c->count == c->ac_pass)
        return 0;
    c->reg_read(uc, c->rid_eflags, &rflags);
    return (rflags & RFLAGS_AC) != 0;
}

void idtlab_count_insn(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct idtlab_counter *c = (struct idtlab_counter *)user_data;
    uint64_t before = c->cycles;
    if (ac_stop(c, uc)) {
        /* Counted, not executed, like a threshold stop (the machine takes it back). */
        c->count++;
        c->cycles = before + c->default_cost;
        c->last_cost = c->default_cost;
        c->stopped = 1;
        c->ac_stopped = 1;
        c->stop(uc);
        return;
    }
    uint64_t cost = c->timed ? cost_of(c, address, size) : c->default_cost;
    c->count++;
    c->cycles = before + cost;
    c->last_cost = cost;
    c->last_addr = address;
    if (c->count >= c->stop_at || before >= c->stop_cycle) {
        c->stopped = 1;
        c->stop(uc);
    }
}

static int btable_put(struct idtlab_counter *c, uint64_t key, uint64_t val);

static int btable_grow(struct idtlab_counter *c)
{
    uint64_t old_cap = c->bkeys ? c->bmask + 1 : 0;
    uint64_t *old_keys = c->bkeys, *old_vals = c->bvals;
    uint64_t cap = old_cap ? old_cap * 2 : 1024;
    uint64_t *keys = calloc(cap, sizeof *keys), *vals = calloc(cap, sizeof *vals);
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return -1;
    }
    c->bkeys = keys;
    c->bvals = vals;
    c->bmask = cap - 1;
    c->bused = 0;
    for (uint64_t i = 0; i < old_cap; i++)
        if (old_keys[i])
            btable_put(c, old_keys[i], old_vals[i]);
    free(old_keys);
    free(old_vals);
    return 0;
}

static int btable_put(struct idtlab_counter *c, uint64_t key, uint64_t val)
{
    if (!c->bkeys || (c->bused + 1) * 2 > c->bmask + 1)
        if (btable_grow(c) != 0)
            return -1;
    uint64_t i = slot_of(key, c->bmask);
    while (c->bkeys[i] && c->bkeys[i] != key)
        i = (i + 1) & c->bmask;
    if (!c->bkeys[i])
        c->bused++;
    c->bkeys[i] = key;
    c->bvals[i] = val;
    return 0;
}

static uint64_t block_insns(struct idtlab_counter *c, uint64_t address, uint32_t size)
{
    uint64_t key = address + 1;
    if (c->bkeys) {
        uint64_t i = slot_of(key, c->bmask);
        while (c->bkeys[i]) {
            if (c->bkeys[i] == key) {
                if ((c->bvals[i] >> 32) == size)
                    return c->bvals[i] & 0xFFFFFFFFu;
                break; /* same start, other size (a split block): ask again */
            }
            i = (i + 1) & c->bmask;
        }
    }
    uint64_t n = c->bmiss ? c->bmiss(address, size) : 1;
    btable_put(c, key, ((uint64_t)size << 32) | n);
    return n;
}

/* Fast mode: a UC_HOOK_BLOCK callback, called before each translation block runs.
 *
 * It adds the block's instruction count (and count * default_cost cycles) before the
 * block runs, and remembers where the block started, so the machine can settle the
 * exact count at any stop: the instructions retired are `block_before` plus those of
 * the block before the stopping RIP. When the instruction or cycle threshold falls
 * inside this block, it stops the engine *before* the block runs, adds nothing, and
 * sets `split` to the index of the instruction the machine must stop before; the
 * machine then runs exactly that far with Unicorn's `until`. */
static __attribute__((noinline)) void count_block(void *uc, uint64_t address, uint32_t size,
                                                  struct idtlab_counter *c);

void idtlab_count_block(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    /* The common case, with no call and so no register saves (this runs before every
     * block: its cost is the block counter's): the block's count is in its first slot of
     * the table, no alignment check is armed, no cycle threshold is set and the
     * instruction threshold is beyond the block. Everything else: `count_block`. */
    struct idtlab_counter *c = (struct idtlab_counter *)user_data;
    uint64_t key = address + 1, i, n;
    if (c->bkeys && !c->ac_check && c->stop_cycle == UINT64_MAX) {
        i = slot_of(key, c->bmask);
        if (c->bkeys[i] == key && (c->bvals[i] >> 32) == size) {
            n = c->bvals[i] & 0xFFFFFFFFu;
            if (c->count + n < c->stop_at) {
                c->block_addr = address;
                c->block_size = size;
                c->block_before = c->count;
                c->block_cycles_before = c->cycles;
                c->block_n = n;
                c->count += n;
                c->cycles += n * c->default_cost;
                return;
            }
        }
    }
    count_block(uc, address, size, c);
}

static void count_block(void *uc, uint64_t address, uint32_t size, struct idtlab_counter *c)
{
    uint64_t n;
    uint64_t cost = c->default_cost;
    uint64_t k = NO_SPLIT;
    c->block_addr = address;
    c->block_size = size;
    c->block_before = c->count;
    c->block_cycles_before = c->cycles;
    c->block_n = 0;
    n = block_insns(c, address, size);
    if (ac_stop(c, uc)) {
        c->split = 0; /* stop before the block's first instruction */
        c->stopped = 1;
        c->ac_stopped = 1;
        c->stop(uc);
        return;
    }
    if (c->count + n >= c->stop_at)
        k = c->stop_at > c->count + 1 ? c->stop_at - 1 - c->count : 0;
    if (c->stop_cycle != UINT64_MAX) {
        uint64_t kc = NO_SPLIT;
        if (c->cycles >= c->stop_cycle)
            kc = 0;
        else if (cost)
            kc = (c->stop_cycle - c->cycles + cost - 1) / cost;
        if (kc < n && kc < k)
            k = kc;
    }
    if (k != NO_SPLIT && k < n) {
        c->split = k;
        c->stopped = 1;
        c->stop(uc);
        return;
    }
    c->count += n;
    c->cycles += n * c->default_cost;
    c->block_n = n;
}

/* Forget every cached cost and block count (code was rewritten, or the profile changed). */
void idtlab_table_clear(struct idtlab_counter *c)
{
    free(c->keys);
    free(c->vals);
    c->keys = NULL;
    c->vals = NULL;
    c->mask = 0;
    c->used = 0;
    free(c->bkeys);
    free(c->bvals);
    c->bkeys = NULL;
    c->bvals = NULL;
    c->bmask = 0;
    c->bused = 0;
}
