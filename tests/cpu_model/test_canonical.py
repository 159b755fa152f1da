"""Canonical checks on loaded base addresses (cpu/canonical.py, cpu/checked_sites.py):
LGDT/LIDT, LLDT/LTR and WRFSBASE/WRGSBASE in 64-bit mode. A refused load is a fault on
the instruction (saved RIP = it) and the register keeps its value; an accepted one is
executed by the engine. The MSR forms are in test_msrs.py."""

from __future__ import annotations

import struct

import pytest

from cpu.canonical import pseudo_descriptor_base, system_descriptor_base
from cpu.layout import GDT_BASE, GDT_ENTRIES, GDT_LIMIT, IDT_BASE
from tests.cpu_model.kit import DATA, run

GP, UD = 13, 6
NONCANONICAL = 0x8000_0000_0000_1000
CANONICAL_HIGH = 0xFFFF_8000_0000_2000
CR4_FSGSBASE = 1 << 16
NEW_GDT = DATA + 0x100
LDT_SEL, TSS_SEL = 0x38, 0x48
TYPE_LDT, TYPE_TSS = 0x2, 0x9


def system_descriptor(base: int, kind: int, limit: int = 0x67) -> bytes:
    """A 16-byte 64-bit-mode LDT/TSS descriptor: present, DPL 0 (SDM Vol. 3A "TSS
    Descriptor in 64-bit mode")."""
    low = ((limit & 0xFFFF) | ((base & 0xFFFF) << 16) | (((base >> 16) & 0xFF) << 32)
           | ((0x80 | kind) << 40) | (((limit >> 16) & 0xF) << 48)
           | (((base >> 24) & 0xFF) << 56))
    return struct.pack("<QQ", low, base >> 32)


def test_the_descriptor_helpers_read_the_bases_as_the_sdm_lays_them_out() -> None:
    assert system_descriptor_base(system_descriptor(0x1234_5678_9ABC_DEF0, TYPE_TSS)) == \
        0x1234_5678_9ABC_DEF0
    assert pseudo_descriptor_base(struct.pack("<HQ", 0xFFF, CANONICAL_HIGH)) == CANONICAL_HIGH


@pytest.mark.parametrize("insn", ["lgdt", "lidt"])
def test_a_table_load_with_a_non_canonical_base_is_gp0_and_the_register_is_kept(
        insn: str) -> None:
    r = run(f"""
    main:
        lea rdx, [{DATA}]
    the_insn:
        {insn} [rdx]
        hlt
    """, memory={DATA: struct.pack("<HQ", 0xFFF, NONCANONICAL)})
    assert r.fault() == (GP, 0, r.sym["the_insn"])
    assert r.m.engine.read_table("gdtr")[1:] == (GDT_BASE, GDT_LIMIT)
    assert r.m.engine.read_table("idtr")[1:] == (IDT_BASE, 0xFFF)


@pytest.mark.parametrize(("insn", "table"), [("lgdt", "gdtr"), ("lidt", "idtr")])
def test_a_table_load_with_a_canonical_base_loads_it(insn: str, table: str) -> None:
    r = run(f"""
    main:
        {insn} [rip + operand]
        hlt
    operand:
        .word 0x123
        .quad {CANONICAL_HIGH:#x}
    """)
    assert (r.first, r.m.engine.read_table(table)[1:]) == (None, (CANONICAL_HIGH, 0x123))


def new_gdt(ldt_base: int, tss_base: int) -> dict[int, bytes]:
    """A copy of the machine's GDT with an LDT descriptor at 38H and a TSS at 48H."""
    old = b"".join(GDT_ENTRIES)
    return {NEW_GDT: old + system_descriptor(ldt_base, TYPE_LDT)
            + system_descriptor(tss_base, TYPE_TSS),
            DATA: struct.pack("<HQ", len(old) + 32 - 1, NEW_GDT)}


@pytest.mark.parametrize(("insn", "selector"), [("lldt", LDT_SEL), ("ltr", TSS_SEL)])
@pytest.mark.parametrize("form", ["register", "memory"])
def test_a_system_segment_load_whose_base_is_not_canonical_is_gp_selector(
        insn: str, selector: int, form: str) -> None:
    operand = "ax" if form == "register" else f"word ptr [{DATA + 16}]"
    r = run(f"""
    main:
        lgdt [{DATA}]
        mov eax, {selector:#x}
        mov word ptr [{DATA + 16}], ax
    the_insn:
        {insn} {operand}
        hlt
    """, memory=new_gdt(NONCANONICAL, NONCANONICAL))
    # The error code is the selector with its RPL cleared, as KVM's emulator raises it.
    assert r.fault() == (GP, selector, r.sym["the_insn"])


@pytest.mark.parametrize(("insn", "selector", "register"), [("lldt", LDT_SEL, "ldtr"),
                                                            ("ltr", TSS_SEL, "tr")])
def test_a_system_segment_load_with_a_canonical_base_loads_it(
        insn: str, selector: int, register: str) -> None:
    r = run(f"""
    main:
        lgdt [{DATA}]
        mov eax, {selector:#x}
        {insn} ax
        hlt
    """, memory=new_gdt(CANONICAL_HIGH, CANONICAL_HIGH))
    assert r.first is None
    assert r.m.engine.read_table(register)[:2] == (selector, CANONICAL_HIGH)


@pytest.mark.parametrize("insn", ["wrfsbase", "wrgsbase"])
def test_wrfsbase_of_a_non_canonical_address_is_gp0(insn: str) -> None:
    r = run(f"""
    main:
        mov rax, {NONCANONICAL:#x}
    the_insn:
        {insn} rax
        hlt
    """, cr4=CR4_FSGSBASE)
    assert r.fault() == (GP, 0, r.sym["the_insn"])


@pytest.mark.parametrize(("insn", "msr"), [("wrfsbase", 0xC0000100), ("wrgsbase", 0xC0000101)])
def test_wrfsbase_of_a_canonical_address_loads_the_base(insn: str, msr: int) -> None:
    r = run(f"""
    main:
        mov rax, {CANONICAL_HIGH:#x}
        {insn} rax
        hlt
    """, cr4=CR4_FSGSBASE)
    assert (r.first, r.m.engine.read_msr(msr)) == (None, CANONICAL_HIGH)


def test_wrfsbase_without_cr4_fsgsbase_is_ud_before_the_address_is_looked_at() -> None:
    r = run(f"""
    main:
        mov rax, {NONCANONICAL:#x}
    the_insn:
        wrfsbase rax
        hlt
    """)
    assert r.fault() == (UD, None, r.sym["the_insn"])
