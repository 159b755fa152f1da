"""Pictures of a delivery: the stack the CPU pushed onto, and the gate it went through.

A delivery in IA-32e mode (SDM Vol. 3A, "Interrupt and Exception Handling in 64-bit
Mode" / "64-Bit Mode Stack Frame" and "Stack Switching in IA-32e Mode") does, in order:

* read the 16-byte gate at IDTR.base + 16 * vector ("64-Bit Mode IDT");
* pick the stack: TSS.ISTn when the gate's IST field is n (always, even without a
  privilege change), TSS.RSP0 on a change to CPL 0, else the current RSP;
* align that RSP down to 16 bytes and push SS, RSP, RFLAGS, CS, RIP and, for the
  exceptions that have one, the error code - always all of them in 64-bit mode.

The picture shows exactly that, slot by slot, with the values pushed (from the trace's
`deliver` record) at the addresses they went to, where RSP was before (the interrupted
RSP, pushed as the RSP slot) and after (the handler's first RSP), which stack it was
(IST n / RSP0 / the current one, with the TSS value read at that delivery), and the gate
decoded field by field as the CPU read it. When the delivery overwrote the frame of an
event whose IRET had not run yet (the trace's `frame_overwritten`: the nested-NMI and
#VE re-arm races), each slot shows the old value beside the new one.

`svg(picture)` draws it for a browser, `text(picture)` for a terminal: the same facts.
`capture(machine)` records, at every delivery of a run, the gate and the TSS as the CPU
read them (a guest may rewrite its own IDT or TSS later; the picture shows what the CPU
saw). The labs (idtlab/labs/) and the race explorer's HTML report (idtlab/explore_html.py)
draw with this module.
"""

from __future__ import annotations

import contextlib
import html
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idt.descriptors import (
    GATE_TYPE_INTERRUPT,
    GATE_TYPE_TRAP,
    TSS_IST_OFFSET,
    TSS_RSP_OFFSET,
    GateDescriptor,
)

if TYPE_CHECKING:
    from cpu.machine import Machine

TSS_BYTES = 0x68
GATE_BYTES = 16

SLOT_NAMES = {"error_code": "error code", "rip": "RIP", "cs": "CS", "rflags": "RFLAGS",
              "rsp": "RSP", "ss": "SS"}


@dataclass(frozen=True)
class Slot:
    key: str  # error_code, rip, cs, rflags, rsp, ss
    address: int
    value: int
    note: str
    old: int | None = None  # the value this slot held in an overwritten live frame

    @property
    def name(self) -> str:
        return SLOT_NAMES[self.key]

    @property
    def changed(self) -> bool:
        return self.old is not None and self.old != self.value


@dataclass(frozen=True)
class GateField:
    name: str
    bits: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Picture:
    number: int  # 1-based: the n-th delivery of the run
    icount: int
    event: str  # "#BP", "NMI", "vec 0x30"
    vector: int
    source: str
    error_code: int | None
    cr2: int | None
    interrupted: str  # symbolized RIP of the interrupted (or faulting) instruction
    handler: str
    stack: str  # current, rsp0..rsp2, ist1..ist7
    stack_pointer: int | None  # the TSS value used (IST/RSPn), None for the current stack
    rsp_before: int
    rsp_after: int
    slots: tuple[Slot, ...]  # from the highest address down
    gate_address: int | None
    gate: tuple[GateField, ...]
    victim: str = ""  # the event whose live frame this delivery overwrote
    victim_icount: int | None = None
    depth: int = 0

    @property
    def stack_label(self) -> str:
        if self.stack.startswith("ist"):
            return f"IST{self.stack[3:]}"
        if self.stack.startswith("rsp"):
            return f"RSP{self.stack[3:]}"
        return "current stack"

    @property
    def stack_source(self) -> str:
        if self.stack_pointer is None:
            if self.stack == "current":
                return "the interrupted RSP, no stack switch"
            return f"TSS.{self.stack_label} (unreadable)"
        return f"TSS.{self.stack_label} = {self.stack_pointer:#x}"

    @property
    def overwrites(self) -> bool:
        return bool(self.victim)

    @property
    def title(self) -> str:
        ec = "" if self.error_code is None else f"({self.error_code:#x})"
        return (f"delivery {self.number}: {self.event}{ec} ({self.source}) -> {self.handler}, "
                f"interrupted at {self.interrupted}")


