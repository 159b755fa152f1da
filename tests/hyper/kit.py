"""A builder for the hypervisor-model tests: one block of Intel-syntax code on a fresh
VMX machine whose events meet a host (cpu/vmx_exits.py, cpu/vmx_host.py), and readers
for the `vmexit` / `vmentry` records.

Expected values in the tests are the SDM's encodings written out (0x80000B0E is #PF,
hardware exception, error code valid), never computed by the code under test.

Layout (tests/delivery/rig.py):

    0x06F000  STACK_PAGE   the page below KERNEL_STACK: where a CPL0 frame lands
    0x070000  KERNEL_STACK initial RSP (CPL0)
    0x080000  RSP0_TOP     TSS.RSP0 (its frame page is 0x7F000)
    0x090000  IST1_TOP     TSS.IST1
    0x100000  CODE         the test's code block
    0x300000  DATA         scratch area handlers write to
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cpu.layout import PageSpec
from cpu.machine import Machine
from cpu.outcomes import RunResult
from cpu.vmx import VmxConfig
from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Halt, Host, resolve_host
from idt.vmx_events import ExceptionBitmap
from tests.delivery.rig import (
    CODE,
    DATA,
    IST1_TOP,
    IST2_TOP,
    KERNEL_STACK,
    RSP0_TOP,
    USER_STACK,
    of_kind,
    one,
    read_frame,
)
from tests.delivery.rig import build as rig_build

STACK_PAGE = KERNEL_STACK - 0x1000
RSP0_PAGE = RSP0_TOP - 0x1000
N = 0x8000_0000_0000_0000  # non-canonical: `mov rax, [N]` is #GP(0)
IDT = 0x2000  # the machine's IDT (cpu/layout.py), linear = guest-physical

__all__ = [
    "CODE",
    "DATA",
    "IDT",
    "IST1_TOP",
    "IST2_TOP",
    "KERNEL_STACK",
    "RSP0_PAGE",
    "RSP0_TOP",
    "STACK_PAGE",
    "USER_STACK",
    "N",
    "build",
    "entries",
    "exits",
    "of_kind",
    "one",
    "read_frame",
    "run",
    "unmapped",
]


def unmapped(*pages: int) -> list[PageSpec]:
    """Guest PTEs made not present."""
    return [PageSpec(va=p, pa=p, present=False) for p in pages]


def build(source: str, *, gates: Mapping[int, Mapping[str, Any]] | None = None,
          pages: Iterable[PageSpec] = (), controls: VmxControls | None = None,
          host: str | Host = "sdm", host_pages: Iterable[int] = (),
          l1: ExceptionBitmap | None = None, tss: Mapping[str, int] | None = None,
          known: Mapping[str, int] | None = None, vmx: VmxConfig | None = None
          ) -> tuple[Machine, dict[str, int]]:
    """A fresh VMX guest with `source` at CODE under `host` ("sdm", "kvm-pre-6.1" or a
    callable) with the event controls `controls` (`vmx`: the #VE controls)."""
    m, sym = rig_build(source, gates=gates, pages=pages, tss=tss, known=known,
                       vmx=vmx or VmxConfig())
    h = resolve_host(host, l1_exception_bitmap=l1) if isinstance(host, str) else host
    m.vmx_exits.enable(controls or VmxControls(), h, host_pages=frozenset(host_pages))
    return m, sym


def run(m: Machine, *, cpl: int = 0, rsp: int | None = None, max_insns: int = 10_000
        ) -> RunResult:
    return m.run(entry=CODE, rsp=rsp if rsp is not None else
                 (USER_STACK if cpl == 3 else KERNEL_STACK), cpl=cpl, max_insns=max_insns)


def ept_none(m: Machine, page: int) -> None:
    """The host removes the EPT entry of `page` (not present, suppress-#VE clear)."""
    assert m.ept is not None
    m.ept.set_range(page & ~0xFFF, 0x1000, read=False, write=False, execute=False,
                    suppress_ve=False)


def ept_read_only(m: Machine, page: int) -> None:
    assert m.ept is not None
    m.ept.set_range(page & ~0xFFF, 0x1000, read=True, write=False, execute=False,
                    suppress_ve=False)


def exits(r: RunResult) -> list[dict[str, Any]]:
    return of_kind(r.trace.records, "vmexit")


def entries(r: RunResult) -> list[dict[str, Any]]:
    return of_kind(r.trace.records, "vmentry")


class Script:
    """A host that answers the exits with `answers` in order (an action, or a function
    `(exit, vcpu) -> action`), then stops; `seen` keeps every exit it was given."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.seen: list[Any] = []

    def __call__(self, exit_: Any, vcpu: Any) -> Any:

        self.seen.append(exit_)
        if not self.answers:
            return Halt("script done")
        a = self.answers.pop(0)
        return a(exit_, vcpu) if callable(a) else a


STOP = Halt("test host stops")
