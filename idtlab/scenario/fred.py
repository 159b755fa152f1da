"""`[fred]`: run the scenario's machine with FRED (cpu/fred.py) instead of the IDT.

The table gives the CPU FRED (CPUID.(EAX=07H,ECX=1):EAX FRED and LKGS), sets CR4.FRED
before the first instruction (`enabled`, default true) and programs the FRED MSRs:
IA32_FRED_CONFIG from `entry` (a 4-KiB-aligned address or label: events from ring 3
enter there, events from ring 0 at `entry + 256`), `red_zone` (bytes, a multiple of 64
up to 448) and `interrupt_level` (CONFIG[10:9]); IA32_FRED_RSP0-3 from `rsp0`..`rsp3`;
IA32_FRED_STKLVLS from `stack_levels` (`{ <vector 0-31> = <level 0-3> }`). IA32_STAR
gives the selectors of ring-3 transitions: `kernel_cs` (STAR[47:32], default 0x08, the
machine's kernel code segment) and `user_base` (STAR[63:48], ERETU's standard pair).
The options where the sources disagree are `fmask`, `syscall_requires_sce`,
`config_canonical_check`, `nested_after_any_event`, `mov_ss_sets_sti_bit` and `lkgs`
(cpu.fred.FredConfig; docs/sdm-map.md).
"""

from __future__ import annotations

from cpu.cpu_model import MsrFault
from cpu.fred import FredConfig
from cpu.layout import KERNEL_CS
from cpu.msrs import MSR_STAR
from idtlab.scenario.context import Build

FRED_KEYS = ("entry", "rsp0", "rsp1", "rsp2", "rsp3", "stack_levels", "interrupt_level",
             "red_zone", "enabled", "kernel_cs", "user_base", "lkgs", "fmask",
             "syscall_requires_sce", "config_canonical_check", "nested_after_any_event",
             "mov_ss_sets_sti_bit")


def build_fred(b: Build) -> None:
    """`[fred]`, if present (see the module docstring)."""
    if "fred" not in b.data:
        return
    chk, m = b.chk, b.machine
    fred = chk.table(b.data["fred"], "[fred]")
    chk.keys(fred, FRED_KEYS, "[fred]")
    if "entry" not in fred:
        raise chk.fail("[fred]", "missing key 'entry' (the FRED entry point)")
    entry = b.addr(fred["entry"], "[fred] entry")
    if entry % 4096:
        raise chk.fail("[fred] entry", f"{entry:#x} is not 4-KiB aligned")
    red_zone = chk.int_(fred.get("red_zone", 0), "[fred] red_zone", 0, 448)
    if red_zone % 64:
        raise chk.fail("[fred] red_zone", f"{red_zone} is not a multiple of 64")
    level = chk.int_(fred.get("interrupt_level", 0), "[fred] interrupt_level", 0, 3)
    levels = chk.table(fred.get("stack_levels", {}), "[fred] stack_levels")
    stklvls = 0
    for key, value in levels.items():
        try:
            vector = int(key, 0)
        except ValueError:
            raise chk.fail("[fred] stack_levels", f"key '{key}' is not a vector number") from None
        if not 0 <= vector <= 31:
            raise chk.fail("[fred] stack_levels", f"vector {vector} outside 0..31")
        stklvls |= chk.int_(value, f"[fred] stack_levels {key}", 0, 3) << (2 * vector)
    options = FredConfig(
        lkgs=chk.bool_(fred.get("lkgs", True), "[fred] lkgs"),
        apply_fmask=chk.bool_(fred.get("fmask", False), "[fred] fmask"),
        syscall_requires_sce=chk.bool_(fred.get("syscall_requires_sce", False),
                                       "[fred] syscall_requires_sce"),
        config_canonical_check=chk.bool_(fred.get("config_canonical_check", True),
                                         "[fred] config_canonical_check"),
        nested_after_any_event=chk.bool_(fred.get("nested_after_any_event", True),
                                         "[fred] nested_after_any_event"),
        mov_ss_sets_sti_bit=chk.bool_(fred.get("mov_ss_sets_sti_bit", False),
                                      "[fred] mov_ss_sets_sti_bit"))
    msrs = {f"rsp{n}": b.addr(fred.get(f"rsp{n}", 0), f"[fred] rsp{n}") for n in range(4)}
    try:
        m.enable_fred(options, enable=chk.bool_(fred.get("enabled", True), "[fred] enabled"),
                      config=entry | level << 9 | red_zone, stklvls=stklvls, **msrs)
    except MsrFault as exc:
        raise chk.fail("[fred]", str(exc)) from None
    kernel_cs = chk.int_(fred.get("kernel_cs", KERNEL_CS), "[fred] kernel_cs", 0, 0xFFFF)
    user_base = chk.int_(fred.get("user_base", 0), "[fred] user_base", 0, 0xFFFF)
    m.engine.write_msr(MSR_STAR, user_base << 48 | kernel_cs << 32)
