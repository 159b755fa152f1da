"""Reading TOML values with errors that say where.

A scenario file is user input: every problem in it is a `BadInput` whose message is one
line naming the file, the table and the key (`s.toml: [idt] 3 ist: 0x9 outside
0x0..0x7`), so that the command line can print it and exit with status 2. `Checker`
reads one file's values: each method either returns the value with its Python type or
raises that error. The table builders of this package call nothing else to read a value.

    >>> chk = Checker("s.toml")
    >>> chk.int_(7, "[idt] 3 ist", 0, 7)
    7
    >>> str(chk.fail("[run] cpl", "must be 0 or 3"))
    's.toml: [run] cpl: must be 0 or 3'
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from idtlab.errors import BadInput

Value = int | str  # an address as written: a number or a symbol expression


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or "" when none is close.

    >>> did_you_mean("entyr", ("entry", "rsp"))
    " (did you mean 'entry'?)"
    """
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Checker:
    """Typed reads of one scenario file's values; every failure is a `BadInput` naming
    the file (`name`: a path's file name, or any label such as "run" for a command-line
    option) and the place (`where`: "[table] key").

    >>> Checker("s.toml").bool_(True, "[machine] apic")
    True
    >>> Checker("s.toml").bool_(1, "[machine] apic")
    Traceback (most recent call last):
    ...
    cpu.errors.BadInput: s.toml: [machine] apic: expected true or false, got 1
    """

    def __init__(self, path: str | Path) -> None:
        self.name = Path(path).name

    def fail(self, where: str, msg: str) -> BadInput:
        """The error to raise for `msg` at `where`."""
        return BadInput(f"{self.name}: {where}: {msg}")

    def keys(self, table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
        """Every key of `table` is one of `allowed` (else: unknown key, did you mean)."""
        for key in table:
            if key not in allowed:
                raise self.fail(where, f"unknown key '{key}'{did_you_mean(key, allowed)}")

    def int_(self, value: Any, where: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
        """An integer in `lo`..`hi` (a TOML boolean is not an integer)."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {type(value).__name__} {value!r}")
        if not lo <= value <= hi:
            raise self.fail(where, f"{value:#x} outside {lo:#x}..{hi:#x}")
        return value

    def bool_(self, value: Any, where: str) -> bool:
        """A TOML boolean."""
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {value!r}")
        return value

    def addr(self, value: Any, where: str) -> Value:
        """An address as written (a number or a symbol expression), not yet resolved."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.fail(where, f"expected an address (integer or symbol), got {value!r}")
        return value

    def table(self, value: Any, where: str) -> dict[str, Any]:
        """A TOML table (`[name]` or an inline `{...}`)."""
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a table, got {type(value).__name__}")
        return value

    def array_of_tables(self, value: Any, where: str) -> list[dict[str, Any]]:
        """A TOML array of tables (`[[name]]`)."""
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(where, f"expected an array of tables ([[{where.strip('[]')}]])")
        return value


def parse_size(text: Any, where: str, chk: Checker) -> int:
    """A size in bytes: an integer, or a string like "16M", "512K", "1G".

    >>> parse_size("16M", "[machine] memory", Checker("s.toml"))
    16777216
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return chk.int_(text, where, 1)
    if not isinstance(text, str):
        raise chk.fail(where, f"expected a size like \"16M\", got {text!r}")
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise chk.fail(where, f"cannot read size {text!r} (use e.g. \"16M\", \"512K\", \"1G\")")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