def _gate_fields(raw: bytes, symbol: Callable[[int], str]) -> tuple[GateField, ...]:
    g = GateDescriptor.unpack(raw)
    lo, _sel, _b4, _b5, mid, hi, _res = struct.unpack("<HHBBHII", raw[:16])
    kind = {GATE_TYPE_INTERRUPT: "64-bit interrupt gate: IF := 0 on entry",
            GATE_TYPE_TRAP: "64-bit trap gate: IF unchanged"}.get(
        g.type, "not a valid 64-bit gate type (#GP)")
    ist = f"stack TSS.IST{g.ist}" if g.ist else "no IST: RSP0 on a CPL change, else current"
    return (
        GateField("offset 15:0", "bits 15:0", f"{lo:#06x}", ""),
        GateField("segment selector", "bits 31:16", f"{g.selector:#x}",
                  "kernel code (GDT 1, RPL 0)" if g.selector == 0x08 else "the handler's CS"),
        GateField("IST", "bits 34:32", str(g.ist), ist),
        GateField("type", "bits 43:40", f"{g.type:#x}", kind),
        GateField("DPL", "bits 46:45", str(g.dpl),
                  "INT n/INT3 need CPL <= DPL; events ignore it"),
        GateField("P", "bit 47", str(int(g.present)), "present" if g.present else
                  "not present: #NP"),
        GateField("offset 31:16", "bits 63:48", f"{mid:#06x}", ""),
        GateField("offset 63:32", "bits 95:64", f"{hi:#010x}", ""),
        GateField("handler", "offset", f"{g.offset:#x}", symbol(g.offset)),
    )


def _tss_pointer(raw: bytes | None, stack: str) -> int | None:
    if raw is None or stack == "current":
        return None
    n = int(stack[3:])
    off = TSS_IST_OFFSET(n) if stack.startswith("ist") else TSS_RSP_OFFSET(n)
    return int.from_bytes(raw[off:off + 8], "little")


def _slot_note(key: str, value: int, symbol: Callable[[int], str]) -> str:
    if key == "rip":
        return symbol(value)
    if key == "cs":
        return f"CPL {value & 3}"
    if key == "ss":
        return "null selector" if value & 0xFFFC == 0 else f"RPL {value & 3}"
    if key == "rflags":
        bits = [name for bit, name in ((9, "IF"), (8, "TF"), (16, "RF")) if value >> bit & 1]
        return " ".join(bits) if bits else "IF=0"
    if key == "rsp":
        return "the interrupted RSP"
    return ""


def capture(m: Machine) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """From now on, at every delivery of `m`, read the 16 bytes of the gate the CPU used
    and the TSS's 0x68 bytes from guest memory: the two dicts (by the `deliver` record's
    `seq`) fill as the machine runs. Unreadable ones are left out (drawn as unknown)."""
    gates: dict[int, bytes] = {}
    tss: dict[int, bytes] = {}

    def on_deliver(rec: dict[str, Any]) -> None:
        st = m.arch_state()
        with contextlib.suppress(Exception):
            gates[int(rec["seq"])] = bytes(
                m.read_linear(st.idtr_base + GATE_BYTES * int(rec["vector"]), GATE_BYTES))
        with contextlib.suppress(Exception):
            tss[int(rec["seq"])] = bytes(m.read_linear(st.tr_base, TSS_BYTES))

    m.on_deliver.append(on_deliver)
    return gates, tss


