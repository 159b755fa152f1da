"""KVM's paravirtual asynchronous page fault ("async #PF", APF), as a pure model of the host
side: the three MSRs, the shared area, the host's swapped-out pages and their tokens, the
injection decision and the page-ready hand-shake. Sources: Linux
arch/x86/include/uapi/asm/kvm_para.h, Documentation/virt/kvm/x86/msr.rst,
arch/x86/kernel/kvm.c (the guest) and arch/x86/kvm/x86.c (the host), and three LKML threads:
"[PATCH v2] x86/kvm: Disable KVM_ASYNC_PF_SEND_ALWAYS" (2020-03/04, the CR2/flags race),
"[PATCH 2/8] KVM: x86: extend struct kvm_vcpu_pv_apf_data with token info" (S. Christopherson,
2020-05-15: CR2 and NMIs) and "[RFC PATCH] kvm,x86: Exit to user space in case of page fault
error" (2020-06-30: failed page-ins).

What async #PF is
-----------------
A guest page the host has swapped out is not present in the EPT. Normally the vCPU then
waits for the host's disk inside a VM exit, and the whole guest CPU stalls. With async #PF
the host instead tells the guest "this page will take a while" and lets it run something
else: the guest kernel puts the faulting task to sleep on a *token* and schedules. When the
page is in, the host says "token N is ready", and the guest wakes the task, which retries
the access and now finds the page.

The protocol
------------
The guest enables it with `MSR_KVM_ASYNC_PF_EN` (0x4b564d02)::

    bits 63:6  guest-physical address of a 64-byte, 64-byte aligned area
    bits 5:4   reserved (a write with either set is refused: #GP(0))
    bit 3      DELIVERY_AS_INT       page-ready by interrupt (CPUID 0x40000001 bit 14)
    bit 2      DELIVERY_AS_PF_VMEXIT nested: async #PF of L2 as a #PF VM exit to L1 (bit 10)
    bit 1      SEND_ALWAYS           may inject at CPL 0 too (current Linux never sets it)
    bit 0      ENABLED

and names the page-ready vector in `MSR_KVM_ASYNC_PF_INT` (0x4b564d06; bits 7:0, bits 63:8
reserved), which it must write *before* enabling. The area, `struct kvm_vcpu_pv_apf_data`,
has two layouts (`layout=` chooses); "2020" is the one since V. Kuznetsov's series "KVM: x86:
Interrupt-based mechanism for async_pf 'page present' notifications" (LKML, 2020-05):

    "2020" (since that series, about v5.8)              "legacy" (before it)
    +0  u32 flags   host: 1 before page-not-present     +0  u32 reason  1 not present,
    +4  u32 token   host: the token at page-ready                       2 page ready
    +8  u8 pad[56]                                      +4  u8 pad[60]

(The guest keeps a private u32 `enabled` at +64, outside the 64 bytes the host shares.)

Page not present: the host writes 1 at +0 and injects a #PF with error code 0 and CR2 =
the token (a u32), a combination no real #PF produces. The guest's #PF entry
(`__kvm_handle_async_pf`) reads and clears the word at +0: 0 means an ordinary #PF, 1
means "sleep on token CR2". It panics if the host did this with IF=0 or at CPL 0.

Page ready (2020 layout): the host writes the token at +4 and raises a fixed APIC interrupt
on the vector from `MSR_KVM_ASYNC_PF_INT`. The guest (`sysvec_kvm_asyncpf_interrupt`) EOIs,
wakes the token, writes 0 at +4 and then writes 1 to `MSR_KVM_ASYNC_PF_ACK` (0x4b564d07).
The host delivers a page-ready only while the word at +4 is 0 and the local APIC is
enabled (`kvm_arch_can_dequeue_async_page_present`); otherwise it stops and waits. What
makes it look again is an ACK, or the next page-in completing (`kvm_check_async_pf_completion`
runs on KVM_REQ_APF_READY). So a handler that ACKs *before* zeroing the token leaves the
next notification stuck until some later page-in happens to complete: this model does the
same (`page_ready_to_deliver`). Token 0xFFFFFFFF means "wake everyone": KVM queues one
whenever the guest writes the enable MSR with bit 0 set and nothing is already queued
(`kvm_pv_enable_async_pf` -> `kvm_async_pf_wakeup_all`), so tasks left sleeping across a
disable/enable (or a kexec) are released. Writing bit 0 clear drops everything queued.

In the legacy layout both events were #PFs (page-ready: reason 2, CR2 = token). Current
KVM delivers no APF event at all without DELIVERY_AS_INT (msr.rst), which a legacy guest
never sets; this model follows current KVM, so with the legacy layout page-ready
notifications are dequeued and dropped, and only page-not-present (with its race, below)
can be exercised, under a policy that does not insist on DELIVERY_AS_INT ("always").

When the host injects (arch/x86/kvm/x86.c; `decide`, in this order, first failure wins)
-----------------------------------------------------------------------------------------
    kvm_can_do_async_pf          1. no exception pending or being re-injected
      (fails: the fault is       2. RFLAGS.IF = 1                (kvm_arch_interrupt_allowed,
       synchronous, a stall)     3. no STI / MOV-SS shadow        __vmx_interrupt_blocked)
    kvm_can_deliver_async_pf     4. APF enabled (bit 0)
      (fails: async page-in,     5. DELIVERY_AS_INT (bit 3): `kvm_pv_async_pf_enabled` tests
       "artificial halt" of         both bits 0 and 3 - UNCONFIRMED, its body was not read
       the vCPU until ready)     6. CPL != 0, unless SEND_ALWAYS
                                 7. paging on (CR0.PG); nested (L2) is not modelled
    policy "never-while-nmi-blocked" adds   8. NMIs not blocked

    policy                    checks
    "kvm"                     1-7 (KVM as it is)
    "kvm-send-always"         1-5, 7 (as if the guest had set SEND_ALWAYS)
    "never-while-nmi-blocked" 1-8 (the mitigation in the 2020-05-15 mail)
    "always"                  4 only: stress mode, IF/shadow/CPL/NMI/pending exceptions
                              and DELIVERY_AS_INT ignored (so legacy guests get #PFs too)
    "nmi-blocked-only"        4 and 8 only: a host whose one condition is NMI blocking,
                              to ask "would a host that only checks NMI blocking inject
                              here?" (the race explorer's `policy=nmi-blocked-only`)

Nothing in KVM looks at NMI blocking. The conditions protect the *guest's scheduler*: only
a context that may be preempted (interrupts on, user mode) can be put to sleep on a token.
NMI blocking is independent of IF, so code that runs with IF=1 while NMIs are blocked (an
NMI handler after an STI, or entered through a trap gate) passes every check and can be
handed an async #PF (`kvm_can_do_async_pf`, `kvm_can_deliver_async_pf`). The race below
needs even less: the #PF is injected first and the NMI arrives in its window.

The CR2/flags race (Lutomirski, LKML 2020-03; Christopherson, LKML 2020-05-15)
------------------------------------------------------------------------------
    1. the host injects async #PF: flags := 1, CR2 := token; the #PF entry starts
    2. before it reads CR2 and flags, an NMI arrives (#PF delivery does not block NMIs)
    3. the NMI handler touches user memory and takes a real #PF: CR2 := its address,
       and that handler reads (and clears) flags = 1, meant for the outer one
    4. the outer #PF resumes with flags = 0 and CR2 = the inner address (or the token, if
       the NMI path restores CR2 as Linux does): no order of the two reads is safe
The error code is safe (it is on the stack); CR2 and the flags word are not. Christopherson
notes (2020-05-15) the simple case is avoidable by not injecting while NMIs are blocked,
but an IRET from a #DB inside the NMI handler unblocks NMIs early (the #PF->NMI->#DB->#PF
chain: UNCONFIRMED as a named scenario). Hence policy "never-while-nmi-blocked".

Failed page-ins (LKML, 2020-06-30)
----------------------------------
A page-in can fail on the host (a truncated file behind virtiofs, say). The guest still
gets its page-ready, retries, and would be sent down the async path again, for ever. The
thread's fixes remember the "error gfn" and handle the next fault on it synchronously.
`swap_out(..., fail=True)` makes every page-in of those pages fail: the page stays swapped,
its page-ready is still queued, and `SwapState.failed_page_ins` counts the failures, which
is what the machine needs to implement the error-gfn rule (or to watch the loop happen).

What is not here
----------------
Writing the area, injecting the #PF or raising the interrupt, and the vCPU stall or halt:
cpu/machine.py. Nested delivery (DELIVERY_AS_PF_VMEXIT is stored, never acted on). KVM's
CPUID gating of bits 2 and 3 (the model always advertises the features) and its check that
the area GPA is backed by memory (the machine's). Real tokens are `(counter << 12) |
vcpu_id`; here they are 1, 2, 3... (opaque to the guest either way). Time is the machine's
cycle counter, passed in as `now`; an earlier `now` than one already seen reads as the
latest, as in cpu/devices/apic.py. Everything is integer arithmetic in a fixed order.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from cpu.errors import Unsupported

# MSRs (LNX arch/x86/include/uapi/asm/kvm_para.h; msr.rst).
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_ASYNC_PF_INT = 0x4B564D06
MSR_KVM_ASYNC_PF_ACK = 0x4B564D07

# CPUID: the hypervisor leaves and the feature bits of 0x40000001 EAX.
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_ASYNC_PF = 4
KVM_FEATURE_ASYNC_PF_VMEXIT = 10
KVM_FEATURE_ASYNC_PF_INT = 14
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"  # EBX, ECX, EDX of leaf 0x40000000

# MSR_KVM_ASYNC_PF_EN bits.
APF_ENABLED = 1 << 0
APF_SEND_ALWAYS = 1 << 1
APF_DELIVERY_AS_PF_VMEXIT = 1 << 2
APF_DELIVERY_AS_INT = 1 << 3
APF_EN_RESERVED = 0x30  # bits 5:4
APF_EN_GPA_MASK = ~0x3F & 0xFFFFFFFFFFFFFFFF  # bits 63:6
APF_INT_VECTOR_MASK = 0xFF  # MSR_KVM_ASYNC_PF_INT bits 7:0; 63:8 reserved
APF_ACK_BIT = 1 << 0

# Reasons (the value written at +0) and the broadcast token.
REASON_PAGE_NOT_PRESENT = 1
REASON_PAGE_READY = 2
WAKE_ALL_TOKEN = 0xFFFFFFFF

# The shared area, both layouts (struct kvm_vcpu_pv_apf_data, arch/x86/include/uapi/asm/kvm_para.h).
APF_FLAGS_OFFSET = 0  # "2020": u32 flags
APF_TOKEN_OFFSET = 4  # "2020": u32 token
APF_REASON_OFFSET = 0  # "legacy": u32 reason
APF_AREA_SIZE = 64  # the host-shared part; the guest's `enabled` word follows at +64
LAYOUTS = ("2020", "legacy")

# The policies of KVM as it is and of the fixes discussed (the policy x design matrix of
# idtlab/apf_matrix.py compares exactly these) ...
POLICIES = ("kvm", "kvm-send-always", "never-while-nmi-blocked", "always")
# ... and every policy `decide` knows: those, plus hosts that exist only to ask a question.
# "nmi-blocked-only" checks nothing but NMI blocking (and that APF is enabled): "would a
# host that only checks NMI blocking inject here?" (the 2020-05-15 mail).
HOST_POLICIES = (*POLICIES, "nmi-blocked-only")

PAGE_SIZE = 0x1000
FIRST_APIC_VECTOR = 16  # vectors 0-15 are illegal for a fixed APIC interrupt
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

_MSR_NAMES = {
    MSR_KVM_ASYNC_PF_EN: "MSR_KVM_ASYNC_PF_EN",
    MSR_KVM_ASYNC_PF_INT: "MSR_KVM_ASYNC_PF_INT",
    MSR_KVM_ASYNC_PF_ACK: "MSR_KVM_ASYNC_PF_ACK",
}

# The reasons `decide` gives, in the order it checks them (module docstring, steps 1-8).
WHY_ALLOWED = "allowed"
WHY_EXCEPTION_PENDING = "an exception is pending"
WHY_IF_CLEAR = "RFLAGS.IF=0"
WHY_SHADOW = "STI/MOV-SS interrupt shadow"
WHY_APF_DISABLED = "async #PF not enabled (MSR_KVM_ASYNC_PF_EN bit 0)"
WHY_NO_DELIVERY_AS_INT = ("DELIVERY_AS_INT clear (MSR_KVM_ASYNC_PF_EN bit 3): current KVM "
                          "delivers no APF event without it (UNCONFIRMED)")
WHY_CPL0 = "CPL 0 without SEND_ALWAYS"
WHY_PAGING_OFF = "paging off (CR0.PG=0)"
WHY_NMI_BLOCKED = "NMIs blocked"

# What KVM does instead when each check fails (Decision.outcome).
_SYNCHRONOUS = frozenset({WHY_EXCEPTION_PENDING, WHY_IF_CLEAR, WHY_SHADOW})


class ApfMsrError(Exception):
    """A write to an async-#PF MSR that KVM refuses; the machine raises #GP(0). The message
    names the MSR and the offending bits."""

    def __init__(self, msr: int, value: int, bits: int, what: str) -> None:
        self.msr = msr
        self.value = value
        self.bits = bits
        super().__init__(f"{_MSR_NAMES[msr]} ({msr:#x}): write of {value:#x} sets {what} "
                         f"({bits:#x}); KVM refuses it with #GP(0)")


class ApfUnsupported(Unsupported):
    """An async-#PF situation idtlab does not model. The message names it."""


