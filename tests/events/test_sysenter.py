"""SYSENTER and SYSEXIT (SDM Vol. 2), executed by the machine as SYSCALL/SYSRET are: the
CPL they change is the machine's to track. CPUID.01H:EDX.SEP is reported, so a guest may
use them in 64-bit mode (Intel).

IA32_SYSENTER_CS = 0x08: SYSENTER loads CS 0x08, SS 0x10; SYSEXIT to 64-bit mode loads
CS 0x08 + 32 | 3 = 0x2b and SS 0x33 (fixed descriptors: selectors only, not read from
the GDT), to compatibility mode CS 0x1b and SS 0x23."""

from __future__ import annotations

from tests.delivery.rig import CODE, KERNEL_STACK, START_RFLAGS, USER_STACK, build, gate

SETUP = """
    mov ecx, 0x174               # IA32_SYSENTER_CS
    mov eax, {sysenter_cs:#x}
    xor edx, edx
    wrmsr
    mov ecx, 0x175               # IA32_SYSENTER_ESP
    mov eax, 0x7f000
    wrmsr
    mov ecx, 0x176               # IA32_SYSENTER_EIP
    lea rax, [rip + entry]
    xor edx, edx
    wrmsr
    lea rdx, [rip + user]
    mov rcx, {user_stack:#x}
    pushfq
    or qword ptr [rsp], {tf:#x}
    popfq
the_sysexit:
    .byte 0x48, 0x0f, 0x35       # sysexitq (Keystone lacks the mnemonic)
"""
GP, DB = 13, 1


def test_sysexit_enters_cpl3_and_sysenter_returns_to_cpl0_at_sysenter_eip() -> None:
    m, sym = build(SETUP.format(sysenter_cs=0x08, user_stack=USER_STACK, tf=0) + """
user:
    mov rbx, rsp
after_sysexit:
    sysenter
entry:
    hlt
    """)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)
    assert r.outcome == "hlt", r.reason
    rbx, rsp, rflags, cs, ss, rip = m.engine.read(("rbx", "rsp", "rflags", "cs", "ss", "rip"))
    # At CPL3 RSP was RCX; SYSENTER: RSP = SYSENTER_ESP, IF cleared, CPL 0, CS/SS fixed.
    assert (rbx, rsp, rflags & 0x200, cs, ss, m.cpl) == (USER_STACK, 0x7F000, 0, 0x08, 0x10, 0)
    assert rip == sym["entry"] + 1
    sysexit, sysenter = r.trace.of_kind("sysexit")[0], r.trace.of_kind("sysenter")[0]
    assert (sysexit["to_rip"], sysexit["to_64bit"]) == (sym["user"], True)
    assert (sysenter["rip"], sysenter["to_rip"]) == (sym["after_sysexit"], sym["entry"])


def test_user_code_after_sysexit_runs_at_cpl3_and_cannot_execute_hlt() -> None:
    m, sym = build(SETUP.format(sysenter_cs=0x08, user_stack=USER_STACK, tf=0) + """
user:
    hlt
entry:
    hlt
gp:
    hlt
    """, gates={GP: gate("gp")})
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)
    d = r.deliveries[0]
    assert (d["vector"], d["rip"], d["cs"], d["ss"], d["stack"]) == (GP, sym["user"], 0x2B,
                                                                     0x33, "rsp0")


def test_sysexit_with_sysenter_cs_15_2_zero_is_gp0() -> None:
    m, sym = build(SETUP.format(sysenter_cs=0x03, user_stack=USER_STACK, tf=0) + """
user:
    hlt
entry:
    hlt
gp:
    hlt
    """, gates={GP: gate("gp")})
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)
    d = r.deliveries[0]
    assert (d["vector"], d["error_code"], d["rip"], d["cpl"]) == (GP, 0, sym["the_sysexit"], 0)


def test_sysexit_at_cpl3_is_gp0() -> None:
    m, sym = build(SETUP.format(sysenter_cs=0x08, user_stack=USER_STACK, tf=0) + """
user:
    .byte 0x48, 0x0f, 0x35       # sysexitq at CPL3
entry:
    hlt
gp:
    hlt
    """, gates={GP: gate("gp")})
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)
    d = r.deliveries[0]
    assert (d["vector"], d["error_code"], d["rip"], d["stack"]) == (GP, 0, sym["user"], "rsp0")


def test_sysenter_with_tf_traps_at_the_entry_point() -> None:
    # SYSENTER clears IF, VM and RF but not TF: the single-step trap follows it, with the
    # saved RIP at SYSENTER_EIP (the first kernel instruction has not run) and the new
    # CPL's CS.
    m, sym = build("""
user:
    sysenter
entry:
    hlt
db:
    hlt
    """, gates={DB: gate("db")})
    for msr, value in ((0x174, 0x08), (0x175, 0x7F000), (0x176, sym["entry"])):
        m.model.wrmsr(msr, value)
    r = m.run(entry=sym["user"], rsp=USER_STACK, cpl=3, rflags=START_RFLAGS | 0x100,
              max_insns=100)
    d = r.deliveries[0]
    assert (d["vector"], d["rip"], d["cs"], d["cpl"], d["stack"], d["old_rsp"]) == (
        DB, sym["entry"], 0x08, 0, "current", 0x7F000)
    assert d["rflags"] & 0x300 == 0x100  # TF kept, IF cleared
