"""Page ready, the wake-all, failed page-ins and forced injections, driven by guest code
(Linux arch/x86/kernel/kvm.c; docs/async-pf.md; for failed page-ins, Sean Christopherson's
mail of 2020-06-30 on LKML, "[RFC PATCH] kvm,x86: Exit to user space in case of page
fault error").

Page ready (2020 layout): the host writes the token at offset 4 of the area and raises
the interrupt from MSR_KVM_ASYNC_PF_INT, but only while that slot is 0; a slot found busy
ends the host's look (KVM's dequeue loop), and only the guest's ACK (or another page-in
completing) makes it look again - zeroing the slot alone is not enough. Enabling queues
a wake-all (token 0xffffffff)."""

from __future__ import annotations

from tests.apf.kit import (
    AREA,
    DATA,
    ENABLE,
    ENABLED,
    EXIT,
    KERNEL_STACK,
    PROBE,
    SEND_ALWAYS,
    WAKE_ALL,
    build,
    kinds,
    of_kind,
    one,
)
from tests.delivery.rig import gate

READY_VECTOR = 0x40
APIC_ON = """
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xf0], 0x1ff
"""


def ready_handler(ack: bool) -> str:
    """Log the token (DATA + 8 * n, count at DATA + 0x80), zero the slot, EOI, maybe ACK."""
    ack_code = """
    mov ecx, 0x4b564d07
    mov eax, 1
    xor edx, edx
    wrmsr""" if ack else ""
    return f"""
ready_handler:
    push rax
    push rbx
    push rcx
    push rdx
    mov eax, dword ptr [AREA + 4]
    mov rbx, qword ptr [DATA + 0x80]
    mov qword ptr [DATA + rbx*8], rax
    inc qword ptr [DATA + 0x80]
    mov dword ptr [AREA + 4], 0
    mov rax, 0xfee00000
    mov dword ptr [rax + 0xb0], 0{ack_code}
    pop rdx
    pop rcx
    pop rbx
    pop rax
    iretq
"""


def handshake(ack: bool):
    """IF=0 throughout main: enabling queues the wake-all, which the host delivers at once
    (slot := 0xffffffff, IRR set, held by IF=0). Policy "always" then injects an async #PF
    for PROBE anyway (token 1; the handler skips the load). While main spins, the page-in
    completes: token 1 is queued, the slot is busy, the host stops looking. Then STI: the
    wake-all handler zeroes the slot, EOIs and (maybe) ACKs."""
    source = f"""
main:
{APIC_ON}
{ENABLE}
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov ecx, 600
spin:
    dec ecx
    jnz spin
    sti
    nop
    nop
    nop
    nop
    mov al, byte ptr [DATA + 0x80]
{EXIT}
pf_handler:
    add qword ptr [rsp + 8], 3
    add rsp, 8
    iretq
{ready_handler(ack)}
"""
    m, sym = build(source, policy="always", swapped=[(PROBE, 300)],
                   gates={14: gate("pf_handler"), READY_VECTOR: gate("ready_handler")})
    result = m.run(entry=sym["main"], rsp=KERNEL_STACK, rflags=0x2, max_insns=3000)
    return m, result


def ready_tokens(result) -> list[int]:
    return [r["token"] for r in of_kind(result.trace.records, "apf_page_ready")]


def test_enabling_async_pf_queues_a_wake_all_page_ready_first() -> None:
    m, result = handshake(ack=True)
    first = of_kind(result.trace.records, "apf_page_ready")[0]
    assert (first["token"], first["vector"], first["layout"]) == (WAKE_ALL, READY_VECTOR, "2020")
    assert m.phys.read_uint(DATA, 8) == WAKE_ALL  # what the guest's handler read at +4


def test_the_handshake_setup_really_has_the_page_in_done_while_the_slot_is_busy() -> None:
    _, result = handshake(ack=False)
    recs = result.trace.records
    order = kinds(recs, ["apf_page_ready", "apf_not_present", "apf_page_in_done", "deliver"])
    assert order[:4] == ["apf_page_ready", "apf_not_present", "deliver", "apf_page_in_done"]
    interrupts = [r for r in of_kind(recs, "deliver") if r["vector"] == READY_VECTOR]
    assert interrupts and interrupts[0]["seq"] > one(recs, "apf_page_in_done")["seq"]


def test_with_the_ack_the_second_page_ready_follows_the_wake_all() -> None:
    m, result = handshake(ack=True)
    assert ready_tokens(result) == [WAKE_ALL, 1]
    assert [m.phys.read_uint(DATA + 8 * i, 8) for i in range(2)] == [WAKE_ALL, 1]
    assert result.exit_code == 2
    assert m.apf is not None and m.apf.pending_page_ready == ()


