"""The host side of KVM's asynchronous page faults.

The guest side of the protocol — the MSRs, the shared area, tokens, the page-ready
queue — is the device model in cpu/devices/apf.py. This module is the host around it:
a guest access to a page the host swapped out (EPT-not-present with suppress-#VE set, so
it is a VM exit) is answered by the host's *policy* (`cpu.devices.apf.decide`, or a
Python callback): inject a "page not present" #PF (error code 0, CR2 = token, the
area's `flags` = 1; Linux arch/x86/kernel/kvm.c) or stall the vCPU until the page is in
(KVM's "artificial halt"). Page-ins complete at their cycle; page-ready notifications
then go out as the configured interrupt vector (the 2020 ABI) or, in the legacy layout,
as a second #PF with reason 2, injected under the same conditions as page-not-present
when the guest has freed the reason word.

When a page-in fails, `on_fail` decides: "retry" (again, up to `APF_MAX_RETRIES`),
"stop" (outcome `vmexit`), or "inject-pf" (a synchronous #PF for the access).

The error path as the 2020 thread designed it (LKML "[RFC PATCH] kvm,x86: Exit to user
space in case of page fault error", V. Goyal, V. Kuznetsov, S. Christopherson,
2020-06-30) is `error_policy` instead: what the host remembers about failed page-ins,
so that the next fault on such a gfn is handled synchronously (and, failing again,
exits to user space with the faulting context intact) rather than sent down the async
path again, for ever:

    "none"           nothing: every fault is async again, the guest loops
    "error-gfn"      Vivek Goyal's RFC: one error gfn per vCPU; each failure replaces
                     it, so two failing gfns touched in turn loop
    "error-cache:N"  "a cache of error gfns": N entries, oldest evicted first; N + 1
                     failing gfns touched in turn overflow it and loop (Vitaly
                     Kuznetsov: "every cache ... has a limited size ... we will follow
                     the APF path again and this can go over and over")
    "spte-tag"       Sean Christopherson: tag the not-present SPTE as "invalid for
                     async #PF" (here bit 62 of the EPT entry, an ignored bit of a
                     not-present entry): one bit per gfn, in the entry itself, never
                     overflows; a successful page-in rewrites the entry and drops it
    "exit-to-user"   exit to user space as soon as a page-in fails: bounded, but the
                     faulting context is gone (the guest is wherever it got to since;
                     Vivek: "we want to retain the real context")

The memory is `ApfHostState.error_gfns` (bounded by the policy); `arrive` (the race
explorer's async_pf host events) refuses a gfn the policy knows has failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cpu.devices.apf import (
    APF_FLAGS_OFFSET,
    APF_REASON_OFFSET,
    APF_TOKEN_OFFSET,
    REASON_PAGE_NOT_PRESENT,
    REASON_PAGE_READY,
    AsyncPf,
    Decision,
    GuestState,
    decide,
)
from cpu.ept import EptViolation
from cpu.events import HOST, policy_text
from cpu.events import AsyncPf as AsyncPfEvent
from cpu.mmu import Access
from cpu.outcomes import Outcome, Stop
from idt.blocking import Shadow
from idt.error_codes import PFErr
from idt.state import RFLAGS_IF, Event
from idt.vectors import Vector

if TYPE_CHECKING:
    from cpu.machine import Machine

APF_FAIL_ACTIONS = ("retry", "stop", "inject-pf")
APF_MAX_RETRIES = 3  # "retry": give up (outcome vmexit) after this many failed page-ins
APF_ERROR_POLICIES = ("none", "error-gfn", "error-cache:N", "spte-tag", "exit-to-user")
EPT_APF_ERROR_TAG = 1 << 62  # "spte-tag": an ignored bit of a not-present EPT entry


def parse_error_policy(text: str) -> tuple[str, int]:
    """("error-cache", N) from "error-cache:N", (name, 0) for the others; ValueError for
    anything else."""
    name, _, size = text.partition(":")
    if name == "error-cache":
        if not size.isdigit() or not 1 <= int(size) <= 4096:
            raise ValueError(f"error policy {text!r}: the cache size N must be 1..4096")
        return name, int(size)
    if size or name not in APF_ERROR_POLICIES:
        raise ValueError(f"unknown error policy {text!r} (known: {', '.join(APF_ERROR_POLICIES)})")
    return name, 0

ApfPolicy = str | Callable[["Machine", GuestState], Decision]


@dataclass
class ApfHostState:
    """The async-#PF host: the guest-visible device and the host's own bookkeeping."""

    device: AsyncPf | None = None  # None: the machine models no async #PF
    policy: ApfPolicy = "kvm"
    on_fail: str = "retry"
    notified: set[int] = field(default_factory=set)  # tokens given to the guest
    legacy_ready: list[int] = field(default_factory=list)  # legacy page-ready #PFs due
    wants_step: bool = False  # a legacy page-ready waits for a condition: step
    error_policy: str | None = None  # None: `on_fail` decides (see the module docstring)
    error_cache_size: int = 0
    error_gfns: list[int] = field(default_factory=list)  # oldest first; bounded by policy


