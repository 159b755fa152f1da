"""The timeline's renderer registry (idtlab.trace): one renderer per trace kind, the
indentation by delivery depth, and the JSON fallback for a kind without a renderer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from idtlab.trace import RENDERERS, Symbolizer, renders, stuck, timeline

ROOT = Path(__file__).resolve().parents[2]
SYM = Symbolizer({"main": 0x100000, "nmi_handler": 0x100100})


def documented_kinds() -> set[str]:
    """The kinds in the first column of docs/trace-format.md's table."""
    kinds: set[str] = set()
    for line in (ROOT / "docs" / "trace-format.md").read_text().splitlines():
        if line.startswith("| `"):
            kinds.update(re.findall(r"`(\w+)`", line.split("|")[1]))
    return kinds


def test_every_kind_the_trace_format_documents_has_a_renderer() -> None:
    kinds = documented_kinds()
    assert {"deliver", "iret", "end", "apf_page_in_failed", "apic_timer"} <= kinds
    assert sorted(kinds - RENDERERS.keys()) == []


def test_a_kind_without_a_renderer_is_shown_with_its_fields_as_json() -> None:
    rec = {"seq": 4, "icount": 12, "cycle": 30, "kind": "new_kind", "vector": 2, "why": "x"}
    assert timeline([rec], SYM) == ['        12  new_kind {"vector": 2, "why": "x"}']


def test_a_record_without_a_depth_is_indented_inside_the_handler_of_the_delivery_before_it() -> None:
    # The NMI interrupts depth 1; its handler runs at depth 2, where the HLT is. The end
    # of the run is not indented.
    records = [
        {"seq": 0, "icount": 1, "cycle": 1, "kind": "deliver", "vector": 2, "name": "NMI",
         "source": "nmi", "error_code": None, "rip": 0x100004, "cs": 0x08, "handler": 0x100100,
         "stack": "ist1", "rsp": 0x8FFD8, "cpl": 0, "depth": 1},
        {"seq": 1, "icount": 2, "cycle": 2, "kind": "hlt", "rip": 0x100104},
        {"seq": 2, "icount": 2, "cycle": 2, "kind": "end", "reason": "hlt", "rip": 0x100105},
    ]
    assert timeline(records, SYM, cycles=True) == [
        "         1             1    NMI nmi before main+0x4 -> nmi_handler  stack=ist1 "
        "rsp=0x8ffd8 cpl 0->0",
        "         2             2      hlt at nmi_handler+0x4: waiting",
        "         2             2  end: hlt at nmi_handler+0x5",
    ]


def test_a_frame_overwrite_lists_its_slots_under_its_own_indentation() -> None:
    rec = {"seq": 0, "icount": 7, "cycle": 7, "kind": "frame_overwritten", "by": "NMI",
           "victim": "NMI", "victim_icount": 3, "at": 0x8FFD8, "depth": 1,
           "slots": [["rip", 0x100007, 0x100025], ["cs", 0x8, 0x8]]}
    assert timeline([rec], SYM) == [
        "         7    !! NMI frame at 0x8ffd8 overwrites the live NMI frame (pushed at icount 3):",
        "                 rip     0x100007 -> 0x100025  <- changed",
        "                 cs      0x8 -> 0x8",
    ]


def test_a_second_renderer_for_a_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="two renderers for trace kind 'iret'"):
        renders("iret")(lambda r, sym: "")


# -- timelines that explain themselves ----------------------------------------------------
def _iret(i: int, depth: int = 0) -> dict[str, object]:
    return {"seq": i, "icount": 10 + 2 * i, "cycle": 100 + 20 * i, "kind": "iret",
            "rip": 0x100001, "to_rip": 0x100000, "to_rsp": 0x8FFD0, "to_cpl": 0,
            "nmi_unblocked": False, "depth": depth}


def test_a_record_repeated_in_a_row_is_one_line_with_its_count_and_icount_range() -> None:
    records = [_iret(i) for i in range(100)]
    assert timeline(records, SYM, collapse=True) == [
        "   10..208  100 \u00d7 iret at main+0x1 -> main rsp=0x8ffd0 cpl 0"]
    assert len(timeline(records, SYM)) == 100  # without collapse: every record


def test_a_block_of_records_repeated_in_a_row_is_shown_once_under_its_count() -> None:
    deliver = {"kind": "deliver", "vector": 3, "name": "#BP", "source": "software",
               "error_code": None, "rip": 0x100001, "cs": 8, "handler": 0x100100,
               "stack": "current", "rsp": 0x6FFD8, "cpl": 0, "depth": 0}
    records = []
    for i in range(5):
        records.append({"seq": 2 * i, "icount": 4 * i, "cycle": 0, **deliver})
        records.append({**_iret(2 * i + 1), "icount": 4 * i + 2})
    lines = timeline(records, SYM, collapse=True)
    assert lines[0] == "     0..18  5 \u00d7 the 2 records below, in turn:"
    assert lines[1].strip().startswith("#BP software, returns to main+0x1 -> nmi_handler")
    assert lines[2].strip() == "iret at main+0x1 -> main rsp=0x8ffd0 cpl 0"
    assert len(lines) == 3


