"""`[apf]` and `[[swapped]]`: a KVM host with paravirtual async page faults.

`[apf]` turns the host model on (`cpu.devices.apf`): its injection `policy`, the ABI
`layout` (the 2020 one with "page ready" by interrupt, or the legacy one with both
events as #PF; Linux arch/x86/include/uapi/asm/kvm_para.h) and what it does when a
page-in fails. `[[swapped]]` lists guest-physical pages the host has swapped out: the
guest's first access to one starts its page-in, with the latency given.
"""

from __future__ import annotations

from cpu.apf_host import APF_FAIL_ACTIONS, parse_error_policy
from cpu.devices.apf import HOST_POLICIES, LAYOUTS
from idtlab.scenario.checker import did_you_mean
from idtlab.scenario.context import Build

APF_KEYS = ("policy", "layout", "on_fail", "error_policy")
SWAPPED_KEYS = ("gpa", "size", "latency", "fail")


def build_apf(b: Build) -> None:
    """`[apf]`: enable async page faults (also implied by `[[swapped]]`)."""
    if "apf" not in b.data and "swapped" not in b.data:
        return
    chk = b.chk
    apf_t = chk.table(b.data.get("apf", {}), "[apf]")
    chk.keys(apf_t, APF_KEYS, "[apf]")
    for key, known in (("policy", HOST_POLICIES), ("layout", LAYOUTS), ("on_fail", APF_FAIL_ACTIONS)):
        if key in apf_t and apf_t[key] not in known:
            raise chk.fail(f"[apf] {key}", f"{apf_t[key]!r} is not one of {', '.join(known)}"
                           + did_you_mean(str(apf_t[key]), known))
    error_policy = apf_t.get("error_policy")
    if error_policy is not None:
        if "on_fail" in apf_t:
            raise chk.fail("[apf] error_policy", "give either on_fail or error_policy, not both")
        try:
            parse_error_policy(str(error_policy))
        except ValueError as exc:
            raise chk.fail("[apf] error_policy", str(exc)) from None
    b.machine.enable_apf(policy=apf_t.get("policy", "kvm"), layout=apf_t.get("layout", "2020"),
                         on_fail=apf_t.get("on_fail", "retry"),
                         error_policy=None if error_policy is None else str(error_policy))


def build_swapped(b: Build) -> None:
    """`[[swapped]]`: pages the host has swapped out."""
    chk = b.chk
    for i, sw in enumerate(chk.array_of_tables(b.data.get("swapped", []), "[[swapped]]"), 1):
        where = f"[[swapped]] #{i}"
        chk.keys(sw, SWAPPED_KEYS, where)
        if "gpa" not in sw:
            raise chk.fail(where, "missing key 'gpa'")
        gpa = b.addr(sw["gpa"], f"{where} gpa")
        size = chk.int_(sw.get("size", 4096), f"{where} size", 1)
        if gpa % 4096 or gpa + size > b.memory:
            raise chk.fail(f"{where} gpa", f"{gpa:#x}..{gpa + size:#x} must be 4-KiB aligned and "
                           "inside guest memory")
        b.machine.swap_out(gpa, size, latency=chk.int_(sw.get("latency", 5000), f"{where} latency"),
                           fail=chk.bool_(sw.get("fail", False), f"{where} fail"))
