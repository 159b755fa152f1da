"""cpu.devices.apf on its own: KVM's async-#PF MSRs, CPUID leaves, the injection decision
under every policy, tokens, page-in completion and the page-ready hand-shake
(Linux arch/x86/kvm/x86.c, arch/x86/kernel/kvm.c). No engine involved."""

from __future__ import annotations

import itertools

import pytest

from cpu.devices.apf import (
    APF_AREA_SIZE,
    APF_DELIVERY_AS_INT,
    APF_DELIVERY_AS_PF_VMEXIT,
    APF_ENABLED,
    APF_FLAGS_OFFSET,
    APF_REASON_OFFSET,
    APF_SEND_ALWAYS,
    APF_TOKEN_OFFSET,
    KVM_CPUID_FEATURES,
    KVM_CPUID_SIGNATURE,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    POLICIES,
    REASON_PAGE_NOT_PRESENT,
    REASON_PAGE_READY,
    WAKE_ALL_TOKEN,
    WHY_ALLOWED,
    WHY_APF_DISABLED,
    WHY_CPL0,
    WHY_EXCEPTION_PENDING,
    WHY_IF_CLEAR,
    WHY_NMI_BLOCKED,
    WHY_NO_DELIVERY_AS_INT,
    WHY_PAGING_OFF,
    WHY_SHADOW,
    ApfMsrError,
    ApfUnsupported,
    AsyncPf,
    Decision,
    GuestState,
    SwapState,
    cpuid,
    decide,
)
from cpu.errors import Unsupported

AREA = 0x7000
VECTOR = 0xEC
LINUX_EN = AREA | APF_DELIVERY_AS_INT | APF_ENABLED  # what kvm_guest_cpu_init writes


def linux_guest(**kwargs: str) -> AsyncPf:
    """An APF set up as a current Linux guest does it: vector first, then enable; the
    wake-all that enabling queues is delivered and acknowledged."""
    apf = AsyncPf(**kwargs)
    apf.wrmsr(MSR_KVM_ASYNC_PF_INT, VECTOR, now=0)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    assert apf.page_ready_to_deliver(0) == WAKE_ALL_TOKEN
    apf.delivered(WAKE_ALL_TOKEN)
    apf.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1, now=0)
    return apf


# -- constants and CPUID ------------------------------------------------------------------


def test_the_abi_numbers_are_those_of_kvm_para_h() -> None:
    assert (MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT, MSR_KVM_ASYNC_PF_ACK) == (
        0x4B564D02, 0x4B564D06, 0x4B564D07)
    assert (APF_ENABLED, APF_SEND_ALWAYS, APF_DELIVERY_AS_PF_VMEXIT, APF_DELIVERY_AS_INT) == (1, 2, 4, 8)
    assert (REASON_PAGE_NOT_PRESENT, REASON_PAGE_READY, WAKE_ALL_TOKEN) == (1, 2, 0xFFFFFFFF)
    assert (APF_FLAGS_OFFSET, APF_TOKEN_OFFSET, APF_REASON_OFFSET, APF_AREA_SIZE) == (0, 4, 0, 64)
    assert POLICIES == ("kvm", "kvm-send-always", "never-while-nmi-blocked", "always")


def test_the_signature_leaf_names_kvm_and_the_features_leaf() -> None:
    eax, ebx, ecx, edx = cpuid(KVM_CPUID_SIGNATURE) or (0, 0, 0, 0)
    assert eax == KVM_CPUID_FEATURES == 0x40000001
    assert b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx)) == b"KVMKVMKVM\0\0\0"
    assert (ebx, ecx, edx) == (0x4B4D564B, 0x564B4D56, 0x0000004D)


def test_the_features_leaf_advertises_exactly_the_three_async_pf_bits() -> None:
    assert cpuid(KVM_CPUID_FEATURES) == ((1 << 4) | (1 << 10) | (1 << 14), 0, 0, 0)
    assert cpuid(KVM_CPUID_FEATURES, apf_features=False) == (0, 0, 0, 0)
    assert cpuid(KVM_CPUID_SIGNATURE, apf_features=False) == cpuid(KVM_CPUID_SIGNATURE)


@pytest.mark.parametrize("leaf", [0, 1, 0x3FFFFFFF, 0x40000002, 0x40000100, 0x80000000])
def test_any_other_leaf_is_not_kvms_to_answer(leaf: int) -> None:
    assert cpuid(leaf) is None


