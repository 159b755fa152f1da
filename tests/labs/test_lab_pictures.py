"""The stack pictures: every slot the CPU pushed at the address it went to, the stack it
chose, RSP before and after, the gate as the CPU read it, and an overwritten frame's old
and new slots. Checked against the shipped nested-NMI example (idtlab/examples/
nested_nmi_naive.toml), whose every value follows from the SDM (Vol. 3A "64-Bit Mode
Stack Frame", "Interrupt Stack Table", "Handling Multiple NMIs")."""

from __future__ import annotations

from pathlib import Path

import pytest

from idtlab.labs import markdown, pictures, runner

ROOT = Path(__file__).resolve().parents[2]
NESTED = ROOT / "idtlab" / "examples" / "nested_nmi_naive.toml"


@pytest.fixture(scope="module")
def pics() -> list[pictures.Picture]:
    return pictures.pictures(runner.run_scenario(NESTED))


def slots(p: pictures.Picture) -> list[tuple[int, str, int, int | None]]:
    return [(s.address, s.key, s.value, s.old) for s in p.slots]


def test_an_nmi_on_ist1_pushes_five_slots_at_the_top_of_the_ist_stack(
        pics: list[pictures.Picture]) -> None:
    p = pics[0]
    assert (p.event, p.vector, p.source, p.interrupted, p.handler) == (
        "NMI", 2, "nmi", "work", "nmi_handler")
    assert (p.stack, p.stack_label, p.stack_pointer) == ("ist1", "IST1", 0x122000)
    assert (p.rsp_before, p.rsp_after) == (0x70000, 0x122000 - 40)
    assert slots(p) == [(0x121FF8, "ss", 0x10, None), (0x121FF0, "rsp", 0x70000, None),
                        (0x121FE8, "rflags", 0x202, None), (0x121FE0, "cs", 0x08, None),
                        (0x121FD8, "rip", 0x100007, None)]
    assert not p.overwrites


def test_the_gate_is_decoded_field_by_field_as_the_cpu_read_it(
        pics: list[pictures.Picture]) -> None:
    fields = {f.name: f.value for f in pics[0].gate}
    assert fields == {"offset 15:0": "0x001c", "segment selector": "0x8", "IST": "1",
                      "type": "0xe", "DPL": "0", "P": "1", "offset 31:16": "0x0010",
                      "offset 63:32": "0x00000000", "handler": "0x10001c"}
    assert [f.meaning for f in pics[0].gate if f.name == "type"] == [
        "64-bit interrupt gate: IF := 0 on entry"]


def test_a_bp_without_ist_stays_on_the_current_stack_aligned_down_to_16(
        pics: list[pictures.Picture]) -> None:
    p = pics[1]
    assert (p.event, p.stack, p.stack_pointer) == ("#BP", "current", None)
    # RSP was 0x121fd0 (the NMI handler pushed RAX): already 16-byte aligned.
    assert (p.rsp_before, p.rsp_after) == (0x121FD0, 0x121FD0 - 40)
    assert [s.key for s in p.slots] == ["ss", "rsp", "rflags", "cs", "rip"]
    assert p.slots[-1].note == "nmi_after_int3"


def test_the_latched_nmi_overwrites_the_live_frame_and_the_picture_shows_old_and_new(
        pics: list[pictures.Picture]) -> None:
    p = pics[2]
    assert p.overwrites and p.victim == "NMI" and p.victim_icount == 1
    assert slots(p) == [(0x121FF8, "ss", 0x0, 0x10), (0x121FF0, "rsp", 0x121FD0, 0x70000),
                        (0x121FE8, "rflags", 0x2, 0x202), (0x121FE0, "cs", 0x08, 0x08),
                        (0x121FD8, "rip", 0x100025, 0x100007)]
    assert [s.key for s in p.slots if s.changed] == ["ss", "rsp", "rflags", "rip"]


def test_the_text_picture_has_every_slot_the_stack_and_the_overwrite(
        pics: list[pictures.Picture]) -> None:
    lines = pictures.text(pics[2])
    assert lines[0] == ("delivery 3: NMI (nmi) -> nmi_handler, interrupted at nmi_after_int3"
                        "   [icount 6]")
    text = "\n".join(lines)
    assert "stack: IST1 (TSS.IST1 = 0x122000)" in text
    assert "RSP before: 0x121fd0   RSP after: 0x121fd8" in text
    assert "overwrites the live NMI frame (pushed at icount 1): old -> new" in text
    assert "0x121ff0|RSP               0x70000 -> 0x121fd0" in text
    assert "IST               bits 34:32   1             stack TSS.IST1" in text
    assert "gate 2" not in "\n".join(pictures.text(pics[2], gate=False))


def test_the_svg_picture_is_standalone_and_carries_the_same_values(
        pics: list[pictures.Picture]) -> None:
    svg = pictures.svg(pics[2])
    assert svg.startswith("<svg xmlns='http://www.w3.org/2000/svg' class='stack-picture'")
    assert svg.count("class='slot'") == 5 and svg.count("class='gate-field'") == 9
    for text in ("0x121fd0", "0x70000", "0x100025", "IST1", "RSP after = 0x121fd8",
                 "old: NMI", "new: NMI", "this delivery overwrote the live NMI frame (pushed at "
                 "icount 1)"):
        assert text in svg, text
    assert "href=" not in svg


def test_a_cpl3_system_call_lands_on_tss_rsp0(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('''
[[code]]
at = 0x100000
asm = """
user:
    int 0x80
    hlt
sys:
    iretq
"""
[idt]
0x80 = { handler = "sys", dpl = 3 }
[tss]
rsp0 = 0x90008
[run]
entry = "user"
cpl = 3
rsp = 0x80000
''')
    [p, *_] = pictures.pictures(runner.run_scenario(scenario))
    assert (p.stack, p.stack_label, p.stack_pointer) == ("rsp0", "RSP0", 0x90008)
    # 0x90008 aligned down to 16 is 0x90000: the frame's top.
    assert p.rsp_after == 0x90000 - 40 and p.rsp_before == 0x80000
    assert slots(p)[0] == (0x8FFF8, "ss", 0x23, None)
    assert [f.value for f in p.gate if f.name == "DPL"] == ["3"]


def test_lesson_markdown_renders_headings_with_ids_code_tables_and_inline_markup() -> None:
    out = markdown.to_html("# Lab\n\n## The IDT gate\n\nA *gate* is `16` bytes, **always**."
                           "\n\n```\n| SS |\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- x\n- y\n")
    assert "<h2 id='the-idt-gate'>The IDT gate</h2>" in out
    assert "<p>A <em>gate</em> is <code>16</code> bytes, <strong>always</strong>.</p>" in out
    assert "<pre><code>| SS |</code></pre>" in out
    assert "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td>" \
        in out
    assert "<ul><li>x</li><li>y</li></ul>" in out