def test_zeroing_the_slot_without_the_ack_leaves_the_next_page_ready_queued() -> None:
    m, result = handshake(ack=False)
    assert ready_tokens(result) == [WAKE_ALL]
    assert result.exit_code == 1
    assert m.phys.read_uint(AREA + 4, 4) == 0  # the slot is free ...
    assert m.apf is not None and m.apf.pending_page_ready == (1,)  # ... and token 1 still waits


# ----- failed page-ins ----------------------------------------------------------------------

FAIL_SOURCE = f"""
main:
{ENABLE}
    cli                             # IF=0: the first access is a synchronous page-in
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov al, 0
{EXIT}
pf_handler:
    mov rax, cr2
    mov qword ptr [DATA], rax
    mov al, 0xaf
{EXIT}
"""


def run_failing(on_fail: str):
    m, sym = build(FAIL_SOURCE, on_fail=on_fail, swapped=[(PROBE, 1000)], fail=True,
                   gates={14: gate("pf_handler")})
    return m, sym, m.run(entry=sym["main"], rsp=KERNEL_STACK, max_insns=200)


def test_a_failed_page_in_with_on_fail_stop_ends_the_run_with_a_vmexit() -> None:
    m, _, result = run_failing("stop")
    recs = result.trace.records
    assert kinds(recs, ["apf_not_present", "apf_halt", "apf_page_in_done", "apf_page_in_failed", "end"]) == [
        "apf_not_present", "apf_halt", "apf_page_in_done", "apf_page_in_failed", "end"]
    assert one(recs, "apf_page_in_done")["ok"] is False
    failed = one(recs, "apf_page_in_failed")
    assert (failed["gpa"], failed["failures"], failed["action"]) == (PROBE, 1, "stop")
    assert result.outcome == "vmexit"
    assert m.apf is not None and m.apf.is_swapped(PROBE)


def test_a_failed_page_in_with_on_fail_inject_pf_gives_the_access_a_synchronous_pf() -> None:
    _, sym, result = run_failing("inject-pf")
    recs = result.trace.records
    assert one(recs, "apf_page_in_failed")["action"] == "inject-pf"
    pf = one(recs, "deliver")
    # A read at CPL0: P (the model's choice: the page "is there" but unreadable), R, S.
    assert (pf["vector"], pf["error_code"], pf["cr2"], pf["rip"]) == (14, 1, PROBE, sym["the_access"])
    assert result.exit_code == 0xAF


def test_a_failed_page_in_with_on_fail_retry_gives_up_after_three_failures() -> None:
    _, _, result = run_failing("retry")
    recs = result.trace.records
    assert [r["failures"] for r in of_kind(recs, "apf_page_in_failed")] == [1, 2, 3]
    assert len(of_kind(recs, "apf_halt")) == 3
    assert result.outcome == "vmexit"


RETRY_SOURCE = f"""
main:
{ENABLE}
    sti                             # IF=1: the host may inject
    nop
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov al, 0
{EXIT}
pf_handler:                         # returns to the access: it faults again
    add rsp, 8
    iretq
"""


def test_retry_is_not_a_synchronous_page_in_each_round_is_a_fresh_async_pf_where_allowed() -> None:
    # docs/async-pf.md: "retry" handles the next access like the first one. Where the
    # policy allows it, each round is a new page-not-present #PF with a new token (the
    # access retried inside the round is KVM's repeated fault: a halt until the page-in
    # completes, failed); after the third failed page-in the host stops.
    m, sym = build(RETRY_SOURCE, policy="always", swapped=[(PROBE, 1000)], fail=True,
                   gates={14: gate("pf_handler")})
    result = m.run(entry=sym["main"], rsp=KERNEL_STACK, max_insns=400)
    recs = result.trace.records
    injected = [r for r in of_kind(recs, "apf_not_present") if r["decision"] == "inject"]
    assert [r["token"] for r in injected] == [1, 2, 3]
    assert [d["cr2"] for d in of_kind(recs, "deliver")] == [1, 2, 3]
    assert [r["failures"] for r in of_kind(recs, "apf_page_in_failed")] == [1, 2, 3]
    assert result.outcome == "vmexit"


# ----- forced injections ---------------------------------------------------------------------

FORCED_SOURCE = f"""
main:
{ENABLE}
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov al, 0
{EXIT}
pf_handler:
    mov rax, cr2
    mov qword ptr [DATA], rax
    mov al, 0xaf
{EXIT}
"""


def run_forced(**where: int):
    m, sym = build(FORCED_SOURCE, swapped=[(PROBE, 1000)], gates={14: gate("pf_handler")})
    m.inject("async_pf", before=sym["the_access"], **where)
    return m, sym, m.run(entry=sym["main"], rsp=KERNEL_STACK, max_insns=200)


