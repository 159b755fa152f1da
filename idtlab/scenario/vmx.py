"""`[vmx]`, `[[ept]]` and `[host]`: the scenario's guest runs under a VMX host with EPT.

`[vmx]` gives the VM-execution controls that matter for #VE (SDM Vol. 3C, "Virtualization
Exceptions"): the "EPT-violation #VE" control, the VE-information page and the EPTP
index; the machine is built with them (`vmx_config`, read before the machine exists).
`[[ept]]` sets EPT rights per 4-KiB guest-physical page, or makes the entry at one level
of the EPT walk not present, each with its suppress-#VE bit (bit 63 of the entry that
decides). `[host]` says what the host model does at an EPT-violation VM exit.
"""

from __future__ import annotations

from typing import Any

from cpu.ept import EptMisconfig
from cpu.vmx import VmxConfig
from idtlab.scenario.checker import Checker
from idtlab.scenario.context import Build

VMX_KEYS = ("ept_violation_ve", "ve_info", "eptp_index")
# Where [[ept]] ranges end: every guest-physical page the machine has (RAM and the
# local APIC, I/O APIC and HPET pages) is below 4 GiB, and a range is set page by page.
EPT_RANGE_END = 1 << 32
EPT_KEYS = ("gpa", "size", "read", "write", "exec", "suppress_ve", "not_present_level")
HOST_KEYS = ("on_ept_violation",)
EPT_LEVELS = {"pml4": 4, "pdpt": 3, "pd": 2, "pt": 1}
HOST_ACTIONS = ("resume-fixed", "stop")


def vmx_config(data: dict[str, Any], chk: Checker, memory: int) -> VmxConfig | None:
    """The `[vmx]` controls, or None for a guest without VMX (no `[vmx]`, no `[[ept]]`)."""
    if "vmx" not in data and "ept" not in data:
        return None
    vt = chk.table(data.get("vmx", {}), "[vmx]")
    chk.keys(vt, VMX_KEYS, "[vmx]")
    ve_info = vt.get("ve_info")
    if ve_info is not None:
        ve_info = chk.int_(ve_info, "[vmx] ve_info")
        if ve_info % 4096 or ve_info + 4096 > memory:
            raise chk.fail("[vmx] ve_info", f"{ve_info:#x} must be a 4-KiB aligned page inside "
                           "guest memory")
    vmx = VmxConfig(ept_violation_ve=chk.bool_(vt.get("ept_violation_ve", False),
                                               "[vmx] ept_violation_ve"),
                    ve_info=ve_info,
                    eptp_index=chk.int_(vt.get("eptp_index", 0), "[vmx] eptp_index", 0, 0xFFFF))
    if vmx.ept_violation_ve and ve_info is None:
        raise chk.fail("[vmx]", "ept_violation_ve = true needs ve_info (the VE-information page)")
    return vmx


def build_ept(b: Build) -> None:
    """`[[ept]]`: EPT rights of guest-physical pages, or not-present entries."""
    chk, m = b.chk, b.machine
    for i, ep in enumerate(chk.array_of_tables(b.data.get("ept", []), "[[ept]]"), 1):
        where = f"[[ept]] #{i}"
        chk.keys(ep, EPT_KEYS, where)
        assert m.ept is not None  # [[ept]] alone makes a VMX guest (vmx_config)
        if "gpa" not in ep:
            raise chk.fail(where, "missing key 'gpa'")
        gpa = b.addr(ep["gpa"], f"{where} gpa")
        rights: dict[str, bool] = {k: chk.bool_(ep.get(k, True), f"{where} {k}")
                                   for k in ("read", "write", "exec")}
        suppress = chk.bool_(ep.get("suppress_ve", False), f"{where} suppress_ve")
        if gpa % 4096:
            raise chk.fail(f"{where} gpa", f"{gpa:#x} must be 4-KiB aligned")
        try:
            if "not_present_level" in ep:
                level = EPT_LEVELS.get(str(ep["not_present_level"]))
                if level is None:
                    raise chk.fail(f"{where} not_present_level", "expected pml4, pdpt, pd or pt")
                m.ept.set_not_present(gpa, level, suppress_ve=suppress)
            else:
                size = chk.int_(ep.get("size", 4096), f"{where} size", 4096)
                if size % 4096:
                    raise chk.fail(f"{where} size", f"{size:#x} must be a multiple of 4 KiB")
                if gpa + size > EPT_RANGE_END:
                    raise chk.fail(f"{where} size", f"{gpa:#x}..{gpa + size:#x} must end by "
                                   f"{EPT_RANGE_END:#x} (guest RAM and the device pages "
                                   "below 4 GiB)")
                m.ept.set_range(gpa, size, read=rights["read"], write=rights["write"],
                                execute=rights["exec"], suppress_ve=suppress)
        except (ValueError, EptMisconfig) as exc:
            raise chk.fail(where, str(exc)) from None


def build_host(b: Build) -> None:
    """`[host]`: what the host does at an EPT-violation VM exit."""
    chk = b.chk
    host = chk.table(b.data.get("host", {}), "[host]")
    chk.keys(host, HOST_KEYS, "[host]")
    if "on_ept_violation" in host:
        if b.machine.ept is None:
            raise chk.fail("[host] on_ept_violation", "needs [vmx] or [[ept]] (a VMX guest)")
        if host["on_ept_violation"] not in HOST_ACTIONS:
            raise chk.fail("[host] on_ept_violation",
                           f"{host['on_ept_violation']!r} is not 'resume-fixed' or 'stop'")
        b.machine.on_ept_violation = host["on_ept_violation"]
