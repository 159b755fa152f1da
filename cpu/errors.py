"""Errors of the machine layer (re-exported by `idtlab.errors`)."""

from __future__ import annotations


class Unsupported(NotImplementedError):
    """A mechanism that idtlab does not model (yet). The message names it."""
