"""`[[code]]`: Intel-syntax assembly, inline or from a file, loaded as code.

All blocks are assembled together (`idtlab.assemble`), so a label defined in one block
is known in every other and in the other tables; each block claims its region of guest
memory. An assembly error names the scenario file, the block and the line of the TOML
file it is on (`_asm_first_line` finds where a block's `asm` string starts).
"""

from __future__ import annotations

import re

from idtlab.assemble import CodeBlock, assemble_blocks
from idtlab.errors import BadInput, read_text_input
from idtlab.scenario.context import Build

CODE_KEYS = ("at", "asm", "file")


def build_code(b: Build) -> None:
    """Assemble every `[[code]]` block, load it as code and define its labels."""
    chk, path = b.chk, b.path
    blocks: list[CodeBlock] = []
    for i, c in enumerate(chk.array_of_tables(b.data.get("code", []), "[[code]]"), 1):
        where = f"[[code]] #{i}"
        chk.keys(c, CODE_KEYS, where)
        if "at" not in c:
            raise chk.fail(where, "missing key 'at'")
        at = chk.int_(c["at"], f"{where} at")
        if ("asm" in c) == ("file" in c):
            raise chk.fail(where, "give exactly one of 'asm' (inline source) or 'file'")
        if "asm" in c:
            if not isinstance(c["asm"], str):
                raise chk.fail(f"{where} asm", "expected a string")
            blocks.append(CodeBlock(at, c["asm"], f"{path.name} {where}",
                                    _asm_first_line(b.text, i, c["asm"])))
        else:
            src = path.parent / str(c["file"])
            try:
                source = read_text_input(src, "an assembly source")
            except BadInput as exc:
                raise chk.fail(f"{where} file", str(exc)) from None
            blocks.append(CodeBlock(at, source, src.name, 1))
    if blocks:
        assembled, code_symbols = assemble_blocks(blocks, b.symbols)
        for blk in assembled:
            b.region(blk.at, max(1, len(blk.code)), blk.origin)
            b.machine.load(blk.at, blk.code, code=True)
        b.symbols.update(code_symbols)


def _asm_first_line(text: str, index: int, asm: str) -> int:
    """Line number in the TOML file where the index-th [[code]] block's asm text starts."""
    if not text:
        return 1
    lines = text.splitlines()
    seen = 0
    first = asm.splitlines()[0].strip() if asm.strip() else ""
    for n, line in enumerate(lines, 1):
        if line.strip() == "[[code]]":
            seen += 1
        if seen == index and re.match(r"\s*asm\s*=", line):
            rest = line.split("=", 1)[1].strip()
            if rest.startswith(('"""', "'''")) and rest[3:].strip() == "":
                return n + 1  # multi-line string: TOML drops the first newline
            return n if first and first in line else n + 1
    return 1
