"""Errors that the CLI turns into one line and exit status 2.

`BadInput` is for anything wrong with what the *user* gave us (a scenario key, an
assembly line, a symbol, an ELF file). Its message is already the one line the user
sees: it names the file and the key or line. Guest misbehaviour is never a
`BadInput`: it is an outcome in the trace.
"""

from __future__ import annotations

from cpu.errors import Unsupported

__all__ = ["BadInput", "Unsupported"]


class BadInput(Exception):
    """Invalid user input. `str(exc)` is a complete one-line message naming where."""
