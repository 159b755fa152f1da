"""The machine as a VMX guest: EPT violations become #VE or VM exits to a host model.

With `Machine(vmx=VmxConfig(...))` every guest-physical access goes through a second
translation stage (cpu/ept.py). An access EPT refuses is an *EPT violation* (SDM Vol. 3C
"EPT Violations"). It is converted to a virtualization exception (#VE, vector 20) when
the "EPT-violation #VE" control is on, the entry's suppress-#VE bit is clear, the
VE-information area's busy word is zero, and the violation did not happen while
delivering an event (`idt.ve.convert_to_ve`); the CPU then writes the information area
and sets the busy word (SDM Vol. 3C "Virtualization Exceptions"). Otherwise it is a VM
exit, and the host model answers: fix the entry and resume, resume as it is, or stop.

An exit during event delivery re-executes that delivery when the host resumes (the event
is in the IDT-vectoring information; KVM re-injects it). An exit from an IRET that had
unblocked NMIs re-blocks them, since the IRET re-executes (SDM "NMI Unblocking Due to
IRET"; KVM `vmx_recover_nmi_blocking`). An EPT misconfiguration (SDM "EPT
Misconfigurations") is always a VM exit (basic reason 49).

With a hypervisor model (`[hypervisor]`, cpu/vmx_exits.py) an EPT violation that is a
VM exit goes to that model instead: full exit fields, and the host object decides.

A guest access to a page the async-#PF host swapped out is that host's business
(cpu/apf_host.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpu.ept import EXIT_REASON_EPT_MISCONFIG, EptMisconfig, EptViolation
from cpu.errors import Unsupported
from cpu.mmu import Access
from cpu.outcomes import Outcome, Stop
from idt.state import Event
from idt.ve import (
    EXIT_REASON_EPT_VIOLATION,
    VE_BUSY,
    VE_INFO_BUSY,
    VE_VECTOR,
    VeInfo,
    convert_to_ve,
    decode_qualification,
    ept_qualification,
)

if TYPE_CHECKING:
    from cpu.machine import Machine

HOST_ACTIONS = ("resume-fixed", "resume", "stop")


@dataclass(frozen=True)
class VmxConfig:
    """The VMX controls this machine models (SDM Vol. 3C): the "EPT-violation #VE"
    secondary control, the VE-information address (guest-physical, 4-KiB aligned) and
    the EPTP index reported in the information area.

        >>> VmxConfig(ept_violation_ve=True, ve_info=0x5000).eptp_index
        0
    """

    ept_violation_ve: bool = False
    ve_info: int | None = None
    eptp_index: int = 0

    def __post_init__(self) -> None:
        if self.ve_info is not None and self.ve_info % 4096:
            raise ValueError(f"ve_info {self.ve_info:#x} must be 4-KiB aligned (VM entry fails "
                             "otherwise)")
        if not 0 <= self.eptp_index <= 0xFFFF:
            raise ValueError(f"eptp_index {self.eptp_index} outside 0..0xffff")


@dataclass(frozen=True)
class VmExit:
    """An EPT-violation VM exit, as the host model sees it."""

    reason: int
    qualification: int
    gpa: int
    gla: int | None
    rip: int
    during_delivery: Event | None
    nmi_unblocked_by_iret: bool
    why: str


HostPolicy = str | Callable[["Machine", VmExit], str]


@dataclass
class VmxState:
    """The host model's answer to a VM exit: one of `HOST_ACTIONS`, or a callback that
    returns one."""

    on_ept_violation: HostPolicy = "resume-fixed"


class Vmx:
    """EPT violations and misconfigurations: #VE or a VM exit and the host's answer."""

    def __init__(self, m: Machine, state: VmxState) -> None:
        self.m = m
        self.state = state

    def ept_violation(self, v: EptViolation, rip: int, access: Access, *,
                      during: Event | None = None, nmi_unblocked: bool = False) -> None:
        """An EPT violation at `rip` (in the access `access`, or while delivering
        `during`): convert it to #VE when allowed, else VM-exit to the host model."""
        m = self.m
        vmx, ept = m.vmx, m.ept
        assert vmx is not None and ept is not None
        if m.apf is not None and m.apf.is_swapped(v.gpa):
            m.apf_host.fault(v, rip, during)
            return
        gla = getattr(v, "gla", None)
        qual = ept_qualification(
            read=v.access is Access.READ, write=v.access is Access.WRITE,
            fetch=v.access is Access.FETCH, readable=v.readable, writable=v.writable,
            executable=v.executable, gla_valid=gla is not None,
            final_translation=bool(getattr(v, "final", True)), nmi_unblocked_by_iret=nmi_unblocked)
        ve_info = vmx.ve_info
        busy = VE_BUSY if ve_info is None else m.phys.read_uint(ve_info + VE_INFO_BUSY, 4)
        convert, why = convert_to_ve(ve_enabled=vmx.ept_violation_ve and vmx.ve_info is not None,
                                     suppress_ve=v.suppress_ve, busy=busy,
                                     during_delivery=during is not None)
        if convert:
            assert vmx.ve_info is not None
            info = VeInfo(exit_reason=EXIT_REASON_EPT_VIOLATION, busy=VE_BUSY, qualification=qual,
                          guest_linear=gla or 0, guest_physical=v.gpa,
                          eptp_index=vmx.eptp_index)
            m.phys.write(vmx.ve_info, info.pack())
            m.emit("ve_info_written", at=vmx.ve_info, exit_reason=info.exit_reason,
                   busy=info.busy, qualification=qual, gla=info.guest_linear,
                   gpa=info.guest_physical, eptp_index=info.eptp_index,
                   **decode_qualification(qual))
            # #VE: a fault with no error code; saved RIP = the faulting instruction.
            m.deliver(Event.exception(VE_VECTOR, rip), why=f"EPT violation at GPA {v.gpa:#x}")
            return
        if m.vmx_exits.enabled:
            # The hypervisor model owns exits (cpu/vmx_exits.py): full exit fields.
            m.vmx_exits.ept_exit(reason=EXIT_REASON_EPT_VIOLATION, qualification=qual,
                                 gpa=v.gpa, gla=gla, rip=rip, during=during, why=why)
            return
        exit_ = VmExit(reason=EXIT_REASON_EPT_VIOLATION, qualification=qual, gpa=v.gpa, gla=gla,
                       rip=rip, during_delivery=during, nmi_unblocked_by_iret=nmi_unblocked, why=why)
        m.count_event(rip, "events (VM exits that never resolve?)")
        policy = self.state.on_ept_violation
        action = policy(m, exit_) if callable(policy) else policy
        m.emit("vmexit", reason=exit_.reason, qualification=qual, gpa=v.gpa, gla=gla, rip=rip,
               during_delivery=during.name if during is not None else None,
               nmi_unblocked_by_iret=nmi_unblocked, why=why, action=action)
        if action == "stop":
            raise Stop(Outcome.VMEXIT, f"EPT violation at GPA {v.gpa:#x} ({why}): VM exit, "
                       "host stops", rip)
        if action == "resume-fixed":
            ept.fix(v.gpa)
        elif action != "resume":
            raise Unsupported(f"host action {action!r} (known: {', '.join(HOST_ACTIONS)})")
        m.engine.flush_tlb()
        if during is not None and action == "resume":
            # Nothing changed for the delivery: re-delivering would only exit again.
            raise Stop(Outcome.VMEXIT, f"EPT violation at GPA {v.gpa:#x} while delivering "
                       f"{during.name}: the host resumed without fixing it", rip)
        if nmi_unblocked:
            # The IRET re-executes: the host re-establishes the NMI blocking it cleared.
            m.intr.nmi_blocked = True
        if during is not None:
            m.deliver(during)  # the interrupted delivery re-executes (re-injection)

    def ept_misconfig(self, bad: EptMisconfig, rip: int, *, during: Event | None = None) -> None:
        """An EPT misconfiguration: a VM exit with basic reason 49, never a #VE. The host
        stops, or with "resume-fixed" rewrites the page's entry as RWX and resumes (the
        delivery, if any, re-executes)."""
        m = self.m
        assert m.ept is not None
        if m.vmx_exits.enabled:
            m.vmx_exits.ept_exit(reason=EXIT_REASON_EPT_MISCONFIG, qualification=0, gpa=bad.gpa,
                                 gla=None, rip=rip, during=during, why=bad.why)
            return
        policy = self.state.on_ept_violation
        action = "stop" if callable(policy) else policy
        m.emit("vmexit", reason=EXIT_REASON_EPT_MISCONFIG, qualification=0, gpa=bad.gpa,
               gla=None, rip=rip, during_delivery=during.name if during is not None else None,
               nmi_unblocked_by_iret=False, why=bad.why, action=action)
        if action != "resume-fixed" or not m.count_event(rip, None):
            raise Stop(Outcome.VMEXIT, str(bad), rip)
        m.ept.set_range(bad.gpa & ~0xFFF, 4096, read=True, write=True, execute=True)
        m.engine.flush_tlb()
        if during is not None:
            m.deliver(during)

    def revoke(self, gpa: int, where: dict[str, Any], *, checked: bool = False) -> None:
        """The host takes all access to a guest-physical page away (an EPT entry made not
        present, suppress-#VE clear): the guest's next access to it is an EPT violation,
        converted to a #VE when the #VE controls allow it, a VM exit otherwise.

        `checked`: only a page the guest can still access; one with no access already
        is a `host_declines` record (not applicable) and nothing changes."""
        m = self.m
        assert m.ept is not None
        page = gpa & ~0xFFF
        if checked and not self._accessible(page):
            m.emit("host_declines", event=f"ept_revoke:{page:#x},policy=host",
                   status="not_applicable",
                   reason=f"GPA {page:#x} has no EPT access already: nothing to revoke",
                   **where)
            return
        m.ept.set_range(page, 0x1000, read=False, write=False, execute=False, suppress_ve=False)
        m.engine.flush_tlb()  # entries filled earlier carry the old rights
        m.emit("ept_revoke", gpa=page, **where)

    def _accessible(self, page: int) -> bool:
        """Whether the EPT grants any access to `page` (read, write or fetch)."""
        m = self.m
        assert m.ept is not None
        for access in (Access.READ, Access.WRITE, Access.FETCH):
            try:
                m.ept.translate(page, access)
            except EptViolation:
                continue
            except EptMisconfig:
                return True  # an entry is there, if a broken one: revoking changes it
            return True
        return False