# -- MSRs ---------------------------------------------------------------------------------


def test_the_three_msrs_are_handled_and_nothing_else() -> None:
    apf = AsyncPf()
    assert all(apf.handles(m) for m in (MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT, MSR_KVM_ASYNC_PF_ACK))
    assert not any(apf.handles(m) for m in (0x4B564D00, 0x4B564D01, 0x4B564D03, 0x4B564D05, 0x1B))


def test_a_fresh_model_reads_zero_and_is_disabled() -> None:
    apf = AsyncPf()
    assert [apf.rdmsr(m) for m in (MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT, MSR_KVM_ASYNC_PF_ACK)] == [0, 0, 0]
    assert not apf.enabled and apf.area_gpa is None and apf.vector is None
    assert apf.flags_gpa is None and apf.token_gpa is None and apf.pending_page_ready == ()


@pytest.mark.parametrize("value", [
    LINUX_EN, AREA | APF_ENABLED, AREA | 0xF, 0xFFFFFFFFFFFFFFC0 | 0xF, AREA, 0])
def test_the_enable_msr_reads_back_what_was_written(value: int) -> None:
    apf = AsyncPf()
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, value, now=0)
    assert apf.rdmsr(MSR_KVM_ASYNC_PF_EN) == value
    assert apf.enabled == bool(value & 1)
    assert apf.send_always == bool(value & 2)
    assert apf.delivery_as_pf_vmexit == bool(value & 4)
    assert apf.delivery_as_int == bool(value & 8)
    assert apf.area_gpa == (value & ~0x3F if value & 1 else None)


def test_the_area_words_sit_at_their_offsets_and_legacy_has_no_token_slot() -> None:
    apf = AsyncPf()
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    assert (apf.area_gpa, apf.flags_gpa, apf.token_gpa) == (AREA, AREA, AREA + 4)
    legacy = AsyncPf(layout="legacy")
    legacy.wrmsr(MSR_KVM_ASYNC_PF_EN, AREA | APF_ENABLED, now=0)
    assert (legacy.flags_gpa, legacy.token_gpa) == (AREA, None)


@pytest.mark.parametrize("vector", [0, 0x20, 0xEC, 0xFF])
def test_the_interrupt_msr_reads_back_its_vector(vector: int) -> None:
    apf = AsyncPf()
    apf.wrmsr(MSR_KVM_ASYNC_PF_INT, vector, now=0)
    assert apf.rdmsr(MSR_KVM_ASYNC_PF_INT) == vector and apf.vector == vector


@pytest.mark.parametrize("value", [1, 0])
def test_the_ack_msr_reads_zero_whatever_was_written(value: int) -> None:
    apf = AsyncPf()
    apf.wrmsr(MSR_KVM_ASYNC_PF_ACK, value, now=0)
    assert apf.rdmsr(MSR_KVM_ASYNC_PF_ACK) == 0


@pytest.mark.parametrize(("msr", "value", "bits"), [
    (MSR_KVM_ASYNC_PF_EN, LINUX_EN | 0x10, 0x10),
    (MSR_KVM_ASYNC_PF_EN, LINUX_EN | 0x20, 0x20),
    (MSR_KVM_ASYNC_PF_EN, 0x30, 0x30),
    (MSR_KVM_ASYNC_PF_INT, 0x1EC, 0x100),
    (MSR_KVM_ASYNC_PF_INT, 1 << 63, 1 << 63),
    (MSR_KVM_ASYNC_PF_ACK, 3, 2),
    (MSR_KVM_ASYNC_PF_ACK, 1 << 32, 1 << 32),
])
def test_reserved_bits_are_refused_naming_the_msr_and_the_bits(msr: int, value: int, bits: int) -> None:
    apf = AsyncPf()
    with pytest.raises(ApfMsrError) as info:
        apf.wrmsr(msr, value, now=0)
    assert info.value.msr == msr and info.value.bits == bits and info.value.value == value
    assert f"{msr:#x}" in str(info.value) and f"{bits:#x}" in str(info.value)
    assert "MSR_KVM_ASYNC_PF_" in str(info.value) and "#GP(0)" in str(info.value)


def test_a_refused_write_changes_nothing() -> None:
    apf = linux_guest()
    with pytest.raises(ApfMsrError):
        apf.wrmsr(MSR_KVM_ASYNC_PF_EN, 0x30, now=1)
    with pytest.raises(ApfMsrError):
        apf.wrmsr(MSR_KVM_ASYNC_PF_INT, 0x100, now=1)
    assert apf.rdmsr(MSR_KVM_ASYNC_PF_EN) == LINUX_EN and apf.vector == VECTOR and apf.enabled