class ApfHost:
    """A KVM host with paravirtual async page faults (see the module docstring)."""

    def __init__(self, m: Machine, state: ApfHostState) -> None:
        self.m = m
        self.state = state

    def enable(self, *, policy: ApfPolicy, layout: str, on_fail: str,
               error_policy: str | None = None) -> AsyncPf:
        if on_fail not in APF_FAIL_ACTIONS:
            raise ValueError(f"unknown on_fail {on_fail!r} (known: {', '.join(APF_FAIL_ACTIONS)})")
        st = self.state
        if error_policy is not None:
            st.error_policy, st.error_cache_size = parse_error_policy(error_policy)
            st.error_gfns = []
        st.device = AsyncPf(layout=layout, policy=policy if isinstance(policy, str) else "kvm")
        st.policy = policy
        st.on_fail = on_fail
        st.notified = set()
        st.legacy_ready = []
        m = self.m
        if m.ept is None:
            # An async #PF is a host decision on an EPT violation: give the machine the
            # second stage (identity, all RWX) without #VE.
            m.enable_ept()
        return st.device

    def swap_out(self, gpa: int, size: int, *, latency: int, fail: bool) -> None:
        m = self.m
        apf = self.state.device
        if apf is None or m.ept is None:
            raise ValueError("swap_out needs async page faults (Machine.enable_apf)")
        apf.swap_out(gpa, size, latency=latency, fail=fail)
        m.ept.set_range(gpa, size, read=False, write=False, execute=False, suppress_ve=True)

    def _guest_state(self, rip: int) -> GuestState:
        m = self.m
        apf = self.state.device
        assert apf is not None
        rflags = m.engine.read_reg("rflags")
        # Pre-2020 KVM (the legacy layout) had no DELIVERY_AS_INT: page ready was a #PF.
        legacy = apf.layout == "legacy"
        return GuestState(apf_enabled=apf.enabled, send_always=apf.send_always,
                          delivery_as_int=apf.delivery_as_int or legacy,
                          if_flag=bool(rflags & RFLAGS_IF),
                          shadow=m.boundary.shadow_at(rip, m.engine.icount) is not Shadow.NONE,
                          exception_pending=False, cpl=m.regs.state.cpl,
                          nmi_blocked=m.intr.nmi_blocked, paging=True)

    def _decide(self, rip: int, policy: ApfPolicy | None = None) -> Decision:
        """The decision of `policy` (default: the host's own) for the guest at `rip`."""
        asked = self.state.policy if policy is None else policy
        g = self._guest_state(rip)
        return asked(self.m, g) if callable(asked) else decide(asked, g)

    def _policy_name(self) -> str:
        return self.state.policy if isinstance(self.state.policy, str) else "callback"

    def fault(self, v: EptViolation, rip: int, during: Event | None) -> None:
        """A guest access hit a swapped-out page: a VM exit the host answers itself by
        its policy (inject a page-not-present #PF, or stall the vCPU until the page is
        in), or, for a page whose page-in fails, by `on_fail`."""
        m = self.m
        st = self.state
        apf = st.device
        assert apf is not None and m.ept is not None
        e = m.engine
        page = v.gpa & ~0xFFF
        swap = apf.swap_state(page)
        assert swap is not None
        gla = getattr(v, "gla", None)
        if st.error_policy is not None and swap.token is None and self.error_known(page):
            # KVM handles the fault synchronously (no async #PF); the page-in fails
            # again and the host exits to user space, the faulting access intact.
            m.emit("apf_error_exit", gpa=page, gla=gla, policy=self._error_policy_text(),
                   rip=rip)
            raise Stop(Outcome.VMEXIT, f"GPA {page:#x}: a page-in failed before "
                       f"({self._error_policy_text()}): synchronous fault, fails again: "
                       "exit to user space", rip)
        if st.error_policy is None and swap.fail and swap.token is None and \
                swap.failed_page_ins:
            # A page-in of this page already failed.
            m.emit("apf_page_in_failed", gpa=page, gla=gla, failures=swap.failed_page_ins,
                   action=st.on_fail)
            if st.on_fail == "stop" or swap.failed_page_ins >= APF_MAX_RETRIES:
                raise Stop(Outcome.VMEXIT, f"page-in of GPA {page:#x} failed "
                           f"{swap.failed_page_ins} time(s): host stops", rip)
            if st.on_fail == "inject-pf" and during is None and gla is not None:
                ec = int(PFErr.P) | (int(PFErr.W) if v.access is Access.WRITE else 0) | (
                    int(PFErr.U) if m.regs.state.cpl == 3 else 0)
                m.deliver(Event.exception(Vector.PF, rip, ec, gla),
                          why=f"page-in of GPA {page:#x} failed: host injects a #PF")
                return
        if swap.token is not None:
            decision = Decision(False, "page-in already in flight (repeated fault)")
        elif during is not None:
            decision = Decision(False, "during event delivery")
        else:
            decision = self._decide(rip)
        if decision.inject:
            token = apf.start_page_in(page, e.cycles)
            st.notified.add(token)
            m.emit("apf_not_present", token=token, gpa=page, gla=gla, decision="inject",
                   reason=decision.reason, policy=self._policy_name())
            self._deliver_not_present(token, rip)
            return
        # Synchronous page-in or KVM's "artificial halt": the vCPU stalls until the page
        # is in; the guest sees an ordinary (slow) access.
        if swap.token is None:
            apf.start_page_in(page, e.cycles, notify=False)
        swap = apf.swap_state(page)
        assert swap is not None and swap.ready_at is not None
        wait = max(0, swap.ready_at - e.cycles)
        m.emit("apf_not_present", token=None, gpa=page, gla=gla, decision="halt",
               reason=decision.reason, policy=self._policy_name())
        m.emit("apf_halt", gpa=page, cycles=wait)
        e.cycles += wait
        self.service()  # completes the page-in (and queues any page-ready)
        if during is not None:
            m.deliver(during)

    # -- the error path (error_policy) --------------------------------------------------
    def _error_policy_text(self) -> str:
        st = self.state
        return (f"error-cache:{st.error_cache_size}" if st.error_policy == "error-cache"
                else st.error_policy or "on_fail")

    def error_known(self, page: int) -> bool:
        """Whether the policy remembers a failed page-in of `page`."""
        st = self.state
        if st.error_policy == "spte-tag":
            ept = self.m.ept
            assert ept is not None
            try:
                return bool(ept.entry(page, 1) & EPT_APF_ERROR_TAG)
            except ValueError:
                return False
        return page in st.error_gfns

    def _page_in_failed(self, page: int) -> None:
        """A page-in of `page` completed with an error: remember it as the policy says."""
        st = self.state
        m = self.m
        evicted: int | None = None
        if st.error_policy == "exit-to-user":
            rip = int(m.engine.read_reg("rip"))
            m.emit("apf_error_exit", gpa=page, gla=None, policy="exit-to-user", rip=rip)
            raise Stop(Outcome.VMEXIT, f"page-in of GPA {page:#x} failed: exit to user space "
                       "(the faulting context is gone: the guest is elsewhere now)", rip)
        if st.error_policy == "error-gfn":
            st.error_gfns = [page]
        elif st.error_policy == "error-cache":
            if page not in st.error_gfns:
                st.error_gfns.append(page)
                if len(st.error_gfns) > st.error_cache_size:
                    evicted = st.error_gfns.pop(0)
        elif st.error_policy == "spte-tag":
            ept = m.ept
            assert ept is not None
            ept.set_entry(page, 1, ept.entry(page, 1) | EPT_APF_ERROR_TAG)
        else:
            return  # "none"
        m.emit("apf_error_recorded", gpa=page, policy=self._error_policy_text(),
               remembered=list(st.error_gfns) if st.error_policy != "spte-tag" else [page],
               evicted=evicted)

    def _area_write(self, offset: int, value: int) -> None:
        apf = self.state.device
        assert apf is not None and apf.area_gpa is not None
        self.m.phys.write(apf.area_gpa + offset, value.to_bytes(4, "little"))

    def _area_read(self, offset: int) -> int:
        apf = self.state.device
        assert apf is not None and apf.area_gpa is not None
        return self.m.phys.read_uint(apf.area_gpa + offset, 4)

    def _deliver_not_present(self, token: int, rip: int) -> None:
        """Page not present: `flags` (or the legacy `reason`) = 1, then #PF(0), CR2 = token."""
        apf = self.state.device
        assert apf is not None
        if apf.area_gpa is not None:
            self._area_write(APF_FLAGS_OFFSET, REASON_PAGE_NOT_PRESENT)
        self.m.deliver(Event.exception(Vector.PF, rip, 0, token), why="async #PF: page not present")

    def arrive(self, ev: AsyncPfEvent, *, where: dict[str, Any]) -> None:
        """An `async_pf` event arrives at an injection point: the host may inject a
        page-not-present #PF here.

        First, can it apply at all? With `gpa` (and no token of its own) the page must be
        swapped out with no page-in in flight: a resident page has nothing to page in, and
        a page already being paged in has its token out (KVM's repeated fault halts, it
        never injects twice). Then, unless the event is forced (`policy` None), the
        policy it names is asked with the guest's state at this boundary. Either refusal
        is a `host_declines` record (`status` "not_applicable" or "refused", `reason`)
        and nothing happens: the event did not take place. Otherwise the host starts the
        page-in (with `gpa`) and injects the #PF with CR2 = the token."""
        m = self.m
        apf = self.state.device
        assert apf is not None
        rip = m.engine.read_reg("rip")
        token, gpa = ev.token, ev.gpa
        swap = apf.swap_state(gpa) if gpa is not None else None
        if gpa is not None and token is None and swap is not None and swap.token is None and \
                self.state.error_policy is not None and self.error_known(gpa & ~0xFFF):
            m.emit("host_declines", event=ev.text, status="refused",
                   policy=self._error_policy_text(),
                   reason=f"GPA {gpa & ~0xFFF:#x} failed to page in before: the host handles "
                          "it synchronously, never with an async #PF", **where)
            return
        if gpa is not None and token is None and (swap is None or swap.token is not None):
            page = gpa & ~0xFFF
            why = (f"GPA {page:#x} is resident here: there is nothing to page in"
                   if swap is None else
                   f"GPA {page:#x} is being paged in already (token {swap.token:#x}): the "
                   "host halts on a repeated fault, it never injects twice")
            m.emit("host_declines", event=ev.text, status="not_applicable", reason=why, **where)
            return
        if ev.policy is None:
            reason, policy = "forced by the scenario", self._policy_name()
        else:
            asked = self.state.policy if ev.policy == HOST else ev.policy
            policy = policy_text(asked)
            decision = self._decide(rip, asked)
            if not decision.inject:
                m.emit("host_declines", event=ev.text, status="refused", policy=policy,
                       reason=decision.reason, **where)
                return
            reason = decision.reason
        if gpa is not None and swap is not None and swap.token is None:
            token = apf.start_page_in(gpa, m.engine.cycles)
            self.state.notified.add(token)
        assert token is not None
        m.emit("apf_not_present", token=token, gpa=gpa, gla=None, decision="inject",
               reason=reason, policy=policy, **where)
        self._deliver_not_present(token, rip)

    def service(self) -> None:
        """At a boundary: page-ins that completed, and page-ready notifications."""
        st = self.state
        apf = st.device
        if apf is None:
            return
        m = self.m
        e = m.engine
        for page, token in apf.complete_due(e.cycles):
            assert m.ept is not None
            if not apf.is_swapped(page):
                m.ept.fix(page)
                e.flush_tlb()
            m.emit("apf_page_in_done", gpa=page, token=token, ok=not apf.is_swapped(page))
            if st.error_policy is not None and apf.is_swapped(page):
                self._page_in_failed(page)
            if apf.layout == "legacy" and token in st.notified:
                st.legacy_ready.append(token)
        if apf.area_gpa is None or not apf.enabled:
            return
        if apf.layout == "legacy":
            self._service_legacy()
            return
        apic = m.apic
        if apic is None:
            return
        ready = apf.page_ready_to_deliver(self._area_read(APF_TOKEN_OFFSET),
                                          apic_enabled=apic.software_enabled)
        if ready is None:
            return
        token = ready
        assert apf.vector is not None
        self._area_write(APF_TOKEN_OFFSET, token)
        apf.delivered(token)
        # KVM's dequeue loop goes on at once, finds the slot it just filled busy and
        # stops: the next page-ready waits for the guest's ACK (or another completion).
        apf.page_ready_to_deliver(token, apic_enabled=apic.software_enabled)
        apic.set_irr(apf.vector)
        m.emit("apf_page_ready", token=token, vector=apf.vector, layout="2020")

    def _service_legacy(self) -> None:
        """Page ready is a second #PF with reason 2 (pre-2020 ABI), injected under the
        same conditions as page-not-present, when the reason word is free."""
        st = self.state
        m = self.m
        e = m.engine
        if not st.legacy_ready:
            st.wants_step = False
            return
        if self._area_read(APF_REASON_OFFSET) != 0:
            # The guest frees the reason word with an ordinary store: step until then.
            st.wants_step = True
            return
        rip = e.read_reg("rip")
        decision = self._decide(rip)
        if not decision.inject:
            # Held by IF = 0 or a shadow: both can end without an event the machine
            # sees, so step until they do (KVM: the next VM exit re-checks).
            st.wants_step = decision.outcome == "synchronous"
            return
        st.wants_step = False
        token = st.legacy_ready.pop(0)
        self._area_write(APF_REASON_OFFSET, REASON_PAGE_READY)
        m.emit("apf_page_ready", token=token, vector=int(Vector.PF), layout="legacy")
        if m.boundary.state.halted:
            # Old KVM made the vCPU runnable (kvm_arch_async_page_present).
            m.boundary.state.halted = False
            e.cycles += m.profile.event("hlt_wake")
            m.emit("wake", by="async_pf", vector=int(Vector.PF))
        m.deliver(Event.exception(Vector.PF, rip, 0, token), why="async #PF: page ready")

