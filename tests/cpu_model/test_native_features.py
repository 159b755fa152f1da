"""The features the CPU model reports that the engine executes itself: one guest run per
feature family, each result written down from the instruction's definition in SDM Vol. 2
(never from running it). cpu/cpu_model.py's FEATURES table names these tests as the
semantics of those CPUID bits, so a bit cannot be reported unless its instructions run
as the SDM says."""

from __future__ import annotations

import pytest

from tests.cpu_model.kit import DATA, run

UD = 6
CR4_TSD = 1 << 2
MSR_TSC_AUX = 0xC0000103


def test_x87_arithmetic_runs_as_the_sdm_defines_it() -> None:
    r = run(f"""
    main:
        fninit
        fld1
        fld1
        faddp st(1), st(0)
        fld1
        faddp st(1), st(0)
        fistp dword ptr [{DATA}]     # 1 + 1 + 1
        fldpi
        fstp qword ptr [{DATA + 8}]
        hlt
    """)
    assert r.result.outcome == "hlt"
    assert r.u64(DATA) & 0xFFFFFFFF == 3
    # pi rounded to double precision (round to nearest: the FNINIT control word 037FH).
    assert r.u64(DATA + 8) == 0x400921FB54442D18


def test_sse_and_sse2_run_natively() -> None:
    r = run("""
    main:
        mov eax, 3
        cvtsi2ss xmm1, eax
        movd ebx, xmm1              # 3.0f
        mov rax, 0x3ff0000000000000 # 1.0
        movq xmm0, rax
        addsd xmm0, xmm0
        movq rcx, xmm0              # 2.0
        mov rax, 0x0102030405060708
        movq xmm2, rax
        paddq xmm2, xmm2
        movq rdx, xmm2
        hlt
    """)
    assert (r.reg("rbx"), r.reg("rcx"), r.reg("rdx")) == (
        0x40400000, 0x4000000000000000, 0x020406080A0C0E10)


def test_sse3_ssse3_and_sse4_run_natively() -> None:
    r = run("""
    main:
        mov rax, 0x1122334455667788
        movq xmm1, rax
        movddup xmm0, xmm1          # SSE3: both qwords = the low one
        pextrq rbx, xmm0, 1         # SSE4.1
        mov eax, -5
        movd xmm2, eax
        pabsd xmm2, xmm2            # SSSE3: |-5|
        movd ecx, xmm2
        mov rax, 5
        movq xmm3, rax
        mov rax, 3
        movq xmm4, rax
        pcmpgtq xmm3, xmm4          # SSE4.2: 5 > 3 -> all ones in the low qword
        movq rdx, xmm3
        mov eax, 7
        movd xmm5, eax
        mov eax, 6
        movd xmm6, eax
        pmulld xmm5, xmm6           # SSE4.1: 7 * 6
        movd esi, xmm5
        hlt
    """)
    assert (r.reg("rbx"), r.reg("rcx"), r.reg("rdx"), r.reg("rsi")) == (
        0x1122334455667788, 5, 0xFFFFFFFFFFFFFFFF, 42)


def test_pclmulqdq_and_aes_run_natively() -> None:
    r = run("""
    main:
        mov rax, 3
        movq xmm0, rax
        movq xmm1, rax
        pclmulqdq xmm0, xmm1, 0     # 11b carry-less times 11b = 101b
        movq rbx, xmm0
        pxor xmm2, xmm2
        pxor xmm3, xmm3
        aesenc xmm2, xmm3           # state 0, round key 0
        movq rcx, xmm2
        hlt
    """)
    # AESENC: MixColumns(ShiftRows(SubBytes(0))) ^ 0. S-box(00) = 63H in every byte;
    # ShiftRows keeps an all-equal state; MixColumns of (63,63,63,63) is
    # 2*63 ^ 3*63 ^ 63 ^ 63 = 63 in every row.
    assert (r.reg("rbx"), r.reg("rcx")) == (5, 0x6363636363636363)


def test_movbe_and_popcnt_run_natively() -> None:
    r = run(f"""
    main:
        mov dword ptr [{DATA}], 0x11223344
        movbe eax, dword ptr [{DATA}]
        mov ebx, 0xF0F0
        popcnt rcx, rbx
        mov ebx, 1
        lzcnt edx, ebx
        hlt
    """)
    assert (r.reg("rax"), r.reg("rcx"), r.reg("rdx")) == (0x44332211, 8, 31)


def test_cmpxchg8b_and_cmpxchg16b_run_natively() -> None:
    r = run(f"""
    main:
        mov qword ptr [{DATA}], 0x1111
        mov qword ptr [{DATA + 8}], 0x2222
        mov rax, 0x1111
        mov rdx, 0x2222
        mov rbx, 0xAAAA
        mov rcx, 0xBBBB
        lea rsi, [{DATA}]
        cmpxchg16b [rsi]            # equal: store RCX:RBX, ZF = 1
        setz byte ptr [{DATA + 16}]
        mov dword ptr [{DATA + 24}], 5
        mov dword ptr [{DATA + 28}], 6
        xor eax, eax
        xor edx, edx
        cmpxchg8b [rsi + 24]        # not equal: EDX:EAX = the memory, ZF = 0
        hlt
    """)
    assert (r.u64(DATA), r.u64(DATA + 8), r.u64(DATA + 16) & 0xFF) == (0xAAAA, 0xBBBB, 1)
    assert (r.reg("rax"), r.reg("rdx")) == (5, 6)