def test_legacy_guests_may_set_delivery_as_int_all_the_same() -> None:
    apf = AsyncPf(layout="legacy")
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    assert apf.delivery_as_int


def test_unknown_msrs_and_oversized_values_are_caller_bugs() -> None:
    apf = AsyncPf()
    with pytest.raises(ValueError, match="0x1b"):
        apf.rdmsr(0x1B)
    with pytest.raises(ValueError, match="0x1b"):
        apf.wrmsr(0x1B, 0, now=0)
    with pytest.raises(ValueError, match="64 bits"):
        apf.wrmsr(MSR_KVM_ASYNC_PF_EN, 1 << 64, now=0)


def test_unknown_layouts_and_policies_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="2020, legacy"):
        AsyncPf(layout="2019")
    with pytest.raises(ValueError, match="kvm, kvm-send-always, never-while-nmi-blocked, always"):
        AsyncPf(policy="sometimes")


# -- enable, disable, wake-all --------------------------------------------------------------


def test_enabling_queues_a_wake_all() -> None:
    apf = AsyncPf()
    apf.wrmsr(MSR_KVM_ASYNC_PF_INT, VECTOR, now=0)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    assert apf.pending_page_ready == (WAKE_ALL_TOKEN,)
    assert apf.page_ready_to_deliver(0) == WAKE_ALL_TOKEN


def test_a_rewrite_while_enabled_queues_another_wake_all_only_if_the_queue_is_empty() -> None:
    apf = AsyncPf()
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    assert apf.pending_page_ready == (WAKE_ALL_TOKEN,)
    apf = linux_guest()
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=1)
    assert apf.pending_page_ready == (WAKE_ALL_TOKEN,)


def test_writing_zero_disables_queues_nothing_and_drops_what_was_queued() -> None:
    apf = AsyncPf()
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, 0, now=0)
    assert apf.pending_page_ready == ()
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, AREA, now=0)
    assert apf.pending_page_ready == () and not apf.page_ready_requested and apf.area_gpa is None


def test_page_ins_in_flight_across_a_disable_complete_silently() -> None:
    apf = linux_guest()
    apf.swap_out(0x10000, 0x1000, latency=100)
    token = apf.start_page_in(0x10000, now=10)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, 0, now=20)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=30)  # re-enabled: a fresh wake-all
    assert apf.complete_due(110) == [(0x10000, token)]
    assert not apf.is_swapped(0x10000)
    assert apf.pending_page_ready == (WAKE_ALL_TOKEN,)


# -- decide() -------------------------------------------------------------------------------

BOOLS = (False, True)
FIELDS = ("apf_enabled", "send_always", "delivery_as_int", "if_flag", "shadow",
          "exception_pending", "nmi_blocked", "paging")


def every_guest_state() -> list[GuestState]:
    states = []
    for bits in itertools.product(BOOLS, repeat=len(FIELDS)):
        for cpl in (0, 3):
            states.append(GuestState(cpl=cpl, **dict(zip(FIELDS, bits, strict=True))))
    return states


def reference(policy: str, g: GuestState) -> Decision:
    """KVM's decision (Linux arch/x86/kvm/x86.c) written out again, independently: KVM's
    kvm_can_do_async_pf (exception, IF, shadow), then kvm_can_deliver_async_pf (enabled
    and DELIVERY_AS_INT, CPL, paging), then the mitigation's NMI check."""
    if policy == "always":
        return Decision(g.apf_enabled, WHY_ALLOWED if g.apf_enabled else WHY_APF_DISABLED)
    cpl0_ok = g.send_always or policy == "kvm-send-always"
    nmi_matters = policy == "never-while-nmi-blocked"
    if g.exception_pending:
        return Decision(False, WHY_EXCEPTION_PENDING)
    if not g.if_flag:
        return Decision(False, WHY_IF_CLEAR)
    if g.shadow:
        return Decision(False, WHY_SHADOW)
    if not g.apf_enabled:
        return Decision(False, WHY_APF_DISABLED)
    if not g.delivery_as_int:
        return Decision(False, WHY_NO_DELIVERY_AS_INT)
    if g.cpl == 0 and not cpl0_ok:
        return Decision(False, WHY_CPL0)
    if not g.paging:
        return Decision(False, WHY_PAGING_OFF)
    if nmi_matters and g.nmi_blocked:
        return Decision(False, WHY_NMI_BLOCKED)
    return Decision(True, WHY_ALLOWED)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_agrees_with_the_reference_over_every_guest_state(policy: str) -> None:
    states = every_guest_state()
    assert len(states) == 2 ** len(FIELDS) * 2
    for g in states:
        assert decide(policy, g) == reference(policy, g), g


