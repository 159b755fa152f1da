"""Errors that the CLI turns into one line and exit status 2 (defined in `cpu.errors`, at
the bottom of the import order, so every layer that reads user input can raise them)."""

from __future__ import annotations

from cpu.errors import BadInput, Unsupported, read_input, read_text_input

__all__ = ["BadInput", "Unsupported", "read_input", "read_text_input"]
