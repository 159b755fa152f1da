"""MOV SS of a null selector in 64-bit mode (SDM Vol. 2 "MOV—Move"): at CPL < 3 it loads
when RPL = CPL and is #GP(0) when RPL ≠ CPL (cpu/checked_sites.py `CheckedSites.mov_ss`;
the engine, like QEMU 7.2 TCG, loads it). A fault is on the instruction (saved RIP = it)
and SS keeps its value. Non-null selectors are the engine's (kvm-unit-tests
x86/emulator64.c test_sreg)."""

from __future__ import annotations

import pytest

from cpu.layout import KERNEL_DS
from tests.cpu_model.kit import DATA, run

GP = 13


@pytest.mark.parametrize("source", ["register", "memory"])
@pytest.mark.parametrize("selector", [1, 2, 3])
def test_mov_ss_of_a_null_selector_whose_rpl_is_not_the_cpl_is_gp0_and_ss_is_kept(
        source: str, selector: int) -> None:
    operand = "ax" if source == "register" else f"word ptr [{DATA}]"
    r = run(f"""
    main:
        mov eax, {selector}
    the_insn:
        mov ss, {operand}
        hlt
    """, memory={DATA: selector.to_bytes(2, "little")})
    assert r.fault() == (GP, 0, r.sym["the_insn"])
    assert r.m.engine.read_reg("ss") == KERNEL_DS


@pytest.mark.parametrize("source", ["register", "memory"])
def test_mov_ss_of_the_null_selector_with_rpl_0_at_cpl0_loads_it(source: str) -> None:
    operand = "ax" if source == "register" else f"word ptr [{DATA}]"
    r = run(f"""
    main:
        xor eax, eax
        mov ss, {operand}
        hlt
    """, memory={DATA: b"\0\0"})
    assert r.first is None
    assert r.m.engine.read_reg("ss") == 0


def test_mov_ss_of_a_non_null_selector_with_rpl_3_at_cpl0_is_the_engines_gp_selector() -> None:
    r = run(f"""
    main:
        mov eax, {KERNEL_DS | 3}
    the_insn:
        mov ss, ax
        hlt
    """)
    assert r.fault() == (GP, KERNEL_DS, r.sym["the_insn"])
    assert r.m.engine.read_reg("ss") == KERNEL_DS
