"""Errors that cross layers.

`BadInput` is for anything wrong with what the *user* gave (a scenario key, an event
spelling, an ELF file): `str(exc)` is the complete one-line message, naming the file and
the key or line, that the command line prints before exiting with status 2. Guest
misbehaviour is never a `BadInput`: it is an outcome in the trace.

`Unsupported` names a mechanism idtlab does not model; a run that needs one ends with
the outcome "unsupported" and that message.

They live at the bottom of the import order (`cpu` is imported by `guest_images` and
`idtlab`) so that every layer that reads user input can raise them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BadInput", "Unsupported", "read_input", "read_text_input"]


class Unsupported(NotImplementedError):
    """A mechanism that idtlab does not model (yet). The message names it.

        >>> str(Unsupported("IRET to a 16-bit code segment is not modelled"))
        'IRET to a 16-bit code segment is not modelled'
    """


class BadInput(Exception):
    """Invalid user input. `str(exc)` is a complete one-line message naming where; a
    line break in it (a user's value quoted back: a register name with a newline in
    it) is shown as `\\n`, so the message stays one line.

        >>> read_input("/no/such/file.toml", "a scenario")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        cpu.errors.BadInput: /no/such/file.toml: no such file
        >>> str(BadInput("unknown register 'rcx\\nhlt'"))
        "unknown register 'rcx\\\\nhlt'"
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


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


def read_text_input(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file the user named (a scenario, an assembly source); a
    `BadInput` naming the file and the first byte that is not UTF-8 when it is not text.

        >>> import tempfile, os
        >>> with tempfile.NamedTemporaryFile(suffix=".toml", delete=False) as f:
        ...     _ = f.write(b"a = 1\\n# caf\\xe9\\n")
        >>> read_text_input(f.name, "a scenario")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cpu.errors.BadInput: ...: not UTF-8 text (byte 0xe9 at line 2, column 6): a scenario is a UTF-8 file
        >>> os.unlink(f.name)
    """
    raw = read_input(path, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise BadInput(f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at line {line}, "
                       f"column {column}): {what} is a UTF-8 file") from None