def test_kvm_never_looks_at_nmi_blocking() -> None:
    for g in every_guest_state():
        flipped = GuestState(**{**g.__dict__, "nmi_blocked": not g.nmi_blocked})
        for policy in ("kvm", "kvm-send-always", "always"):
            assert decide(policy, g) == decide(policy, flipped)


def test_a_linux_user_task_with_interrupts_on_gets_the_fault_under_kvm() -> None:
    g = GuestState(apf_enabled=True, send_always=False, delivery_as_int=True, if_flag=True,
                   shadow=False, exception_pending=False, cpl=3, nmi_blocked=True, paging=True)
    assert decide("kvm", g) == Decision(True, "allowed")
    assert decide("never-while-nmi-blocked", g) == Decision(False, WHY_NMI_BLOCKED)


def test_the_reason_strings_say_what_failed() -> None:
    assert WHY_ALLOWED == "allowed"
    assert "IF=0" in WHY_IF_CLEAR and "UNCONFIRMED" in WHY_NO_DELIVERY_AS_INT
    assert "CPL 0" in WHY_CPL0 and "CR0.PG" in WHY_PAGING_OFF and "NMI" in WHY_NMI_BLOCKED


def test_the_outcome_separates_kvms_synchronous_fault_from_its_artificial_halt() -> None:
    for why in (WHY_EXCEPTION_PENDING, WHY_IF_CLEAR, WHY_SHADOW):
        assert Decision(False, why).outcome == "synchronous"
    for why in (WHY_APF_DISABLED, WHY_NO_DELIVERY_AS_INT, WHY_CPL0, WHY_PAGING_OFF, WHY_NMI_BLOCKED):
        assert Decision(False, why).outcome == "halt"
    assert Decision(True, WHY_ALLOWED).outcome == "inject"


def test_an_unknown_policy_is_refused_naming_the_known_ones() -> None:
    g = every_guest_state()[0]
    with pytest.raises(ValueError, match="kvm, kvm-send-always, never-while-nmi-blocked, always"):
        decide("kvm-ish", g)


def test_a_cpl_that_is_not_a_privilege_level_is_refused() -> None:
    with pytest.raises(ValueError, match="CPL 4"):
        GuestState(apf_enabled=True, send_always=False, delivery_as_int=True, if_flag=True,
                   shadow=False, exception_pending=False, cpl=4, nmi_blocked=False, paging=True)


def test_the_models_guest_state_takes_the_apf_bits_from_the_enable_msr() -> None:
    apf = AsyncPf(policy="never-while-nmi-blocked")
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN | APF_SEND_ALWAYS, now=0)
    g = apf.guest_state(if_flag=True, shadow=False, exception_pending=False, cpl=0,
                        nmi_blocked=True, paging=True)
    assert (g.apf_enabled, g.send_always, g.delivery_as_int) == (True, True, True)
    assert apf.decide(g) == Decision(False, WHY_NMI_BLOCKED)


# -- swapped pages and tokens -----------------------------------------------------------------


def test_swap_out_covers_every_page_the_range_touches() -> None:
    apf = AsyncPf()
    apf.swap_out(0x10FFF, 2, latency=50)
    assert apf.is_swapped(0x10000) and apf.is_swapped(0x11ABC)
    assert not apf.is_swapped(0xFFFF) and not apf.is_swapped(0x12000)
    assert apf.swap_state(0x11000) == SwapState(latency=50, fail=False, token=None, ready_at=None)
    assert apf.swap_state(0x12000) is None


def test_tokens_are_one_two_three_and_ready_at_is_now_plus_latency() -> None:
    apf = linux_guest()
    apf.swap_out(0x20000, 0x3000, latency=100)
    tokens = [apf.start_page_in(0x22000, now=5), apf.start_page_in(0x20000, now=6),
              apf.start_page_in(0x21000, now=7)]
    assert tokens == [1, 2, 3]
    assert apf.swap_state(0x22000) == SwapState(latency=100, fail=False, token=1, ready_at=105)
    assert apf.next_ready() == 105


