/* A native front for idtlab's TLB-fill hook: validated translations without Python.
 *
 * Unicorn runs in UC_TLB_VIRTUAL mode: every miss of QEMU's software TLB asks the
 * UC_HOOK_TLB_FILL callback for the physical page and the rights. Answering in Python
 * costs ~10 us, and code that sweeps more pages than QEMU's TLB holds misses every few
 * hundred instructions (kvm-unit-tests' sieve: one fill per ~100 instructions).
 *
 * This hook answers from a direct-mapped table of translations Python computed earlier,
 * and calls Python (`miss`) for everything else. An entry is used only if it still holds:
 * the same page, access kind, CR0/CR3/CR4/EFER and privilege (read from the engine at
 * each fill), the same EFLAGS.AC for a supervisor fill while CR4.SMAP = 1 (SMAP lets an
 * explicit supervisor access reach a user page only with AC = 1), the same `generation`
 * (Python bumps it whenever anything else a fill depends on changes: checkpoint tracking,
 * EPT, IA32_PKRS; Python never remembers a fill made while CR4.PKE = 1, as PKRU changes
 * natively) and, for a translation that grants write access, the same
 * `write_generation` (bumped at a checkpoint rollback), and every paging-structure entry the
 * walk read still holds the value the walk left there (re-read from guest memory). So an
 * answer from the table is exactly the answer a fresh Python walk would give — like
 * `cpu.mmu.WalkCache`, this is not a model of the hardware TLB, only a faster path to the
 * same result. Refused translations (faults, MMIO, outside RAM) are never in the table.
 *
 * uc_reg_read is passed in as a pointer so this file needs no Unicorn headers.
 */
#include <stdint.h>
#include <string.h>

#define TLB_WALK_MAX 4

struct tlb_entry_out {  /* Unicorn's uc_tlb_entry */
    uint64_t paddr;
    int32_t perms;
};

struct tlb_slot {
    uint64_t tag;  /* (page << 2 | access) + 1; 0: empty */
    uint64_t cr0, cr3, cr4, efer;
    uint64_t generation;
    uint64_t write_generation;
    uint64_t user;
    uint64_t ac;
    uint64_t n;
    uint64_t addr[TLB_WALK_MAX];
    uint64_t val[TLB_WALK_MAX];
    uint64_t paddr;
    uint64_t perms;
};

struct uc_msr {
    uint32_t rid;
    uint64_t value;
};

struct idtlab_tlb {
    int (*reg_read)(void *uc, int regid, void *value);
    int (*miss)(void *uc, uint64_t vaddr, int32_t type, void *entry);
    uint8_t *mem;
    uint64_t mem_size;
    uint64_t enabled;
    uint64_t generation;
    struct tlb_slot *slots;
    uint64_t mask;
    uint64_t hits;
    uint64_t misses;
    int32_t rid_cr0, rid_cr3, rid_cr4, rid_cs, rid_msr, rid_rflags;
    /* The context of the last lookup, for `idtlab_tlb_insert` from the miss path. */
    uint64_t cr0, cr3, cr4, efer, user, ac;
    /* Bumped alone when only the translations that grant write access must go (a
     * checkpoint rollback: a write fill marks its page for copy-on-write, so it must
     * reach Python again; read and fetch fills stay valid, being re-validated here). */
    uint64_t write_generation;
};

#define PROT_W 2

#define MSR_EFER 0xC0000080u
#define CR4_SMAP (1ull << 21)
#define RFLAGS_AC (1ull << 18)

static uint64_t slot_index(uint64_t tag, uint64_t mask)
{
    return (tag * 0x9E3779B97F4A7C15ull >> 24) & mask;
}

static void read_context(struct idtlab_tlb *t, void *uc)
{
    uint64_t cs = 0;
    struct uc_msr msr = {MSR_EFER, 0};
    t->reg_read(uc, t->rid_cr0, &t->cr0);
    t->reg_read(uc, t->rid_cr3, &t->cr3);
    t->reg_read(uc, t->rid_cr4, &t->cr4);
    t->reg_read(uc, t->rid_cs, &cs);
    t->reg_read(uc, t->rid_msr, &msr);
    t->efer = msr.value;
    t->user = (cs & 3) == 3;
    t->ac = 0;
    if ((t->cr4 & CR4_SMAP) && !t->user) {
        uint64_t rflags = 0;
        t->reg_read(uc, t->rid_rflags, &rflags);
        t->ac = (rflags & RFLAGS_AC) != 0;
    }
}

int idtlab_tlb_fill(void *uc, uint64_t addr, int32_t type, struct tlb_entry_out *entry,
                    void *user_data)
{
    struct idtlab_tlb *t = user_data;
    if (t->enabled && type >= 16 && type <= 18) {
        uint64_t tag = (((addr >> 12) << 2) | (uint64_t)(type - 16)) + 1;
        struct tlb_slot *s = &t->slots[slot_index(tag, t->mask)];
        read_context(t, uc);
        if (s->tag == tag && s->generation == t->generation && s->cr3 == t->cr3 &&
                s->cr0 == t->cr0 && s->cr4 == t->cr4 && s->efer == t->efer &&
                s->user == t->user && s->ac == t->ac &&
                (!(s->perms & PROT_W) || s->write_generation == t->write_generation)) {
            uint64_t i;
            for (i = 0; i < s->n; i++) {
                uint64_t v;
                if (s->addr[i] + 8 > t->mem_size)
                    break;
                memcpy(&v, t->mem + s->addr[i], 8);
                if (v != s->val[i])
                    break;
            }
            if (i == s->n) {
                entry->paddr = s->paddr;
                entry->perms = (int32_t)s->perms;
                t->hits++;
                return 1;
            }
        }
    }
    t->misses++;
    return t->miss(uc, addr, type, entry);
}

/* Remember a translation Python computed for (vaddr, type) under the context of the
 * lookup that missed (and only if Python's privilege agrees with it); `n`
 * paging-structure entries at `addrs` held `vals`. */
void idtlab_tlb_insert(struct idtlab_tlb *t, uint64_t vaddr, int32_t type, uint64_t user,
                       uint64_t n, const uint64_t *addrs, const uint64_t *vals, uint64_t paddr,
                       uint64_t perms)
{
    uint64_t tag, i;
    struct tlb_slot *s;
    if (!t->enabled || n > TLB_WALK_MAX || type < 16 || type > 18 || user != t->user)
        return;
    tag = (((vaddr >> 12) << 2) | (uint64_t)(type - 16)) + 1;
    s = &t->slots[slot_index(tag, t->mask)];
    s->tag = tag;
    s->cr0 = t->cr0;
    s->cr3 = t->cr3;
    s->cr4 = t->cr4;
    s->efer = t->efer;
    s->user = t->user;
    s->ac = t->ac;
    s->generation = t->generation;
    s->write_generation = t->write_generation;
    s->n = n;
    for (i = 0; i < n; i++) {
        s->addr[i] = addrs[i];
        s->val[i] = vals[i];
    }
    s->paddr = paddr;
    s->perms = perms;
}
