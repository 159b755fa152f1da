"""`[machine]`: the machine a scenario runs on.

Guest RAM size, the delivery limit (a runaway event storm ends the run with outcome
`max_events`), the cycle accounting mode and cost profile, whether the STI shadow also
holds NMIs, and whether there is a local APIC. The `[vmx]` controls (`vmx.vmx_config`)
are read here too, because the machine is built with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpu.layout import memory_size_problem
from cpu.machine import MODES, Machine
from cpu.timing import ProfileError, load_profile
from idtlab.scenario.checker import Checker, parse_size
from idtlab.scenario.vmx import vmx_config

MACHINE_KEYS = ("memory", "max_events", "mode", "profile", "sti_blocks_nmi", "apic")


def build_machine(path: Path, data: dict[str, Any], chk: Checker,
                  mode: str | None) -> tuple[Machine, int]:
    """The machine of `[machine]` (and `[vmx]`) and its memory size; `mode` overrides
    `[machine] mode`."""
    mach = chk.table(data.get("machine", {}), "[machine]")
    chk.keys(mach, MACHINE_KEYS, "[machine]")
    memory = parse_size(mach.get("memory", "16M"), "[machine] memory", chk)
    problem = memory_size_problem(memory)
    if problem is not None:
        raise chk.fail("[machine] memory", problem)
    max_events = chk.int_(mach.get("max_events", 100_000), "[machine] max_events", 1)
    if mode is None:
        mode = mach.get("mode", "fast")
    if mode not in MODES:
        raise chk.fail("[machine] mode", f"'{mode}' is not one of {', '.join(MODES)}")
    profile = mach.get("profile", "default")
    if not isinstance(profile, str):
        raise chk.fail("[machine] profile", "expected a profile name or a path to a .toml file")
    if profile.endswith(".toml"):
        profile = str((path.parent / profile).resolve())
    try:
        prof = load_profile(profile)
    except ProfileError as exc:
        raise chk.fail("[machine] profile", str(exc)) from None
    vmx = vmx_config(data, chk, memory)
    m = Machine(memory, max_events=max_events, mode=mode, profile=prof, vmx=vmx,
                sti_blocks_nmi=chk.bool_(mach.get("sti_blocks_nmi", True),
                                         "[machine] sti_blocks_nmi"),
                apic=chk.bool_(mach.get("apic", True), "[machine] apic"))
    return m, memory
