"""The guest-visible interface of the async-#PF host model, driven by guest code: the
three KVM MSRs, the other MSRs the machine answers, and the hypervisor CPUID leaves
(Linux arch/x86/include/uapi/asm/kvm_para.h; SDM Vol. 2 RDMSR/WRMSR: #GP(0) at CPL > 0,
for an unimplemented MSR and for reserved bits; KVM Documentation/virt/kvm/x86/msr.rst and
cpuid.rst).

A refused RDMSR/WRMSR is a fault: the `deliver` record has vector 13, error code 0 and
the saved RIP of the RDMSR/WRMSR itself; the MSR keeps its value."""

from __future__ import annotations

import pytest

from tests.apf.kit import (
    AREA,
    CPL0_EN,
    ENABLE,
    EXIT,
    KERNEL_STACK,
    MSR_ACK,
    MSR_EN,
    MSR_INT,
    USER_STACK,
    build,
    of_kind,
    one,
)
from tests.delivery.rig import gate

GP = 13
GP_HANDLER = """
gp_handler:
    hlt                             # IF=0 here: the run ends, the record is what counts
"""


def write_msr(msr: int, value: int) -> str:
    return f"""
main:
    mov ecx, {msr:#x}
    mov eax, {value & 0xFFFFFFFF:#x}
    mov edx, {value >> 32:#x}
the_insn:
    wrmsr
    mov al, 1
{EXIT}
{GP_HANDLER}
"""


def read_msr(msr: int) -> str:
    return f"""
main:
    mov ecx, {msr:#x}
the_insn:
    rdmsr
    mov dword ptr [DATA], eax
    mov dword ptr [DATA + 4], edx
    mov al, 1
{EXIT}
{GP_HANDLER}
"""


def run(source: str, *, cpl: int = 0, apf: bool = True):
    m, sym = build(source, gates={GP: gate("gp_handler")}, apf=apf)
    result = m.run(entry=sym["main"], rsp=USER_STACK if cpl == 3 else KERNEL_STACK, cpl=cpl)
    return m, sym, result


def assert_gp0_at_the_insn(result, sym) -> None:
    rec = one(result.trace.records, "deliver")
    assert (rec["vector"], rec["error_code"], rec["rip"]) == (GP, 0, sym["the_insn"])


@pytest.mark.parametrize(("msr", "value"), [
    (MSR_EN, CPL0_EN | 0x10),           # EN bit 4: reserved
    (MSR_EN, CPL0_EN | 0x20),           # EN bit 5: reserved
    (MSR_INT, 0x140),                   # INT bits 63:8: reserved
    (MSR_INT, 1 << 40),
    (MSR_ACK, 2),                       # ACK bits 63:1 (refused by this model)
])
def test_a_reserved_bit_in_an_async_pf_msr_is_gp0_at_the_wrmsr_and_changes_nothing(msr: int, value: int) -> None:
    m, sym, result = run(write_msr(msr, value))
    assert_gp0_at_the_insn(result, sym)
    fault = one(result.trace.records, "msr_fault")
    assert (fault["msr"], fault["write"]) == (msr, True)
    assert of_kind(result.trace.records, "msr_write") == []
    assert m.apf is not None and m.apf.rdmsr(MSR_EN) == 0 and m.apf.rdmsr(MSR_INT) == 0
    assert not m.apf.enabled


@pytest.mark.parametrize("make", [read_msr, lambda msr: write_msr(msr, 0)], ids=["rdmsr", "wrmsr"])
@pytest.mark.parametrize("msr", [0x4B564D03, 0xDEADBEEF])
def test_an_msr_the_machine_does_not_implement_is_gp0(make, msr: int) -> None:
    _, sym, result = run(make(msr))
    assert_gp0_at_the_insn(result, sym)
    assert one(result.trace.records, "msr_fault")["msr"] == msr


def test_the_async_pf_msrs_are_unknown_when_the_host_does_not_model_async_pf() -> None:
    _, sym, result = run(read_msr(MSR_EN), apf=False)
    assert_gp0_at_the_insn(result, sym)


