"""Colour on a terminal, and only there.

Output goes to a terminal, a file, a pipe or a CI log. Colour helps a person scan a
timeline or a table (a broken point in red, a frame overwrite in bold red), but escape
codes in a file or a pipe are noise. So colour is used when the stream is a TTY, never
when the `NO_COLOR` environment variable is set (https://no-color.org: any non-empty
value), and `FORCE_COLOR` (non-empty) turns it on regardless, for a pager that shows
colours. The text is the same with and without colour: colour only marks it.

    >>> plain = Palette(False)
    >>> plain.bad("BREAKS")
    'BREAKS'
    >>> Palette(True).bad("BREAKS")
    '\\x1b[31;1mBREAKS\\x1b[0m'
"""

from __future__ import annotations

import os
from typing import TextIO

_CODES = {"bad": "31;1", "good": "32", "warn": "33", "dim": "2", "head": "1", "note": "36"}


def wants_colour(stream: TextIO) -> bool:
    """Whether to colour what goes to `stream` (see the module docstring)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Palette:
    """Marks text with a colour when `enabled`; returns it unchanged otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _mark(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def bad(self, text: str) -> str:
        return self._mark(_CODES["bad"], text)

    def good(self, text: str) -> str:
        return self._mark(_CODES["good"], text)

    def warn(self, text: str) -> str:
        return self._mark(_CODES["warn"], text)

    def dim(self, text: str) -> str:
        return self._mark(_CODES["dim"], text)

    def head(self, text: str) -> str:
        return self._mark(_CODES["head"], text)

    def note(self, text: str) -> str:
        return self._mark(_CODES["note"], text)


PLAIN = Palette(False)