def pictures(records: Sequence[Mapping[str, Any]], symbol: Callable[[int], str],
             gates: Mapping[int, bytes] | None = None,
             tss: Mapping[int, bytes] | None = None) -> list[Picture]:
    """One picture per `deliver` record of a run's trace, in order (`gates` and `tss`
    from `capture`, by record `seq`; without them the gate is drawn as unknown)."""
    gates = gates or {}
    tss = tss or {}
    out: list[Picture] = []
    recs = records
    for i, r in enumerate(recs):
        if r.get("kind") != "deliver":
            continue
        over: Mapping[str, Any] | None = None
        for later in recs[i + 1:]:
            if later.get("kind") == "frame_overwritten":
                over = later
                break
            if later.get("kind") != "frame_overwritten":
                break
        keys = (["error_code"] if r.get("error_code") is not None else []) + [
            "rip", "cs", "rflags", "rsp", "ss"]
        values = {"error_code": r.get("error_code"), "rip": r["rip"], "cs": r["cs"],
                  "rflags": r["rflags"], "rsp": r["old_rsp"], "ss": r["ss"]}
        olds: dict[str, int] = {}
        if over is not None:
            olds = {str(s): int(o) for s, o, _n in over["slots"]}
        rsp_after = int(r["rsp"])
        slots = [Slot(k, rsp_after + 8 * j, int(values[k] or 0),
                      _slot_note(k, int(values[k] or 0), symbol), olds.get(k))
                 for j, k in enumerate(keys)]
        seq = int(r["seq"])
        raw = gates.get(seq)
        out.append(Picture(
            number=len(out) + 1, icount=int(r["icount"]), event=str(r["name"]),
            vector=int(r["vector"]), source=str(r["source"]), error_code=r.get("error_code"),
            cr2=r.get("cr2"), interrupted=symbol(int(r["rip"])),
            handler=symbol(int(r["handler"])), stack=str(r["stack"]),
            stack_pointer=_tss_pointer(tss.get(seq), str(r["stack"])),
            rsp_before=int(r["old_rsp"]), rsp_after=rsp_after, slots=tuple(reversed(slots)),
            gate_address=None, gate=_gate_fields(raw, symbol) if raw is not None else (),
            victim=str(over["victim"]) if over else "",
            victim_icount=int(over["victim_icount"]) if over else None,
            depth=int(r.get("depth", 0))))
    return out


# -- text ----------------------------------------------------------------------------------
def text(p: Picture, gate: bool = True) -> list[str]:
    """The picture for a terminal (plain ASCII); `gate`: with the gate's fields."""
    lines = [p.title + f"   [icount {p.icount}]"]
    if p.cr2 is not None:
        lines.append(f"  CR2 = {p.cr2:#x}")
    top = p.rsp_after + 8 * len(p.slots)
    lines.append(f"  stack: {p.stack_label} ({p.stack_source}); frame top {top:#x} "
                 "(aligned down to 16)")
    lines.append(f"  RSP before: {p.rsp_before:#x}   RSP after: {p.rsp_after:#x}")
    width = 44 if p.overwrites else 30
    bar = "            +" + "-" * width + "+"
    if p.overwrites:
        lines.append(f"  overwrites the live {p.victim} frame (pushed at icount "
                     f"{p.victim_icount}): old -> new")
    lines.append(bar)
    for s in p.slots:
        if p.overwrites:
            old = "?" if s.old is None else f"{s.old:#x}"
            cell = f"{s.name:<10} {old:>14} -> {s.value:#x}"
        else:
            cell = f"{s.name:<10} {s.value:#x}"
        mark = ""
        if s.address == p.rsp_after:
            mark = "  <- RSP after"
        if s.changed:
            mark += "  <- CHANGED"
        note = f"  {s.note}" if s.note else ""
        lines.append(f"  {s.address:>#10x}|{cell:<{width}}|{note}{mark}")
    lines.append(bar)
    if p.gate and gate:
        lines.append(f"  gate {p.vector} (IDT + {16 * p.vector:#x}), as the CPU read it:")
        for f in p.gate:
            meaning = f"  {f.meaning}" if f.meaning else ""
            lines.append(f"    {f.name:<17} {f.bits:<12} {f.value:<12}{meaning}")
    return lines


# -- SVG -------------------------------------------------------------------------------------
_FONT = "font-family='DejaVu Sans Mono, Menlo, Consolas, monospace'"


def _t(x: float, y: float, s: str, size: int = 12, anchor: str = "start", fill: str = "#222",
       weight: str = "normal", cls: str = "") -> str:
    c = f" class='{cls}'" if cls else ""
    return (f"<text x='{x:g}' y='{y:g}' font-size='{size}' text-anchor='{anchor}' "
            f"fill='{fill}' font-weight='{weight}' {_FONT}{c}>{html.escape(s)}</text>")


