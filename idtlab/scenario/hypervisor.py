"""`[hypervisor]`: the guest runs under a host that sees its events (cpu/vmx_exits.py).

    [hypervisor]
    host = "sdm"                    # or "kvm-pre-6.1", or "package.module:attribute"
    exception_bitmap = [14]         # vectors (or one 32-bit number)
    pfec_mask = 0                   # #PF error-code mask / match
    pfec_match = 0
    nmi_exiting = false
    virtual_nmis = false
    external_interrupt_exiting = false
    ack_interrupt_on_exit = true
    interrupt_window_exiting = false
    nmi_window_exiting = false
    host_pages = ["0x6f000"]        # guest pages whose PTE the host owns (fixes on #PF)
    l1_exception_bitmap = [13]      # the guest is an inner hypervisor's guest (L2):
    l1_pfec_mask = 0                #   its bitmap, for the hosts' nested routing
    l1_pfec_match = 0
    inject = { info = 0x80000b0c, error_code = 0xbeef, length = 0 }   # VMLAUNCH injects

A table without `host` uses "sdm". A `[hypervisor]` alone makes the guest a VMX guest
(EPT identity map) as `[vmx]` does.
"""

from __future__ import annotations

from typing import Any

from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Inject, resolve_host
from idt.vmx_events import ExceptionBitmap, bitmap_of
from idtlab.scenario.checker import Checker
from idtlab.scenario.context import Build

CONTROL_FLAGS = ("nmi_exiting", "virtual_nmis", "external_interrupt_exiting",
                 "ack_interrupt_on_exit", "interrupt_window_exiting", "nmi_window_exiting")
HYPERVISOR_KEYS = ("host", "exception_bitmap", "pfec_mask", "pfec_match", *CONTROL_FLAGS,
                   "host_pages", "l1_exception_bitmap", "l1_pfec_mask", "l1_pfec_match",
                   "inject")
INJECT_KEYS = ("info", "error_code", "length")


def _bitmap(value: Any, chk: Checker, where: str) -> int:
    if isinstance(value, list):
        vectors = [chk.int_(v, where, 0, 31) for v in value]
        return bitmap_of(vectors)
    return chk.int_(value, where, 0, 0xFFFFFFFF)


def build_hypervisor(b: Build) -> None:
    """`[hypervisor]`: the event controls and the host."""
    if "hypervisor" not in b.data:
        return
    chk = b.chk
    t = chk.table(b.data["hypervisor"], "[hypervisor]")
    chk.keys(t, HYPERVISOR_KEYS, "[hypervisor]")
    flags = {k: chk.bool_(t[k], f"[hypervisor] {k}") for k in CONTROL_FLAGS if k in t}
    try:
        controls = VmxControls(
            exception_bitmap=_bitmap(t.get("exception_bitmap", 0), chk,
                                     "[hypervisor] exception_bitmap"),
            pfec_mask=chk.int_(t.get("pfec_mask", 0), "[hypervisor] pfec_mask", 0, 0xFFFFFFFF),
            pfec_match=chk.int_(t.get("pfec_match", 0), "[hypervisor] pfec_match", 0,
                                0xFFFFFFFF),
            **flags)
    except ValueError as exc:
        raise chk.fail("[hypervisor]", str(exc)) from None
    l1 = None
    if "l1_exception_bitmap" in t:
        l1 = ExceptionBitmap(
            _bitmap(t["l1_exception_bitmap"], chk, "[hypervisor] l1_exception_bitmap"),
            chk.int_(t.get("l1_pfec_mask", 0), "[hypervisor] l1_pfec_mask", 0, 0xFFFFFFFF),
            chk.int_(t.get("l1_pfec_match", 0), "[hypervisor] l1_pfec_match", 0, 0xFFFFFFFF))
    spec = t.get("host", "sdm")
    if not isinstance(spec, str):
        raise chk.fail("[hypervisor] host", "expected a string")
    try:
        host = resolve_host(spec, l1_exception_bitmap=l1)
    except ValueError as exc:
        raise chk.fail("[hypervisor] host", str(exc)) from None
    pages = t.get("host_pages", [])
    if not isinstance(pages, list):
        raise chk.fail("[hypervisor] host_pages", "expected a list of addresses")
    host_pages = frozenset(b.addr(p, "[hypervisor] host_pages") for p in pages)
    b.machine.vmx_exits.enable(controls, host, host_pages=host_pages)
    if "inject" in t:
        inj = chk.table(t["inject"], "[hypervisor] inject")
        chk.keys(inj, INJECT_KEYS, "[hypervisor] inject")
        if "info" not in inj:
            raise chk.fail("[hypervisor] inject", "missing key 'info'")
        b.machine.vmx_exits.launch(Inject(
            chk.int_(inj["info"], "[hypervisor] inject info", 0, 0xFFFFFFFF),
            chk.int_(inj.get("error_code", 0), "[hypervisor] inject error_code", 0, 0xFFFFFFFF),
            chk.int_(inj.get("length", 0), "[hypervisor] inject length", 0, 0xFFFFFFFF)))
