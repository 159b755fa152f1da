"""Timed mode never trusts the engine's instruction size beyond 15 bytes (SDM Vol. 2A,
"Instruction Format"). Unicorn reports 0xF1F1F1F1 as the size of INT1 (ICEBP, 0xF1);
the cost model used to read that many bytes of guest memory for it: 4 GiB and 5 s for
the #PF -> NMI -> #DB -> #PF example, which executes INT1 in its NMI handler."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cpu.machine import Machine

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "idtlab" / "examples" / "apf" / "apf_pf_nmi_db_pf.toml"

# The peak RSS of this process alone: /proc's VmHWM (a new address space at exec). Linux's
# ru_maxrss keeps the high-water mark of the process that forked it (here pytest, which
# may have grown past the limit by itself), so it is only the fallback.
PROBE = f"""
import resource
from pathlib import Path
from idtlab import scenario as scn
sc = scn.load({str(EXAMPLE)!r}, mode="timed")
result = scn.run(sc)
assert scn.check(sc, result) == [], scn.check(sc, result)
status = Path("/proc/self/status")
hwm = [line.split()[1] for line in status.read_text().splitlines()
       if line.startswith("VmHWM:")] if status.exists() else []
print(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_the_int1_example_runs_in_timed_mode_in_bounded_memory() -> None:
    # A fresh process: its peak RSS is this run's (KiB on Linux). The machine's own
    # 16 MiB of guest RAM, Unicorn and Python take about 60 MiB.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    peak_kib = int(out.stdout.split()[-1])
    assert peak_kib < 400 * 1024, f"peak RSS {peak_kib} KiB"


def test_an_engine_size_beyond_15_bytes_reads_15_and_costs_the_instruction_there() -> None:
    m = Machine(mode="timed")
    m.load(0x100000, b"\xf1\x90", code=True)  # int1; nop
    read: list[int] = []
    real = m.read_linear

    def spy(addr: int, size: int) -> bytes:
        read.append(size)
        return real(addr, size)

    m.read_linear = spy  # type: ignore[method-assign]
    assert m._insn_cost(0x100000, 0xF1F1F1F1) == m._insn_cost(0x100000, 1)
    assert read == [15, 1]
