"""The native TLB-fill front (cpu/native/tlb.c): a fill it answers is exactly the fill
Python would compute — it re-validates every paging-structure entry the walk read — and
code that sweeps more pages than QEMU's TLB holds stops calling Python for them."""

from __future__ import annotations

from cpu.layout import PageSpec
from cpu.machine import Machine
from tests.delivery.rig import CODE, DATA, KERNEL_STACK, START_RFLAGS, build, gate

SWEEP = """
    mov r8, 4
again:
    mov rbx, 0x400000
    mov rcx, 2048                # 8 MiB of pages, more than QEMU's TLB holds
touch:
    mov rax, qword ptr [rbx]
    add rbx, 0x1000
    dec rcx
    jnz touch
    dec r8
    jnz again
    hlt
"""


def test_a_sweep_over_many_pages_is_answered_natively_after_the_first_pass() -> None:
    m, _ = build(SWEEP)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100_000)
    hits, misses = m.engine.fill_counts
    assert r.outcome == "hlt"
    assert misses < 2048 + 200 and hits > 2048  # passes 2-4 hit the native front


def test_a_pte_the_guest_clears_without_invlpg_is_seen_at_the_next_fill() -> None:
    """Not a hardware TLB: a remembered translation whose PTE changed is not used (the
    result is what a fresh walk gives, here a #PF)."""
    m, sym = build(f"""
    mov rax, qword ptr [{DATA:#x}]           # fills DATA's translation
    mov rcx, 2048
flush:                                      # evict QEMU's TLB entry by sweeping pages
    mov rdx, rcx
    shl rdx, 12
    add rdx, 0x400000
    mov rdx, qword ptr [rdx]
    loop flush
    mov rdi, qword ptr [pte_addr]           # the guest clears DATA's PTE, no INVLPG
    mov qword ptr [rdi], 0
    mov rcx, 2048
flush2:
    mov rdx, rcx
    shl rdx, 12
    add rdx, 0x400000
    mov rdx, qword ptr [rdx]
    loop flush2
the_load:
    mov rax, qword ptr [{DATA:#x}]
    hlt
pf_handler:
    hlt
pte_addr: .quad 0
    """, gates={14: gate("pf_handler")}, pages=[PageSpec(va=DATA, pa=DATA)])
    # Where the machine's identity map keeps DATA's 4-KiB PTE (a PageSpec gets one).
    m.build()
    pte_addr = _pte_address(m, DATA)
    m.phys.write_u64(sym["pte_addr"], pte_addr)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=2_000_000)

    [pf] = r.deliveries
    assert (pf["name"], pf["rip"], pf["error_code"], pf["cr2"]) == ("#PF", sym["the_load"], 0, DATA)


def _pte_address(m: Machine, va: int) -> int:
    table = m.engine.read_reg("cr3") & ~0xFFF
    for shift in (39, 30, 21):
        entry = m.phys.read_uint(table + 8 * ((va >> shift) & 0x1FF), 8)
        table = entry & 0x000FFFFFFFFFF000
    return table + 8 * ((va >> 12) & 0x1FF)
