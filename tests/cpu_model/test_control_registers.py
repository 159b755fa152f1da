"""MOV to CR0/CR3/CR4/CR8, XSETBV/XGETBV and RDPMC against the declared CPU model
(cpu/control_regs.py, cpu/emulated.py, cpu/checked_sites.py).

Every refused write is #GP(0) on the instruction itself (saved RIP = the MOV/XSETBV, a
fault: the register keeps its value); the rules are SDM Vol. 2 "MOV—Move to/from Control
Registers" (64-Bit Mode Exceptions), Vol. 3A "Control Registers", Vol. 2 "XSETBV",
"XGETBV", "RDPMC"."""

from __future__ import annotations

import pytest

from cpu.control_regs import CR4_WRITABLE
from tests.cpu_model.kit import DATA, Ran, run

GP, UD = 13, 6
CR4_DEFAULT = 0x620  # the scenario machine's: PAE, OSFXSR, OSXMMEXCPT
CR0_DEFAULT = 0x80010033  # PG, WP, NE, ET, MP, PE
CR4_OSXSAVE = 1 << 18
CR4_PKE = 1 << 22


def write_cr(cr: int, value: int, *, cpl: int = 0, cr4: int = 0) -> Ran:
    return run(f"""
    main:
        mov rax, {value:#x}
    the_mov:
        mov cr{cr}, rax
        hlt
    """, cpl=cpl, cr4=cr4)


def test_the_writable_cr4_bits_are_those_of_long_mode_and_of_the_reported_features() -> None:
    # TSD 2, PAE 5, PCE 8, OSFXSR 9, OSXMMEXCPT 10 always; DE 3, PSE 4, MCE 6, PGE 7, UMIP 11,
    # FSGSBASE 16, OSXSAVE 18, SMEP 20, SMAP 21, PKE 22, PKS 24 from CPUID.
    assert CR4_WRITABLE == 0x01750FFC


def test_mov_to_cr4_of_all_ones_is_gp0_and_cr4_keeps_its_value() -> None:
    # kvm-unit-tests x86/idt_test.c writes 0xFFFFFFFF to CR4 and expects #GP.
    r = write_cr(4, 0xFFFFFFFF)
    assert r.fault() == (GP, 0, r.sym["the_mov"])
    assert r.reg("cr4") == CR4_DEFAULT


@pytest.mark.parametrize("bit", [0, 1, 12, 13, 14, 15, 17, 19, 23, 25, 26, 27, 28, 31, 32, 63],
                         ids=lambda b: f"bit{b}")
def test_a_cr4_bit_the_model_has_no_feature_for_is_gp0(bit: int) -> None:
    # VME 0, PVI 1, LA57 12, VMXE 13, SMXE 14, reserved 15, PCIDE 17, KL 19, CET 23, UINTR
    # 25, LAM_SUP 28, reserved 26-27/29-31 and 63:32.
    r = write_cr(4, CR4_DEFAULT | (1 << bit))
    assert r.fault() == (GP, 0, r.sym["the_mov"])
    assert r.reg("cr4") == CR4_DEFAULT


@pytest.mark.parametrize("bit", [2, 3, 4, 6, 7, 8, 11, 16, 18, 21, 22, 24],
                         ids=lambda b: f"bit{b}")
def test_cr4_bits_of_declared_features_are_writable(bit: int) -> None:
    # TSD 2, DE 3, PSE 4, MCE 6, PGE 7, PCE 8, UMIP 11, FSGSBASE 16, OSXSAVE 18, SMAP 21,
    # PKE 22, PKS 24: the value reads back, and PSE changes nothing in IA-32e paging
    # (Vol. 3A "Paging Modes and Control Bits": CR4.PSE only matters for 32-bit paging), so
    # the next instruction still runs. (SMEP 20: tests/cpu_model/test_protection.py, as
    # the kit's code is on user pages.)
    r = write_cr(4, CR4_DEFAULT | (1 << bit))
    assert (r.first, r.result.outcome, r.reg("cr4")) == (None, "hlt", CR4_DEFAULT | (1 << bit))


def test_clearing_cr4_pae_in_ia32e_mode_is_gp0() -> None:
    r = write_cr(4, CR4_DEFAULT & ~(1 << 5))
    assert r.fault() == (GP, 0, r.sym["the_mov"])