@pytest.mark.parametrize("make", [read_msr, lambda msr: write_msr(msr, 0)], ids=["rdmsr", "wrmsr"])
def test_rdmsr_and_wrmsr_at_cpl3_are_gp0_even_for_a_known_msr(make) -> None:
    _, sym, result = run(make(MSR_EN), cpl=3)
    rec = one(result.trace.records, "deliver")
    assert (rec["vector"], rec["error_code"], rec["rip"], rec["cpl"]) == (GP, 0, sym["the_insn"], 0)
    assert rec["cs"] & 3 == 3  # the frame: interrupted at CPL3
    assert of_kind(result.trace.records, "msr_fault") == []  # refused before the MSR is looked at


def test_the_enable_and_vector_msrs_read_back_and_ack_reads_zero() -> None:
    source = f"""
main:
{ENABLE}
    mov ecx, 0x4b564d02
    rdmsr
    mov dword ptr [DATA], eax
    mov dword ptr [DATA + 4], edx
    mov ecx, 0x4b564d06
    rdmsr
    mov qword ptr [DATA + 8], rax
    mov ecx, 0x4b564d07
    mov eax, 0x55
    rdmsr
    mov qword ptr [DATA + 16], rax
    mov al, 1
{EXIT}
"""
    m, sym = build(source)
    result = m.run(entry=sym["main"], rsp=KERNEL_STACK, rflags=0x2)
    assert result.exit_code == 1
    assert m.phys.read_uint(0x300000, 8) == CPL0_EN
    assert m.phys.read_uint(0x300008, 8) == 0x40
    assert m.phys.read_uint(0x300010, 8) == 0
    writes = [(r["msr"], r["value"]) for r in of_kind(result.trace.records, "msr_write")]
    assert writes == [(MSR_INT, 0x40), (MSR_EN, CPL0_EN)]
    assert m.apf is not None and m.apf.area_gpa == AREA


def test_efer_reads_long_mode_active_and_enabled() -> None:
    m, _, result = run(read_msr(0xC0000080))
    assert result.exit_code == 1
    value = one(result.trace.records, "msr_read")["value"]
    assert value & (1 << 8) and value & (1 << 10)  # LME, LMA (SDM: IA32_EFER in IA-32e mode)
    assert m.phys.read_uint(0x300000, 8) == value  # EDX:EAX


def test_ia32_apic_base_reads_the_default_base_enabled_bsp() -> None:
    m, _, result = run(read_msr(0x1B))
    assert result.exit_code == 1
    assert one(result.trace.records, "msr_read")["value"] == 0xFEE00900
    assert m.phys.read_uint(0x300000, 8) == 0xFEE00900  # EDX:EAX


def cpuid(leaf: int) -> tuple[int, int, int, int]:
    source = f"""
main:
    mov eax, {leaf:#x}
    xor ecx, ecx
    cpuid
    mov dword ptr [DATA], eax
    mov dword ptr [DATA + 4], ebx
    mov dword ptr [DATA + 8], ecx
    mov dword ptr [DATA + 12], edx
    mov al, 1
{EXIT}
"""
    m, sym = build(source)
    assert m.run(entry=sym["main"], rsp=KERNEL_STACK).exit_code == 1
    return tuple(m.phys.read_uint(0x300000 + 4 * i, 4) for i in range(4))  # type: ignore[return-value]


def test_cpuid_0x40000000_is_kvms_signature_and_its_highest_leaf() -> None:
    eax, ebx, ecx, edx = cpuid(0x40000000)
    assert eax == 0x40000001
    sig = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
    assert sig == b"KVMKVMKVM\0\0\0"


def test_cpuid_0x40000001_advertises_async_pf_vmexit_and_int() -> None:
    eax, ebx, ecx, edx = cpuid(0x40000001)
    assert eax == (1 << 4) | (1 << 10) | (1 << 14)  # KVM_FEATURE_ASYNC_PF, _VMEXIT, _INT
    assert (ebx, ecx, edx) == (0, 0, 0)
