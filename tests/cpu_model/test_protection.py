"""SMEP, SMAP, protection keys (PKU, PKS) and UMIP, each with the #PF error code the SDM
gives (Vol. 3A "Access Rights", "Protection Keys", "Page-Fault Error Code": P 0, W/R 1,
U/S 2, I/D 4, PK 5) or #GP(0) for UMIP (Vol. 3A "User-Mode Instruction Prevention").

Layout: the machine's identity map is made of user pages; these tests turn the pages the
supervisor code needs (GDT/TSS, IDT, code, kernel stacks) into supervisor pages, and
probe PROBE (0x400000), a user page, or PROBE + 0x1000 made a supervisor page."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cpu.layout import PageSpec
from cpu.machine import Machine
from tests.cpu_model.kit import (
    CODE,
    DATA,
    KERNEL_STACK,
    PROBE,
    RSP0_TOP,
    Ran,
    leaf_entry,
    run,
)
from tests.delivery.rig import build, gate

GP, PF = 13, 14
P, W, U, ID, PK = 1, 2, 4, 16, 32
CR4_SMEP, CR4_SMAP, CR4_PKE, CR4_PKS, CR4_UMIP = 1 << 20, 1 << 21, 1 << 22, 1 << 24, 1 << 11
CR0_WP = 1 << 16
RFLAGS_AC = 1 << 18
IST1_TOP = 0x90000
SUPER_PROBE = PROBE + 0x1000


def supervisor(*vas: int) -> list[PageSpec]:
    return [PageSpec(va, va, user=False) for va in vas]


# GDT+TSS 0x1000, IDT 0x2000, the code's two pages, the kernel stack, TSS.RSP0, IST1.
KERNEL_PAGES = supervisor(0x1000, 0x2000, CODE, CODE + 0x1000, KERNEL_STACK - 0x1000,
                          RSP0_TOP - 0x1000, IST1_TOP - 0x1000, SUPER_PROBE)
USER_PAGES = [PageSpec(PROBE, PROBE), PageSpec(PROBE + 0x2000, PROBE + 0x2000, writable=False)]


def with_key(va: int, key: int) -> Callable[[Machine], None]:
    def setup(m: Machine) -> None:
        entry = leaf_entry(m, va)
        m.phys.write_u64(entry, m.phys.read_u64(entry) | (key << 59))
    return setup


def kernel(source: str, **kw: object) -> Ran:
    return run(source, pages=KERNEL_PAGES + USER_PAGES, **kw)  # type: ignore[arg-type]


def pf(r: Ran, error_code: int, cr2: int, rip: int) -> None:
    d = r.first
    assert d is not None, r.result.outcome
    assert (d["vector"], d["error_code"], d["cr2"], d["rip"]) == (PF, error_code, cr2, rip)


# -- SMEP ------------------------------------------------------------------------------------

def test_with_smep_a_supervisor_fetch_from_a_user_page_is_pf_p_id() -> None:
    r = kernel(f"""
    main:
        mov rax, {PROBE}
        jmp rax
    """, cr4=CR4_SMEP)
    pf(r, P | ID, PROBE, PROBE)


def test_with_smep_a_data_read_of_a_user_page_does_not_make_it_executable() -> None:
    # The engine's TLB entry for the read also serves fetches: it must not grant them.
    r = kernel(f"""
    main:
        mov rax, {PROBE}
        mov rbx, qword ptr [rax]
        jmp rax
    """, cr4=CR4_SMEP)
    pf(r, P | ID, PROBE, PROBE)


def test_setting_smep_while_running_on_a_user_page_faults_the_next_fetch() -> None:
    r = run("""
    main:
        mov rax, cr4
        bts rax, 20
        mov cr4, rax
    next:
        nop
    """)
    pf(r, P | ID, r.sym["next"], r.sym["next"])
    assert r.reg("cr4") & CR4_SMEP


# -- SMAP ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("insn", "code"), [(f"mov rbx, qword ptr [{PROBE + 8}]", P),
                                            (f"mov qword ptr [{PROBE + 8}], rbx", P | W)])
def test_with_smap_and_ac_0_a_supervisor_data_access_to_a_user_page_is_pf(
        insn: str, code: int) -> None:
    r = kernel(f"""
    main:
    the_insn:
        {insn}
        hlt
    """, cr4=CR4_SMAP)
    pf(r, code, PROBE + 8, r.sym["the_insn"])


def test_with_smap_and_ac_1_a_supervisor_data_access_to_a_user_page_is_allowed() -> None:
    r = kernel(f"""
    main:
        stac
        mov qword ptr [{PROBE + 8}], 0x77
        mov rbx, qword ptr [{PROBE + 8}]
        hlt
    """, cr4=CR4_SMAP)
    assert (r.first, r.reg("rbx")) == (None, 0x77)


def test_clac_after_an_allowed_access_makes_the_next_one_fault() -> None:
    # The page was just translated with AC = 1; the AC = 0 access must not reuse that.
    r = kernel(f"""
    main:
        stac
        mov rbx, qword ptr [{PROBE + 8}]
        clac
    the_insn:
        mov rbx, qword ptr [{PROBE + 8}]
        hlt
    """, cr4=CR4_SMAP)
    pf(r, P, PROBE + 8, r.sym["the_insn"])


def test_a_translation_made_with_ac_1_is_not_reused_with_ac_0_after_a_tlb_flush() -> None:
    # Rewriting CR3 with its own value empties the engine's TLB but changes no control
    # register: only EFLAGS.AC tells the two fills apart.
    r = kernel(f"""
    main:
        stac
        mov rbx, qword ptr [{PROBE + 8}]
        mov rax, cr3
        mov cr3, rax
        clac
    the_insn:
        mov rbx, qword ptr [{PROBE + 8}]
        hlt
    """, cr4=CR4_SMAP)
    pf(r, P, PROBE + 8, r.sym["the_insn"])


def test_popf_setting_ac_lets_the_access_through() -> None:
    r = kernel(f"""
    main:
        pushfq
        or qword ptr [rsp], {RFLAGS_AC}
        popfq
        mov rbx, qword ptr [{PROBE + 8}]
        hlt
    """, cr4=CR4_SMAP)
    assert (r.first, r.result.outcome) == (None, "hlt")


def test_with_smap_a_supervisor_fetch_from_a_user_page_is_allowed_without_smep() -> None:
    r = kernel(f"""
    main:
        mov byte ptr [{SUPER_PROBE}], 0xF4     # a HLT, written through a supervisor page
        mov rax, {PROBE}
        mov qword ptr [rsp - 8], rax
        stac
        mov byte ptr [{PROBE}], 0xF4
        clac
        jmp rax
    """, cr4=CR4_SMAP)
    assert (r.first, r.result.outcome, r.reg("rip")) == (None, "hlt", PROBE + 1)


def test_with_smap_delivery_pushing_onto_a_user_page_faults_even_with_ac_1() -> None:
    # Delivery's pushes are implicit supervisor-mode accesses: SMAP refuses them whatever
    # EFLAGS.AC (decision in docs/sdm-map.md). The #PF then goes to IST1.
    m, sym = build(f"""
    main:
        stac
        mov rsp, {PROBE + 0x800}
    the_int3:
        int3
        hlt
    fault:
        hlt
    """, gates={3: gate("fault"), 14: gate("fault", ist=1)},
        pages=KERNEL_PAGES + USER_PAGES)
    m.build()
    m.engine.write({"cr4": m.engine.read_reg("cr4") | CR4_SMAP})
    result = m.run(entry=sym["main"], rsp=KERNEL_STACK, max_insns=100)
    bad = [rec for rec in result.trace.records if rec["kind"] == "delivery_fault"]
    assert [(b["vector"], b["fault"], b["error_code"]) for b in bad] == [(3, PF, P | W)]
    d = result.deliveries[0]
    assert (d["vector"], d["error_code"], d["cr2"], d["stack"]) == (PF, P | W, PROBE + 0x800 - 8,
                                                                     "ist1")


# -- protection keys for user pages (PKU) ----------------------------------------------------

def pkru_run(insn: str, *, cpl: int, pkru: int, cr0_clear: int = 0) -> Ran:
    """WRPKRU (not privileged: the CPL3 code sets PKRU itself), then `insn` at `cpl`, with
    CR4.PKE = 1 and protection key 1 on PROBE."""
    source = f"""
    main:
        mov eax, {pkru:#x}
        xor ecx, ecx
        xor edx, edx
        wrpkru
    the_insn:
        {insn}
    done:
        hlt
    """
    if cpl == 3:
        return run(source, cpl=3, cr4=CR4_PKE, pages=USER_PAGES, setup=with_key(PROBE, 1))
    return kernel(source, cr4=CR4_PKE, cr0_clear=cr0_clear, setup=with_key(PROBE, 1))


AD1, WD1 = 1 << 2, 1 << 3  # key 1: bits 2 (AD) and 3 (WD)


@pytest.mark.parametrize(("cpl", "insn", "pkru", "code"), [
    (3, f"mov rbx, qword ptr [{PROBE}]", AD1, P | U | PK),
    (3, f"mov qword ptr [{PROBE}], rbx", AD1, P | W | U | PK),
    (3, f"mov qword ptr [{PROBE}], rbx", WD1, P | W | U | PK),
    (0, f"mov rbx, qword ptr [{PROBE}]", AD1, P | PK),
    (0, f"mov qword ptr [{PROBE}], rbx", WD1, P | W | PK),     # CR0.WP = 1
], ids=["cpl3-read-ad", "cpl3-write-ad", "cpl3-write-wd", "cpl0-read-ad", "cpl0-write-wd"])
def test_a_pkru_refusal_is_pf_with_pk(cpl: int, insn: str, pkru: int, code: int) -> None:
    r = pkru_run(insn, cpl=cpl, pkru=pkru)
    pf(r, code, PROBE, r.sym["the_insn"])


@pytest.mark.parametrize(("cpl", "insn", "pkru", "cr0_clear"), [
    (3, f"mov rbx, qword ptr [{PROBE}]", WD1, 0),               # WD does not stop reads
    (0, f"mov qword ptr [{PROBE}], rbx", WD1, CR0_WP),          # supervisor, WP = 0
    (3, f"mov rbx, qword ptr [{PROBE}]", 1 << 4, 0),            # key 2's AD, page has key 1
    (0, f"mov rbx, qword ptr [{PROBE}]", AD1 << 8, 0),          # key 5's AD
])
def test_pkru_lets_through_what_it_does_not_forbid(cpl: int, insn: str, pkru: int,
                                                    cr0_clear: int) -> None:
    r = pkru_run(insn, cpl=cpl, pkru=pkru, cr0_clear=cr0_clear)
    # The access completes; at CPL3 the run then ends with the HLT's #GP(0).
    assert r.first is None if cpl == 0 else r.fault() == (GP, 0, r.sym["done"])


def test_a_fetch_is_not_checked_against_pkru() -> None:
    r = run(f"""
    main:
        mov byte ptr [{PROBE}], 0xF4
        mov eax, {AD1:#x}
        xor ecx, ecx
        xor edx, edx
        wrpkru
        mov rax, {PROBE}
        jmp rax
    """, cr4=CR4_PKE, setup=with_key(PROBE, 1))
    assert (r.first, r.result.outcome, r.reg("rip")) == (None, "hlt", PROBE + 1)


def test_a_read_only_page_faults_without_pk_even_with_a_write_disabled_key() -> None:
    r = run(f"""
    main:
        mov eax, {WD1:#x}
        xor ecx, ecx
        xor edx, edx
        wrpkru
    the_insn:
        mov qword ptr [{PROBE + 0x2000}], rbx
        hlt
    """, cpl=3, cr4=CR4_PKE, pages=USER_PAGES, setup=with_key(PROBE + 0x2000, 1))
    pf(r, P | W | U, PROBE + 0x2000, r.sym["the_insn"])


def test_wrpkru_takes_effect_on_the_next_access_to_a_page_already_translated() -> None:
    r = run(f"""
    main:
        mov rbx, qword ptr [{PROBE}]
        mov eax, {AD1:#x}
        xor ecx, ecx
        xor edx, edx
        wrpkru
    the_insn:
        mov rbx, qword ptr [{PROBE}]
        hlt
    """, cpl=3, cr4=CR4_PKE, setup=with_key(PROBE, 1))
    pf(r, P | U | PK, PROBE, r.sym["the_insn"])


# -- protection keys for supervisor pages (PKS) ----------------------------------------------

def pks_run(insn: str, *, pkrs: int, cr0_clear: int = 0, page: int = SUPER_PROBE) -> Ran:
    return kernel(f"""
    main:
        mov ecx, 0x6e1
        mov eax, {pkrs:#x}
        xor edx, edx
        wrmsr
    the_insn:
        {insn}
        hlt
    """, cr4=CR4_PKS, cr0_clear=cr0_clear, setup=with_key(page, 2))


AD2, WD2 = 1 << 4, 1 << 5


@pytest.mark.parametrize(("insn", "pkrs", "code"), [
    (f"mov rbx, qword ptr [{SUPER_PROBE}]", AD2, P | PK),
    (f"mov qword ptr [{SUPER_PROBE}], rbx", AD2, P | W | PK),
    (f"mov qword ptr [{SUPER_PROBE}], rbx", WD2, P | W | PK),
])
def test_a_pkrs_refusal_is_pf_with_pk(insn: str, pkrs: int, code: int) -> None:
    r = pks_run(insn, pkrs=pkrs)
    pf(r, code, SUPER_PROBE, r.sym["the_insn"])


@pytest.mark.parametrize(("insn", "pkrs", "cr0_clear", "page"), [
    (f"mov qword ptr [{SUPER_PROBE}], rbx", WD2, CR0_WP, SUPER_PROBE),   # WP = 0
    (f"mov rbx, qword ptr [{SUPER_PROBE}]", WD2, 0, SUPER_PROBE),        # WD: reads pass
    (f"stac; mov qword ptr [{PROBE}], rbx", AD2, 0, PROBE),               # a user page
], ids=["wp0", "read-wd", "user-page"])
def test_pkrs_lets_through_what_it_does_not_forbid(insn: str, pkrs: int, cr0_clear: int,
                                                   page: int) -> None:
    r = pks_run(insn, pkrs=pkrs, cr0_clear=cr0_clear, page=page)
    assert (r.first, r.result.outcome) == (None, "hlt")


def test_a_pkrs_write_takes_effect_on_the_next_access() -> None:
    r = kernel(f"""
    main:
        mov rbx, qword ptr [{SUPER_PROBE}]
        mov ecx, 0x6e1
        mov eax, {AD2:#x}
        xor edx, edx
        wrmsr
    the_insn:
        mov rbx, qword ptr [{SUPER_PROBE}]
        hlt
    """, cr4=CR4_PKS, setup=with_key(SUPER_PROBE, 2))
    pf(r, P | PK, SUPER_PROBE, r.sym["the_insn"])


# -- UMIP ------------------------------------------------------------------------------------

UMIP_INSNS = [f"sgdt [{DATA}]", f"sidt [{DATA}]", "sldt eax", "smsw eax", "str eax",
              f"smsw word ptr [{DATA}]"]


@pytest.mark.parametrize("insn", UMIP_INSNS)
def test_with_umip_a_descriptor_table_store_at_cpl3_is_gp0(insn: str) -> None:
    r = run(f"""
    main:
    the_insn:
        {insn}
        hlt
    """, cpl=3, cr4=CR4_UMIP)
    assert r.fault() == (GP, 0, r.sym["the_insn"])


@pytest.mark.parametrize(("cpl", "cr4"), [(0, CR4_UMIP), (3, 0)])
@pytest.mark.parametrize("insn", UMIP_INSNS)
def test_without_umip_or_at_cpl0_a_descriptor_table_store_runs(insn: str, cpl: int,
                                                              cr4: int) -> None:
    r = run(f"""
    main:
        {insn}
        mov rax, 1
        hlt
    """, cpl=cpl, cr4=cr4)
    # At CPL3 the run ends at the HLT (#GP(0), as HLT is privileged): the store ran.
    assert r.reg("rax") == 1