@pytest.mark.parametrize(("value", "why"), [
    (CR0_DEFAULT | (1 << 32), "CR0 bits 63:32 are reserved"),
    (CR0_DEFAULT & ~1, "CR0.PG = 1 with CR0.PE = 0"),
    (CR0_DEFAULT | (1 << 29), "CR0.NW = 1 with CR0.CD = 0"),
    (CR0_DEFAULT & ~(1 << 31), "clearing CR0.PG in IA-32e mode"),
], ids=["high", "pg-without-pe", "nw-without-cd", "pg-clear"])
def test_an_invalid_cr0_is_gp0_and_cr0_keeps_its_value(value: int, why: str) -> None:
    r = write_cr(0, value)
    assert r.fault() == (GP, 0, r.sym["the_mov"])
    assert r.reg("cr0") == CR0_DEFAULT
    assert why in r.first["why"]  # type: ignore[index]


def test_cr0_reserved_low_bits_are_ignored_and_et_reads_1() -> None:
    # CD and NW together are valid; bit 6 and bit 17 are reserved (ignored), ET (bit 4)
    # is hard-wired to 1; WP cleared.
    value = (CR0_DEFAULT & ~(1 << 4) & ~(1 << 16)) | (1 << 6) | (1 << 17) | (3 << 29)
    r = write_cr(0, value)
    assert (r.first, r.reg("cr0")) == (None, 0xE0000033)


@pytest.mark.parametrize("bit", [40, 51, 52, 62, 63], ids=lambda b: f"bit{b}")
def test_a_cr3_bit_at_or_above_maxphyaddr_is_gp0(bit: int) -> None:
    r = run(f"""
    main:
        mov rax, cr3
        mov rbx, rax
        bts rax, {bit}
    the_mov:
        mov cr3, rax
        hlt
    """)
    assert r.fault() == (GP, 0, r.sym["the_mov"])
    assert r.reg("cr3") == r.reg("rbx")


def test_cr3_keeps_its_ignored_and_cache_control_bits() -> None:
    r = run("""
    main:
        mov rax, cr3
        or rax, 0xFFF                # PWT 3, PCD 4, and the ignored bits 2:0 and 11:5
        mov cr3, rax
        mov rbx, cr3
        hlt
    """)
    assert r.first is None and r.reg("rbx") & 0xFFF == 0xFFF


def test_mov_to_cr8_sets_the_apic_tpr_and_mov_from_cr8_reads_it() -> None:
    r = run("""
    main:
        mov rax, 9
        mov cr8, rax
        mov rdx, 0xFEE00080          # the TPR register
        mov ebx, dword ptr [rdx]
        mov dword ptr [rdx], 0x35
        mov rcx, cr8
        hlt
    """)
    # CR8[3:0] = TPR[7:4] (Vol. 3A "Task Priority in IA-32e Mode"); TPR[3:0] reads 0 after
    # a CR8 write; MOV from CR8 returns TPR[7:4].
    assert (r.first, r.reg("rbx"), r.reg("rcx"), r.m.apic.tpr) == (None, 0x90, 3, 0x35)


def test_a_cr8_bit_above_3_is_gp0() -> None:
    r = write_cr(8, 0x10)
    assert r.fault() == (GP, 0, r.sym["the_mov"])
    assert r.m.apic.tpr == 0


@pytest.mark.parametrize("insn", ["mov cr0, rax", "mov cr3, rax", "mov cr4, rax",
                                  "mov cr8, rax", "mov rax, cr8", "mov rax, cr0"])
def test_a_control_register_move_at_cpl3_is_gp0(insn: str) -> None:
    r = run(f"""
    main:
    the_mov:
        {insn}
        hlt
    """, cpl=3)
    assert r.fault() == (GP, 0, r.sym["the_mov"])


def test_with_cr4_de_a_mov_from_dr4_is_ud() -> None:
    r = run("""
    main:
        mov rbx, dr6
        mov rax, dr4                 # CR4.DE = 0: an alias of DR6
        mov rcx, cr4
        or rcx, 1 << 3
        mov cr4, rcx
    the_mov:
        mov rax, dr4
        hlt
    """)
    assert r.fault() == (UD, None, r.sym["the_mov"])
    assert r.reg("rax") == r.reg("rbx")


