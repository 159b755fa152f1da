"""CPUID answers from the declared CPU model (cpu/cpu_model.py), leaf by leaf, with the
values written out from the SDM's layout of each leaf (Vol. 2 "CPUID—CPU
Identification"); and the table that ties every reported feature bit to what implements
it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from cpu.cpu_model import (
    FEATURES,
    MAX_BASIC_LEAF,
    MAX_EXTENDED_LEAF,
    CpuidInputs,
    Feature,
    Reg,
    cpuid,
)
from tests.cpu_model.kit import DATA, run

ROOT = Path(__file__).resolve().parents[2]
RESET = CpuidInputs()
CR4_OSXSAVE = 1 << 18
CR4_PKE = 1 << 22


def test_leaf_0_reports_leaf_0dh_as_the_highest_and_genuineintel() -> None:
    # EBX, EDX, ECX spell "Genu", "ineI", "ntel" (little-endian).
    assert cpuid(0, 0, RESET) == (0x0D, 0x756E6547, 0x6C65746E, 0x49656E69)


def test_leaf_1_reports_the_signature_the_clflush_line_and_the_declared_features() -> None:
    eax, ebx, ecx, edx = cpuid(1, 0, CpuidInputs(apic_id=0))
    assert eax == 0x00050654  # stepping 4, model 5, family 6, extended model 5
    assert ebx == 0x00000800  # CLFLUSH line 8 x 8 bytes; initial APIC ID 0
    # SSE3 0, PCLMULQDQ 1, SSSE3 9, CX16 13, SSE4.1 19, SSE4.2 20, MOVBE 22, POPCNT 23,
    # AES 25, XSAVE 26.
    assert ecx == 0x06D82203
    # FPU 0, DE 2, PSE 3, TSC 4, MSR 5, PAE 6, MCE 7, CX8 8, APIC 9, SEP 11, PGE 13, MCA 14,
    # CMOV 15, PAT 16, CLFSH 19, MMX 23, FXSR 24, SSE 25, SSE2 26.
    assert edx == 0x0789EBFD


def test_leaf_1_reports_no_apic_and_no_apic_id_without_a_local_apic() -> None:
    _, ebx, _, edx = cpuid(1, 0, CpuidInputs(apic_id=None))
    assert (ebx, edx & (1 << 9)) == (0x800, 0)
    _, ebx, _, _ = cpuid(1, 0, CpuidInputs(apic_id=5))
    assert ebx == 0x05000800


def test_cpuid_1_ecx_osxsave_mirrors_cr4_osxsave() -> None:
    assert not cpuid(1, 0, CpuidInputs(cr4=0))[Reg.ECX] & (1 << 27)
    assert cpuid(1, 0, CpuidInputs(cr4=CR4_OSXSAVE))[Reg.ECX] == 0x0ED82203


def test_leaf_7_reports_smep_smap_pku_pks_umip_and_ospke_mirrors_cr4_pke() -> None:
    # EBX: FSGSBASE 0, TSC_ADJUST 1, BMI1 3, SMEP 7, BMI2 8, ERMS 9, ADX 19, SMAP 20, CLFLUSHOPT 23,
    # CLWB 24. ECX: UMIP 2, PKU 3, PKS 31. EAX: the highest subleaf, 0.
    assert cpuid(7, 0, RESET) == (0, 0x0198038B, 0x8000000C, 0)
    assert cpuid(7, 0, CpuidInputs(cr4=CR4_PKE))[Reg.ECX] == 0x8000001C  # OSPKE 4
    assert cpuid(7, 1, RESET) == (0, 0, 0, 0)


def test_leaf_0dh_reports_x87_sse_and_pkru_state_with_sizes_for_xcr0() -> None:
    # Subleaf 0: EDX:EAX the XCR0 bits supported (x87 0, SSE 1, PKRU 9); EBX the size for
    # the features XCR0 enables (legacy region 512 + header 64 = 576, or up to the end of
    # PKRU at 0A80H + 8); ECX the size for all of them.
    assert cpuid(0xD, 0, CpuidInputs(xcr0=0x3)) == (0x203, 0x240, 0xA88, 0)
    assert cpuid(0xD, 0, CpuidInputs(xcr0=0x203)) == (0x203, 0xA88, 0xA88, 0)
    assert cpuid(0xD, 1, RESET) == (0, 0, 0, 0)  # no XSAVEOPT/XSAVEC/XGETBV1/XSAVES
    assert cpuid(0xD, 2, RESET) == (0, 0, 0, 0)  # no AVX state
    assert cpuid(0xD, 9, RESET) == (8, 0xA80, 0, 0)  # PKRU: 8 bytes at 0A80H, in XCR0


def test_the_extended_leaves_report_long_mode_nx_1_gib_pages_and_the_address_widths() -> None:
    assert cpuid(0x80000000, 0, RESET) == (0x80000008, 0, 0, 0)
    # ECX: LAHF/SAHF 0, LZCNT 5. EDX: SYSCALL 11, NX 20, 1-GiB pages 26, RDTSCP 27, LM 29.
    assert cpuid(0x80000001, 0, RESET) == (0, 0, 0x21, 0x2C100800)
    assert cpuid(0x80000008, 0, RESET) == (0x3028, 0, 0, 0)  # 40 physical, 48 linear bits


def test_the_brand_string_names_the_model() -> None:
    raw = b"".join(r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
                   for r in cpuid(leaf, 0, RESET))
    assert raw == b"idtlab x86-64 CPU model" + bytes(48 - 23)


@pytest.mark.parametrize("leaf", [2, 3, 4, 5, 6, 8, 9, 0xA, 0xB, 0xC, 0x80000005,
                                  0x80000006, 0x80000007])
def test_a_leaf_the_model_has_nothing_for_is_all_zero(leaf: int) -> None:
    assert cpuid(leaf, 0, RESET) == (0, 0, 0, 0)


@pytest.mark.parametrize("leaf", [0xE, 0x20, 0x3FFFFFFF, 0x80000009, 0x8FFFFFFF, 0xFFFFFFFF])
def test_a_leaf_above_the_highest_returns_the_highest_basic_leaf(leaf: int) -> None:
    assert cpuid(leaf, 0, CpuidInputs(xcr0=3)) == (0x203, 0x240, 0xA88, 0)
    assert cpuid(leaf, 9, RESET) == (8, 0xA80, 0, 0)


def test_misc_enable_limits_the_highest_leaf_and_hides_nx() -> None:
    limited = CpuidInputs(misc_enable=1 << 22)  # "Limit CPUID Maxval"
    assert cpuid(0, 0, limited)[Reg.EAX] == 2
    xd_off = CpuidInputs(misc_enable=1 << 34)  # "XD Bit Disable"
    assert cpuid(0x80000001, 0, xd_off)[Reg.EDX] == 0x2C000800


def test_the_hypervisor_range_is_zero_without_kvm_and_kvm_s_with_it() -> None:
    assert cpuid(0x40000000, 0, RESET) == (0, 0, 0, 0)
    assert cpuid(0x4FFFFFFF, 0, RESET) == (0, 0, 0, 0)
    kvm = CpuidInputs(kvm=True)
    assert cpuid(0x40000000, 0, kvm) == (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)
    assert cpuid(1, 0, kvm)[Reg.ECX] & (1 << 31)
    assert not cpuid(1, 0, RESET)[Reg.ECX] & (1 << 31)


# -- the table: every reported bit has its semantics -------------------------------------

def _resolves(ref: str) -> bool:
    if "::" in ref:
        path, name = ref.split("::")
        file = ROOT / path
        if not file.is_file():
            return False
        tree = ast.parse(file.read_text())
        return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree))
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.name)
def test_every_feature_in_the_table_names_an_existing_mechanism_or_test(
        feature: Feature) -> None:
    assert _resolves(feature.semantics), feature.semantics


def test_the_table_names_each_bit_once() -> None:
    places = [(f.leaf, f.subleaf, f.reg, f.bit) for f in FEATURES]
    assert len(places) == len(set(places))
    assert len({f.name for f in FEATURES}) == len(FEATURES)


FEATURE_REGISTERS = {(1, 0): (Reg.ECX, Reg.EDX), (7, 0): (Reg.EBX, Reg.ECX, Reg.EDX),
                     (0x80000001, 0): (Reg.ECX, Reg.EDX)}
EVERYTHING_ON = CpuidInputs(cr4=CR4_OSXSAVE | CR4_PKE, xcr0=0x203, apic_id=0, kvm=True)


def test_cpuid_never_reports_a_feature_bit_outside_the_table() -> None:
    for (leaf, subleaf), regs in FEATURE_REGISTERS.items():
        got = cpuid(leaf, subleaf, EVERYTHING_ON)
        for reg in regs:
            table = sum(f.mask for f in FEATURES
                        if (f.leaf, f.subleaf, f.reg) == (leaf, subleaf, reg))
            assert got[reg] == table, (hex(leaf), reg.name)  # every bit, with all mirrors on
    # and no other leaf carries a feature flag the table does not know: every basic and
    # extended leaf below the highest is either a feature leaf or fixed data asserted above.
    for leaf in (*range(MAX_BASIC_LEAF + 1), *range(0x80000000, MAX_EXTENDED_LEAF + 1)):
        if (leaf, 0) not in FEATURE_REGISTERS and leaf not in (0, 0xD, 0x80000000, 0x80000002,
                                                               0x80000003, 0x80000004,
                                                               0x80000008):
            assert cpuid(leaf, 0, EVERYTHING_ON) == (0, 0, 0, 0), hex(leaf)


# -- CPUID executed by a guest -------------------------------------------------------------

def test_a_guest_s_cpuid_takes_the_subleaf_from_ecx_and_sees_cr4_osxsave_change() -> None:
    r = run(f"""
    main:
        mov eax, 0xd
        mov ecx, 9
        cpuid
        mov dword ptr [{DATA}], eax
        mov dword ptr [{DATA + 4}], ebx
        mov eax, 1
        cpuid
        mov dword ptr [{DATA + 8}], ecx
        mov rax, cr4
        or rax, {CR4_OSXSAVE}
        mov cr4, rax
        mov eax, 1
        cpuid
        mov dword ptr [{DATA + 12}], ecx
        hlt
    """)
    assert r.result.outcome == "hlt"
    words = [int.from_bytes(r.m.phys.read(DATA + 4 * i, 4), "little") for i in range(4)]
    assert words == [8, 0xA80, 0x06D82203, 0x0ED82203]


def test_cpuid_1_edx_apic_reads_0_while_the_apic_is_globally_disabled() -> None:
    r = run(f"""
    main:
        mov ecx, 0x1b
        rdmsr
        and eax, ~0x800
        wrmsr
        mov eax, 1
        cpuid
        mov dword ptr [{DATA}], edx
        mov dword ptr [{DATA + 4}], ebx
        hlt
    """)
    assert r.result.outcome == "hlt"
    assert r.u64(DATA) == 0x00000800_0789E9FD  # EDX.APIC (bit 9) clear, EBX[31:24] = 0


def test_a_cpuid_in_code_the_machine_did_not_decode_answers_from_the_model_too() -> None:
    # Code written at run time is not decoded for sites; the engine's own CPUID would
    # report its Skylake model (RDRAND, XSAVEOPT, ...). Here: copied by the guest, then run.
    r = run(f"""
    main:
        mov dword ptr [{DATA}], 0x00A20F90      # nop; cpuid; <byte 0>
        mov byte ptr [{DATA + 3}], 0xF4         # hlt
        mov eax, 1
        xor ecx, ecx
        lea rbx, [{DATA}]
        jmp rbx
    """)
    assert (r.result.outcome, r.reg("rip")) == ("hlt", DATA + 4)
    assert (r.reg("rax"), r.reg("rcx"), r.reg("rdx")) == (0x50654, 0x06D82203, 0x0789EBFD)
