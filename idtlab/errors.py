"""Errors that the CLI turns into one line and exit status 2.

`BadInput` is for anything wrong with what the *user* gave us (a scenario key, an
assembly line, a symbol, an ELF file). Its message is already the one line the user
sees: it names the file and the key or line. Guest misbehaviour is never a
`BadInput`: it is an outcome in the trace.
"""

from __future__ import annotations

from pathlib import Path

from cpu.errors import Unsupported

__all__ = ["BadInput", "Unsupported", "read_input"]


class BadInput(Exception):
    """Invalid user input. `str(exc)` is a complete one-line message naming where."""


def read_input(path: str | Path, what: str) -> bytes:
    """The bytes of a file the user named; `BadInput` naming it when it cannot be read
    (`what` says what it should have been: "an ELF file", "a log")."""
    name = str(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{name}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{name}: is a directory, not {what}") from None
    except OSError as exc:
        raise BadInput(f"{name}: cannot read ({exc.strerror})") from None