def cpuid(leaf: int, *, apf_features: bool = True) -> tuple[int, int, int, int] | None:
    """EAX, EBX, ECX, EDX of KVM's hypervisor CPUID leaves; None for any other leaf.

    0x40000000: the highest hypervisor leaf (0x40000001) and "KVMKVMKVM\\0\\0\\0".
    0x40000001: EAX = the async-#PF feature bits 4, 10 and 14 when `apf_features`, else 0.
    No other KVM feature is advertised: the machine implements no other PV interface, and
    a guest that saw, say, the kvmclock bit would program MSRs nobody answers."""
    if leaf == KVM_CPUID_SIGNATURE:
        ebx, ecx, edx = (int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))
        return KVM_CPUID_FEATURES, ebx, ecx, edx
    if leaf == KVM_CPUID_FEATURES:
        eax = 0
        if apf_features:
            eax = ((1 << KVM_FEATURE_ASYNC_PF) | (1 << KVM_FEATURE_ASYNC_PF_VMEXIT)
                   | (1 << KVM_FEATURE_ASYNC_PF_INT))
        return eax, 0, 0, 0
    return None


@dataclass(frozen=True)
class GuestState:
    """Everything the host looks at when a guest access hits a swapped-out page.

    `exception_pending` covers KVM's "exception pending or injected" and "event needs
    re-injection" (an event whose delivery was cut short by the very fault). `shadow` is
    the STI or MOV-SS interrupt shadow. `paging` is CR0.PG."""

    apf_enabled: bool
    send_always: bool
    delivery_as_int: bool
    if_flag: bool
    shadow: bool
    exception_pending: bool
    cpl: int
    nmi_blocked: bool
    paging: bool

    def __post_init__(self) -> None:
        if self.cpl not in (0, 1, 2, 3):
            raise ValueError(f"GuestState: CPL {self.cpl!r} is not 0, 1, 2 or 3")


