"""What the table builders share while one scenario file becomes a machine.

The tables of a scenario are not independent: `[[code]]` labels are addresses that
`[idt]`, `[run]` and `[[inject]]` name; `[[data]]`, `[[image]]` and `[[code]]` place
bytes in one guest memory and must not overlap each other or the machine's system area;
a multiboot `[[image]]` rules out the tables that build system structures. `Build` holds
that shared state — the file, the machine being built, the symbol table, the memory
regions claimed so far — and the two operations every builder needs: claim a region,
resolve an address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpu.layout import RESERVED_END
from cpu.machine import Machine
from idtlab.assemble import resolve_address
from idtlab.scenario.checker import Checker


@dataclass
class Build:
    """One scenario file being built: its `data` (the parsed TOML) and `text` (for
    assembly line numbers), the `machine`, its guest `memory` size, the `symbols` known
    so far, and the guest-memory `regions` already claimed ((start, end, what))."""

    path: Path
    data: dict[str, Any]
    text: str
    chk: Checker
    machine: Machine
    memory: int
    symbols: dict[str, int] = field(default_factory=dict)
    regions: list[tuple[int, int, str]] = field(
        default_factory=lambda: [(0, RESERVED_END, "the machine's system area")])
    multiboot: bool = False  # a multiboot [[image]] builds its own system structures

    def region(self, at: int, size: int, what: str) -> None:
        """Claim guest memory `at`..`at + size` for `what`; it must lie inside guest
        memory and overlap nothing claimed before."""
        if at + size > self.memory:
            raise self.chk.fail(what, f"{at:#x}..{at + size:#x} is outside guest memory "
                                f"(0..{self.memory:#x})")
        for lo, hi, other in self.regions:
            if at < hi and lo < at + size:
                raise self.chk.fail(what, f"{at:#x}..{at + size:#x} overlaps {other} "
                                    f"({lo:#x}..{hi:#x})")
        self.regions.append((at, at + size, what))

    def addr(self, value: Any, where: str) -> int:
        """An address key's value (a number, or a symbol expression such as
        "handler+4") as a number."""
        return resolve_address(self.chk.addr(value, where), self.symbols,
                               f"{self.path.name}: {where}")