def test_cmov_and_lahf_run_natively() -> None:
    r = run("""
    main:
        mov eax, 1
        mov ebx, 2
        cmp eax, eax                # ZF = 1, CF = 0
        cmovz eax, ebx
        cmovnz ecx, ebx
        stc
        lahf                        # AH = SF ZF 0 AF 0 PF 1 CF
        hlt
    """, regs={"rcx": 7})
    # After CMP EAX, EAX: ZF = 1, PF = 1 (result 0); STC sets CF: AH = 01000111b.
    assert (r.reg("rax"), r.reg("rcx")) == (0x4702, 7)  # AH from LAHF, AL from CMOVZ


def test_cache_line_flushes_run_natively() -> None:
    r = run(f"""
    main:
        mov qword ptr [{DATA}], 0x1234
        lea rax, [{DATA}]
        clflush [rax]
        clflushopt [rax]
        clwb [rax]
        mov rbx, qword ptr [{DATA}]
        hlt
    """)
    assert (r.result.outcome, r.first, r.reg("rbx")) == ("hlt", None, 0x1234)


def test_mmx_runs_natively() -> None:
    r = run("""
    main:
        mov rax, 0x01020304050607F0
        movq mm0, rax
        mov rax, 0x0101010101010120
        movq mm1, rax
        paddb mm0, mm1              # bytewise, wrapping: F0 + 20 = 10
        movq rbx, mm0
        emms
        hlt
    """)
    assert r.reg("rbx") == 0x0203040506070810


def test_fxsave_and_fxrstor_run_natively() -> None:
    r = run(f"""
    main:
        lea rax, [{DATA}]
        fxsave [rax]
        mov ebx, dword ptr [{DATA + 24}]   # MXCSR at its reset value
        mov dword ptr [{DATA + 24}], 0x1F80 | 0x6000   # round toward zero
        fxrstor [rax]
        stmxcsr dword ptr [{DATA + 600}]
        mov ecx, dword ptr [{DATA + 600}]
        hlt
    """)
    # FXSAVE area: MXCSR at byte 24 (SDM Vol. 1 "FXSAVE Save Area"); 1F80H after reset
    # (Vol. 3A "Processor State After Reset").
    assert (r.reg("rbx"), r.reg("rcx")) == (0x1F80, 0x7F80)


def test_bmi1_bmi2_and_adx_run_natively() -> None:
    r = run("""
    main:
        mov rbx, 0xFF00
        mov rcx, 0xFFF0
        andn rax, rbx, rcx          # ~RBX & RCX
        mov rbx, 0b1011
        mov rcx, 0xF0F0
        pdep rdx, rbx, rcx          # deposit 1011 into the set bits of F0F0
        mov rsi, -1
        mov rdi, 1
        clc
        adcx rsi, rdi               # -1 + 1: 0, CF = 1
        setc r8b
        hlt
    """)
    assert (r.reg("rax"), r.reg("rdx"), r.reg("rsi"), r.reg("r8") & 0xFF) == (
        0xF0, 0xB0, 0, 1)


def test_rep_movsb_and_stosb_run_natively() -> None:
    r = run(f"""
    main:
        lea rdi, [{DATA}]
        mov al, 0x5A
        mov ecx, 13
        rep stosb
        lea rsi, [{DATA}]
        lea rdi, [{DATA + 64}]
        mov ecx, 13
        rep movsb
        hlt
    """)
    assert r.m.phys.read(DATA + 64, 14) == b"\x5a" * 13 + b"\0"
    assert (r.reg("rcx"), r.reg("rsi"), r.reg("rdi")) == (0, DATA + 13, DATA + 64 + 13)


def test_rdtsc_counts_up_and_cr4_tsd_makes_it_gp_at_cpl3() -> None:
    r = run("""
    main:
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov rbx, rax
        rdtsc
        shl rdx, 32
        or rax, rdx
        sub rax, rbx
        hlt
    """)
    assert r.result.outcome == "hlt" and 0 < r.reg("rax") < 1 << 63
    r = run("""
    main:
        rdtsc
        hlt
    """, cpl=3, cr4=CR4_TSD)
    assert r.fault() == (13, 0, r.sym["main"])


def test_rdtscp_returns_tsc_aux_in_ecx() -> None:
    r = run(f"""
    main:
        mov ecx, {MSR_TSC_AUX}
        mov eax, 0x1234
        xor edx, edx
        wrmsr
        xor ecx, ecx
        rdtscp
        hlt
    """)
    assert r.reg("rcx") == 0x1234


@pytest.mark.parametrize("insn", ["rdrand eax", "rdrand rax", "rdseed eax", "xsaveopt [rsi]",
                                  "xsavec [rsi]", "xsaves [rsi]", "xrstors [rsi]",
                                  ".byte 0xf3, 0x48, 0x0f, 0xc7, 0xf8",  # rdpid rax
                                  "invpcid rax, [rsi]"])
def test_an_instruction_the_model_does_not_report_is_ud(insn: str) -> None:
    # CPUID.01H:ECX.RDRAND = 0, no RDSEED/RDPID/INVPCID in leaf 7, CPUID.(EAX=0DH,ECX=1):
    # EAX = 0: each instruction's "#UD If CPUID... = 0" (SDM Vol. 2).
    r = run(f"""
    main:
        lea rsi, [{DATA}]
        mov rax, cr4
        bts rax, 18                  # CR4.OSXSAVE, so that the XSAVE forms are not #UD for it
        mov cr4, rax
    the_insn:
        {insn}
        hlt
    """)
    assert r.fault() == (UD, None, r.sym["the_insn"])
