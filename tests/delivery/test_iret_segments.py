"""IRETQ to an outer privilege level nulls the data segment registers the new CPL may
not use (SDM Vol. 2 IRET, RETURN-TO-OUTER-PRIVILEGE-LEVEL: "FOR each SegReg in (ES, FS,
GS, and DS) ... IF (SegmentSelector == NULL) OR (tempDesc(DPL) < CPL AND tempDesc(Type)
is (data or non-conforming code)) THEN SegReg <- NULL"). The DPL and type come from the
descriptor cache, loaded when the guest wrote the register; in 64-bit mode FS and GS
keep their bases. An IRET to the same CPL touches none of them.

The code below loads DS/ES/FS/GS at CPL0, sets FS.base and GS.base, IRETs to CPL3, and
the CPL3 code executes INT3 through a DPL3 gate: the #BP handler (CPL0) stops there so
the registers can be read as the CPL3 code left them.
"""

from __future__ import annotations

from cpu.machine import Machine
from cpu.outcomes import RunResult
from tests.delivery.rig import (
    CODE,
    KERNEL_CS,
    KERNEL_DS,
    RSP0_TOP,
    USER_CS,
    USER_DS,
    USER_STACK,
    Frame,
    assert_delivered,
    build,
    deliveries,
    gate,
    one,
)

MSR_FS_BASE, MSR_GS_BASE = 0xC0000100, 0xC0000101
FS_BASE, GS_BASE = 0x1234_5000, 0x6789_A000

TO_CPL3 = """
start:
    mov eax, {ds:#x}
    mov ds, ax
    mov eax, {es:#x}
    mov es, ax
    mov eax, {fs:#x}
    mov fs, ax
    mov eax, {gs:#x}
    mov gs, ax
    mov ecx, 0xC0000100
    mov eax, 0x12345000
    xor edx, edx
    wrmsr
    mov ecx, 0xC0000101
    mov eax, 0x6789A000
    wrmsr
    push {ss3:#x}
    push {user_stack:#x}
    push 0x2
    push {cs3:#x}
    lea rax, [rip + user]
    push rax
the_iret:
    iretq
user:
    int3
after_int3:
    nop
bp_handler:
    hlt
"""


def run(ds: int, es: int, fs: int, gs: int, *, cs3: int = USER_CS,
        ss3: int = USER_DS) -> tuple[Machine, dict[str, int], RunResult]:
    m, sym = build(TO_CPL3.format(ds=ds, es=es, fs=fs, gs=gs, cs3=cs3, ss3=ss3,
                                  user_stack=USER_STACK),
                   gates={3: gate("bp_handler", dpl=3)})
    r = m.run(entry=CODE, rsp=0x70000, rflags=0x2)
    return m, sym, r


def test_an_iretq_to_cpl3_nulls_dpl0_data_and_code_segments_and_keeps_dpl3_data() -> None:
    # DS, FS: kernel data (DPL 0); GS: kernel code (DPL 0, non-conforming, readable);
    # ES: user data (DPL 3) stays.
    m, sym, r = run(ds=KERNEL_DS, es=USER_DS, fs=KERNEL_DS, gs=KERNEL_CS)

    assert (r.outcome, r.rip) == ("hlt", sym["bp_handler"] + 1)
    iret = one(r.trace.records, "iret")
    assert (iret["rip"], iret["to_rip"], iret["to_rsp"], iret["to_cpl"]) == (
        sym["the_iret"], sym["user"], USER_STACK, 3)
    assert iret["null_segments"] == ["fs", "gs", "ds"]  # the SDM's order: ES, FS, GS, DS
    e = m.engine
    assert e.read(("ds", "es", "fs", "gs")) == [0, USER_DS, 0, 0]
    assert (e.read_msr(MSR_FS_BASE), e.read_msr(MSR_GS_BASE)) == (FS_BASE, GS_BASE)
    # The INT3 at CPL3 delivers normally through TSS.RSP0: frame of the CPL3 code.
    (rec,) = deliveries(r.trace.records)
    assert_delivered(m, rec, vector=3, stack="rsp0", stack_top=RSP0_TOP, cpl=0,
                     frame=Frame(rip=sym["after_int3"], cs=USER_CS, rflags=0x2,
                                 rsp=USER_STACK, ss=USER_DS))


def test_an_iretq_to_cpl3_leaves_null_selectors_and_dpl3_segments_alone() -> None:
    m, _, r = run(ds=USER_DS, es=0, fs=USER_DS, gs=0)

    iret = one(r.trace.records, "iret")
    assert "null_segments" not in iret and iret["to_cpl"] == 3
    assert m.engine.read(("ds", "es", "fs", "gs")) == [USER_DS, 0, USER_DS, 0]
    assert (m.engine.read_msr(MSR_FS_BASE), m.engine.read_msr(MSR_GS_BASE)) == (FS_BASE, GS_BASE)


def test_an_iretq_to_the_same_cpl_nulls_nothing() -> None:
    m, _, r = run(ds=KERNEL_DS, es=KERNEL_DS, fs=KERNEL_DS, gs=KERNEL_DS,
                    cs3=KERNEL_CS, ss3=KERNEL_DS)

    iret = one(r.trace.records, "iret")
    assert "null_segments" not in iret and iret["to_cpl"] == 0
    assert m.engine.read(("ds", "es", "fs", "gs")) == [KERNEL_DS] * 4
