"""`[[inject]]`: asynchronous events that arrive at points of the run.

Each entry is one event (`cpu.events`: an NMI, a maskable interrupt through the local
APIC, a KVM async page fault, the host revoking a page's EPT access) and one injection
point (before the `hit`-th arrival at an address, at an instruction count, at a cycle,
right after a write to a port, or at the first boundary). The event and the point are
built by `cpu.events.make_event` and `make_point`, the constructors the Python API and
the explorer use too, and handed to `Machine.inject`. The checks here come first only
where the scenario's message says more (it names the key to write, or the table).

A host event (`async_pf`, `ept_revoke`) is forced: the host does it at the point. With
`policy` ("host": the `[apf]` policy; or a policy name) the host asks that policy there
and does nothing when it refuses (a `host_declines` record says why).

Arrival is not delivery: the blocking rules decide when a pending event is delivered
(SDM Vol. 3A, "Nonmaskable Interrupt (NMI)" and "Masking Maskable Hardware Interrupts").
"""

from __future__ import annotations

from typing import Any

from cpu.events import PORT_POINTS, EventKind, make_event, make_point
from idtlab.scenario.checker import did_you_mean
from idtlab.scenario.context import Build

INJECT_KEYS = ("event", "vector", "before", "hit", "icount", "cycle", "label", "token", "gpa",
               "at_port", "policy")
EVENT_KINDS = tuple(k.value for k in EventKind)
POINT_KEYS = ("before", "icount", "cycle", "at_port")


def build_injections(b: Build) -> None:
    """Schedule every `[[inject]]` event on the machine."""
    chk = b.chk
    for i, inj in enumerate(chk.array_of_tables(b.data.get("inject", []), "[[inject]]"), 1):
        where = f"[[inject]] #{i}"
        chk.keys(inj, INJECT_KEYS, where)
        _check(b, inj, where)
        label = inj.get("label", "")
        if not isinstance(label, str):
            raise chk.fail(f"{where} label", "expected a string")
        vector = chk.int_(inj["vector"], f"{where} vector", 16, 255) if "vector" in inj else None
        before = b.addr(inj["before"], f"{where} before") if "before" in inj else None
        hit = chk.int_(inj.get("hit", 1), f"{where} hit", 1)
        icount = chk.int_(inj["icount"], f"{where} icount") if "icount" in inj else None
        cycle = chk.int_(inj["cycle"], f"{where} cycle") if "cycle" in inj else None
        token = chk.int_(inj["token"], f"{where} token", 1, 0xFFFFFFFE) if "token" in inj \
            else None
        gpa = b.addr(inj["gpa"], f"{where} gpa") if "gpa" in inj else None
        policy = inj.get("policy")
        if policy is not None and (not isinstance(policy, str) or ":" in policy):
            raise chk.fail(f"{where} policy", "expected \"host\" (the [apf] policy) or a "
                           "policy name")
        try:
            event = make_event(inj["event"], vector=vector, token=token, gpa=gpa,
                               policy=policy)
            point = make_point(before=before, hit=hit, icount=icount, cycle=cycle,
                               at_port=inj.get("at_port"))
            b.machine.inject(event, point, label=label or f"inject #{i}")
        except ValueError as exc:
            raise chk.fail(where, str(exc)) from None


def _check(b: Build, inj: dict[str, Any], where: str) -> None:
    """The rules whose scenario message names the key to write."""
    chk = b.chk
    event = inj.get("event")
    if event not in EVENT_KINDS:
        raise chk.fail(f"{where} event", f"{event!r} is not one of {', '.join(EVENT_KINDS)}"
                       + did_you_mean(str(event), EVENT_KINDS))
    points = [k for k in POINT_KEYS if k in inj]
    if len(points) > 1:
        raise chk.fail(where, "give at most one of before, icount, cycle, at_port (got "
                       f"{', '.join(points)})")
    if "hit" in inj and "before" not in inj and "at_port" not in inj:
        raise chk.fail(f"{where} hit", "'hit' counts arrivals at a 'before' address or writes "
                       "to an 'at_port' port")
    if "at_port" in inj and inj["at_port"] not in PORT_POINTS:
        raise chk.fail(f"{where} at_port", f"{inj['at_port']!r} is not one of "
                       f"{', '.join(PORT_POINTS)}")
    if event == EventKind.INTERRUPT:
        if "vector" not in inj:
            raise chk.fail(where, "an interrupt needs 'vector' (16..255)")
        chk.int_(inj["vector"], f"{where} vector", 16, 255)
    elif "vector" in inj:
        raise chk.fail(f"{where} vector", f"an {event} has no vector")
    if "token" in inj and event != EventKind.ASYNC_PF:
        raise chk.fail(f"{where} token", "'token' belongs to event = \"async_pf\"")
    if "gpa" in inj and event not in (EventKind.ASYNC_PF, EventKind.EPT_REVOKE):
        raise chk.fail(f"{where} gpa", "'gpa' belongs to event = \"async_pf\" or "
                       "\"ept_revoke\"")
    if "policy" in inj and event not in (EventKind.ASYNC_PF, EventKind.EPT_REVOKE):
        raise chk.fail(f"{where} policy", "'policy' belongs to a host event (\"async_pf\" or "
                       "\"ept_revoke\")")
    if event == EventKind.EPT_REVOKE and "gpa" not in inj:
        raise chk.fail(where, "an ept_revoke needs 'gpa' (the page the host revokes)")