def svg(p: Picture) -> str:
    """The picture as one standalone SVG element (no external resources)."""
    row = 26
    slot_x, slot_w = 120, 300 if p.overwrites else 230
    top_y = 100 if p.overwrites else 78
    n = len(p.slots)
    gate_x = slot_x + slot_w + 175
    gate_rows = len(p.gate) + 1
    height = max(top_y + row * n + (70 if p.overwrites else 52), 64 + 20 * gate_rows + 14)
    width = gate_x + 620
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' class='stack-picture' width='{width}' "
             f"height='{height}' viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='{html.escape(p.title)}'>",
             f"<rect x='0' y='0' width='{width}' height='{height}' fill='#fcfcfa' "
             "stroke='#ccc'/>",
             _t(10, 20, p.title, 14, weight="bold"),
             _t(10, 40, f"icount {p.icount}; stack {p.stack_label} ({p.stack_source})"
                + (f"; CR2 = {p.cr2:#x}" if p.cr2 is not None else ""), 12, fill="#444")]
    top = p.rsp_after + 8 * n
    parts.append(_t(slot_x, top_y - 8, f"frame top {top:#x} (aligned down to 16)", 11,
                    fill="#666"))
    colour = {"ist": "#dbe9f7", "rsp": "#e4f3dc", "cur": "#f4ecd6"}[p.stack[:3]]
    for i, s in enumerate(p.slots):
        y = top_y + row * i
        fill = "#f8c8c8" if s.changed else colour
        parts.append(f"<rect class='slot' x='{slot_x}' y='{y}' width='{slot_w}' height='{row}' "
                     f"fill='{fill}' stroke='#555'/>")
        parts.append(_t(slot_x - 8, y + 17, f"{s.address:#x}", 11, "end", "#555"))
        parts.append(_t(slot_x + 8, y + 17, s.name, 12, weight="bold"))
        if p.overwrites:
            old = "?" if s.old is None else f"{s.old:#x}"
            parts.append(_t(slot_x + 100, y + 17, old, 12, fill="#777"))
            parts.append(_t(slot_x + 190, y + 17, "->", 12, fill="#777"))
            parts.append(_t(slot_x + 215, y + 17, f"{s.value:#x}", 12,
                            fill="#b00" if s.changed else "#222", weight="bold"))
        else:
            parts.append(_t(slot_x + 100, y + 17, f"{s.value:#x}", 12))
        if s.note:
            parts.append(_t(slot_x + slot_w + 8, y + 17, s.note, 11, fill="#555"))
    if p.overwrites:
        parts.append(_t(slot_x + 100, top_y - 26, f"old: {p.victim}", 11, fill="#777",
                        weight="bold"))
        parts.append(_t(slot_x + 215, top_y - 26, f"new: {p.event}", 11, fill="#b00",
                        weight="bold"))
    y_after = top_y + row * (n - 1) + row // 2
    parts.append(f"<line x1='{slot_x - 95}' y1='{y_after + row}' x2='{slot_x - 4}' "
                 f"y2='{y_after + 3}' stroke='#b00' stroke-width='2'/>")
    parts.append(_t(10, top_y + row * n + 22, f"RSP after = {p.rsp_after:#x}", 12, fill="#b00",
                    weight="bold"))
    parts.append(_t(10, top_y + row * n + 40, f"RSP before = {p.rsp_before:#x} (pushed as the "
                    "RSP slot)", 12, fill="#444"))
    if p.overwrites:
        parts.append(_t(10, top_y + row * n + 58, f"this delivery overwrote the live {p.victim} "
                        f"frame (pushed at icount {p.victim_icount}): red slots changed", 12,
                        fill="#b00", weight="bold"))
    # the gate, field by field
    gy = 64
    parts.append(_t(gate_x, gy, f"IDT gate {p.vector} (IDT + {16 * p.vector:#x})", 13,
                    weight="bold"))
    if not p.gate:
        parts.append(_t(gate_x, gy + 20, "(unreadable)", 12))
    for i, f in enumerate(p.gate):
        y = gy + 8 + 20 * i
        parts.append(f"<rect class='gate-field' x='{gate_x}' y='{y}' width='610' height='20' "
                     f"fill='{'#eef' if i % 2 else '#f6f6ff'}' stroke='#ccd'/>")
        parts.append(_t(gate_x + 6, y + 14, f.name, 11, weight="bold"))
        parts.append(_t(gate_x + 130, y + 14, f.bits, 11, fill="#666"))
        parts.append(_t(gate_x + 215, y + 14, f.value, 11))
        parts.append(_t(gate_x + 290, y + 14, f.meaning, 10, fill="#555"))
    parts.append("</svg>")
    return "".join(parts)