def test_tokens_never_repeat_while_in_use_and_skip_zero_and_wake_all() -> None:
    apf = linux_guest()
    apf._next_token = WAKE_ALL_TOKEN - 1  # as if 2**32 - 2 page-ins had gone before
    apf.swap_out(0x20000, 0x3000, latency=100)
    assert apf.start_page_in(0x20000, now=0) == 0xFFFFFFFE
    assert apf.start_page_in(0x21000, now=0) == 1
    apf._next_token = 1
    assert apf.start_page_in(0x22000, now=0) == 2


def test_starting_a_page_in_twice_or_on_a_resident_page_is_a_caller_bug() -> None:
    apf = linux_guest()
    apf.swap_out(0x20000, 0x1000, latency=100)
    apf.start_page_in(0x20000, now=0)
    with pytest.raises(ValueError, match="already being paged in"):
        apf.start_page_in(0x20800, now=1)
    with pytest.raises(ValueError, match="not swapped out"):
        apf.start_page_in(0x30000, now=1)
    with pytest.raises(ValueError, match="in flight"):
        apf.swap_out(0x1F000, 0x2000, latency=1)
    assert not apf.is_swapped(0x1F000)


def test_complete_due_reports_in_completion_order_then_token_order() -> None:
    apf = linux_guest()
    apf.swap_out(0x20000, 0x4000, latency=100)
    t1 = apf.start_page_in(0x20000, now=0)   # ready at 100
    t2 = apf.start_page_in(0x21000, now=0)   # ready at 100
    apf.swap_out(0x22000, 0x1000, latency=10)
    t3 = apf.start_page_in(0x22000, now=50)  # ready at 60
    assert apf.complete_due(59) == []
    assert apf.next_ready() == 60
    t4 = apf.start_page_in(0x23000, now=90)  # ready at 190
    assert apf.complete_due(100) == [(0x22000, t3), (0x20000, t1), (0x21000, t2)]
    assert apf.pending_page_ready == (t3, t1, t2)
    assert not any(apf.is_swapped(p) for p in (0x20000, 0x21000, 0x22000))
    assert apf.is_swapped(0x23000) and apf.next_ready() == 190
    assert apf.complete_due(1000) == [(0x23000, t4)]
    assert apf.next_ready() is None


def test_a_page_in_the_guest_was_not_told_about_queues_no_page_ready() -> None:
    apf = linux_guest()
    apf.swap_out(0x20000, 0x1000, latency=10)
    token = apf.start_page_in(0x20000, now=0, notify=False)
    assert apf.complete_due(10) == [(0x20000, token)]
    assert apf.pending_page_ready == () and not apf.is_swapped(0x20000)


def test_a_failed_page_in_still_wakes_the_guest_but_the_page_stays_out() -> None:
    apf = linux_guest()
    apf.swap_out(0x20000, 0x1000, latency=10, fail=True)
    token = apf.start_page_in(0x20000, now=0)
    assert apf.complete_due(10) == [(0x20000, token)]
    assert apf.pending_page_ready == (token,)
    assert apf.swap_state(0x20000) == SwapState(latency=10, fail=True, token=None, ready_at=None,
                                                failed_page_ins=1)
    apf.start_page_in(0x20000, now=20)
    apf.complete_due(30)
    assert apf.swap_state(0x20000) == SwapState(10, True, None, None, failed_page_ins=2)


def test_time_never_goes_back() -> None:
    apf = linux_guest()
    apf.swap_out(0x20000, 0x2000, latency=10)
    apf.start_page_in(0x20000, now=100)
    apf.start_page_in(0x21000, now=50)  # read as 100
    assert apf.next_ready() == 110 and len(apf.complete_due(60)) == 0


# -- page-ready -------------------------------------------------------------------------------


def one_page_in(apf: AsyncPf, page: int, now: int) -> int:
    """Swap out `page`, page it in from cycle `now` (the guest gets the token) and let it
    complete at now + 10. Callers pass increasing `now`: the model's time never goes back."""
    apf.swap_out(page, 0x1000, latency=10)
    token = apf.start_page_in(page, now=now)
    apf.complete_due(now + 10)
    return token


def test_a_completed_page_in_is_delivered_when_the_slot_is_free() -> None:
    apf = linux_guest()
    token = one_page_in(apf, 0x20000, 0)
    assert apf.page_ready_to_deliver(0) == token
    assert apf.page_ready_to_deliver(0) == token  # asking again changes nothing
    apf.delivered(token)
    assert apf.pending_page_ready == ()


