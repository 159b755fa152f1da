"""`[[data]]`: blocks of guest memory, zero-filled or initialised, optionally named.

A block claims its region of guest memory (no overlap with code, images or the
machine's system area); `u64`, `u32` and `u8` arrays give initial values in that order,
little-endian, and the rest up to `size` is zero. A `symbol` names the block's address
for the other tables and the assembly.
"""

from __future__ import annotations

import re

from idtlab.scenario.context import Build

DATA_KEYS = ("at", "symbol", "size", "u64", "u32", "u8")
SYMBOL_NAME = re.compile(r"[A-Za-z_.$][\w.$]*")


def build_data(b: Build) -> None:
    """Load every `[[data]]` block and define its symbol."""
    chk = b.chk
    for i, d in enumerate(chk.array_of_tables(b.data.get("data", []), "[[data]]"), 1):
        where = f"[[data]] #{i}"
        chk.keys(d, DATA_KEYS, where)
        if "at" not in d:
            raise chk.fail(where, "missing key 'at'")
        at = chk.int_(d["at"], f"{where} at")
        blob = bytearray()
        for key, width in (("u64", 8), ("u32", 4), ("u8", 1)):
            if key in d:
                if not isinstance(d[key], list):
                    raise chk.fail(f"{where} {key}", "expected an array of integers")
                for j, v in enumerate(d[key]):
                    blob += chk.int_(v, f"{where} {key}[{j}]", 0, 2 ** (8 * width) - 1).to_bytes(
                        width, "little")
        size = chk.int_(d.get("size", len(blob) or 8), f"{where} size", 1)
        if len(blob) > size:
            raise chk.fail(where, f"{len(blob)} initialised bytes exceed size {size}")
        b.region(at, size, where)  # before the zero fill: a size beyond RAM is an error here
        blob += bytes(size - len(blob))
        b.machine.load(at, bytes(blob))
        if "symbol" in d:
            sym = d["symbol"]
            if not isinstance(sym, str) or not SYMBOL_NAME.fullmatch(sym):
                raise chk.fail(f"{where} symbol", f"{sym!r} is not a valid symbol name")
            if sym in b.symbols:
                raise chk.fail(f"{where} symbol", f"'{sym}' is already defined")
            b.symbols[sym] = at
