"""Sites: the instructions in guest code that the machine must see before they execute.

Unicorn executes IRET, HLT, RDMSR/WRMSR, CPUID, MOV to control registers and RDPMC with
QEMU's semantics, which skip what idtlab models (NMI unblocking by IRET, the HLT wait,
the CPU model's MSRs and CPUID leaves, the control-register checks, the local APIC's
TPR as CR8). So the code the machine loads is decoded once, and each such instruction
gets a code hook (a *site*): the engine stops there and Python executes the instruction
instead (cpu/emulated.py). XSETBV/XGETBV, LGDT/LIDT/LLDT/LTR, WRFSBASE/WRGSBASE and
SGDT/SIDT/SLDT/SMSW/STR are *checked* sites: Python stops the engine only when the
instruction must fault (cpu/checked_sites.py), and otherwise it runs natively. STI and
MOV SS sites are observed (they open an interrupt shadow; cpu/boundary.py) and OUT
sites are looked at for the exit ports (cpu/platform.py); those then run natively. An instruction with a
LOCK prefix the SDM forbids is a site that raises #UD (the engine, like QEMU, runs some
of them). RDTSC/RDTSCP sites are hooked natively (cpu/native_paths.py): the plain case
runs without Python.

The table is configuration: written when code is loaded, never changed by a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpu.decode import SiteKind, decode_loaded, site_kind

if TYPE_CHECKING:
    from cpu.machine import Machine

_RDTSC = frozenset({SiteKind.RDTSC, SiteKind.RDTSCP})


class SiteTable:
    """Sites by address, from a linear decode of every code block loaded."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.kinds: dict[int, SiteKind] = {}
        self.lengths: dict[int, int] = {}
        self.iretq: frozenset[int] = frozenset()  # IRET sites with REX.W (the form modelled)
        self.cr2_reads: frozenset[int] = frozenset()  # MOV reg, CR2 (Frames.observe_cr2_reads)

    def add_code(self, addr: int, data: bytes) -> None:
        """Decode `data` (guest code at linear `addr`) and hook its sites."""
        iretq, cr2_reads = set(self.iretq), set(self.cr2_reads)
        for insn in decode_loaded(data, addr):
            kind = site_kind(insn)
            if kind is not None:
                self.kinds[insn.address] = kind
                self.lengths[insn.address] = insn.size
                if insn.mnemonic == "iretq":
                    iretq.add(insn.address)
                native = (insn.size, kind is SiteKind.RDTSCP) if kind in _RDTSC else None
                self.m.engine.add_site(insn.address, native)
            elif insn.mnemonic == "mov" and insn.op_str.endswith(", cr2"):
                cr2_reads.add(insn.address)
        self.iretq, self.cr2_reads = frozenset(iretq), frozenset(cr2_reads)
        self.m.engine.clear_cost_cache()
