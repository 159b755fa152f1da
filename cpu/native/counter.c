/* Instruction counter for idtlab: a native UC_HOOK_CODE callback.
 *
 * A Python per-instruction hook runs at ~1.4 MIPS; this one keeps exact instruction
 * counts at native speed. It counts every instruction *before* it executes and stops
 * the engine when the count reaches `stop_at`, so the instruction that triggered the
 * stop has been counted but not executed (the machine subtracts it).
 * uc_emu_stop is passed in as a pointer so this file needs no Unicorn headers.
 */
#include <stdint.h>

struct idtlab_counter {
    uint64_t count;
    uint64_t stop_at;
    int (*stop)(void *uc);
    uint64_t stopped;
};

void idtlab_count_insn(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct idtlab_counter *c = (struct idtlab_counter *)user_data;
    (void)address;
    (void)size;
    if (++c->count >= c->stop_at) {
        c->stopped = 1;
        c->stop(uc);
    }
}