@dataclass(frozen=True)
class Decision:
    """Whether the host injects a page-not-present #PF; `reason` is the first failing
    condition (one of the WHY_* strings) or "allowed"."""

    inject: bool
    reason: str

    @property
    def outcome(self) -> str:
        """"inject"; "synchronous" (kvm_can_do_async_pf failed: the vCPU simply waits for
        the page, the guest sees a long access); or "halt" (kvm_can_deliver_async_pf
        failed: the page-in is async but the vCPU is halted until it completes, and an
        interrupt still wakes it to be delivered). The mitigation's NMI check would live
        in kvm_can_deliver_async_pf, so "NMIs blocked" halts."""
        if self.inject:
            return "inject"
        return "synchronous" if self.reason in _SYNCHRONOUS else "halt"


def decide(policy: str, g: GuestState) -> Decision:
    """May the host inject a page-not-present #PF now, under `policy` (HOST_POLICIES)? The
    checks and their fixed order are the table in the module docstring.

        >>> g = GuestState(apf_enabled=True, send_always=False, delivery_as_int=True,
        ...                if_flag=False, shadow=False, exception_pending=False, cpl=0,
        ...                nmi_blocked=False, paging=True)
        >>> decide("kvm", g)
        Decision(inject=False, reason='RFLAGS.IF=0')
        >>> decide("nmi-blocked-only", g)
        Decision(inject=True, reason='allowed')
    """
    if policy not in HOST_POLICIES:
        raise ValueError(f"unknown async-#PF policy {policy!r}; known: {', '.join(HOST_POLICIES)}")
    if policy == "always":
        return Decision(True, WHY_ALLOWED) if g.apf_enabled else Decision(False, WHY_APF_DISABLED)
    if policy == "nmi-blocked-only":
        if not g.apf_enabled:
            return Decision(False, WHY_APF_DISABLED)
        return Decision(False, WHY_NMI_BLOCKED) if g.nmi_blocked else Decision(True, WHY_ALLOWED)
    checks = (
        (g.exception_pending, WHY_EXCEPTION_PENDING),
        (not g.if_flag, WHY_IF_CLEAR),
        (g.shadow, WHY_SHADOW),
        (not g.apf_enabled, WHY_APF_DISABLED),
        (not g.delivery_as_int, WHY_NO_DELIVERY_AS_INT),
        (g.cpl == 0 and not (g.send_always or policy == "kvm-send-always"), WHY_CPL0),
        (not g.paging, WHY_PAGING_OFF),
        (g.nmi_blocked and policy == "never-while-nmi-blocked", WHY_NMI_BLOCKED),
    )
    for failed, why in checks:
        if failed:
            return Decision(False, why)
    return Decision(True, WHY_ALLOWED)