# -- XSETBV / XGETBV ---------------------------------------------------------------------

def xsetbv(ecx: int, value: int, *, cpl: int = 0, cr4: int = CR4_OSXSAVE) -> Ran:
    return run(f"""
    main:
        mov rcx, {ecx:#x}
        mov eax, {value & 0xFFFFFFFF:#x}
        mov edx, {value >> 32:#x}
    the_insn:
        xsetbv
        xor ecx, ecx
        xgetbv
        hlt
    """, cpl=cpl, cr4=cr4)


@pytest.mark.parametrize("value", [0x1, 0x3, 0x201, 0x203])
def test_xsetbv_accepts_x87_with_sse_and_pkru_state(value: int) -> None:
    r = xsetbv(0, value)
    assert (r.first, r.reg("rax"), r.reg("rdx")) == (None, value, 0)


def test_xsetbv_ignores_rcx_63_32() -> None:
    r = xsetbv(0x1234_5678_0000_0000, 0x3)
    assert (r.first, r.reg("rax")) == (None, 0x3)


@pytest.mark.parametrize(("ecx", "value"), [
    (0, 0x0), (0, 0x2), (0, 0x7), (0, 0x1F), (0, 0xE7), (0, 0x403), (0, 1 << 62 | 3),
    (1, 0x3), (2, 0x3), (0x80000000, 0x3),
], ids=lambda v: hex(v))
def test_xsetbv_of_an_unsupported_xcr0_or_another_xcr_is_gp0(ecx: int, value: int) -> None:
    r = xsetbv(ecx, value)
    assert r.fault() == (GP, 0, r.sym["the_insn"])


def test_xsetbv_at_cpl3_is_gp0_and_without_cr4_osxsave_ud() -> None:
    r = xsetbv(0, 3, cpl=3)
    assert r.fault() == (GP, 0, r.sym["the_insn"])
    r = xsetbv(0, 3, cr4=0)
    assert r.fault() == (UD, None, r.sym["the_insn"])


@pytest.mark.parametrize("ecx", [1, 2, 0xFFFFFFFF])
def test_xgetbv_of_anything_but_xcr0_is_gp0(ecx: int) -> None:
    # The model does not report XGETBV with ECX = 1 (CPUID.(EAX=0DH,ECX=1):EAX[2] = 0).
    r = run(f"""
    main:
        mov ecx, {ecx:#x}
    the_insn:
        xgetbv
        hlt
    """, cr4=CR4_OSXSAVE)
    assert r.fault() == (GP, 0, r.sym["the_insn"])


def test_xsave_stores_pkru_and_xrstor_loads_it() -> None:
    area = DATA + 0x1000  # 64-byte aligned
    r = run(f"""
    main:
        xor ecx, ecx
        mov eax, 0x203
        xor edx, edx
        xsetbv
        mov eax, 0x12345678
        xor ecx, ecx
        wrpkru
        lea rdi, [{area}]
        mov eax, -1
        mov edx, -1
        xsave [rdi]
        mov qword ptr [{area + 0xA80}], 0x55
        xrstor [rdi]
        xor ecx, ecx
        rdpkru
        hlt
    """, cr4=CR4_OSXSAVE | CR4_PKE)
    # PKRU state: 8 bytes at 0A80H (CPUID.(EAX=0DH,ECX=9)); XSTATE_BV (byte 512) gets
    # the requested features XCR0 enables that are in use: the engine reports every one
    # in use (XINUSE all ones, which the SDM permits: "Processor Tracking of XSAVE-Managed
    # State"), so x87, SSE and PKRU.
    assert r.first is None
    assert (r.u64(area + 512), r.reg("rax")) == (0x203, 0x55)


# -- RDPMC ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("cpl", "cr4"), [(0, 0), (3, 0), (3, 1 << 8)])
def test_rdpmc_is_gp0_as_the_model_has_no_counters(cpl: int, cr4: int) -> None:
    r = run("""
    main:
        xor ecx, ecx
    the_insn:
        rdpmc
        hlt
    """, cpl=cpl, cr4=cr4)
    assert r.fault() == (GP, 0, r.sym["the_insn"])
