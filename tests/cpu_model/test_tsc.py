"""RDTSC and RDTSCP read the machine's time-stamp counter (cpu/emulated.py
`Emulated.rdtsc`): the cycle count plus the offset a WRMSR of IA32_TIME_STAMP_COUNTER
sets (cpu/msrs.py), the value RDMSR reads too (SDM Vol. 3B "Time-Stamp Counter"). Never
the host's: the same run gives the same values, byte for byte."""

from __future__ import annotations

import time

import pytest

from cpu.machine import Machine
from cpu.msrs import HOST_TSC_HZ
from tests.cpu_model.kit import run

MSR_TSC, MSR_TSC_AUX = 0x10, 0xC0000103
PROGRAM = f"""
main:
    mov ecx, {MSR_TSC}
    xor eax, eax
    mov edx, 1
    wrmsr                       # TSC = 1 << 32, at the boundary after the WRMSR
    rdtsc
    mov rbx, rax
    mov rsi, rdx
    mov ecx, {MSR_TSC}
    rdmsr
    mov rdi, rax
    mov ecx, {MSR_TSC_AUX}
    mov eax, 0x1234
    xor edx, edx
    wrmsr
    rdtscp
    hlt
"""


def test_rdtsc_reads_the_value_written_to_the_tsc_msr_plus_the_cycles_since() -> None:
    r = run(PROGRAM)
    per = r.m.profile.cycles_per_instruction  # fast mode: one figure per instruction
    assert (r.reg("rsi"), r.reg("rbx")) == (1, 1 * per)   # the WRMSR's own cycle
    assert r.reg("rdi") == 5 * per                          # RDMSR: 4 instructions later
    assert (r.reg("rdx"), r.reg("rax")) == (1, 11 * per)  # RDTSCP: 6 after the RDMSR
    assert r.reg("rcx") == 0x1234                          # IA32_TSC_AUX[31:0]


def test_two_runs_read_the_same_tsc_values() -> None:
    a, b = run(PROGRAM), run(PROGRAM)
    assert [a.reg(x) for x in ("rbx", "rsi", "rdi", "rax", "rdx")] == \
        [b.reg(x) for x in ("rbx", "rsi", "rdi", "rax", "rdx")]


@pytest.mark.parametrize("insn", ["rdtsc", "rdtscp"])
def test_with_cr4_tsd_rdtsc_at_cpl3_is_gp0_and_at_cpl0_runs(insn: str) -> None:
    src = f"""
    main:
        {insn}
        hlt
    """
    assert run(src, cpl=3, cr4=1 << 2).fault() == (13, 0, run(src).sym["main"])
    assert run(src, cr4=1 << 2).result.outcome == "hlt"


def test_tsc_adjust_and_the_tsc_move_together() -> None:
    # SDM Vol. 3B "Time-Stamp Counter Adjustment" (kvm-unit-tests x86/tsc_adjust.c).
    r = run(f"""
    main:
        mov ecx, 0x3b
        rdmsr
        mov r8, rax                 # IA32_TSC_ADJUST at reset
        rdtsc
        mov r9, rax                 # TSC before
        mov ecx, 0x3b
        mov eax, 1000
        xor edx, edx
        wrmsr                       # TSC_ADJUST = 1000: the TSC gains 1000
        rdtsc
        mov r10, rax
        mov ecx, {MSR_TSC}
        mov eax, 5
        xor edx, edx
        wrmsr                       # TSC = 5: TSC_ADJUST loses what the TSC lost
        mov ecx, 0x3b
        rdmsr
        mov r11, rax
        mov r12, rdx
        hlt
    """)
    per = r.m.profile.cycles_per_instruction
    assert r.reg("r8") == 0
    assert r.reg("r10") - r.reg("r9") == 1000 + 6 * per
    # At the TSC WRMSR the TSC was r10 + 5 instructions (the RDTSC itself and four); it
    # became 5.
    tsc_before_write = r.reg("r10") + 5 * per
    assert (r.reg("r12") << 32 | r.reg("r11")) == (1000 + 5 - tsc_before_write) % 2**64


def test_with_the_host_clock_as_source_the_tsc_follows_the_host_not_the_cycles() -> None:
    def host(m: Machine) -> None:
        m.model.state.msrs.tsc_source = "host"

    src = """
    main:
        rdtsc
        shl rdx, 32
        or rax, rdx
        hlt
    """
    before = time.monotonic_ns() * HOST_TSC_HZ // 10**9
    r = run(src, setup=host)
    after = time.monotonic_ns() * HOST_TSC_HZ // 10**9
    assert before <= r.reg("rax") <= after
    assert run(src).reg("rax") == 0  # the cycles: nothing retired before the RDTSC
