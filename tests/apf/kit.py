"""A builder for the async-#PF tests: one block of Intel-syntax code on a fresh machine
(the delivery rig's layout, tests/delivery/rig.py) with the KVM async-#PF host model
enabled, and readers for the trace records it leaves (docs/async-pf.md).

Expected values in the tests are written down from KVM (Linux
arch/x86/include/uapi/asm/kvm_para.h, arch/x86/kvm/x86.c, arch/x86/kernel/kvm.c: the ABI
numbers, the injection conditions), never computed by running the code.

Layout, besides the rig's stacks and CODE at 0x100000:

    0x140000  AREA     the shared area (struct kvm_vcpu_pv_apf_data)
    0x300000  DATA     scratch words handlers write to
    0x400000  PROBE    the swapped-out pages (GPA == linear here)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cpu.layout import PageSpec
from cpu.machine import Machine
from tests.delivery.rig import (
    CODE,
    DATA,
    IST1_TOP,
    KERNEL_STACK,
    PROBE,
    RSP0_TOP,
    USER_STACK,
    of_kind,
    one,
)
from tests.delivery.rig import build as rig_build

AREA = 0x140000
PAGE = 0x1000

# ABI numbers (Linux arch/x86/include/uapi/asm/kvm_para.h), spelled out rather than
# imported from the model.
MSR_EN = 0x4B564D02
MSR_INT = 0x4B564D06
MSR_ACK = 0x4B564D07
ENABLED, SEND_ALWAYS, DELIVERY_AS_INT = 1 << 0, 1 << 1, 1 << 3
WAKE_ALL = 0xFFFFFFFF
LINUX_EN = AREA | DELIVERY_AS_INT | ENABLED  # what kvm_guest_cpu_init writes
CPL0_EN = LINUX_EN | SEND_ALWAYS

# The guest's own enable sequence: page-ready vector first, then the enable MSR (value EN).
ENABLE = """
    mov ecx, 0x4b564d06
    mov eax, 0x40
    xor edx, edx
    wrmsr
    mov ecx, 0x4b564d02
    mov eax, EN
    xor edx, edx
    wrmsr
"""

EXIT = """
    mov dx, 0xf4
    out dx, al
"""

__all__ = [
    "AREA", "CODE", "CPL0_EN", "DATA", "DELIVERY_AS_INT", "ENABLE", "ENABLED", "EXIT",
    "IST1_TOP", "KERNEL_STACK", "LINUX_EN", "MSR_ACK", "MSR_EN", "MSR_INT", "PAGE", "PROBE",
    "RSP0_TOP", "SEND_ALWAYS", "USER_STACK", "WAKE_ALL", "build", "kinds", "of_kind", "one",
]


def build(source: str, *, gates: Mapping[int, Mapping[str, Any]] | None = None,
          policy: str = "kvm", layout: str = "2020", on_fail: str = "retry",
          swapped: Iterable[tuple[int, int]] = (), fail: bool = False, en: int = CPL0_EN,
          apf: bool = True, pages: Iterable[PageSpec] = ()) -> tuple[Machine, dict[str, int]]:
    """A fresh machine with `source` at CODE (symbols EN, AREA, DATA, PROBE known), the IDT
    rows `gates`, async #PF enabled on the host side (`policy`, `layout`, `on_fail`) and
    the pages `swapped` ((gpa, latency) pairs, each one page, all failing if `fail`)."""
    m, sym = rig_build(source, gates=gates, pages=pages,
                       known={"EN": en, "AREA": AREA, "DATA": DATA, "PROBE": PROBE})
    if apf:
        m.enable_apf(policy=policy, layout=layout, on_fail=on_fail)
        for gpa, latency in swapped:
            m.swap_out(gpa, PAGE, latency=latency, fail=fail)
    return m, sym


def kinds(records: list[dict[str, Any]], wanted: Iterable[str]) -> list[str]:
    keep = set(wanted)
    return [r["kind"] for r in records if r["kind"] in keep]