def test_two_repeats_are_not_collapsed() -> None:
    assert len(timeline([_iret(0), _iret(1)], SYM, collapse=True)) == 2


def test_a_run_that_ends_in_an_endless_iret_loop_gets_a_verdict_and_a_correct_one_does_not() -> None:
    end = {"seq": 99, "icount": 300, "cycle": 0, "kind": "end", "reason": "max_insns",
           "rip": 0x100001}
    assert stuck([*(_iret(i) for i in range(15)), end], SYM) == (
        "the guest is stuck: the run ends in 15 identical IRETs (at main+0x1, to main) until "
        "the instruction limit")
    assert stuck([*(_iret(i) for i in range(15)), {**end, "reason": "exit"}], SYM) is None
    assert stuck([_iret(0), _iret(1), end], SYM) is None


@pytest.mark.parametrize("record, text", [
    ({"source": "nmi", "vector": 2, "name": "NMI", "error_code": None},
     "NMI nmi before main+0x4 (nop) -> nmi_handler"),
    ({"source": "exception", "vector": 14, "name": "#PF", "error_code": 4},
     "#PF(0x4) exception at main+0x4 (nop) -> nmi_handler"),
    ({"source": "software", "vector": 3, "name": "#BP", "error_code": None},
     "#BP software: int3 at main+0x3, returns to main+0x4 -> nmi_handler"),
    ({"source": "software", "vector": 0x80, "name": "vec 0x80", "error_code": None},
     "vec 0x80 software: int 0x80 at main+0x2, returns to main+0x4 -> nmi_handler"),
])
def test_a_delivery_names_the_instruction_in_the_words_of_its_class(
        record: dict[str, object], text: str) -> None:
    code = {0x100002: "int 0x80", 0x100003: "int3", 0x100004: "nop"}
    wanted = 0x80 if record["vector"] == 0x80 else 3
    insns = {a: t for a, t in code.items() if t != ("int3" if wanted == 0x80 else "int 0x80")}
    sym = Symbolizer({"main": 0x100000, "nmi_handler": 0x100100},
                     disasm=lambda a: insns.get(a, "??"))
    rec = {"seq": 0, "icount": 1, "cycle": 1, "kind": "deliver", "rip": 0x100004, "cs": 8,
           "handler": 0x100100, "stack": "current", "rsp": 0x6FFD8, "cpl": 0, "depth": 0,
           **record}
    assert timeline([rec], sym)[0][12:].startswith(text)


def test_the_end_of_an_exit_names_the_out_that_ended_the_run_not_the_label_after_it() -> None:
    sym = Symbolizer({"main": 0x100000, "pf_handler": 0x100013},
                     disasm=lambda a: "out dx, al" if a == 0x100012 else "??")
    rec = {"seq": 0, "icount": 9, "cycle": 9, "kind": "end", "reason": "exit", "rip": 0x100013,
           "detail": "exit device: 0x3", "exit_code": 3}
    assert timeline([rec], sym) == [
        "         9  end: exit after main+0x12: out dx, al (exit device: 0x3)"]


def test_handle_serially_is_spelled_so_it_cannot_be_mistaken_for_the_uart() -> None:
    rec = {"seq": 0, "icount": 3, "cycle": 3, "kind": "delivery_fault", "vector": 2,
           "name": "NMI", "fault": 13, "fault_name": "#GP", "error_code": 0x12,
           "action": "serial", "why": "gate not present", "depth": 0}
    (line,) = timeline([rec], SYM)
    assert "-> serial" not in line
    assert line.endswith("-> handled serially: no #DF, the fault is delivered on its own")


def test_colour_marks_overwrites_and_arrivals_only_when_asked() -> None:
    from idtlab.colour import Palette

    rec = {"seq": 0, "icount": 7, "cycle": 7, "kind": "frame_overwritten", "by": "NMI",
           "victim": "NMI", "victim_icount": 3, "at": 0x8FFD8, "depth": 0,
           "slots": [["rip", 0x100007, 0x100025]]}
    coloured = timeline([rec], SYM, palette=Palette(True))
    assert coloured[0].startswith("         7  \x1b[31;1m!! NMI frame") and "\x1b[0m" in coloured[0]
    assert "\x1b[" not in "".join(timeline([rec], SYM))
