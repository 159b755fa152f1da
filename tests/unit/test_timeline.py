"""The timeline's renderer registry (idtlab.trace): one renderer per trace kind, the
indentation by delivery depth, and the JSON fallback for a kind without a renderer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from idtlab.trace import RENDERERS, Symbolizer, renders, timeline

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


def test_a_record_is_indented_by_the_depth_of_the_delivery_before_it_and_the_end_is_not() -> None:
    records = [
        {"seq": 0, "icount": 1, "cycle": 1, "kind": "deliver", "vector": 2, "name": "NMI",
         "source": "nmi", "error_code": None, "rip": 0x100004, "cs": 0x08, "handler": 0x100100,
         "stack": "ist1", "rsp": 0x8FFD8, "cpl": 0, "depth": 1},
        {"seq": 1, "icount": 2, "cycle": 2, "kind": "hlt", "rip": 0x100104},
        {"seq": 2, "icount": 2, "cycle": 2, "kind": "end", "reason": "hlt", "rip": 0x100105},
    ]
    assert timeline(records, SYM, cycles=True) == [
        "         1             1    NMI nmi at main+0x4 -> nmi_handler  stack=ist1 "
        "rsp=0x8ffd8 cpl 0->0",
        "         2             2    hlt at nmi_handler+0x4: waiting",
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
