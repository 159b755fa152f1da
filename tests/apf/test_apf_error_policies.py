"""The error path of the 2020 thread as selectable policies (LKML "[RFC PATCH] kvm,x86:
Exit to user space in case of page fault error", 2020-06-30; cpu/apf_host.py): a guest
that sleeps on each token and retries after page ready touches failing gfns in turn; a
host that remembers too little sends it down the async path again, for ever."""

from __future__ import annotations

from typing import Any

import pytest

from cpu.apf_host import EPT_APF_ERROR_TAG, parse_error_policy
from cpu.events import AsyncPf
from tests.apf.kit import DATA, ENABLE, KERNEL_STACK, PAGE, PROBE, build, of_kind, one
from tests.delivery.rig import gate

A, B, C = PROBE, PROBE + PAGE, PROBE + 2 * PAGE


def guest(pages: list[int]) -> str:
    touches = "".join(f"""
    mov rcx, {p:#x}
touch_{i}:
    mov rax, qword ptr [rcx]
    call wait_ready
""" for i, p in enumerate(pages))
    return f"""
main:
{ENABLE}
    mov rax, 0xfee000f0             # APIC software enable (SVR): page ready needs it
    mov dword ptr [rax], 0x1ff
    xor r12, r12
    sti
round:
{touches}
    inc qword ptr [DATA]
    jmp round

wait_ready:                         # sleep until a page-ready came (cli; check; sti; hlt)
    cli
    mov rax, qword ptr [DATA+8]
    cmp rax, r12
    jne woken
    sti
    hlt
    jmp wait_ready
woken:
    mov r12, rax
    sti
    ret

pf_handler:                         # async "page not present": sleep on the token
    push rax
    mov eax, dword ptr [AREA]
    test eax, eax
    jz real_pf
    mov dword ptr [AREA], 0
    add qword ptr [rsp+16], 3       # this task gives up the CPU: skip the access
    pop rax
    add rsp, 8
    iretq
real_pf:
    hlt

ready_handler:                      # page ready: wake, free the slot, EOI, ACK
    push rax
    push rcx
    push rdx
    inc qword ptr [DATA+8]
    mov dword ptr [AREA+4], 0
    mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    mov ecx, 0x4b564d07
    mov eax, 1
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    iretq
"""


def run_policy(policy: str, pages: list[int], max_insns: int = 4000) -> tuple[Any, Any, Any]:
    m, sym = build(guest(pages), gates={14: gate("pf_handler"), 0x40: gate("ready_handler")})
    m.enable_apf(policy="kvm", error_policy=policy)
    for p in pages:
        m.swap_out(p, PAGE, latency=1000, fail=True)
    return m, sym, m.run(entry=sym["main"], rsp=KERNEL_STACK, max_insns=max_insns)


def injected(r: Any, page: int) -> int:
    return sum(1 for x in of_kind(r.trace.records, "apf_not_present")
               if x["decision"] == "inject" and x["gpa"] == page)


def test_with_no_memory_of_errors_the_guest_loops_on_the_async_path() -> None:
    m, _sym, r = run_policy("none", [A])
    assert r.outcome == "max_insns"
    assert injected(r, A) >= 5
    assert of_kind(r.trace.records, "apf_error_exit") == []
    assert m.phys.read_uint(DATA, 8) >= 4  # rounds completed


def test_a_single_error_gfn_catches_one_failing_page_on_its_next_fault() -> None:
    _m, sym, r = run_policy("error-gfn", [A])
    assert r.outcome == "vmexit"
    x = one(r.trace.records, "apf_error_exit")
    assert (x["gpa"], x["rip"]) == (A, sym["touch_0"])  # the faulting access, intact
    assert injected(r, A) == 1
    assert [e["remembered"] for e in of_kind(r.trace.records, "apf_error_recorded")] == [[A]]


def test_a_single_error_gfn_loops_when_two_failing_pages_are_touched_in_turn() -> None:
    _m, _sym, r = run_policy("error-gfn", [A, B])
    assert r.outcome == "max_insns"
    remembered = [e["remembered"] for e in of_kind(r.trace.records, "apf_error_recorded")]
    assert remembered[:4] == [[A], [B], [A], [B]]
    assert injected(r, A) >= 3 and injected(r, B) >= 3


def test_a_two_entry_cache_catches_two_failing_pages() -> None:
    _m, sym, r = run_policy("error-cache:2", [A, B])
    assert r.outcome == "vmexit"
    assert one(r.trace.records, "apf_error_exit")["rip"] == sym["touch_0"]
    assert (injected(r, A), injected(r, B)) == (1, 1)


def test_a_two_entry_cache_overflows_with_three_pages_and_the_loop_comes_back() -> None:
    _m, _sym, r = run_policy("error-cache:2", [A, B, C])
    assert r.outcome == "max_insns"
    recs = of_kind(r.trace.records, "apf_error_recorded")
    assert [(e["remembered"], e["evicted"]) for e in recs[:4]] == [
        ([A], None), ([A, B], None), ([B, C], A), ([C, A], B)]
    assert all(len(e["remembered"]) <= 2 for e in recs)
    assert injected(r, A) >= 2


def test_an_spte_tag_never_overflows() -> None:
    m, sym, r = run_policy("spte-tag", [A, B, C])
    assert r.outcome == "vmexit"
    assert one(r.trace.records, "apf_error_exit")["rip"] == sym["touch_0"]
    assert (injected(r, A), injected(r, B), injected(r, C)) == (1, 1, 1)
    assert m.ept is not None
    for p in (A, B, C):
        assert m.ept.entry(p, 1) & EPT_APF_ERROR_TAG


def test_exit_to_user_at_the_failure_loses_the_faulting_context() -> None:
    _m, sym, r = run_policy("exit-to-user", [A])
    assert r.outcome == "vmexit"
    x = one(r.trace.records, "apf_error_exit")
    assert x["gpa"] == A and x["rip"] != sym["touch_0"]  # the guest is elsewhere (sleeping)


def test_a_host_event_on_a_known_error_gfn_is_refused_by_the_policy() -> None:
    m, sym = build(guest([A]), gates={14: gate("pf_handler"), 0x40: gate("ready_handler")})
    m.enable_apf(policy="kvm", error_policy="error-cache:2")
    m.swap_out(A, PAGE, latency=1000, fail=True)
    m.inject(AsyncPf(gpa=A), before=sym["round"], hit=2)
    r = m.run(entry=sym["main"], rsp=KERNEL_STACK, max_insns=4000)
    d = one(r.trace.records, "host_declines")
    assert (d["status"], d["policy"]) == ("refused", "error-cache:2")


@pytest.mark.parametrize("text", ["error-cache", "error-cache:0", "cache:2", "spte-tag:1"])
def test_a_malformed_error_policy_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_error_policy(text)