def test_a_busy_token_slot_holds_the_next_page_ready_until_the_ack() -> None:
    apf = linux_guest()
    first, second = one_page_in(apf, 0x20000, 0), one_page_in(apf, 0x21000, 20)
    assert apf.page_ready_to_deliver(0) == first
    apf.delivered(first)
    assert apf.page_ready_to_deliver(first) is None  # the slot still holds the first token
    assert apf.page_ready_to_deliver(0) is None      # zeroed, but not yet acknowledged
    apf.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1, now=50)
    assert apf.page_ready_to_deliver(0) == second


def test_acking_before_zeroing_the_slot_leaves_the_next_one_stuck_until_another_completion() -> None:
    apf = linux_guest()
    first, second = one_page_in(apf, 0x20000, 0), one_page_in(apf, 0x21000, 20)
    apf.delivered(apf.page_ready_to_deliver(0) or 0)
    apf.ack()                                         # the buggy order: ACK, then zero
    assert apf.page_ready_to_deliver(first) is None
    assert apf.page_ready_to_deliver(0) is None       # nobody is looking any more
    third = one_page_in(apf, 0x22000, 100)             # the next completion looks again
    assert apf.page_ready_to_deliver(0) == second
    apf.delivered(second)
    assert apf.pending_page_ready == (third,)


def test_a_disabled_apic_holds_page_ready_like_a_busy_slot() -> None:
    apf = linux_guest()
    token = one_page_in(apf, 0x20000, 0)
    assert apf.page_ready_to_deliver(0, apic_enabled=False) is None
    assert apf.page_ready_to_deliver(0) is None
    apf.ack()
    assert apf.page_ready_to_deliver(0) == token


def test_the_ack_releases_each_queued_token_in_turn() -> None:
    apf = linux_guest()
    tokens = [one_page_in(apf, 0x20000 + i * 0x1000, 20 * i) for i in range(3)]
    seen = []
    for _ in tokens:
        token = apf.page_ready_to_deliver(0)
        assert token is not None
        apf.delivered(token)
        seen.append(token)
        assert apf.page_ready_to_deliver(token) is None
        apf.wrmsr(MSR_KVM_ASYNC_PF_ACK, 1, now=100)
    assert seen == tokens and apf.pending_page_ready == ()
    assert apf.page_ready_to_deliver(0) is None


def test_delivering_anything_but_the_head_of_the_queue_is_a_caller_bug() -> None:
    apf = linux_guest()
    one_page_in(apf, 0x20000, 0)
    with pytest.raises(ValueError, match="next page-ready is 0x1"):
        apf.delivered(7)
    apf.delivered(1)
    with pytest.raises(ValueError, match="nothing"):
        apf.delivered(1)


def test_without_delivery_as_int_the_queue_is_dropped_as_current_kvm_does() -> None:
    apf = AsyncPf(policy="always")
    apf.wrmsr(MSR_KVM_ASYNC_PF_INT, VECTOR, now=0)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, AREA | APF_ENABLED, now=0)
    assert apf.pending_page_ready == (WAKE_ALL_TOKEN,)
    assert apf.page_ready_to_deliver(0) is None
    assert apf.pending_page_ready == ()


def test_the_legacy_layout_never_gets_an_interrupt_page_ready() -> None:
    apf = AsyncPf(layout="legacy", policy="always")
    apf.wrmsr(MSR_KVM_ASYNC_PF_INT, VECTOR, now=0)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    one_page_in(apf, 0x20000, 0)
    assert apf.page_ready_to_deliver(0) is None and apf.pending_page_ready == ()


@pytest.mark.parametrize("vector", [None, 0, 15])
def test_a_page_ready_on_an_illegal_vector_is_unsupported(vector: int | None) -> None:
    apf = AsyncPf()
    if vector is not None:
        apf.wrmsr(MSR_KVM_ASYNC_PF_INT, vector, now=0)
    apf.wrmsr(MSR_KVM_ASYNC_PF_EN, LINUX_EN, now=0)
    with pytest.raises(ApfUnsupported, match="illegal") as info:
        apf.page_ready_to_deliver(0)
    assert isinstance(info.value, Unsupported)
    assert ("never written" in str(info.value)) == (vector is None)


def test_a_token_slot_wider_than_a_u32_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="32 bits"):
        AsyncPf().page_ready_to_deliver(1 << 32)
