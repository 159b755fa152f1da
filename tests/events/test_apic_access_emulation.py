"""How guest instructions reach the local APIC: the APIC page is never mapped in the
engine, each access stops at the accessing instruction and the machine emulates it
(a MOV in any form a compiler emits, or MOVZX/MOVSX), so its effect is seen at
the boundary right after it in both counting modes."""

from __future__ import annotations

import pytest

from tests.delivery.rig import CODE, KERNEL_STACK, START_RFLAGS, USER_STACK, gate
from tests.events.kit import APIC_BASE, SVR, SVR_ENABLED, TPR, build, kinds

BOTH = ["fast", "timed"]


@pytest.mark.parametrize("mode", BOTH)
def test_a_32_bit_apic_read_zero_extends_into_the_64_bit_register(mode: str) -> None:
    m, _ = build(f"""
    mov rbx, {APIC_BASE:#x}
    mov rax, -1
    mov dword ptr [rbx+{TPR:#x}], 0x35
    mov eax, dword ptr [rbx+{TPR:#x}]
    mov ecx, dword ptr [rbx+0x30]      # version
    hlt
    """, gates={}, mode=mode)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=20)

    assert r.outcome == "hlt" and r.icount == 6
    assert m.engine.read_reg("rax") == 0x35  # upper half cleared (SDM MOV, 64-bit mode)
    assert m.engine.read_reg("rcx") == 0x00050014


@pytest.mark.parametrize("mode", BOTH)
def test_a_register_source_store_reaches_the_apic(mode: str) -> None:
    m, _ = build(f"""
    mov rbx, {APIC_BASE:#x}
    mov edx, {SVR_ENABLED:#x}
    mov dword ptr [rbx+{SVR:#x}], edx
    hlt
    """, gates={}, mode=mode)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=20)

    assert r.outcome == "hlt"
    assert [(w["offset"], w["value"]) for w in r.trace.of_kind("apic_write")] == [(SVR, SVR_ENABLED)]
    assert m.apic is not None and m.apic.software_enabled


@pytest.mark.parametrize("mode", BOTH)
def test_an_apic_access_other_than_mov_ends_the_run_at_that_instruction_naming_it(mode: str) -> None:
    m, sym = build(f"""
    mov rbx, {APIC_BASE:#x}
the_or:
    or dword ptr [rbx+{SVR:#x}], 0x100
    hlt
    """, gates={}, mode=mode)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=20)

    assert (r.outcome, r.rip, r.icount) == ("unsupported", sym["the_or"], 1)
    assert "or dword ptr [rbx + 0xf0], 0x100" in r.reason and "MOV" in r.reason


@pytest.mark.parametrize("mode", BOTH)
def test_the_apic_page_is_supervisor_only_so_a_cpl3_access_is_a_page_fault(mode: str) -> None:
    m, sym = build(f"""
    mov rbx, {APIC_BASE:#x}
the_load:
    mov eax, dword ptr [rbx+0x20]
    hlt
pf_handler:
    hlt
    """, gates={14: gate("pf_handler")}, mode=mode)

    r = m.run(entry=CODE, rsp=USER_STACK, cpl=3, rflags=START_RFLAGS, max_insns=20)

    assert kinds(r.trace.records) == ["deliver", "end"]
    pf = r.deliveries[0]
    # P=1 (the page is present), U/S=1, read: error code 0b101.
    assert (pf["name"], pf["error_code"], pf["cr2"], pf["rip"]) == ("#PF", 0x5, APIC_BASE + 0x20,
                                                                     sym["the_load"])


@pytest.mark.parametrize("mode", BOTH)
def test_every_mov_form_a_compiler_emits_reaches_the_apic_with_the_operand_width(mode: str) -> None:
    """The moffs forms (A1/A3: what kvm-unit-tests' `xapic_read` compiles to), byte and
    word loads into any register part, MOVZX/MOVSX, and narrow stores (dropped by the
    APIC, as KVM's `apic_mmio_write` drops them: the register keeps its value)."""
    m, _ = build(f"""
    mov rbx, {APIC_BASE:#x}
    mov dword ptr [rbx+{TPR:#x}], 0xa5
    mov rax, -1
    movabs eax, dword ptr [{APIC_BASE + 0x30:#x}]
    mov rcx, -1
    mov cl, byte ptr [rbx+{TPR:#x}]
    mov rdx, -1
    mov dh, byte ptr [rbx+{TPR:#x}]
    movzx esi, word ptr [rbx+0x32]
    movsx rdi, byte ptr [rbx+{TPR:#x}]
    mov r8, 0x11
    mov byte ptr [rbx+{TPR:#x}], r8b
    mov r9, 0x22
    movabs dword ptr [{APIC_BASE + TPR:#x}], eax
    mov r10d, dword ptr [rbx+{TPR:#x}]
    hlt
    """, gates={}, mode=mode)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=40)

    assert r.outcome == "hlt", r.reason
    regs = dict(zip(("rax", "rcx", "rdx", "rsi", "rdi", "r10"),
                    m.engine.read(("rax", "rcx", "rdx", "rsi", "rdi", "r10")), strict=True))
    assert regs == {"rax": 0x00050014, "rcx": 0xFFFFFFFFFFFFFFA5, "rdx": 0xFFFFFFFFFFFFA5FF,
                    "rsi": 0x0005, "rdi": 0xFFFFFFFFFFFFFFA5, "r10": 0x14}
    assert [e["register"] for e in r.trace.of_kind("apic_ignored_write")] == ["1-byte store"]


@pytest.mark.parametrize("mode", BOTH)
def test_clearing_the_apic_global_enable_hides_the_page_and_setting_it_resets_the_apic(
        mode: str) -> None:
    """IA32_APIC_BASE[11] ("Enabling or Disabling the Local APIC"), as kvm-unit-tests'
    reset_apic does it: disabled, the page reads all ones and CPUID.1:EDX.APIC is 0;
    enabled again, the APIC is in its reset state (SVR = 0xFF) and the MSR reads EN."""
    m, _ = build(f"""
    mov rbx, {APIC_BASE:#x}
    mov dword ptr [rbx+{SVR:#x}], {SVR_ENABLED:#x}
    mov ecx, 0x1b
    rdmsr
    and eax, ~0x800
    wrmsr
    mov r8d, dword ptr [rbx+{SVR:#x}]
    mov eax, 1
    cpuid
    mov r9, rdx
    mov rbx, {APIC_BASE:#x}
    mov ecx, 0x1b
    rdmsr
    or eax, 0x800
    wrmsr
    mov r10d, dword ptr [rbx+{SVR:#x}]
    rdmsr
    mov r11, rax
    hlt
    """, gates={}, mode=mode)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=40)

    assert r.outcome == "hlt", r.reason
    r8, r9, r10, r11 = m.engine.read(("r8", "r9", "r10", "r11"))
    assert (r8, r9 & (1 << 9), r10, r11) == (0xFFFFFFFF, 0, 0xFF, 0xFEE00900)
