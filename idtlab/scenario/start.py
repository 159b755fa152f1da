"""`[run]`: the state the run starts in, and its instruction limit.

Entry point, stack pointer, CPL (0 or 3: the machine's GDT has 64-bit code segments for
both), RFLAGS and general-purpose registers, each an address or a symbol where that makes
sense. A multiboot image starts at its own 32-bit entry in the state the multiboot
specification defines, so for it only `max_insns` is read.
"""

from __future__ import annotations

from typing import Any

from idtlab.scenario.checker import did_you_mean
from idtlab.scenario.context import Build

RUN_KEYS = ("entry", "cpl", "rsp", "rflags", "regs", "max_insns")
# The registers [run] regs may set (the first 16) and [[expect]] reg may check (all).
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags", "cr2", "cr3")
GPRS = REGS[:16]


def run_args(b: Build) -> dict[str, Any]:
    """The keyword arguments of `Machine.run` that `[run]` gives."""
    chk = b.chk
    run = chk.table(b.data.get("run", {}), "[run]")
    chk.keys(run, RUN_KEYS, "[run]")
    if "entry" not in run and not b.multiboot:
        raise chk.fail("[run]", "missing key 'entry'")
    regs = chk.table(run.get("regs", {}), "[run] regs")
    for r in regs:
        if r not in GPRS:
            raise chk.fail(f"[run] regs {r}", f"unknown register{did_you_mean(r, GPRS)}")
    args: dict[str, Any] = {
        "entry": b.addr(run["entry"], "[run] entry") if not b.multiboot else None,
        "rsp": b.addr(run.get("rsp", 0x70000), "[run] rsp"),
        "cpl": chk.int_(run.get("cpl", 0), "[run] cpl", 0, 3),
        "rflags": chk.int_(run.get("rflags", 0x202), "[run] rflags"),
        "regs": {r: b.addr(v, f"[run] regs {r}") for r, v in regs.items()},
        "max_insns": chk.int_(run.get("max_insns", 10_000_000), "[run] max_insns", 1),
    }
    if args["cpl"] not in (0, 3):
        raise chk.fail("[run] cpl", "must be 0 or 3")
    if b.multiboot:
        return {"max_insns": args["max_insns"]}
    return args
