"""SYSCALL and SYSRET (SDM Vol. 2), executed by the machine: Unicorn's SYSCALL only calls
hooks, and the CPL they change is the machine's to track. Single-step over both looks at
TF when they complete (what KVM's emulator does), so an OS masks it with IA32_FMASK."""

from __future__ import annotations

from tests.delivery.rig import CODE, KERNEL_STACK, START_RFLAGS, USER_STACK, build, gate

# STAR[47:32] = 0x08: SYSCALL loads CS 0x08, SS 0x10. STAR[63:48] = 0x08: SYSRET to 64-bit
# loads CS 0x08 + 16 = 0x1b (the machine's user code) and SS 0x08 + 8 = 0x13 (the
# selectors only: SYSRET's descriptors are fixed, not read from the GDT).
SETUP = """
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1                    # EFER.SCE
    wrmsr
    mov ecx, 0xc0000081          # STAR
    xor eax, eax
    mov edx, 0x00080008          # SYSRET base 0x08, SYSCALL CS 0x08
    wrmsr
    mov ecx, 0xc0000082          # LSTAR
    lea rax, [rip + entry]
    xor edx, edx
    wrmsr
    mov ecx, 0xc0000084          # FMASK
    mov eax, {fmask:#x}
    xor edx, edx
    wrmsr
    lea rcx, [rip + user]
    mov r11, {user_rflags:#x}
    mov rsp, {user_stack:#x}
    .byte 0x48, 0x0f, 0x07       # sysretq (Keystone lacks the mnemonic)
"""


def test_syscall_from_cpl3_enters_lstar_at_cpl0_with_the_return_state_in_rcx_and_r11() -> None:
    m, sym = build(SETUP.format(fmask=0x200, user_rflags=0x246, user_stack=USER_STACK) + """
user:
    syscall
after_syscall:
    nop
entry:
    hlt
    """)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)

    assert r.outcome == "hlt", r.reason
    rcx, r11, rflags, cs, ss, rip = m.engine.read(("rcx", "r11", "rflags", "cs", "ss", "rip"))
    assert (rcx, r11, rflags & ~0x10000, cs, ss, m.cpl) == (
        sym["after_syscall"], 0x246, 0x046, 0x08, 0x10, 0)
    assert rip == sym["entry"] + 1
    sysret, syscall = r.trace.of_kind("sysret")[0], r.trace.of_kind("syscall")[0]
    assert (sysret["to_rip"], sysret["to_64bit"]) == (sym["user"], True)
    assert (syscall["rip"], syscall["to_rip"], syscall["compat"]) == (sym["user"], sym["entry"],
                                                                      False)


def test_sysret_that_sets_tf_traps_after_itself_and_fmask_keeps_syscall_from_trapping() -> None:
    m, sym = build(SETUP.format(fmask=0x100, user_rflags=0x302, user_stack=USER_STACK) + """
user:
    syscall                      # TF = 1 here, masked by FMASK: no trap after it
entry:
    hlt
db_handler:
    hlt
    """, gates={1: gate("db_handler")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)

    [db] = r.deliveries
    assert (db["name"], db["rip"], db["cs"], db["cpl"], db["stack"]) == (
        "#DB", sym["user"], 0x1B, 0, "rsp0")
    assert db["rflags"] & 0x100
    assert m.engine.read_reg("dr6") & (1 << 14)  # DR6.BS


def test_syscall_with_efer_sce_clear_is_ud_at_the_syscall() -> None:
    m, sym = build("""
the_syscall:
    syscall
    hlt
ud_handler:
    hlt
    """, gates={6: gate("ud_handler")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=10)

    [ud] = r.deliveries
    assert (ud["name"], ud["rip"]) == ("#UD", sym["the_syscall"])


def test_sysret_at_cpl3_is_gp0_at_the_sysret() -> None:
    m, sym = build(f"""
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1
    wrmsr
    lea rax, [rip + user]
    push 0x23
    push {USER_STACK:#x}
    push 0x202
    push 0x1b
    push rax
    iretq
user:
the_sysret:
    .byte 0x48, 0x0f, 0x07       # sysretq (Keystone lacks the mnemonic)
gp_handler:
    hlt
    """, gates={13: gate("gp_handler")})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=30)

    [gp] = r.deliveries
    assert (gp["name"], gp["rip"], gp["error_code"], gp["cpl"]) == ("#GP", sym["the_sysret"], 0, 0)
