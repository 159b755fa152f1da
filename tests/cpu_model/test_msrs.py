"""The MSR table (cpu/msrs.py) as a guest sees it through RDMSR/WRMSR: reset values, the
bits a write may set, read-only bits, the per-MSR rules, and #GP(0) for every MSR the
model does not declare (SDM Vol. 2 "RDMSR", "WRMSR"; Vol. 4 "Architectural MSRs")."""

from __future__ import annotations

import pytest

from cpu.msrs import MSRS, Store, check_pat, checked_value
from tests.cpu_model.kit import DATA, Ran, run

GP = 13
NONCANONICAL = 0x8000_0000_0000_0000 | 0x1234  # bit 63 set, bit 47 clear
CANONICAL_HIGH = 0xFFFF_8000_0000_1000


def rdmsr(msr: int) -> Ran:
    return run(f"""
    main:
        mov ecx, {msr:#x}
    the_insn:
        rdmsr
        mov dword ptr [{DATA}], eax
        mov dword ptr [{DATA + 4}], edx
        hlt
    """)


def wrmsr(msr: int, value: int) -> Ran:
    return run(f"""
    main:
        mov ecx, {msr:#x}
        mov eax, {value & 0xFFFFFFFF:#x}
        mov edx, {value >> 32:#x}
    the_insn:
        wrmsr
        rdmsr
        mov dword ptr [{DATA}], eax
        mov dword ptr [{DATA + 4}], edx
        hlt
    """)


@pytest.mark.parametrize(("msr", "reset"), [
    (0x1A0, 0x1801),                 # IA32_MISC_ENABLE: fast strings, BTS/PEBS unavailable
    (0x277, 0x0007040600070406),     # IA32_PAT: WB WT UC- UC WB WT UC- UC
    (0x179, 0),                      # IA32_MCG_CAP: no banks, no MCG_CTL
    (0x17A, 0),                      # IA32_MCG_STATUS
    (0x6E1, 0),                      # IA32_PKRS
    (0x174, 0),                      # IA32_SYSENTER_CS
], ids=hex)
def test_an_msr_reads_its_reset_value(msr: int, reset: int) -> None:
    r = rdmsr(msr)
    assert (r.first, r.u64(DATA)) == (None, reset)


@pytest.mark.parametrize(("msr", "value"), [
    (0x174, 0xFFFF_FFFF_FFFF_1234),          # SYSENTER_CS: every bit can be read and written
    (0x175, CANONICAL_HIGH), (0x176, 0x0000_1234_5678_9ABC),
    (0x1A0, 0x400C50809 | 0x1800),           # kvm-unit-tests x86/msr.c's value
    (0x277, 0x0706050401000706),             # every valid memory type
    (0x6E1, 0xFFFFFFFF),                     # IA32_PKRS: bits 31:0
    (0x17A, 0x7),
    (0xC0000081, 0xFFFF_FFFF_FFFF_FFFF),     # STAR
    (0xC0000082, CANONICAL_HIGH), (0xC0000083, 0x0000_7FFF_FFFF_F000),
    (0xC0000084, 0xFFFFFFFF),                # FMASK: bits 31:0
    (0xC0000100, CANONICAL_HIGH), (0xC0000101, 0x1000), (0xC0000102, CANONICAL_HIGH),
    (0xC0000103, 0xFFFFFFFF),                # TSC_AUX: bits 31:0
], ids=hex)
def test_a_write_of_allowed_bits_reads_back(msr: int, value: int) -> None:
    r = wrmsr(msr, value)
    assert (r.first, r.u64(DATA)) == (None, value)


