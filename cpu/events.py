"""The vocabulary of asynchronous events and of the points where they arrive.

An *asynchronous event* is something outside the instruction stream that becomes pending
at an instruction boundary: an NMI, a maskable interrupt through the local APIC's IRR, a
KVM async page fault, or the host taking a page's EPT access away. An *injection point*
says at which boundary it arrives. Arrival is not delivery: once pending, the blocking
rules (`idt.blocking`: NMI blocking, IF, the STI/MOV-SS shadows, the APIC's priority)
decide when the event is delivered, and the trace says whether it was delivered, latched,
dropped or held.

Every front end builds these objects through the functions here, so the rules and the
messages exist once: the scenario loader (`[[inject]]`), the explorer's `--event`, the
Python API (`Machine.inject`). A bad value raises `ValueError` (from the constructors)
or `BadInput` (from `parse_event`, the command-line spelling) with a message that says
what is allowed.

    >>> parse_event("interrupt:0x40")
    Interrupt(vector=64)
    >>> Before("pf_handler", hit=2)
    Before(address='pf_handler', hit=2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from cpu.devices.apf import HOST_POLICIES
from cpu.errors import BadInput


class EventKind(StrEnum):
    """The kinds of asynchronous event, as scenario files and the trace spell them."""

    NMI = "nmi"
    INTERRUPT = "interrupt"
    ASYNC_PF = "async_pf"
    EPT_REVOKE = "ept_revoke"


@dataclass(frozen=True)
class Nmi:
    """A non-maskable interrupt (vector 2) arrives at the CPU's NMI pin.

        >>> Nmi().text
        'nmi'
    """

    kind: ClassVar[EventKind] = EventKind.NMI

    @property
    def text(self) -> str:
        return "nmi"


@dataclass(frozen=True)
class Interrupt:
    """A fixed interrupt with `vector` (16..255) arrives at the local APIC (its IRR bit
    is set; the APIC's priority and IF decide when it is delivered).

        >>> Interrupt(0x30).text
        'interrupt:0x30'
    """

    vector: int
    kind: ClassVar[EventKind] = EventKind.INTERRUPT

    def __post_init__(self) -> None:
        if not isinstance(self.vector, int) or not 16 <= self.vector <= 255:
            raise ValueError(f"an interrupt needs a vector in 16..255, not {self.vector!r}")

    @property
    def text(self) -> str:
        return f"interrupt:{self.vector:#x}"


# How a host event asks the host (`AsyncPf.policy`, `EptRevoke.policy`): None forces it
# (the host does it whatever its policy says); "host" asks the machine's own policy; an
# async-#PF policy name (cpu.devices.apf.HOST_POLICIES) asks that policy; a callable
# `(machine, GuestState) -> Decision` is a Python policy (cpu/apf_host.py). A front end
# turns a "FILE.py:function" or "module:function" spelling into the callable.
HOST = "host"
PolicyRef = str | Callable[..., Any] | None


def policy_text(policy: PolicyRef) -> str:
    """How a policy is spelled in an event's text and in the trace.

        >>> policy_text("kvm"), policy_text(None)
        ('kvm', 'forced')
    """
    if policy is None:
        return "forced"
    if isinstance(policy, str):
        return policy
    return str(getattr(policy, "__qualname__", None) or getattr(policy, "__name__", "callback"))


@dataclass(frozen=True)
class AsyncPf:
    """The host injects a KVM async page fault ("page not present"): with `gpa` (a page
    the host swapped out) it starts that page's page-in and the #PF carries the host's
    token (a "page ready" follows); with only `token`, CR2 = token.

    `policy` (see `PolicyRef`): None forces the injection (a scenario's `[[inject]]`, the
    explorer's `--force`); otherwise the host asks that policy at the point and injects
    only if it allows (the trace says `host_declines` otherwise). Where the event cannot
    apply at all (`gpa` is not swapped out there, or its page-in is already in flight)
    nothing is injected either way.

        >>> AsyncPf(gpa=0x300000).text
        'async_pf:gpa=0x300000'
        >>> AsyncPf(gpa=0x300000, policy="nmi-blocked-only").text
        'async_pf:gpa=0x300000,policy=nmi-blocked-only'
    """

    gpa: int | None = None
    token: int | None = None
    policy: PolicyRef = None
    kind: ClassVar[EventKind] = EventKind.ASYNC_PF

    def __post_init__(self) -> None:
        if self.token is None and self.gpa is None:
            raise ValueError("an async_pf needs a token (CR2) or a swapped-out gpa")
        if self.token is not None and not 0 < self.token < 0xFFFFFFFF:
            raise ValueError(f"an async_pf token must be in 1..0xfffffffe, not {self.token:#x}")
        if isinstance(self.policy, str) and self.policy != HOST \
                and self.policy not in HOST_POLICIES and ":" not in self.policy:
            raise ValueError(f"unknown async-#PF policy {self.policy!r} (known: host, "
                             f"{', '.join(HOST_POLICIES)}, or FILE.py:FUNCTION)")

    @property
    def text(self) -> str:
        what = f"gpa={self.gpa:#x}" if self.gpa is not None else f"token={self.token}"
        return f"async_pf:{what}" + ("" if self.policy is None
                                     else f",policy={policy_text(self.policy)}")


@dataclass(frozen=True)
class EptRevoke:
    """The host makes the EPT entry of guest-physical page `gpa` not present with
    suppress-#VE clear: the guest's next access to it is an EPT violation.

    `policy`: None forces it; "host" revokes only a page the guest can still access (a
    host takes away what is there: revoking a page that has no access already changes
    nothing, and the trace says `host_declines`). A host has no other condition: it may
    migrate or convert a page at any moment.

        >>> EptRevoke(0x300000).text
        'ept_revoke:0x300000'
    """

    gpa: int
    policy: PolicyRef = None
    kind: ClassVar[EventKind] = EventKind.EPT_REVOKE

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy != HOST:
            raise ValueError(f"an ept_revoke's only policy is 'host', not {self.policy!r}")

    @property
    def text(self) -> str:
        return f"ept_revoke:{self.gpa:#x}" + ("" if self.policy is None
                                              else f",policy={policy_text(self.policy)}")


AsyncEvent = Nmi | Interrupt | AsyncPf | EptRevoke


def make_event(kind: str, *, vector: int | None = None, token: int | None = None,
               gpa: int | None = None, policy: PolicyRef = None) -> AsyncEvent:
    """The event of `kind` with its arguments; `ValueError` for an unknown kind, a
    missing argument, or an argument that kind does not take."""
    if kind not in EventKind.__members__.values():
        raise ValueError(f"unknown event {kind!r} (known: {', '.join(EventKind)})")
    if vector is not None and kind != EventKind.INTERRUPT:
        raise ValueError(f"an {kind} has no vector")
    if token is not None and kind != EventKind.ASYNC_PF:
        raise ValueError("a token belongs to an async_pf")
    if gpa is not None and kind not in (EventKind.ASYNC_PF, EventKind.EPT_REVOKE):
        raise ValueError("a gpa belongs to an async_pf or an ept_revoke")
    if policy is not None and kind not in (EventKind.ASYNC_PF, EventKind.EPT_REVOKE):
        raise ValueError("a policy belongs to a host event (an async_pf or an ept_revoke)")
    if kind == EventKind.NMI:
        return Nmi()
    if kind == EventKind.INTERRUPT:
        if vector is None:
            raise ValueError("an interrupt needs a vector in 16..255, not None")
        return Interrupt(vector)
    if kind == EventKind.ASYNC_PF:
        return AsyncPf(gpa=gpa, token=token, policy=policy)
    if gpa is None:
        raise ValueError("an ept_revoke needs the gpa of the page it revokes")
    return EptRevoke(gpa, policy=policy)


EVENT_FORMS = ("nmi, interrupt:VECTOR, async_pf:gpa=ADDR, async_pf:token=N, ept_revoke:GPA "
               "(host events take ,policy=NAME)")


def parse_event(text: str) -> AsyncEvent:
    """An event in its command-line spelling (`EVENT_FORMS`); `BadInput` otherwise. A host
    event (async_pf, ept_revoke) may name the policy to ask after a comma
    (`async_pf:gpa=0x400000,policy=nmi-blocked-only`); without one it is forced (the
    race explorer asks the scenario's policy unless told `--force`).

        >>> parse_event("async_pf:token=7")
        AsyncPf(gpa=None, token=7, policy=None)
        >>> parse_event("async_pf:gpa=0x400000,policy=kvm").policy
        'kvm'
    """
    head, _, rest = text.partition(":")
    kind, *head_options = head.split(",")
    where = f"--event {text!r}"
    if kind not in EventKind.__members__.values():
        raise BadInput(f"{where}: unknown event (known: {EVENT_FORMS})")
    arg, *options = rest.split(",") if rest else [""]
    options = head_options + options
    policy: str | None = None
    for option in options:
        key, eq, value = option.partition("=")
        if key != "policy" or not eq or not value:
            raise BadInput(f"{where}: {option!r} is not an option of an event (only "
                           "policy=NAME, for async_pf and ept_revoke)")
        if kind not in (EventKind.ASYNC_PF, EventKind.EPT_REVOKE):
            raise BadInput(f"{where}: only host events (async_pf, ept_revoke) take a policy")
        policy = value

    def number(s: str, what: str) -> int:
        try:
            return int(s, 0)
        except ValueError:
            raise BadInput(f"{where}: {what} {s!r} is not a number") from None

    try:
        if kind == EventKind.NMI:
            if arg:
                raise BadInput(f"{where}: an NMI takes no argument")
            return Nmi()
        if kind == EventKind.INTERRUPT:
            vector = number(arg, "vector") if arg else -1
            if not 16 <= vector <= 255:
                raise BadInput(f"{where}: give the vector, 16..255 (interrupt:0x40)")
            return Interrupt(vector)
        if kind == EventKind.ASYNC_PF:
            key, eq, value = arg.partition("=")
            if not eq or key not in ("gpa", "token"):
                raise BadInput(f"{where}: give the swapped page or the token "
                               "(async_pf:gpa=0x300000 or async_pf:token=7)")
            n = number(value, key)
            return AsyncPf(gpa=n, policy=policy) if key == "gpa" else \
                AsyncPf(token=n, policy=policy)
        if not arg:
            raise BadInput(f"{where}: give the guest-physical page (ept_revoke:0x300000)")
        return EptRevoke(number(arg, "gpa"), policy=policy)
    except ValueError as exc:
        raise BadInput(f"{where}: {exc}") from None


# -- injection points --------------------------------------------------------------------
# Ports whose writes are injection points (`AtPort`): name -> port (pc-testdev's
# flush-page port; QEMU hw/misc/pc-testdev.c).
PORT_POINTS = {"flush_page": 0xE4}


@dataclass(frozen=True)
class Before:
    """Pending when execution reaches `address` (or a symbol) for the `hit`-th time,
    before that instruction executes. A boundary re-entered after a stop there is not a
    new arrival; a return to it by IRET is.

        >>> Before("nmi_handler", hit=2)
        Before(address='nmi_handler', hit=2)
    """

    address: int | str
    hit: int = 1

    def __post_init__(self) -> None:
        if self.hit < 1:
            raise ValueError(f"hit must be >= 1, not {self.hit}")


@dataclass(frozen=True)
class AtIcount:
    """Pending once `icount` instructions have retired.

        >>> AtIcount(57)
        AtIcount(icount=57)
    """

    icount: int


@dataclass(frozen=True)
class AtCycle:
    """Pending at the first boundary at or after cycle `cycle`.

        >>> AtCycle(12_000)
        AtCycle(cycle=12000)
    """

    cycle: int


@dataclass(frozen=True)
class AtPort:
    """Pending at the boundary right after the `hit`-th write to the port named `port`
    (a name in `PORT_POINTS`).

        >>> AtPort("flush_page", hit=3)
        AtPort(port='flush_page', hit=3)
    """

    port: str
    hit: int = 1

    def __post_init__(self) -> None:
        if self.port not in PORT_POINTS:
            raise ValueError(f"unknown port point {self.port!r} (known: "
                             f"{', '.join(PORT_POINTS)})")
        if self.hit < 1:
            raise ValueError(f"hit must be >= 1, not {self.hit}")


@dataclass(frozen=True)
class Now:
    """Pending at the next boundary the machine reaches.

        >>> Now()
        Now()
    """


Point = Before | AtIcount | AtCycle | AtPort | Now


def make_point(*, before: int | str | None = None, hit: int = 1, icount: int | None = None,
               cycle: int | None = None, at_port: str | None = None) -> Point:
    """The point given by at most one of `before`/`icount`/`cycle`/`at_port` (`hit`
    counts arrivals for the first and the last); none: `Now()`."""
    if sum(x is not None for x in (before, icount, cycle, at_port)) > 1:
        raise ValueError("an injection has at most one of before/icount/cycle/at_port")
    if before is not None:
        return Before(before, hit)
    if at_port is not None:
        return AtPort(at_port, hit)
    if hit < 1:
        raise ValueError(f"hit must be >= 1, not {hit}")
    if icount is not None:
        return AtIcount(icount)
    if cycle is not None:
        return AtCycle(cycle)
    return Now()


@dataclass
class Injection:
    """An event scheduled to arrive at a point of a run (what `Machine.inject` returns).

    `label` names it in the trace; `shown` is the point as the trace shows it when it
    differs from how it is counted (the race explorer counts arrivals from a checkpoint
    but reports them from the start of the run). `fired` becomes True when it arrived.
    """

    event: AsyncEvent | None  # None: a pause (`Machine.run(pause_at=...)`), not an event
    point: Point = field(default_factory=Now)
    label: str = ""
    fired: bool = False
    shown: tuple[int, int] | None = None

    @property
    def where(self) -> dict[str, int | str]:
        """The point as trace records show it."""
        p = self.point
        if isinstance(p, AtPort):
            return {"at_port": p.port, "hit": p.hit}
        if self.shown is not None:
            return {"before": self.shown[0], "hit": self.shown[1]}
        if isinstance(p, Before):
            return {"before": p.address, "hit": p.hit}
        if isinstance(p, AtIcount):
            return {"at_icount": p.icount}
        if isinstance(p, AtCycle):
            return {"at_cycle": p.cycle}
        return {}

    @property
    def is_pause(self) -> bool:
        return self.event is None
