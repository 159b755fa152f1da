"""Keystone assembly of scenario code blocks, with a symbol table and line-accurate errors.

Keystone returns bytes and nothing else: no symbol table, no line map, and an error that
names neither the line nor the symbol. Worse, Keystone 0.9.2 gets several things silently
wrong once symbols are involved (all checked against capstone, see tests/unit):

* through `sym_resolver`, relative branches and `[rip + sym]` land 1-4 bytes past the
  symbol (the fixup is computed from the displacement field, not the instruction end),
  and `sym+8` silently becomes `sym`;
* `mov r64, [abs]` for any register but rax is emitted RIP-relative with the absolute
  address as displacement, i.e. it reads from the wrong place;
* `.text`/`.section` crash or silently drop the rest of the input, `.cfi_*` aborts the
  process, `.quad $` yields nothing, `jmp 0x100000000` truncates without an error;
* the default radix is uninitialised memory, and any `ks_option` call (setting
  `sym_resolver` is one) makes it 16, so "16" may mean 0x16 (keystone issues #481, #538).
  Every number therefore reaches Keystone rewritten as 0x hex.

So Keystone never sees a symbol it has to resolve by itself. Each *statement* (one
instruction or data directive) is assembled alone at its final address, after every known
symbol in it has been replaced by its number. Numbers are what Keystone encodes
correctly; the two places where it still cannot are repaired and then verified by
decoding the result with capstone:

* relative branch operands are evaluated to one absolute target (so `jmp sym+4` works),
  and the decoded target must equal it (catches silent truncation);
* a memory operand without registers (bracketed, or bracket-less as in `gs:sym` and
  `qword ptr sym`), or `[rip + sym]` (GNU semantics: address of `sym`), gets its
  effective address evaluated; if Keystone's encoding does not decode to that address
  it is re-encoded as `[rip + disp]` with `disp` computed here.

Label addresses depend on the sizes of the statements before them, which depend on label
addresses (short vs near jumps), so whole passes repeat until no label moves. The first
pass treats every forward reference as the referencing statement's own address, so
branches start short and only grow, the order in which relaxing assemblers converge.

Operand meaning follows Keystone, not GNU as, in one place: a bare symbol outside
brackets (`mov rax, sym`) is the immediate value of `sym`, as `mov rax, offset sym` is
(GNU's Intel mode would load from `sym`). Write `[sym]` for a memory operand.

Only statements that make sense in isolation are accepted: instructions, data, alignment
and `.set`/`.equ` constants (which become global symbols like labels). Everything else is
a `BadInput` naming the line, never a Keystone crash.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import capstone
import keystone
from capstone import x86_const as CX

from idtlab.errors import BadInput

MAX_PASSES = 10
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class CodeBlock:
    """One piece of Intel-syntax source to be placed at `at`.

    `origin` and `first_line` exist only for messages: line numbers in errors and in
    `AssembledBlock.line_addrs` are `first_line` + the line's index in `source`, so a
    block cut out of a TOML file still reports the TOML file's line numbers.
    """

    at: int
    source: str
    origin: str
    first_line: int = 1


@dataclass(frozen=True)
class AssembledBlock:
    """The bytes of one block plus what the trace needs to talk about them."""

    at: int
    code: bytes
    origin: str
    labels: dict[str, int]
    line_addrs: list[tuple[int, int]]

    @property
    def end(self) -> int:
        return self.at + len(self.code)


# --------------------------------------------------------------------------- names

def _register_names() -> frozenset[str]:
    names = {"rip", "eip", "ip", "riz", "eiz", "cs", "ds", "es", "fs", "gs", "ss", "st",
             "al", "bl", "cl", "dl", "ah", "bh", "ch", "dh", "spl", "bpl", "sil", "dil"}
    for base in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp"):
        names.update({base, "e" + base, "r" + base})
    for n in range(8, 16):
        names.update({f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b", f"r{n}l"})
    for n in range(16):
        names.update({f"cr{n}", f"dr{n}"})
    for n in range(32):
        names.update({f"xmm{n}", f"ymm{n}", f"zmm{n}"})
    for n in range(8):
        names.update({f"mm{n}", f"k{n}", f"st{n}", f"bnd{n % 4}"})
    return frozenset(names)


_REGISTERS = _register_names()
# Words that may stand where a symbol could, and therefore can never be one.
_KEYWORDS = frozenset({"byte", "word", "dword", "qword", "tbyte", "fword", "oword", "xword",
                       "xmmword", "ymmword", "zmmword", "ptr", "offset", "short", "near",
                       "far", "rel"})
_RESERVED = _REGISTERS | _KEYWORDS

_BRANCHES = frozenset({
    "jmp", "call", "loop", "loope", "loopz", "loopne", "loopnz", "jrcxz", "jecxz", "jcxz",
    "xbegin", "ja", "jae", "jb", "jbe", "jc", "je", "jg", "jge", "jl", "jle", "jna", "jnae",
    "jnb", "jnbe", "jnc", "jne", "jng", "jnge", "jnl", "jnle", "jno", "jnp", "jns", "jnz",
    "jo", "jp", "jpe", "jpo", "js", "jz",
})
_PREFIXES = frozenset({"lock", "rep", "repe", "repz", "repne", "repnz", "bnd", "notrack"})

_DATA_DIRECTIVES = frozenset({
    ".byte", ".2byte", ".4byte", ".8byte", ".short", ".hword", ".value", ".word", ".int",
    ".long", ".quad", ".ascii", ".asciz", ".string", ".fill", ".zero", ".skip", ".space",
    ".align", ".balign", ".p2align",
})
# Accepted for compatibility with GNU as sources and dropped: they change nothing here
# (there is one section, and symbols are global anyway). `.text` would crash Keystone.
_IGNORED_DIRECTIVES = frozenset({".intel_syntax", ".code64", ".globl", ".global", ".text",
                                 ".type", ".size"})

_NAME = r"[A-Za-z_.$][\w.$@]*"
_LABEL_RE = re.compile(rf"\s*({_NAME})\s*:(?!:)")
_SET_RE = re.compile(rf"\.(?:set|equ)\s+({_NAME})\s*,\s*(.+)", re.IGNORECASE)
_ASSIGN_RE = re.compile(rf"({_NAME})\s*=\s*(.+)")
# Strings and numbers are matched so that nothing inside them is taken for a name.
_TOKEN_RE = re.compile(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|\d[\w.]*|" + _NAME)
_OFFSET_RE = re.compile(r"\boffset\s+", re.IGNORECASE)
_BARE_SEGMENT_RE = re.compile(r"\b([c-gs]s)\s*:\s*([^\s\[\],][^,]*?)\s*(?=,|$)",
                              re.IGNORECASE)
_BARE_PTR_RE = re.compile(r"\bptr\s+(?!\[)(?![c-gs]s\s*:)([^,]+?)\s*(?=,|$)", re.IGNORECASE)
_BRACKET_RE = re.compile(r"(\[[^\[\]]*\])")
_RIP_FIRST_RE = re.compile(r"\s*rip\s*\+\s*(.+?)\s*", re.IGNORECASE)
_RIP_LAST_RE = re.compile(r"\s*(.+?)\s*\+\s*rip\s*", re.IGNORECASE)


class _StatementError(Exception):
    """A problem with one statement; the caller adds origin, line and source text."""


def _suggestion(name: str, candidates: Sequence[str] | Mapping[str, int]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _num(value: int) -> str:
    """A value as Keystone should read it; the upper half of the 64-bit space as negative,
    which is the same bit pattern but is accepted where a sign-extended imm32 is."""
    value &= _MASK64
    if value >= 1 << 63:
        return f"(-0x{(1 << 64) - value:x})"
    return f"0x{value:x}"


def _parse_number(token: str) -> int:
    """A GNU as / Intel number literal. Every number reaches Keystone rewritten as 0x hex
    because Keystone's default radix is whatever was in memory, and any `ks_option` call
    (setting `sym_resolver` is one) sets it to 16 (keystone issues #481, #538)."""
    t = token.lower()
    try:
        if t.startswith(("0x", "0b")):
            return int(t, 0)
        if t.endswith("h"):
            return int(t[:-1], 16)
        if len(t) > 1 and t.startswith("0"):
            return int(t, 8)
        return int(t, 10)
    except ValueError:
        hint = (" (numeric local labels are not supported; use a named label)"
                if re.fullmatch(r"\d+[bf]", t) else "")
        raise _StatementError(f"cannot read number '{token}'{hint}") from None


def _signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# --------------------------------------------------------------------------- resolve_address

_ADDR_RE = re.compile(rf"\s*({_NAME})\s*(?:([+-])\s*(0[xX][0-9a-fA-F]+|\d+))?\s*")


def resolve_address(value: int | str, symbols: Mapping[str, int], where: str) -> int:
    """An address given as a number, `"name"`, `"name+N"` or `"name-N"` (N decimal or
    0x hex). Scenario keys use this so that they can name handler and data symbols
    instead of hard-coding addresses that move whenever the code changes."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadInput(f"{where}: expected an address or a symbol name, got {value!r}")
    if isinstance(value, int):
        address = value
    else:
        text = value.strip()
        try:
            address = int(text, 0)
        except ValueError:
            m = _ADDR_RE.fullmatch(text)
            if m is None:
                raise BadInput(
                    f"{where}: cannot read {value!r} as an address "
                    "(expected a number, 'name', 'name+N' or 'name-N')") from None
            name, sign, offset = m.groups()
            if name not in symbols:
                raise BadInput(
                    f"{where}: unknown symbol '{name}'{_suggestion(name, symbols)}") from None
            delta = int(offset, 0) if offset else 0
            address = symbols[name] + (delta if sign != "-" else -delta)
    if not 0 <= address <= _MASK64:
        raise BadInput(f"{where}: address {address:#x} is outside the 64-bit address space")
    return address


# --------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class _Statement:
    line: int                 # absolute line number in the origin
    text: str                 # without labels and comment; "" for a label-only statement
    labels: tuple[str, ...]
    source_line: str          # the whole line, comment removed, for messages
    equate: tuple[str, str] | None = None


@dataclass(frozen=True)
class _ParsedBlock:
    block: CodeBlock
    statements: list[_Statement]


def _split_line(line: str) -> tuple[str, list[str]]:
    """(line without its `#` comment, its `;`-separated statements), quotes respected."""
    pieces: list[str] = []
    start = 0
    quote = ""
    i = 0
    code_end = len(line)
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            code_end = i
            break
        elif c == ";":
            pieces.append(line[start:i])
            start = i + 1
        i += 1
    pieces.append(line[start:code_end])
    return line[:code_end], pieces


def _parse_block(block: CodeBlock) -> _ParsedBlock:
    statements: list[_Statement] = []
    for index, raw in enumerate(block.source.splitlines()):
        line_no = block.first_line + index
        code, pieces = _split_line(raw)
        source_line = code.strip()

        def fail(message: str, line_no: int = line_no,
                 source_line: str = source_line) -> NoReturn:
            raise BadInput(f"{block.origin} line {line_no}: {message} in `{source_line}`")

        for piece in pieces:
            text = piece.strip()
            labels: list[str] = []
            while (m := _LABEL_RE.match(text)) is not None:
                name = m.group(1)
                if name in (".", "$") or name.lower() in _RESERVED:
                    fail(f"'{name}' cannot be a label (it is a register or keyword)")
                labels.append(name)
                text = text[m.end():].strip()
            equate: tuple[str, str] | None = None
            if (m := _SET_RE.fullmatch(text) or _ASSIGN_RE.fullmatch(text)) is not None:
                name = m.group(1)
                if name in (".", "$") or name.lower() in _RESERVED:
                    fail(f"'{name}' cannot be a symbol (it is a register or keyword)")
                equate = (name, m.group(2).strip())
                text = ""
            elif text.startswith("."):
                directive = text.split(None, 1)[0].lower()
                if directive in _IGNORED_DIRECTIVES:
                    text = ""
                elif directive == ".att_syntax":
                    fail("idtlab assembles Intel syntax only")
                elif directive not in _DATA_DIRECTIVES:
                    fail(f"unsupported directive '{directive}' (idtlab accepts instructions, "
                         "data, alignment and .set/.equ)")
            problem = _quoting_problem(text)
            if problem is not None:
                fail(problem)
            if text or labels or equate:
                statements.append(_Statement(line_no, text, tuple(labels), source_line, equate))
    return _ParsedBlock(block, statements)


def _quoting_problem(text: str) -> str | None:
    """What Keystone would not survive in a statement: a backslash outside a quoted
    string, or a string left open (Keystone 0.9.2 loops for ever on a statement that
    starts with a backslash, e.g. a literal `\\n` in single-quoted TOML, and on an
    unterminated string that ends in one)."""
    quote: str | None = None
    escaped = False
    for ch in text:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "\\":
            return ("a backslash outside a string (a literal \\n in single-quoted TOML? use a "
                    "triple-quoted \"\"\"...\"\"\" string, or separate statements with ';')")
    if quote is not None:
        return f"a string opened with {quote} is not closed"
    return None


# --------------------------------------------------------------------------- encoding

Lookup = Callable[[str], int | None]


class _Encoder:
    """Assembles single statements at absolute addresses (see the module docstring)."""

    def __init__(self) -> None:
        self._ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
        self.refused: list[str] = []
        # Also pins Keystone's radix to 16 (any ks_option call does); numbers are always
        # written as 0x hex, so that radix is harmless where an unset one is not.
        self._ks.sym_resolver = self._refuse
        self._cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._cs.detail = True
        self._cache: dict[tuple[str, int], bytes] = {}

    def _refuse(self, name: bytes, _value: Any) -> bool:
        """Keystone asks only about names we did not substitute, i.e. unknown ones."""
        self.refused.append(name.decode("ascii", "replace"))
        return False

    def _asm(self, text: str, address: int) -> bytes:
        key = (text, address)
        if key not in self._cache:
            encoding, _count = self._ks.asm(text, address, as_bytes=True)
            self._cache[key] = bytes(encoding or b"")
        return self._cache[key]

    @staticmethod
    def substitute(text: str, lookup: Lookup, here: int) -> tuple[str, bool]:
        """Replace symbol names (and `$`/`.`, the statement's address) by numbers."""
        used = False

        def replace(m: re.Match[str]) -> str:
            nonlocal used
            token = m.group(0)
            if token[0].isdigit():
                return f"0x{_parse_number(token):x}"
            if token[0] in "\"'" or token.lower() in _RESERVED:
                return token
            value = here if token in ("$", ".") else lookup(token)
            if value is None:
                return token
            used = True
            return _num(value)

        return _TOKEN_RE.sub(replace, text), used

    def evaluate(self, expr: str, address: int) -> int:
        """The value of a symbol-free expression, by Keystone's own expression rules."""
        expr = expr.strip()
        try:
            return int(expr, 0) & _MASK64
        except ValueError:
            pass
        code = self._asm(f".quad ({expr})", address)
        if len(code) != 8:
            raise _StatementError(f"cannot evaluate `{expr}`")
        return int.from_bytes(code, "little")

    def _decode(self, code: bytes, address: int) -> Any:
        return next(self._cs.disasm(code, address, 1), None)

    def _effective_address(self, code: bytes, address: int) -> int | None:
        insn = self._decode(code, address)
        if insn is None:
            return None
        for op in insn.operands:
            if op.type != CX.X86_OP_MEM or op.mem.index != CX.X86_REG_INVALID:
                continue
            if op.mem.base == CX.X86_REG_RIP:
                return int(address + insn.size + op.mem.disp) & _MASK64
            if op.mem.base == CX.X86_REG_INVALID:
                return int(op.mem.disp) & _MASK64
        return None

    def encode(self, text: str, address: int, lookup: Lookup) -> bytes:
        words = text.split(None, 1)
        head = words[0]
        rest = words[1] if len(words) > 1 else ""
        if head.startswith("."):
            body, _ = self.substitute(rest, lookup, address)
            return self._asm(f"{head} {body}", address)
        # `offset sym` is GNU's way to ask for the immediate; Keystone rejects the word
        # and already reads a bare `sym` outside brackets as the immediate.
        rest = _OFFSET_RE.sub("", rest)
        # Bracket-less memory operands (`gs:sym`, `qword ptr sym`) get brackets, so that
        # the memory-operand check below sees them.
        rest = _BARE_SEGMENT_RE.sub(r"\1:[\2]", rest)
        rest = _BARE_PTR_RE.sub(r"ptr [\1]", rest)
        # Look through prefixes so that `bnd jmp x` is still a branch.
        while head.lower() in _PREFIXES and rest:
            word, _, rest = rest.strip().partition(" ")
            head = f"{head} {word}"
        mnemonic = head.split()[-1].lower()
        if mnemonic in _BRANCHES and self._is_plain_target(rest):
            code = self._encode_branch(head, rest, address, lookup)
        else:
            code = self._encode_with_memory(head, rest, address, lookup)
        if not code:
            raise _StatementError("Keystone produced no machine code")
        return code

    @staticmethod
    def _is_plain_target(operand: str) -> bool:
        if not operand.strip() or "[" in operand or ":" in operand:
            return False
        return not any(t.lower() in _RESERVED for t in _TOKEN_RE.findall(operand))

    def _encode_branch(self, head: str, operand: str, address: int, lookup: Lookup) -> bytes:
        expr, _ = self.substitute(operand, lookup, address)
        target = self.evaluate(expr, address)
        try:
            code = self._asm(f"{head} 0x{target:x}", address)
        except keystone.KsError as e:
            if e.errno == keystone.KS_ERR_ASM_FIXUP_INVALID:
                raise _StatementError(
                    f"branch target {target:#x} is out of reach from {address:#x}") from None
            raise
        insn = self._decode(code, address)
        imms = [op.imm & _MASK64 for op in insn.operands if op.type == CX.X86_OP_IMM] \
            if insn is not None else []
        if imms != [target]:
            raise _StatementError(
                f"branch target {target:#x} is out of reach from {address:#x}")
        return code

    def _encode_with_memory(self, head: str, operands: str, address: int,
                            lookup: Lookup) -> bytes:
        parts = _BRACKET_RE.split(operands)
        brackets = [i for i, p in enumerate(parts) if p.startswith("[")]
        out: list[str] = []
        target: int | None = None
        mem_index = -1
        force_rip = False
        for i, part in enumerate(parts):
            if not part.startswith("["):
                out.append(self.substitute(part, lookup, address)[0])
                continue
            inner, used = self.substitute(part[1:-1], lookup, address)
            names = [t for t in _TOKEN_RE.findall(inner)
                     if not (t[0].isdigit() or t[0] in "\"'")]
            registers = [t.lower() for t in names if t.lower() in _REGISTERS]
            if len(brackets) == 1 and len(registers) == len(names) and ":" not in inner:
                if registers == ["rip"] and used:
                    m = _RIP_FIRST_RE.fullmatch(inner) or _RIP_LAST_RE.fullmatch(inner)
                    if m is not None:
                        target = self.evaluate(m.group(1), address)
                        force_rip = True
                elif not registers:
                    target = self.evaluate(inner, address)
                    inner = _num(target)
                mem_index = i
            out.append(f"[{inner}]")

        def render(parts_out: list[str]) -> str:
            body = "".join(parts_out).strip()
            return f"{head} {body}" if body else head

        if target is None:
            return self._asm(render(out), address)
        if not force_rip:
            code = self._asm(render(out), address)
            if self._effective_address(code, address) in (target, None):
                return code
        # Keystone's own encoding does not reach `target`: encode it RIP-relative.
        out[mem_index] = "[rip]"
        end = address + len(self._asm(render(out), address))
        disp = _signed64(target - end)
        if not -(1 << 31) <= disp < 1 << 31:
            raise _StatementError(
                f"cannot encode memory operand: {target:#x} is out of RIP-relative "
                f"reach from {address:#x}")
        out[mem_index] = f"[rip {'+' if disp >= 0 else '-'} 0x{abs(disp):x}]"
        code = self._asm(render(out), address)
        if self._effective_address(code, address) not in (target, None):
            raise _StatementError(f"cannot encode a memory operand at {target:#x}")
        return code


# --------------------------------------------------------------------------- assembly

@dataclass
class _Placed:
    statement: _Statement
    address: int
    code: bytes


def _check_definitions(parsed: list[_ParsedBlock], known: Mapping[str, int]) -> set[str]:
    defined: dict[str, str] = {}
    for pb in parsed:
        for st in pb.statements:
            names = list(st.labels) + ([st.equate[0]] if st.equate else [])
            for name in names:
                where = f"{pb.block.origin} line {st.line}"
                if name in known:
                    raise BadInput(f"{where}: label '{name}' already defined at "
                                   f"{known[name]:#x} (a predefined symbol)")
                if name in defined:
                    raise BadInput(f"{where}: label '{name}' already defined at "
                                   f"{defined[name]}")
                defined[name] = where
    return set(defined)


def _check_overlaps(blocks: list[AssembledBlock]) -> None:
    placed = sorted((b for b in blocks if b.code), key=lambda b: b.at)
    for prev, nxt in itertools.pairwise(placed):
        if nxt.at < prev.end:
            raise BadInput(
                f"{prev.origin} [{prev.at:#x}, {prev.end:#x}) overlaps "
                f"{nxt.origin} [{nxt.at:#x}, {nxt.end:#x})")


def assemble_blocks(blocks: Sequence[CodeBlock],
                    known: Mapping[str, int]) -> tuple[list[AssembledBlock], dict[str, int]]:
    """Assemble `blocks` together; labels of every block are visible in every block.

    Returns the assembled blocks (in input order) and the full symbol table: `known`
    plus every label and `.set`/`.equ` constant. The same input assembles to the same
    output, so the last few results are kept (the explorer and the scenario runners load
    one scenario many times; Keystone takes most of a load); each call gets its own
    copies.
    """
    key = (tuple(blocks), tuple(sorted(known.items())), MAX_PASSES)
    done = _ASSEMBLED.get(key)
    if done is None:
        done = _assemble(blocks, known)
        if len(_ASSEMBLED) >= _ASSEMBLED_LIMIT:
            del _ASSEMBLED[next(iter(_ASSEMBLED))]
        _ASSEMBLED[key] = done
    assembled, symbols = done
    return ([dataclasses.replace(b, labels=dict(b.labels), line_addrs=list(b.line_addrs))
             for b in assembled], dict(symbols))


_ASSEMBLED_LIMIT = 32
_ASSEMBLED: dict[tuple[tuple[CodeBlock, ...], tuple[tuple[str, int], ...], int],
                 tuple[list[AssembledBlock], dict[str, int]]] = {}


def _assemble(blocks: Sequence[CodeBlock],
              known: Mapping[str, int]) -> tuple[list[AssembledBlock], dict[str, int]]:
    parsed = [_parse_block(b) for b in blocks]
    defined = _check_definitions(parsed, known)
    encoder = _Encoder()
    prev: dict[str, int] = {}
    for _pass in range(MAX_PASSES):
        cur: dict[str, int] = {}
        layout = [_place_block(pb, known, defined, prev, cur, encoder) for pb in parsed]
        if cur == prev:
            break
        prev = cur
    else:
        first = blocks[0].origin if blocks else "assembly"
        raise BadInput(f"{first}: label addresses did not settle after {MAX_PASSES} passes "
                       "(instruction sizes keep changing; check .align near branches)")

    assembled: list[AssembledBlock] = []
    for pb, placed in zip(parsed, layout, strict=True):
        labels = {name: cur[name] for p in placed for name in p.statement.labels}
        assembled.append(AssembledBlock(
            at=pb.block.at,
            code=b"".join(p.code for p in placed),
            origin=pb.block.origin,
            labels=labels,
            line_addrs=[(p.address, p.statement.line) for p in placed if p.code],
        ))
    _check_overlaps(assembled)
    symbols = dict(known)
    symbols.update(cur)
    return assembled, symbols


def _place_block(pb: _ParsedBlock, known: Mapping[str, int], defined: set[str],
                 prev: Mapping[str, int], cur: dict[str, int],
                 encoder: _Encoder) -> list[_Placed]:
    """One pass over one block: addresses of its labels into `cur`, bytes out."""
    address = pb.block.at
    placed: list[_Placed] = []
    for st in pb.statements:
        for name in st.labels:
            cur[name] = address
        here = address

        def lookup(name: str, here: int = here) -> int | None:
            if name in known:
                return known[name]
            if name in cur:
                return cur[name]
            if name in prev:
                return prev[name]
            return here if name in defined else None

        code = b""
        encoder.refused.clear()
        try:
            if st.equate is not None:
                expr, _ = encoder.substitute(st.equate[1], lookup, address)
                cur[st.equate[0]] = encoder.evaluate(expr, address)
            elif st.text:
                code = encoder.encode(st.text, address, lookup)
        except keystone.KsError as e:
            raise BadInput(_ks_message(pb.block.origin, st, e, encoder.refused,
                                       defined | set(known))) from None
        except _StatementError as e:
            raise BadInput(f"{pb.block.origin} line {st.line}: {e} in `{st.source_line}`") \
                from None
        except UnicodeEncodeError:
            raise BadInput(f"{pb.block.origin} line {st.line}: non-ASCII character in "
                           f"`{st.source_line}`") from None
        placed.append(_Placed(st, address, code))
        address += len(code)
    return placed


def _ks_message(origin: str, st: _Statement, error: Exception, refused: list[str],
                names: set[str]) -> str:
    where = f"{origin} line {st.line}"
    if refused:
        name = refused[0]
        return f"{where}: unknown symbol '{name}'{_suggestion(name, sorted(names))}"
    message = str(error)
    message = message[:1].lower() + message[1:]
    return f"{where}: {message} in `{st.source_line}`"