@dataclass(frozen=True)
class SwapState:
    """One swapped-out guest page as the host sees it. `token` and `ready_at` are set
    while a page-in is in flight; `failed_page_ins` counts page-ins that completed and
    failed (the page is then still swapped; LKML "[RFC PATCH] kvm,x86: Exit to user space in
    case of page fault error", 2020-06-30)."""

    latency: int
    fail: bool
    token: int | None
    ready_at: int | None
    failed_page_ins: int = 0


@dataclass
class _Page:
    latency: int
    fail: bool
    token: int | None = None
    failures: int = 0


@dataclass(frozen=True)
class _PageIn:
    page: int
    ready_at: int
    notify: bool  # the guest was given the token (KVM: work->notpresent_injected)
    epoch: int  # the enablement it belongs to; a disable orphans it


def _page(gpa: int) -> int:
    if not 0 <= gpa <= _U64:
        raise ValueError(f"guest-physical address {gpa:#x} does not fit in 64 bits")
    return gpa & ~(PAGE_SIZE - 1)


class AsyncPf:
    """The host side of async #PF for the one vCPU.

    The machine's recipe. RDMSR/WRMSR of an MSR `handles` says yes go to `rdmsr`/`wrmsr`
    (an ApfMsrError becomes #GP(0)). A guest access to a page `is_swapped` says is out:
    build a GuestState (`guest_state`) and `decide`. On "inject": `start_page_in`, write
    REASON_PAGE_NOT_PRESENT as a u32 at `flags_gpa`, inject #PF with error code 0 and CR2 =
    the token. Otherwise `start_page_in(..., notify=False)` and stall ("synchronous") or
    halt ("halt") until `next_ready`. A page already in flight (`swap_state(gpa).token`)
    is KVM's repeated fault: halt, do not start another. Stop at `next_ready` and call
    `complete_due`; at every instruction boundary (KVM: each VM entry) read the u32 at
    `token_gpa` and ask `page_ready_to_deliver`; on a token, write it there, set the APF
    vector in the APIC's IRR, and call `delivered(token)`."""

    def __init__(self, *, layout: str = "2020", policy: str = "kvm") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown async-#PF area layout {layout!r}; known: {', '.join(LAYOUTS)}")
        if policy not in HOST_POLICIES:
            raise ValueError(f"unknown async-#PF policy {policy!r}; known: {', '.join(HOST_POLICIES)}")
        self.layout = layout
        self.policy = policy
        self._en = 0  # MSR_KVM_ASYNC_PF_EN as written
        self._int: int | None = None  # MSR_KVM_ASYNC_PF_INT as written; None: never
        self._pages: dict[int, _Page] = {}  # swapped-out pages by page address
        self._in_flight: dict[int, _PageIn] = {}  # by token
        self._ready: deque[int] = deque()  # tokens awaiting page-ready (KVM's done list)
        self._requested = False  # KVM_REQ_APF_READY: the host will look at _ready
        self._next_token = 1
        self._epoch = 0
        self._now = 0

    # ----- MSRs --------------------------------------------------------------------------

    @staticmethod
    def handles(msr: int) -> bool:
        """True for the three async-#PF MSRs."""
        return msr in _MSR_NAMES

    def rdmsr(self, msr: int) -> int:
        """The MSR's value: EN and INT as last written (0 from reset), ACK always 0."""
        if msr == MSR_KVM_ASYNC_PF_EN:
            return self._en
        if msr == MSR_KVM_ASYNC_PF_INT:
            return self._int or 0
        if msr == MSR_KVM_ASYNC_PF_ACK:
            return 0
        raise ValueError(f"async #PF: rdmsr({msr:#x}) is not one of its MSRs (ask handles() first)")

    def wrmsr(self, msr: int, value: int, now: int) -> None:
        """A guest WRMSR at cycle `now`. Raises ApfMsrError where KVM answers #GP(0): EN
        bits 5:4, INT bits 63:8, ACK bits 63:1. (KVM itself ignores ACK bits 63:1: the
        MSR_KVM_ASYNC_PF_ACK case of `kvm_set_msr_common`, arch/x86/kvm/x86.c, tests only
        bit 0; refusing them catches a handler that writes garbage.) Nothing is changed by a
        refused write."""
        if not 0 <= value <= _U64:
            raise ValueError(f"async #PF: wrmsr value {value:#x} does not fit in 64 bits")
        self._advance_clock(now)
        if msr == MSR_KVM_ASYNC_PF_EN:
            self._write_en(value)
        elif msr == MSR_KVM_ASYNC_PF_INT:
            if value & ~APF_INT_VECTOR_MASK:
                raise ApfMsrError(msr, value, value & ~APF_INT_VECTOR_MASK, "reserved bits 63:8")
            self._int = value
        elif msr == MSR_KVM_ASYNC_PF_ACK:
            if value & ~APF_ACK_BIT:
                raise ApfMsrError(msr, value, value & ~APF_ACK_BIT, "reserved bits 63:1")
            if value & APF_ACK_BIT:
                self.ack()
        else:
            raise ValueError(f"async #PF: wrmsr({msr:#x}) is not one of its MSRs (ask handles() first)")

    def _write_en(self, value: int) -> None:
        """`kvm_pv_enable_async_pf`: bits 5:4 refused; bit 0 clear disables, which drops
        every queued page-ready and orphans the page-ins in flight (they still complete,
        silently); bit 0 set (a first enable or a rewrite) queues a wake-all unless
        something is queued already (`kvm_async_pf_wakeup_all` returns early then)."""
        if value & APF_EN_RESERVED:
            raise ApfMsrError(MSR_KVM_ASYNC_PF_EN, value, value & APF_EN_RESERVED, "reserved bits 5:4")
        self._en = value
        if not value & APF_ENABLED:
            self._ready.clear()
            self._requested = False
            self._epoch += 1
            return
        if not self._ready:
            self._ready.append(WAKE_ALL_TOKEN)
            self._requested = True

    def ack(self) -> None:
        """MSR_KVM_ASYNC_PF_ACK bit 0: the guest has consumed the token (and should have
        zeroed the slot first). The host looks at its queue again at the next
        `page_ready_to_deliver`."""
        self._requested = True

    @property
    def enabled(self) -> bool:
        return bool(self._en & APF_ENABLED)

    @property
    def send_always(self) -> bool:
        return bool(self._en & APF_SEND_ALWAYS)

    @property
    def delivery_as_int(self) -> bool:
        return bool(self._en & APF_DELIVERY_AS_INT)

    @property
    def delivery_as_pf_vmexit(self) -> bool:
        """Stored only: nested guests are not modelled."""
        return bool(self._en & APF_DELIVERY_AS_PF_VMEXIT)

    @property
    def area_gpa(self) -> int | None:
        """Guest-physical address of the shared area (EN bits 63:6); None while disabled."""
        return self._en & APF_EN_GPA_MASK if self.enabled else None

    @property
    def flags_gpa(self) -> int | None:
        """Where the host writes REASON_PAGE_NOT_PRESENT (u32) before a page-not-present #PF:
        `flags` (2020) or `reason` (legacy), both at +0. None while disabled."""
        area = self.area_gpa
        return None if area is None else area + APF_FLAGS_OFFSET

    @property
    def token_gpa(self) -> int | None:
        """The page-ready token slot (+4, 2020 layout). None while disabled or legacy."""
        area = self.area_gpa
        return None if area is None or self.layout != "2020" else area + APF_TOKEN_OFFSET

    @property
    def vector(self) -> int | None:
        """The page-ready vector (MSR_KVM_ASYNC_PF_INT bits 7:0); None if never written."""
        return None if self._int is None else self._int & APF_INT_VECTOR_MASK

    # ----- the injection decision --------------------------------------------------------

    def guest_state(self, *, if_flag: bool, shadow: bool, exception_pending: bool, cpl: int,
                    nmi_blocked: bool, paging: bool) -> GuestState:
        """A GuestState with the APF fields taken from MSR_KVM_ASYNC_PF_EN."""
        return GuestState(apf_enabled=self.enabled, send_always=self.send_always,
                          delivery_as_int=self.delivery_as_int, if_flag=if_flag, shadow=shadow,
                          exception_pending=exception_pending, cpl=cpl, nmi_blocked=nmi_blocked,
                          paging=paging)

    def decide(self, g: GuestState) -> Decision:
        """`decide(self.policy, g)`."""
        return decide(self.policy, g)

    # ----- swapped-out pages -------------------------------------------------------------

    def swap_out(self, gpa: int, size: int, *, latency: int, fail: bool = False) -> None:
        """The host swaps out every 4-KiB page that [gpa, gpa + size) touches; a page-in
        will take `latency` cycles, and fail if `fail`. A page already swapped takes the new
        latency and fail flag; one with a page-in in flight is refused (ValueError), and
        then nothing changes."""
        if size <= 0:
            raise ValueError(f"async #PF: swap_out size must be positive, not {size}")
        if latency < 0:
            raise ValueError(f"async #PF: swap_out latency must be >= 0 cycles, not {latency}")
        first, last = _page(gpa), _page(gpa + size - 1)
        pages = range(first, last + PAGE_SIZE, PAGE_SIZE)
        for page in pages:
            busy = self._pages.get(page)
            if busy is not None and busy.token is not None:
                raise ValueError(f"async #PF: cannot swap out page {page:#x}: its page-in "
                                 f"(token {busy.token:#x}) is in flight")
        for page in pages:
            self._pages[page] = _Page(latency=latency, fail=fail)

    def is_swapped(self, gpa: int) -> bool:
        """True while the page holding `gpa` is out (including during its page-in)."""
        return _page(gpa) in self._pages

    def swap_state(self, gpa: int) -> SwapState | None:
        """The page holding `gpa`, or None if it is resident."""
        p = self._pages.get(_page(gpa))
        if p is None:
            return None
        ready_at = None if p.token is None else self._in_flight[p.token].ready_at
        return SwapState(latency=p.latency, fail=p.fail, token=p.token, ready_at=ready_at,
                         failed_page_ins=p.failures)

    def start_page_in(self, gpa: int, now: int, *, notify: bool = True) -> int:
        """Begin paging in the swapped page holding `gpa` at cycle `now`: allocate a token
        (1, 2, 3...; never 0 or 0xFFFFFFFF, never one still in flight or queued) and
        complete at now + latency. `notify` says the guest was given the token (a
        page-not-present #PF was injected); without it the completion queues no page-ready
        (KVM only notifies for `notpresent_injected` work). ValueError if the page is
        resident or already being paged in (KVM's "repeated fault": halt instead)."""
        page = _page(gpa)
        p = self._pages.get(page)
        if p is None:
            raise ValueError(f"async #PF: page {page:#x} is not swapped out")
        if p.token is not None:
            raise ValueError(f"async #PF: page {page:#x} is already being paged in (token "
                             f"{p.token:#x}, ready at cycle {self._in_flight[p.token].ready_at})")
        now = self._advance_clock(now)
        token = self._allocate_token()
        p.token = token
        self._in_flight[token] = _PageIn(page=page, ready_at=now + p.latency, notify=notify,
                                         epoch=self._epoch)
        return token

    def _allocate_token(self) -> int:
        in_use = self._in_flight.keys() | set(self._ready)
        token = self._next_token
        for _ in itertools.repeat(None, WAKE_ALL_TOKEN):
            if token in (0, WAKE_ALL_TOKEN):
                token = 1
            if token not in in_use:
                self._next_token = token + 1
                return token
            token += 1
        raise ApfUnsupported("async #PF: every token 1..0xfffffffe is in use")

    def next_ready(self) -> int | None:
        """The cycle of the earliest page-in completion not yet reported by `complete_due`."""
        return min((w.ready_at for w in self._in_flight.values()), default=None)

    def complete_due(self, now: int) -> list[tuple[int, int]]:
        """Every page-in done by cycle `now`, as (page address, token), in completion order
        (ready_at, then token: equal to token order for page-ins that complete together).
        A page that paged in is resident again; one whose page-in failed stays swapped,
        with no token and one more `failed_page_ins`. Either way the token is queued for
        page-ready if the guest was given it and APF has not been disabled since."""
        now = self._advance_clock(now)
        due = sorted((w.ready_at, token) for token, w in self._in_flight.items() if w.ready_at <= now)
        done: list[tuple[int, int]] = []
        for _, token in due:
            work = self._in_flight.pop(token)
            p = self._pages[work.page]
            if p.fail:
                p.token = None
                p.failures += 1
            else:
                del self._pages[work.page]
            if work.notify and work.epoch == self._epoch:
                self._ready.append(token)
                self._requested = True
            done.append((work.page, token))
        return done

    # ----- page-ready --------------------------------------------------------------------

    def page_ready_to_deliver(self, token_slot: int, *, apic_enabled: bool = True) -> int | None:
        """KVM's `kvm_check_async_pf_completion`, at a VM entry: the next queued token if
        the host is looking (a page-in completed, the guest ACKed, or APF was enabled,
        since it last found it could not deliver), the guest's token slot (`token_slot`,
        the u32 at `token_gpa`) is 0, and the local APIC is software-enabled. Else None.

        Finding the slot busy or the APIC disabled ends the look (KVM's loop stops): the
        queue then waits for the next ACK or completion, even if the guest zeroes the slot
        in between. With the legacy layout, or with DELIVERY_AS_INT clear, the queue is
        dequeued and dropped, as current KVM does (module docstring). A queued token with
        a page-ready vector below 16 (including MSR_KVM_ASYNC_PF_INT never written: KVM
        would inject vector 0) raises ApfUnsupported. The caller writes the token, raises
        the interrupt and calls `delivered(token)`."""
        if not 0 <= token_slot <= _U32:
            raise ValueError(f"async #PF: token slot value {token_slot:#x} does not fit in 32 bits")
        if not self._requested:
            return None
        if not self._ready:
            self._requested = False
            return None
        if self.layout != "2020" or not (self.enabled and self.delivery_as_int):
            self._ready.clear()
            self._requested = False
            return None
        if token_slot != 0 or not apic_enabled:
            self._requested = False
            return None
        vector = self.vector
        if vector is None or vector < FIRST_APIC_VECTOR:
            raise ApfUnsupported(
                f"async #PF: page-ready for token {self._ready[0]:#x} on vector "
                f"{vector or 0:#04x} (MSR_KVM_ASYNC_PF_INT = {self._int or 0:#x}"
                f"{'' if self._int is not None else ', never written'}): vectors 0-15 are "
                f"illegal for a fixed APIC interrupt and the ESR error is not modelled")
        return self._ready[0]

    def delivered(self, token: int) -> None:
        """The machine wrote `token` (the one `page_ready_to_deliver` returned) to the slot
        and raised the interrupt: it leaves the queue. The host keeps looking, and finds
        the slot busy until the guest zeroes it."""
        if not self._ready or self._ready[0] != token:
            head = f"{self._ready[0]:#x}" if self._ready else "nothing"
            raise ValueError(f"async #PF: delivered({token:#x}) but the next page-ready is {head}")
        self._ready.popleft()

    @property
    def pending_page_ready(self) -> tuple[int, ...]:
        """Tokens queued for page-ready, in delivery order."""
        return tuple(self._ready)

    @property
    def page_ready_requested(self) -> bool:
        """True if the host will look at its queue at the next `page_ready_to_deliver`."""
        return self._requested

    def _advance_clock(self, now: int) -> int:
        """Time never goes back: an earlier `now` is read as the latest one seen."""
        if now > self._now:
            self._now = now
        return self._now