@pytest.mark.parametrize(("msr", "value"), [
    (0x1A0, 0x1801 | (1 << 1)),              # MISC_ENABLE reserved bit 1
    (0x1A0, 0x1801 | (1 << 35)),
    (0x277, 0x0007040600070402),             # PA0 = 2: reserved memory type
    (0x277, 0x0007040600070403),             # 3: reserved
    (0x277, 0x0007040600070416),             # bit 4 of PA0: reserved
    (0x179, 0),                              # MCG_CAP is read-only
    (0x17A, 1 << 3),
    (0x6E1, 1 << 32),                        # PKRS 63:32
    (0xC0000084, 1 << 32),                   # FMASK 63:32
    (0xC0000103, 1 << 32),                   # TSC_AUX 63:32
    (0xC0000080, 0xD01 | (1 << 9)),          # EFER bit 9: reserved
    (0xC0000080, 0xD01 | (1 << 12)),         # EFER.SVME: not an Intel feature
    (0xC0000080, 0xC01),                     # clearing LME while paging is on
], ids=hex)
def test_a_write_of_a_reserved_bit_or_a_refused_value_is_gp0(msr: int, value: int) -> None:
    r = wrmsr(msr, value)
    assert r.fault() == (GP, 0, r.sym["the_insn"])


@pytest.mark.parametrize("msr", [0x175, 0x176, 0xC0000082, 0xC0000083, 0xC0000100, 0xC0000101,
                                 0xC0000102], ids=hex)
def test_a_non_canonical_address_in_an_address_msr_is_gp0(msr: int) -> None:
    r = wrmsr(msr, NONCANONICAL)
    assert r.fault() == (GP, 0, r.sym["the_insn"])
    r = wrmsr(msr, 0x0000_8000_0000_0000)  # bit 47 set, 63:48 clear
    assert r.fault() == (GP, 0, r.sym["the_insn"])


def test_misc_enable_read_only_bits_keep_their_value() -> None:
    # Bits 7 (performance monitoring available), 11 and 12 (BTS/PEBS unavailable).
    r = wrmsr(0x1A0, 0x1 | (1 << 7))
    assert (r.first, r.u64(DATA)) == (None, 0x1801)


def test_efer_lma_is_read_only_and_sce_nxe_are_writable() -> None:
    r = wrmsr(0xC0000080, 0x100)  # LME only: LMA stays 1, SCE and NXE cleared
    assert (r.first, r.u64(DATA)) == (None, 0x500)


@pytest.mark.parametrize("msr", [
    0x1B + 1, 0x3A, 0x48, 0x49, 0x10A, 0x17B, 0x1D9, 0x2FF, 0x345, 0x400, 0x401, 0x47F,
    0x480, 0x6E0, 0x800, 0x808, 0x8FF, 0xC1, 0x186, 0x38F, 0xC0000104, 0xC0010000,
    0x4B564D00, 0xFFFFFFFF,
], ids=hex)
def test_an_msr_the_model_does_not_declare_is_gp0_to_read_and_to_write(msr: int) -> None:
    # MTRRs, machine-check banks, VMX capabilities, TSC-deadline, x2APIC, performance
    # counters, SPEC_CTRL/PRED_CMD/FLUSH_CMD, AMD's range, KVM's without its interface.
    r = rdmsr(msr)
    assert r.fault() == (GP, 0, r.sym["the_insn"])
    r = wrmsr(msr, 0)
    assert r.fault() == (GP, 0, r.sym["the_insn"])


def test_the_tsc_msr_reads_the_cycle_count_plus_the_offset_a_write_sets() -> None:
    r = run(f"""
    main:
        mov ecx, 0x10
        mov eax, 0x1000
        xor edx, edx
        wrmsr
        rdmsr
        mov dword ptr [{DATA}], eax
        mov dword ptr [{DATA + 4}], edx
        hlt
    """)
    # The write makes TSC = 1000H at its own cycle; the read comes 1 instruction (1 cycle
    # in fast mode) later.
    assert r.u64(DATA) == 0x1001


def test_the_table_checks_bits_and_rules_without_a_machine() -> None:
    pat = next(m for m in MSRS if m.index == 0x277)
    assert check_pat(0x0007040600070406) is None
    assert check_pat(0x0300000000000000) == "PA7 holds the reserved memory type 3"
    assert checked_value(pat, 0x0606060606060606, 0) == 0x0606060606060606
    misc = next(m for m in MSRS if m.index == 0x1A0)
    assert checked_value(misc, 0x1 | (1 << 7), 0x1801) == 0x1801
    assert {m.store for m in MSRS} == set(Store)