def test_a_forced_async_pf_with_only_a_token_has_cr2_equal_to_the_token() -> None:
    m, sym, result = run_forced(token=0x1234)
    pf = one(result.trace.records, "deliver")
    assert (pf["vector"], pf["error_code"], pf["cr2"], pf["rip"]) == (14, 0, 0x1234, sym["the_access"])
    assert m.phys.read_uint(AREA, 4) == 1
    assert one(result.trace.records, "apf_not_present")["reason"] == "forced by the scenario"


def test_a_forced_async_pf_on_a_swapped_page_uses_the_hosts_token_not_the_given_one() -> None:
    m, _, result = run_forced(token=0x1234, gpa=PROBE)
    pf = one(result.trace.records, "deliver")
    assert pf["cr2"] == 1
    assert one(result.trace.records, "apf_not_present")["token"] == 1
    assert m.apf is not None and m.apf.swap_state(PROBE).token == 1  # type: ignore[union-attr]


def test_a_forced_async_pf_with_only_a_gpa_uses_the_hosts_token() -> None:
    _, _, result = run_forced(gpa=PROBE)
    pf = one(result.trace.records, "deliver")
    assert (pf["vector"], pf["error_code"], pf["cr2"]) == (14, 0, 1)


# ----- legacy layout --------------------------------------------------------------------------

LEGACY_HLT_SOURCE = f"""
main:
    mov ecx, 0x4b564d02
    mov eax, EN
    xor edx, edx
    wrmsr
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov al, byte ptr [DATA + 0x80]
{EXIT}
pf_handler:
    push rax
    push rbx
    mov eax, dword ptr [AREA]       # reason
    mov dword ptr [AREA], 0
    mov rbx, cr2
    inc qword ptr [DATA + 0x80]
    cmp eax, 2
    je woken
    sti
sleep:
    hlt                             # a sleeper that halts, as a real idle loop would
    cmp qword ptr [DATA], rbx
    jne sleep
    cli
    jmp out
woken:
    mov qword ptr [DATA], rbx
out:
    pop rbx
    pop rax
    add rsp, 8
    iretq
"""


def test_a_legacy_page_ready_pf_wakes_a_halted_vcpu() -> None:
    m, sym = build(LEGACY_HLT_SOURCE, layout="legacy", en=AREA | SEND_ALWAYS | ENABLED,
                   swapped=[(PROBE, 500)], gates={14: gate("pf_handler")})
    result = m.run(entry=sym["main"], rsp=KERNEL_STACK, max_insns=300)
    pfs = [r for r in of_kind(result.trace.records, "deliver") if r["vector"] == 14]
    assert [p["cr2"] for p in pfs] == [1, 1]  # not present, then ready: both CR2 = token 1
    assert result.outcome == "exit" and result.exit_code == 2


LEGACY_HELD_SOURCE = f"""
main:
    mov ecx, 0x4b564d02
    mov eax, EN
    xor edx, edx
    wrmsr
    mov rcx, PROBE
the_access:
    mov rax, qword ptr [rcx]
    mov al, byte ptr [DATA + 0x80]
{EXIT}
pf_handler:
    push rax
    push rbx
    push rcx
    mov eax, dword ptr [AREA]       # reason
    mov dword ptr [AREA], 0
    mov rbx, cr2
    inc qword ptr [DATA + 0x80]
    cmp eax, 2
    je woken
    mov ecx, 1000
busy:                               # IF=0 (#PF gate) while the page-in completes
    dec ecx
    jnz busy
    sti                             # now the page-ready #PF may come
sleep:
    pause
    cmp qword ptr [DATA], rbx
    jne sleep
    cli
    jmp out
woken:
    mov qword ptr [DATA], rbx
out:
    pop rcx
    pop rbx
    pop rax
    add rsp, 8
    iretq
"""


def test_a_legacy_page_ready_held_by_if0_is_delivered_once_if_is_set() -> None:
    m, sym = build(LEGACY_HELD_SOURCE, layout="legacy", en=AREA | SEND_ALWAYS | ENABLED,
                   swapped=[(PROBE, 300)], gates={14: gate("pf_handler")})
    result = m.run(entry=sym["main"], rsp=KERNEL_STACK, max_insns=6000)
    recs = result.trace.records
    done = one(recs, "apf_page_in_done")
    sti_reached = done["icount"] < 1000  # the completion fell inside the IF=0 busy loop
    assert sti_reached
    assert [r["token"] for r in of_kind(recs, "apf_page_ready")] == [1]
    assert result.outcome == "exit" and result.exit_code == 2
