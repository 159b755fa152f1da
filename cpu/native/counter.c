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
};

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

void idtlab_count_insn(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct idtlab_counter *c = (struct idtlab_counter *)user_data;
    uint64_t before = c->cycles;
    uint64_t cost = c->timed ? cost_of(c, address, size) : c->default_cost;
    c->count++;
    c->cycles = before + cost;
    c->last_cost = cost;
    if (c->count >= c->stop_at || before >= c->stop_cycle) {
        c->stopped = 1;
        c->stop(uc);
    }
}

/* Forget every cached cost (code was rewritten, or the profile changed). */
void idtlab_table_clear(struct idtlab_counter *c)
{
    free(c->keys);
    free(c->vals);
    c->keys = NULL;
    c->vals = NULL;
    c->mask = 0;
    c->used = 0;
}
