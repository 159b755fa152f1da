"""idtlab.assemble: symbols across blocks, relaxation, Keystone workarounds, messages.

Every encoding claim is checked by decoding with capstone rather than by comparing
bytes, because what matters is where an instruction jumps or which address it reads.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import capstone
import keystone
import pytest
from capstone import x86_const as CX

from idtlab.assemble import (
    MAX_PASSES,
    AssembledBlock,
    CodeBlock,
    assemble_blocks,
    resolve_address,
)
from idtlab.errors import BadInput

BASE = 0x200000
_MASK64 = (1 << 64) - 1

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True


def asm(source: str, known: dict[str, int] | None = None, at: int = BASE,
        origin: str = "t.s", first_line: int = 1) -> AssembledBlock:
    blocks, _ = assemble_blocks([CodeBlock(at, source, origin, first_line)], known or {})
    return blocks[0]


def decode(block: AssembledBlock) -> list[Any]:
    insns = list(_cs.disasm(block.code, block.at))
    assert sum(i.size for i in insns) == len(block.code), "code does not decode cleanly"
    return insns


def first_insn(block: AssembledBlock) -> Any:
    """The first instruction only, for blocks that continue with data."""
    return next(_cs.disasm(block.code, block.at, 1))


def target_of(insn: Any) -> int:
    """Branch target, or effective address of an absolute / RIP-relative operand."""
    for op in insn.operands:
        if op.type == CX.X86_OP_IMM and insn.group(capstone.CS_GRP_BRANCH_RELATIVE):
            return int(op.imm) & _MASK64
        if op.type == CX.X86_OP_MEM:
            return target_of_operand(insn, op)
    raise AssertionError(f"no target in {insn.mnemonic} {insn.op_str}")


def target_of_operand(insn: Any, op: Any) -> int:
    if op.mem.index != CX.X86_REG_INVALID:
        raise ValueError("indexed operand")
    if op.mem.base == CX.X86_REG_RIP:
        return (int(insn.address) + int(insn.size) + int(op.mem.disp)) & _MASK64
    if op.mem.base == CX.X86_REG_INVALID:
        return int(op.mem.disp) & _MASK64
    raise ValueError("register-based operand")


def bad_input(source: str, known: dict[str, int] | None = None, **kw: Any) -> str:
    with pytest.raises(BadInput) as info:
        asm(source, known, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- labels

def test_a_label_defined_in_one_block_is_usable_from_another() -> None:
    blocks, symbols = assemble_blocks(
        [CodeBlock(BASE, "main:\n  call helper\n  hlt\n", "a.s", 1),
         CodeBlock(0x300000, "helper:\n  jmp main\n", "b.s", 1)], {})
    main, helper = blocks
    assert symbols["main"] == BASE and symbols["helper"] == 0x300000
    assert main.labels == {"main": BASE} and helper.labels == {"helper": 0x300000}
    assert target_of(decode(main)[0]) == 0x300000
    assert target_of(decode(helper)[0]) == BASE


def test_a_forward_jump_to_a_label_in_the_same_block_resolves() -> None:
    block = asm("  jmp done\n  nop\n  nop\ndone:\n  hlt\n")
    jmp = decode(block)[0]
    assert jmp.size == 2, "a short forward jump should stay short"
    assert target_of(jmp) == block.labels["done"] == BASE + 4


def test_known_symbols_are_usable_and_returned_with_the_labels() -> None:
    blocks, symbols = assemble_blocks(
        [CodeBlock(BASE, "start: lidt [idt_ptr]\n  .quad tss\n", "a.s", 1)],
        {"idt_ptr": 0x1000, "tss": 0x3000})
    assert target_of(first_insn(blocks[0])) == 0x1000
    assert blocks[0].code.endswith((0x3000).to_bytes(8, "little"))
    assert symbols == {"idt_ptr": 0x1000, "tss": 0x3000, "start": BASE}


def test_a_jump_over_more_than_127_bytes_becomes_a_near_jump() -> None:
    block = asm("  jmp far_away\n  .fill 200, 1, 0x90\nfar_away:\n  hlt\n")
    jmp = decode(block)[0]
    assert jmp.size == 5
    assert block.labels["far_away"] == BASE + 5 + 200
    assert target_of(jmp) == block.labels["far_away"]


def test_labels_settle_when_one_jump_growing_pushes_another_out_of_short_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # `jne end` fits a short jump (2 + 124 bytes) until the `jmp far_end` between it and
    # `end` has grown to a near jump (+3 bytes): only the pass after that one finds out.
    source = ("  jne end\n"
              "  jmp far_end\n"
              "  .fill 124, 1, 0x90\n"
              "end:\n"
              "  .fill 200, 1, 0x90\n"
              "far_end:\n  hlt\n")
    block = asm(source)
    jne, jmp = decode(block)[:2]
    assert (jne.size, jmp.size) == (6, 5)
    assert block.labels["end"] == BASE + 6 + 5 + 124
    assert block.labels["far_end"] == block.labels["end"] + 200
    assert target_of(jne) == block.labels["end"]
    assert target_of(jmp) == block.labels["far_end"]
    # It really is a cascade: optimistic pass, jmp grows, jne grows, confirming pass.
    import idtlab.assemble as assemble

    monkeypatch.setattr(assemble, "MAX_PASSES", 3)
    with pytest.raises(BadInput, match="did not settle"):
        asm(source)


def test_a_backward_short_loop_stays_short() -> None:
    block = asm("top:\n  dec rcx\n  jnz top\n  loop top\n")
    insns = decode(block)
    assert [i.size for i in insns] == [3, 2, 2]
    assert target_of(insns[1]) == target_of(insns[2]) == BASE


def test_a_label_at_the_end_of_a_block_is_the_address_after_its_last_byte() -> None:
    block = asm("  nop\n  nop\nend:\n")
    assert block.labels == {"end": BASE + 2}


def test_several_labels_may_share_a_line_and_an_address() -> None:
    block = asm("a: b: nop\nc:\nd: nop\n")
    assert block.labels == {"a": BASE, "b": BASE, "c": BASE + 1, "d": BASE + 1}


def test_set_and_equ_define_global_constants() -> None:
    blocks, symbols = assemble_blocks(
        [CodeBlock(BASE, ".set FRAME, 5*8\nSLOT = FRAME - 8\n  add rsp, FRAME\n", "a.s", 1),
         CodeBlock(0x300000, "  .equ AFTER, main_end + 2\n  mov rax, [rsp + SLOT]\n"
                             "  .quad AFTER\n", "b.s", 1),
         CodeBlock(0x400000, "main_end:\n", "c.s", 1)], {})
    assert symbols["FRAME"] == 40 and symbols["SLOT"] == 32
    assert symbols["AFTER"] == 0x400002
    assert decode(blocks[0])[0].op_str == "rsp, 0x28"
    assert "rsp + 0x20" in first_insn(blocks[1]).op_str
    assert blocks[1].code.endswith((0x400002).to_bytes(8, "little"))


def test_dollar_and_dot_are_the_address_of_their_statement() -> None:
    block = asm("  nop\n  jmp $\n  .quad .\n")
    assert target_of(list(_cs.disasm(block.code, block.at, 2))[1]) == BASE + 1
    assert block.code[-8:] == (BASE + 3).to_bytes(8, "little")


# --------------------------------------------------------------------------- syntax

def test_hash_starts_a_comment_and_semicolon_separates_statements() -> None:
    block = asm("  nop # a comment; not a statement\n"
                "  mov al, '#' ; mov bl, ';'\n"
                "  .ascii \"a;b#c\"  # string kept whole\n")
    assert block.code == bytes.fromhex("90 b023 b33b") + b"a;b#c"


def test_line_addrs_map_every_statement_to_its_origin_line() -> None:
    source = "start:\n  nop\n\n  # comment only\n  xor eax, eax ; inc eax\nend:\n"
    block = asm(source, first_line=40)
    assert block.line_addrs == [(BASE, 41), (BASE + 1, 44), (BASE + 3, 44)]


def test_decimal_numbers_stay_decimal_whatever_keystone_radix_is() -> None:
    # Keystone reads "10" as 0x10 once any option is set (keystone issue #481).
    block = asm("  mov rax, [rsp + 16]\n  .byte 10, 010, 0b11, 0ah, 16h\n  .fill 16, 1, 0\n")
    assert "rsp + 0x10" in first_insn(block).op_str
    assert block.code[5:10] == bytes([10, 8, 3, 10, 0x16])
    assert len(block.code) == 5 + 5 + 16


def test_offset_asks_for_the_immediate_like_a_bare_symbol() -> None:
    block = asm("  mov rax, offset handler\n  mov rbx, handler\n", {"handler": 0x3000})
    assert [i.op_str for i in decode(block)] == ["rax, 0x3000", "rbx, 0x3000"]


def test_gnu_housekeeping_directives_are_accepted_and_ignored() -> None:
    block = asm(".intel_syntax noprefix\n.text\n.globl main\n.type main, @function\n"
                "main: nop\n")
    assert block.code == b"\x90" and block.labels == {"main": BASE}


@pytest.mark.parametrize("line", [".section .data", ".data", ".rept 3", ".cfi_startproc",
                                  ".org 0x10", ".incbin \"x\""])
def test_directives_keystone_mishandles_are_rejected_with_the_line(line: str) -> None:
    message = bad_input(f"  nop\n  {line}\n", origin="demo.toml [[code]] #1", first_line=7)
    assert message.startswith("demo.toml [[code]] #1 line 8: unsupported directive")
    assert message.endswith(f"in `{line}`")


def test_att_syntax_is_refused() -> None:
    assert "Intel syntax only" in bad_input(".att_syntax\n")


def test_a_register_name_cannot_be_a_label() -> None:
    assert "'rax' cannot be a label" in bad_input("rax: nop\n")


def test_numeric_local_labels_are_refused_with_a_hint() -> None:
    message = bad_input("  jmp 1f\n1: nop\n")
    assert "t.s line 1: cannot read number '1f'" in message
    assert "use a named label" in message


# --------------------------------------------------------------------------- Keystone fixes

@pytest.mark.parametrize(("line", "expected"), [
    ("mov rbx, [data]", 0x5000),              # Keystone: RIP-relative with disp=0x5000
    ("mov rcx, qword ptr [data + 8]", 0x5008),
    ("mov rax, [data + 8]", 0x5008),          # movabs; Keystone's resolver drops +8
    ("mov [data + 16], rdx", 0x5010),
    ("mov qword ptr [data], 1", 0x5000),
    ("inc dword ptr [data + 4]", 0x5004),
    ("lea rsi, [rip + data + 8]", 0x5008),    # GNU meaning: address of data+8
    ("lea rsi, [data + 8 + rip]", 0x5008),
    ("mov rbx, gs:[data]", 0x5000),
    ("mov rbx, gs:data", 0x5000),             # bracket-less forms get the same repair
    ("mov rbx, qword ptr data + 8", 0x5008),
    ("call qword ptr [rip + data]", 0x5000),
    ("jmp qword ptr [data]", 0x5000),
    ("jmp handler", 0x300000),                # resolver: lands 4 bytes late
    ("jmp handler + 4", 0x300004),            # Keystone: "invalid operand"
    ("call handler - 0x10", 0x2ffff0),
    ("jne handler", 0x300000),
    ("loop near_label", 0x200040),
])
def test_symbolic_operands_reach_the_symbol(line: str, expected: int) -> None:
    known = {"data": 0x5000, "handler": 0x300000, "near_label": 0x200040}
    block = asm(f"  {line}\n", known)
    (insn,) = decode(block)
    assert target_of(insn) == expected


def test_a_literal_rip_displacement_is_left_alone() -> None:
    block = asm("  lea rax, [rip + 0x10]\n")
    assert decode(block)[0].op_str == "rax, [rip + 0x10]"


def test_a_branch_out_of_reach_is_an_error_not_a_silent_truncation() -> None:
    message = bad_input("  jmp 0x100200000\n")
    assert message == ("t.s line 1: branch target 0x100200000 is out of reach from 0x200000 "
                       "in `jmp 0x100200000`")
    assert "out of reach" in bad_input("  loop far_away\n", {"far_away": 0x300000})


def test_a_memory_operand_out_of_rip_reach_is_an_error_when_no_encoding_fits() -> None:
    assert "out of RIP-relative reach" in bad_input("  mov rbx, [0xfee00020]\n")
    # ...but rax has a 64-bit absolute form, which Keystone picks.
    assert target_of(decode(asm("  mov rax, [0xfee00020]\n"))[0]) == 0xFEE00020


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                    reason="needs GNU binutils")
def test_every_symbolic_form_means_what_gnu_as_means(tmp_path: Path) -> None:
    """Differential check: the same lines through GNU as + ld and through idtlab must
    decode to the same instructions reaching the same addresses (encodings may differ)."""
    lines = [
        "mov rbx, [data]", "mov rbx, [data + 8]", "mov rax, [data]", "mov eax, [data + 4]",
        "mov [data], rcx", "mov qword ptr [data + 16], 5", "inc qword ptr [data]",
        "lea rax, [rip + target]", "lea rsi, [rip + data + 8]", "mov rdx, [rip + data]",
        "jmp target", "jmp target + 4", "call target", "jne target", "je target + 16",
        "mov rax, offset data", "mov rax, [rbx + data]", "movzx eax, byte ptr [data + 3]",
        "cmp qword ptr [data], 0", "call qword ptr [rip + data]", "jmp qword ptr [data]",
        "mov dword ptr [rip + data + 4], 7", "add qword ptr [data], 1000",
        "mov rbx, gs:data", "mov rcx, qword ptr data", "mov fs:[data + 8], rsi",
    ]
    src = tmp_path / "d.s"
    src.write_text(".intel_syntax noprefix\n.text\n" + "\n".join(lines) + "\n")
    subprocess.run(["as", "--64", "-o", str(tmp_path / "d.o"), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x200000", "--defsym", "data=0x5000",
                    "--defsym", "target=0x300000", "-e", "0", "-o", str(tmp_path / "d.elf"),
                    str(tmp_path / "d.o")], check=True)
    gnu_text = _text_section(tmp_path / "d.elf")
    gnu = list(_cs.disasm(gnu_text, BASE))
    ours = decode(asm("\n".join(lines), {"data": 0x5000, "target": 0x300000}))
    assert [_meaning(i) for i in ours] == [_meaning(i) for i in gnu]


def _text_section(path: Path) -> bytes:
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        text = ELFFile(f).get_section_by_name(".text")
        assert text is not None
        return bytes(text.data())


def _meaning(insn: Any) -> tuple[object, ...]:
    mnemonic = "mov" if insn.mnemonic == "movabs" else insn.mnemonic
    operands: list[object] = []
    for op in insn.operands:
        if op.type == CX.X86_OP_REG:
            operands.append(insn.reg_name(op.reg))
        elif op.type == CX.X86_OP_IMM:
            operands.append(int(op.imm) & _MASK64)
        else:
            try:
                operands.append(("mem", op.size, target_of_operand(insn, op)))
            except ValueError:
                operands.append(("mem", op.size, insn.reg_name(op.mem.base),
                                 int(op.mem.disp)))
    return (mnemonic, *operands)


# --------------------------------------------------------------------------- errors

def test_an_invalid_mnemonic_is_reported_with_its_origin_line_and_text() -> None:
    message = bad_input("  nop\n  nop\n  movx rax, 1   # typo\n",
                        origin="demo.toml [[code]] #2", first_line=12)
    assert message == ("demo.toml [[code]] #2 line 14: invalid mnemonic "
                       "(KS_ERR_ASM_MNEMONICFAIL) in `movx rax, 1`")


def test_a_bad_operand_is_reported_with_its_line() -> None:
    message = bad_input("  nop\n  mov rax, rbx, rcx\n")
    assert message.startswith("t.s line 2: invalid operand")
    assert message.endswith("in `mov rax, rbx, rcx`")


def test_an_error_in_the_second_statement_of_a_line_names_that_line() -> None:
    assert bad_input("  nop\n  nop ; bogus\n").startswith("t.s line 2: invalid mnemonic")


def test_an_unknown_symbol_is_named_and_a_close_match_suggested() -> None:
    known = {"pf_handler": 0x3000, "gp_handler": 0x4000}
    message = bad_input("  nop\n  jmp pf_handlr\n", known, origin="demo.toml [[code]] #1",
                        first_line=6)
    assert message == ("demo.toml [[code]] #1 line 7: unknown symbol 'pf_handlr'; "
                       "did you mean 'pf_handler'?")


def test_an_unknown_symbol_in_a_memory_operand_is_named_too() -> None:
    message = bad_input("  mov rax, [countr + 8]\n", {"counter": 0x5000})
    assert message == "t.s line 1: unknown symbol 'countr'; did you mean 'counter'?"


def test_a_label_in_another_block_is_suggested_for_a_misspelling() -> None:
    with pytest.raises(BadInput, match="did you mean 'recover'"):
        assemble_blocks([CodeBlock(BASE, "  jmp recovr\n", "a.s", 1),
                         CodeBlock(0x300000, "recover: hlt\n", "b.s", 1)], {})


def test_an_unknown_symbol_without_a_close_match_gets_no_suggestion() -> None:
    assert bad_input("  call zzz\n", {"pf_handler": 0x3000}) == \
        "t.s line 1: unknown symbol 'zzz'"


def test_a_label_defined_twice_names_both_places() -> None:
    with pytest.raises(BadInput) as info:
        assemble_blocks([CodeBlock(BASE, "\n\nentry: nop\n", "a.s", 10),
                         CodeBlock(0x300000, "nop\nentry: nop\n", "b.s", 1)], {})
    assert str(info.value) == "b.s line 2: label 'entry' already defined at a.s line 12"


def test_a_label_that_clashes_with_a_known_symbol_is_rejected() -> None:
    message = bad_input("idt:\n  nop\n", {"idt": 0x1000})
    assert message == "t.s line 1: label 'idt' already defined at 0x1000 (a predefined symbol)"


def test_overlapping_blocks_name_both_origins_and_ranges() -> None:
    with pytest.raises(BadInput) as info:
        assemble_blocks([CodeBlock(0x1000, ".fill 16, 1, 0x90\n", "demo.toml [[code]] #1", 3),
                         CodeBlock(0x100F, "nop\nnop\n", "handlers.s", 1)], {})
    assert str(info.value) == ("demo.toml [[code]] #1 [0x1000, 0x1010) overlaps "
                               "handlers.s [0x100f, 0x1011)")


def test_adjacent_and_empty_blocks_do_not_overlap() -> None:
    blocks, _ = assemble_blocks([CodeBlock(0x1000, ".fill 16, 1, 0x90\n", "a", 1),
                                 CodeBlock(0x1010, "nop\n", "b", 1),
                                 CodeBlock(0x1008, "# nothing\n", "c", 1)], {})
    assert [len(b.code) for b in blocks] == [16, 1, 0]


def test_sizes_that_never_settle_are_reported_instead_of_looping_forever(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import idtlab.assemble as assemble

    assert MAX_PASSES >= 5
    monkeypatch.setattr(assemble, "MAX_PASSES", 1)
    with pytest.raises(BadInput) as info:
        asm("  jmp end\n  .fill 200, 1, 0\nend: nop\n")
    assert str(info.value) == ("t.s: label addresses did not settle after 1 passes "
                               "(instruction sizes keep changing; check .align near branches)")


def test_non_ascii_source_is_a_bad_input_not_an_encoding_crash() -> None:
    assert "non-ASCII" in bad_input("  .ascii \"é\"\n")


def test_a_200_line_block_is_encoded_a_bounded_number_of_times(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Relaxation re-encodes each statement once per pass, and a pass is needed only while
    # some jump changes size: a few passes, never a search per statement. (Counted, not
    # timed: a timing assertion fails on a loaded machine.)
    calls = 0
    encode = keystone.Ks.asm

    def counting(self: keystone.Ks, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(keystone.Ks, "asm", counting)
    lines = []
    for i in range(100):
        lines.append(f"l{i}: mov rax, [data + {i * 8}]")
        lines.append(f"  jne l{(i * 37) % 100}")
    block = asm("\n".join(lines), {"data": 0x5000})
    assert len(block.line_addrs) == 200
    assert 200 <= calls <= 5 * 200


# --------------------------------------------------------------------------- resolve_address

SYMS = {"pf_handler": 0x3000, "bp_frame": 0x201000}


@pytest.mark.parametrize(("value", "expected"), [
    (0x1234, 0x1234),
    ("pf_handler", 0x3000),
    ("bp_frame+8", 0x201008),
    ("bp_frame + 0x10", 0x201010),
    ("bp_frame-16", 0x200FF0),
    ("0x400000", 0x400000),
    ("4096", 4096),
])
def test_resolve_address_accepts_numbers_names_and_offsets(value: int | str,
                                                           expected: int) -> None:
    assert resolve_address(value, SYMS, "x.toml [run] entry") == expected


def test_resolve_address_names_an_unknown_symbol_and_suggests_a_close_one() -> None:
    with pytest.raises(BadInput) as info:
        resolve_address("pf_handlr+8", SYMS, "demo.toml [idt] 14")
    assert str(info.value) == ("demo.toml [idt] 14: unknown symbol 'pf_handlr'; "
                               "did you mean 'pf_handler'?")


@pytest.mark.parametrize("value", ["bp_frame * 2", "", "8+bp_frame", True, -1, 1.5])
def test_resolve_address_rejects_what_is_not_an_address(value: Any) -> None:
    with pytest.raises(BadInput, match=r"^x\.toml \[\[expect\]\] #1 mem: "):
        resolve_address(value, SYMS, "x.toml [[expect]] #1 mem")


def test_assembling_the_same_blocks_again_gives_equal_results_that_do_not_share_state() -> None:
    blocks = [CodeBlock(BASE, "start:\n  nop\n  jmp start\n", origin="t", first_line=1)]
    first, symbols = assemble_blocks(blocks, {"K": 1})
    first[0].labels["start"] = 0  # a caller's change stays its own
    symbols["start"] = 0
    second, symbols2 = assemble_blocks(blocks, {"K": 1})
    assert second[0].labels == {"start": BASE} and symbols2 == {"K": 1, "start": BASE}
    assert second[0].code == first[0].code and second[0].line_addrs == first[0].line_addrs
    other, _ = assemble_blocks(blocks, {"K": 2})  # other known symbols: assembled anew
    assert other[0].code == second[0].code
