"""JSONL trace output and the readable timeline.

JSONL: one record per line, keys in emission order, compact separators, so the same
scenario gives byte-identical files (tests check it). Format: docs/trace-format.md.

The timeline is one line per record (a few for a frame overwrite): the instruction count
(and, with `cycles`, the cycle stamp), indentation by delivery depth, then what happened,
with symbols instead of addresses and names instead of vector numbers. Each record kind
has its renderer in `RENDERERS`, registered with `@renders(kind)`; a kind without one
(a kind added to the trace later) is shown with its fields as JSON.

    >>> sym = Symbolizer({"main": 0x100000})
    >>> timeline([{"seq": 0, "icount": 3, "cycle": 3, "kind": "hlt", "rip": 0x100004}], sym)
    ['         3  hlt at main+0x4: waiting']
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpu.cpu_model import MSR_APIC_BASE, MSR_EFER, MSR_TSC
from cpu.devices.apf import MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT
from idt.vectors import vector_name
from idtlab.colour import PLAIN, Palette

Record = Mapping[str, Any]


def to_jsonl(records: Iterable[Record]) -> str:
    """The records as JSONL text (one compact JSON object per line).

    >>> to_jsonl([{"seq": 0, "icount": 1, "cycle": 1, "kind": "end"}])
    '{"seq":0,"icount":1,"cycle":1,"kind":"end"}\\n'
    """
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write the records to `path` as JSONL (`to_jsonl`)."""
    Path(path).write_text(to_jsonl(records))


class Symbolizer:
    """Addresses as `symbol+0x10` (nearest symbol at or below, within 64 KiB), and, given
    a disassembler (`Machine.disassemble`), the instruction at an address.

    >>> sym = Symbolizer({"main": 0x100000, "idt": 0x2000}, hide=["idt"])
    >>> sym(0x100010), sym(0x2000)
    ('main+0x10', '0x2000')
    """

    def __init__(self, symbols: Mapping[str, int], hide: Iterable[str] = (),
                 disasm: Callable[[int], str] | None = None) -> None:
        hidden = set(hide)
        pairs = sorted((v, k) for k, v in symbols.items() if k not in hidden)
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]
        self._disasm = disasm

    def insn(self, addr: int) -> str | None:
        """The instruction at `addr` in Intel syntax; None without a disassembler or when
        the bytes there are unreadable."""
        if self._disasm is None:
            return None
        text = self._disasm(addr)
        return None if text in ("", "??") else text

    def insn_before(self, addr: int, *mnemonics: str) -> tuple[int, str] | None:
        """The instruction that ends at `addr` when it is one of `mnemonics` (1 or 2 bytes
        long: INT3, INT1, INTO, INT n, HLT, OUT): a trap's or an exit's own instruction,
        where the record only has the address after it."""
        for length in (1, 2):
            text = self.insn(addr - length)
            if text is not None and text.split()[0] in mnemonics:
                return addr - length, text
        return None

    def __call__(self, addr: int) -> str:
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i >= 0 and addr - self._addrs[i] < 0x10000:
            off = addr - self._addrs[i]
            return self._names[i] + (f"+{off:#x}" if off else "")
        return f"{addr:#x}"


# -- the registry --------------------------------------------------------------------------
# A renderer turns one record into its text: one line, or several (the first is the
# record's line, the others continue it under the same indentation).
Render = Callable[[Record, Symbolizer], "str | list[str]"]


@dataclass(frozen=True)
class Renderer:
    """How a record kind is shown: `render` gives the text; `nested` says whether it is
    indented by the delivery depth (the end of the run is not)."""

    render: Render
    nested: bool = True


RENDERERS: dict[str, Renderer] = {}


def renders(*kinds: str, nested: bool = True) -> Callable[[Render], Render]:
    """Register the decorated function as the renderer of `kinds`."""
    def register(fn: Render) -> Render:
        for kind in kinds:
            if kind in RENDERERS:
                raise ValueError(f"two renderers for trace kind {kind!r}")
            RENDERERS[kind] = Renderer(fn, nested)
        return fn
    return register


def as_json(r: Record, sym: Symbolizer) -> str:
    """Any record: its kind and its fields (but the stamps) as JSON."""
    rest = {k: v for k, v in r.items() if k not in ("seq", "icount", "cycle", "kind")}
    return f"{r['kind']} {json.dumps(rest)}"


FALLBACK = Renderer(as_json)


def timeline(records: Iterable[Record], sym: Symbolizer, *, cycles: bool = False,
             collapse: bool = False, palette: Palette = PLAIN) -> list[str]:
    r"""Readable lines: icount (and the cycle stamp with `cycles`), nesting by
    indentation, names instead of numbers. With `collapse`, a record (or a block of up to
    four records) repeated three times or more in a row is shown once, with the count and
    the icount range (`repeats`); `palette` colours the lines that matter (LEGEND).

        >>> from idtlab.api import load_asm
        >>> from cpu.machine import Machine
        >>> m = Machine()
        >>> _ = load_asm(m, "main:\n    int3\n    hlt\nbp_handler:\n    iretq", 0x100000)
        >>> m.set_gate(3, m.symbols["bp_handler"])
        >>> sym = Symbolizer({"main": 0x100000, "bp": 0x100002}, disasm=m.disassemble)
        >>> for line in timeline(m.run(entry=0x100000, rsp=0x70000).trace.records, sym):
        ...     print(line)
                 1  #BP software: int3 at main, returns to main+0x1 -> bp  stack=current rsp=0x6ffd8 cpl 0->0
                 2  iret at bp -> main+0x1 rsp=0x70000 cpl 0
                 3  end: hlt after main+0x1: hlt (HLT with no event that can wake the CPU)
    """
    recs = list(records)
    levels = depths(recs)
    out: list[str] = []
    for start, period, count in (repeats(recs) if collapse else
                                 [(i, 1, 1) for i in range(len(recs))]):
        last = recs[start + period * count - 1]
        if count == 1:
            out.extend(_lines(recs[start], levels[start], sym,
                              _head(recs[start], recs[start], cycles), palette))
            continue
        head = _head(recs[start], last, cycles)
        if period == 1:
            out.extend(_lines(recs[start], levels[start], sym, head, palette,
                              prefix=f"{count} \u00d7 "))
            continue
        out.append(f"{head}{count} \u00d7 the {period} records below, in turn:")
        for i in range(start, start + period):
            out.extend(_lines(recs[i], levels[i], sym, " " * (len(head) + 2), palette))
    return out


def depths(records: Sequence[Record]) -> list[int]:
    """The indentation depth of each record: its own `depth` (a delivery's is the level it
    interrupts, an IRET's the level it returns to), or, for a record without one (an
    arrival, a HLT), the level the last delivery or IRET left: inside a handler, one
    deeper than its delivery.

        >>> depths([{"kind": "deliver", "depth": 0}, {"kind": "nmi_latched"},
        ...         {"kind": "iret", "depth": 0}, {"kind": "hlt"}])
        [0, 1, 0, 0]
    """
    out: list[int] = []
    level = 0
    for r in records:
        if "depth" in r:
            out.append(int(r["depth"]))
            level = int(r["depth"]) + (1 if r["kind"] == "deliver" else 0)
        else:
            out.append(level)
    return out


def record_lines(r: Record, sym: Symbolizer) -> tuple[list[str], bool]:
    """One record's text (a first line and its continuations) and whether it is indented
    by the delivery depth (the end of the run is not)."""
    renderer = RENDERERS.get(r["kind"], FALLBACK)
    text = renderer.render(r, sym)
    return ([text] if isinstance(text, str) else list(text)), renderer.nested


def _head(first: Record, last: Record, cycles: bool) -> str:
    """The stamp column(s): one icount (and cycle), or the range a collapsed run covers."""
    def span(key: str) -> str:
        a, b = first[key], last[key]
        return str(a) if a == b else f"{a}..{b}"
    return f"{span('icount'):>10}  " + (f"{span('cycle'):>12}  " if cycles else "")


def _lines(r: Record, depth: int, sym: Symbolizer, head: str, palette: Palette,
           prefix: str = "") -> list[str]:
    lines, nested = record_lines(r, sym)
    pad = "  " * depth if nested else ""
    mark = _colour(r, palette)
    out = [f"{head}{pad}{mark(prefix + lines[0])}"]
    out.extend(f"{' ' * len(head)}{pad}{mark(line) if '<- changed' in line else line}"
               for line in lines[1:])
    return out


def _colour(r: Record, palette: Palette) -> Callable[[str], str]:
    kind = r["kind"]
    if kind in ("frame_overwritten", "delivery_fault", "iret_fault", "shutdown"):
        return palette.bad
    if kind == "cr2_read" and r.get("pf_cr2") not in (None, r.get("value")):
        return palette.bad
    if kind in ("nmi_pending", "nmi_latched", "nmi_dropped", "interrupt_pending", "ept_revoke",
                "host_declines"):
        return palette.note
    if kind == "end":
        return palette.head
    return str


_STAMPS = ("seq", "icount", "cycle")


def _same(a: Record, b: Record) -> bool:
    """The same record but for its stamps."""
    return len(a) == len(b) and all(a.get(k) == v for k, v in b.items() if k not in _STAMPS)


def repeats(records: Sequence[Record], *, longest: int = 4,
            least: int = 3) -> list[tuple[int, int, int]]:
    """The records as runs `(start, period, count)`: a block of `period` records repeated
    `count` times from `start` (count 1: once). A block of up to `longest` records is a
    run when it repeats at least `least` times in a row; the run that covers the most
    records wins, the shorter block on a tie.

        >>> recs = [{"kind": "iret", "rip": 1, "icount": i} for i in range(5)]
        >>> repeats([{"kind": "hlt", "icount": 0}] + recs)
        [(0, 1, 1), (1, 1, 5)]
    """
    out: list[tuple[int, int, int]] = []
    i, n = 0, len(records)
    while i < n:
        best_p, best_k = 1, 1
        for p in range(1, longest + 1):
            k = 1
            while i + (k + 1) * p <= n and all(_same(records[i + j], records[i + k * p + j])
                                               for j in range(p)):
                k += 1
            if k >= least and k * p > best_p * best_k:
                best_p, best_k = p, k
        out.append((i, best_p, best_k))
        i += best_p * best_k
    return out


_STUCK_OUTCOMES = {"max_insns": "the instruction limit", "max_events": "the event limit"}


def stuck(records: Sequence[Record], sym: Callable[[int], str] = hex) -> str | None:
    """A one-line verdict when a run that hit its instruction or event limit spent its
    end repeating the same records (an IRET through a frame that points at itself, an
    event storm): the guest is stuck, whatever the expectations say.

        >>> recs = [{"kind": "iret", "rip": 0x10, "to_rip": 0x10, "icount": i}
        ...         for i in range(15)] + [{"kind": "end", "reason": "max_insns"}]
        >>> print(stuck(recs))
        the guest is stuck: the run ends in 15 identical IRETs (at 0x10, to 0x10) until the instruction limit
    """
    if not records or records[-1].get("kind") != "end" \
            or records[-1].get("reason") not in _STUCK_OUTCOMES:
        return None
    body = records[:-1]
    if not body:
        return None
    start, period, count = repeats(body)[-1]
    if count < 3 or start + period * count != len(body):
        return None
    limit = _STUCK_OUTCOMES[str(records[-1]["reason"])]
    first = body[start]
    if period == 1 and first["kind"] == "iret":
        what = f"{count} identical IRETs (at {sym(first['rip'])}, to {sym(first['to_rip'])})"
    elif period == 1 and first["kind"] == "deliver":
        what = f"{count} identical {first['name']} deliveries"
    elif period == 1:
        what = f"{count} identical '{first['kind']}' records"
    else:
        kinds = ", ".join(str(r["kind"]) for r in body[start:start + period])
        what = f"{count} repetitions of the same {period} records ({kinds})"
    return f"the guest is stuck: the run ends in {what} until {limit}"


# What the timeline's words and symbols mean (`idtlab run --legend`; docs/trace-format.md).
LEGEND = (
    "icount            instructions retired when the record was made: before a delivered",
    "                  event; a record made inside an instruction (a port write, an APIC",
    "                  write) counts that instruction. With --cycles, the cycle counter too",
    "indentation       nesting: the lines under a delivery happen in its handler, until",
    "                  its IRET",
    "X (#k)            the k-th arrival of execution at address X, counted from the start",
    "                  of the run (the race explorer's points: a loop or a re-entered",
    "                  handler gives each arrival a point of its own)",
    "~                 an asynchronous event arrives (NMI, interrupt, host event): pending,",
    "                  LATCHED (NMIs blocked: the one-deep latch) or DROPPED (one already",
    "                  waiting); its delivery, if any, is a line of its own later",
    "E at X (insn)     a fault E delivered: X is the faulting instruction; the frame's RIP",
    "                  is X, and the IRET runs it again",
    "E before X (insn) an NMI or interrupt delivered: X is the next instruction, which has",
    "                  not run; the frame's RIP is X",
    "E ... returns to X  a trap (INT3 -> #BP, INT n, INT1 -> #DB): the instruction has run;",
    "                  the frame's RIP is X, the instruction after it",
    "-> H stack=S rsp=R  the handler H, the stack the frame went to (istN: TSS.ISTn;",
    "                  rspN: TSS.RSPn on a CPL change; current: no switch), the handler's RSP",
    "!                 a fault while delivering an event, and what the SDM's table of",
    "                  exception classes made of it: a #DF, a shutdown, or handled serially",
    "                  (the fault is delivered on its own; the event is not)",
    "!!                a delivery overwrote the frame of an event whose IRET has not run",
    "                  (the nested-NMI race): each slot's old -> new value",
    "N \u00d7 ...           the same record (or block of records) N times in a row; the icount",
    "                  column shows the range it covers",
    "end: R after X (insn)  how the run ended: an exit or HLT names the instruction that",
    "                  ended it; 'at X' is the next RIP",
)
HINT = ("legend: ~ event arrives  ! fault while delivering  !! live frame overwritten  "
        "(#k) k-th arrival  N \u00d7 repeated  (idtlab run --legend explains every column)")


# -- delivery and IRET (SDM Vol. 3A, "Interrupt and Exception Handling") --------------------
@renders("deliver")
def _deliver(r: Record, sym: Symbolizer) -> str:
    ec = "" if r["error_code"] is None else f"({r['error_code']:#x})"
    extra = ""
    if "cr2" in r:
        extra += f" cr2={r['cr2']:#x}"
    if "double_fault_of" in r:
        a, b = r["double_fault_of"]
        extra += f" [double fault: {vector_name(a)} then {vector_name(b)}]"
    if r.get("fred"):
        # FRED (cpu/fred.py): the stack level and the event data of slot 6.
        extra += f" fred sl={r['stack_level']} data={r['event_data']:#x}"
        if r.get("nested"):
            extra += " nested"
    if r.get("real_mode"):  # the IVT (cpu/real_mode.py): no privilege levels
        return (f"{r['name']} {_where(r, sym)} -> {r['handler_cs']:04x}:{r['handler_ip']:04x} "
                f"sp={r['rsp'] & 0xFFFF:#06x} real mode{extra}")
    return (f"{r['name']}{ec} {_where(r, sym)} -> {sym(r['handler'])}  stack={r['stack']} "
            f"rsp={r['rsp']:#x} cpl {r['cs'] & 3}->{r['cpl']}{extra}")


def _where(r: Record, sym: Symbolizer) -> str:
    """Where the event was taken, in the words of its class (LEGEND): the frame's RIP is
    the faulting instruction (a fault), the next instruction (an interrupt, an NMI), or
    the instruction after the trap (INT3, INT n, INT1; a #DB)."""
    rip = int(r["rip"])
    source = r["source"]
    if source == "software" or (source == "exception" and r["vector"] == 1):
        own = sym.insn_before(rip, "int3", "int1", "int", "into") if source == "software" \
            else None
        if own is not None:
            return f"{source}: {own[1]} at {sym(own[0])}, returns to {sym(rip)}"
        return f"{source}, returns to {sym(rip)}"
    insn = sym.insn(rip)
    text = f" ({insn})" if insn else ""
    word = "at" if source == "exception" else "before"
    return f"{source} {word} {sym(rip)}{text}"


@renders("delivery_fault")
def _delivery_fault(r: Record, sym: Symbolizer) -> str:
    ec = "" if r["error_code"] is None else f"({r['error_code']:#x})"
    action = {"serial": "handled serially: no #DF, the fault is delivered on its own",
              "double-fault": "#DF", "shutdown": "shutdown"}.get(r["action"], r["action"])
    return f"! {r['fault_name']}{ec} while delivering {r['name']}: {r['why']} -> {action}"


@renders("iret")
def _iret(r: Record, sym: Symbolizer) -> str:
    nmi = "  (NMIs unblocked)" if r["nmi_unblocked"] else ""
    return f"iret at {sym(r['rip'])} -> {sym(r['to_rip'])} rsp={r['to_rsp']:#x} cpl {r['to_cpl']}{nmi}"


@renders("eret")
def _eret(r: Record, sym: Symbolizer) -> str:
    nmi = "  (NMIs unblocked: SS bit 18)" if r["nmi_unblocked"] else ""
    return (f"{r['insn']} at {sym(r['rip'])} -> {sym(r['to_rip'])} rsp={r['to_rsp']:#x} "
            f"cpl {r['to_cpl']} sl={r['stack_level']}{nmi}")


@renders("eret_fault")
def _eret_fault(r: Record, sym: Symbolizer) -> str:
    ec = "" if r["error_code"] is None else f"({r['error_code']:#x})"
    return (f"{r['insn']} at {sym(r['rip'])} faults: {vector_name(r['vector'])}{ec} {r['why']}"
            "  (nothing committed: NMI blocking unchanged)")


@renders("lkgs")
def _lkgs(r: Record, sym: Symbolizer) -> str:
    return (f"lkgs at {sym(r['rip'])}: GS = {r['selector']:#x}, "
            f"IA32_KERNEL_GS_BASE = {r['kernel_gs_base']:#x}")


@renders("iret_fault")
def _iret_fault(r: Record, sym: Symbolizer) -> str:
    return (f"iret at {sym(r['rip'])} faults: {vector_name(r['vector'])}"
            f"({r['error_code']:#x}) {r['why']}"
            + ("  (NMIs unblocked anyway)" if r["nmi_unblocked"] else ""))


@renders("frame_overwritten")
def _frame_overwritten(r: Record, sym: Symbolizer) -> list[str]:
    lines = [f"!! {r['by']} frame at {r['at']:#x} overwrites the live {r['victim']} frame "
             f"(pushed at icount {r['victim_icount']}):"]
    for slot, old, new in r["slots"]:
        mark = "  <- changed" if old != new else ""
        lines.append(f"   {slot:<7} {old:#x} -> {new:#x}{mark}")
    return lines


@renders("cr2_read")
def _cr2_read(r: Record, sym: Symbolizer) -> str:
    pf = r.get("pf_cr2")
    verdict = "" if pf is None else (
        f" (the #PF being handled had CR2 = {pf:#x})" if pf == r["value"] else
        f" -- WRONG: the #PF being handled had CR2 = {pf:#x}")
    return f"{sym(r['rip'])}: reads CR2 = {r['value']:#x}{verdict}"


# -- the end of a run ---------------------------------------------------------------------
@renders("shutdown")
def _shutdown(r: Record, sym: Symbolizer) -> str:
    return f"SHUTDOWN: {r['reason']}"


@renders("end", nested=False)
def _end(r: Record, sym: Symbolizer) -> str:
    detail = f" ({r['detail']})" if r.get("detail") else ""
    rip = int(r["rip"])
    # An exit or a HLT ends the run with RIP past its instruction: name the instruction.
    own = None
    if r["reason"] == "exit":
        own = sym.insn_before(rip, "out")
    elif r["reason"] == "hlt":
        own = sym.insn_before(rip, "hlt")
    if own is not None:
        return f"end: {r['reason']} after {sym(own[0])}: {own[1]}{detail}"
    return f"end: {r['reason']} at {sym(rip)}{detail}"


# -- arrivals of asynchronous events (cpu.events) ------------------------------------------
_ARRIVAL = {"nmi_pending": "pending", "nmi_latched": "LATCHED (NMIs blocked)",
            "nmi_dropped": "DROPPED (one already latched)",
            "interrupt_pending": "pending in IRR"}


@renders(*_ARRIVAL)
def _arrival(r: Record, sym: Symbolizer) -> str:
    kind = r["kind"]
    what = "NMI" if kind.startswith("nmi") else f"interrupt {r['vector']:#x}"
    where = f" before {sym(r['before'])}" if "before" in r else ""
    if "hit" in r and r["hit"] != 1:
        where += f" (arrival {r['hit']})"
    return f"~ {what} arrives ({r.get('source', '?')}){where}: {_ARRIVAL[kind]}"


# -- HLT ---------------------------------------------------------------------------------
@renders("hlt")
def _hlt(r: Record, sym: Symbolizer) -> str:
    return f"hlt at {sym(r['rip'])}: waiting"


@renders("wake")
def _wake(r: Record, sym: Symbolizer) -> str:
    first = f" (the HLT's {r['first']} first)" if "first" in r else ""
    return f"wake-up by {r['by']}{first}"


# -- VMX: EPT violations, #VE and VM exits (SDM Vol. 3C, "EPT Violations") ----------------
@renders("ept_revoke")
def _ept_revoke(r: Record, sym: Symbolizer) -> str:
    where = f" before {sym(r['before'])}" if "before" in r else ""
    return (f"~ host revokes EPT access to GPA {r['gpa']:#x}{where} "
            "(not present, suppress-#VE clear)")


@renders("ve_info_written")
def _ve_info_written(r: Record, sym: Symbolizer) -> str:
    bits = [b for b in ("read", "write", "fetch") if r.get(b)]
    rights = "".join(c if r.get(k) else "-" for c, k in
                     (("R", "readable"), ("W", "writable"), ("X", "executable")))
    return (f"EPT violation -> #VE: {'/'.join(bits)} of GPA {r['gpa']:#x} "
            f"(GLA {r['gla']:#x}, rights {rights}); VE info at {r['at']:#x}: "
            f"qualification {r['qualification']:#x}, busy word set")


@renders("vmexit")
def _vmexit(r: Record, sym: Symbolizer) -> str:
    if "exit_reason" in r:
        return _hyper_exit(r, sym)
    gla = "-" if r["gla"] is None else f"{r['gla']:#x}"
    during = f", during delivery of {r['during_delivery']}" if r["during_delivery"] else ""
    nmi = ", NMI unblocked by IRET" if r["nmi_unblocked_by_iret"] else ""
    return (f"VM EXIT (EPT violation, reason {r['reason']}) at {sym(r['rip'])}: "
            f"GPA {r['gpa']:#x} GLA {gla} qualification {r['qualification']:#x}{during}"
            f"{nmi} [not #VE: {r['why']}] -> host: {r['action']}")


def _hyper_exit(r: Record, sym: Symbolizer) -> str:
    """A hypervisor-model exit (cpu/vmx_exits.py): raw fields, then their decoding."""
    d = r["decoded"]
    parts = [f"VM EXIT {d['exit']} (reason {r['exit_reason']:#x}) at {sym(r['rip'])}:"]
    if r["interruption_info"] >> 31:
        parts.append(f"II {r['interruption_info']:#010x} [{d['interruption']}]"
                     + (f" error {r['interruption_error_code']:#x}"
                        if r["interruption_info"] & (1 << 11) else ""))
    if r["idt_vectoring_info"] >> 31:
        parts.append(f"IDTV {r['idt_vectoring_info']:#010x} [{d['idt_vectoring']}]"
                     + (f" error {r['idt_vectoring_error_code']:#x}"
                        if r["idt_vectoring_info"] & (1 << 11) else ""))
    else:
        parts.append("IDTV invalid")
    if r["qualification"]:
        parts.append(f"qual {r['qualification']:#x}")
    if r.get("gpa") is not None:
        parts.append(f"GPA {r['gpa']:#x}")
    if r["instruction_length"]:
        parts.append(f"len {r['instruction_length']}")
    parts.append(f"IS {r['interruptibility']:#x}")
    return " ".join(parts) + f" -> host: {r.get('action', '?')}"


@renders("apf_error_recorded")
def _apf_error_recorded(r: Record, sym: Symbolizer) -> str:
    gone = f", evicts {r['evicted']:#x}" if r.get("evicted") is not None else ""
    held = ", ".join(f"{g:#x}" for g in r["remembered"])
    return f"host ({r['policy']}) remembers failed GPA {r['gpa']:#x}: [{held}]{gone}"


@renders("apf_error_exit")
def _apf_error_exit(r: Record, sym: Symbolizer) -> str:
    return (f"host ({r['policy']}): GPA {r['gpa']:#x} failed to page in: exit to user space "
            f"at {sym(r['rip'])}")


@renders("vmentry")
def _vmentry(r: Record, sym: Symbolizer) -> str:
    if r["injected"] is None:
        return "VM ENTRY: resume, nothing injected"
    ec = f" error {r['error_code']:#x}" if r["injected"] & (1 << 11) else ""
    if "failed" in r:
        how = (f"VMfailValid, VM-instruction error {r['vm_instruction_error']}"
               if r.get("vm_instruction_error") is not None
               else f"VM-entry failure, exit reason {r['exit_reason']:#x}")
        return f"VM ENTRY injecting {r['injected']:#010x}{ec} FAILED: {how} ({r['failed']})"
    cr2 = f", CR2 := {r['cr2']:#x}" if r.get("cr2") is not None else ""
    return f"VM ENTRY injecting {r['injected']:#010x} [{r['decoded']}]{ec}{cr2}"


@renders("host_fix")
def _host_fix(r: Record, sym: Symbolizer) -> str:
    if r["what"] == "ept":
        return f"~ host restores the EPT entry of GPA {r['gpa']:#x}"
    return f"~ host maps the guest page {r['gla']:#x} (its shadow page)"


@renders("nested_vmexit")
def _nested_vmexit(r: Record, sym: Symbolizer) -> str:
    d = r["decoded"]
    idtv = (f"IDTV {r['idt_vectoring_info']:#010x} [{d['idt_vectoring']}]"
            if r["idt_vectoring_info"] >> 31 else "IDTV invalid")
    return (f"EXIT TO L1 (vmcs12): II {r['interruption_info']:#010x} [{d['interruption']}] "
            f"error {r['interruption_error_code']:#x} {idtv} ({r['why']})")


# -- the local APIC (SDM Vol. 3A, "Advanced Programmable Interrupt Controller") -----------
@renders("apic_write")
def _apic_write(r: Record, sym: Symbolizer) -> str:
    return f"APIC write [{r['offset']:#x}] = {r['value']:#x}"


@renders("apic_ipi")
def _apic_ipi(r: Record, sym: Symbolizer) -> str:
    status = "" if r.get("delivered", True) else " (no target)"
    return (f"IPI {r.get('mode', '?')} vector {r.get('vector', 0):#x} to "
            f"{r.get('shorthand', '?')}{status}")


# -- MSRs -------------------------------------------------------------------------------
_MSR_NAMES = {MSR_KVM_ASYNC_PF_EN: "MSR_KVM_ASYNC_PF_EN", MSR_KVM_ASYNC_PF_INT: "MSR_KVM_ASYNC_PF_INT",
              MSR_KVM_ASYNC_PF_ACK: "MSR_KVM_ASYNC_PF_ACK", MSR_EFER: "EFER",
              MSR_APIC_BASE: "IA32_APIC_BASE", MSR_TSC: "TSC"}


@renders("msr_read", "msr_write")
def _msr(r: Record, sym: Symbolizer) -> str:
    write = r["kind"] == "msr_write"
    return (f"{'WRMSR' if write else 'RDMSR'} {_MSR_NAMES.get(r['msr'], hex(r['msr']))} "
            f"{'=' if write else '->'} {r['value']:#x}")


# -- KVM async page faults (Linux arch/x86/kernel/kvm.c) -----------------------------------
@renders("apf_not_present")
def _apf_not_present(r: Record, sym: Symbolizer) -> str:
    gpa = "?" if r.get("gpa") is None else f"{r['gpa']:#x}"
    if r["decision"] == "inject":
        return (f"async #PF: GPA {gpa} swapped out -> host injects page-not-present, "
                f"token {r['token']:#x} ({r['policy']}: {r['reason']})")
    return f"async #PF: GPA {gpa} swapped out -> host stalls the vCPU ({r['policy']}: {r['reason']})"


@renders("host_declines")
def _host_declines(r: Record, sym: Symbolizer) -> str:
    where = f" before {sym(r['before'])}" if "before" in r else ""
    if r["status"] == "refused":
        return (f"~ host does not do {r['event']}{where}: policy {r['policy']} refuses "
                f"({r['reason']})")
    return f"~ host cannot do {r['event']}{where}: {r['reason']}"


@renders("apf_halt")
def _apf_halt(r: Record, sym: Symbolizer) -> str:
    return f"vCPU halted {r['cycles']} cycles until GPA {r['gpa']:#x} is in"


@renders("apf_page_in_done")
def _apf_page_in_done(r: Record, sym: Symbolizer) -> str:
    ok = "paged in" if r["ok"] else "page-in FAILED"
    return f"host: GPA {r['gpa']:#x} {ok} (token {r['token']:#x})"


@renders("apf_page_ready")
def _apf_page_ready(r: Record, sym: Symbolizer) -> str:
    how = f"interrupt {r['vector']:#x}" if r["layout"] == "2020" else "#PF (reason 2)"
    return f"page ready: token {r['token']:#x} by {how}"


# -- boot and platform devices ------------------------------------------------------------
@renders("boot")
def _boot(r: Record, sym: Symbolizer) -> str:
    return (f"{r['protocol']} boot: 32-bit entry at {sym(r['entry'])}, "
            f"EAX={r['eax']:#x} EBX={r['info']:#x} (boot information), "
            f"cmdline {r['cmdline']!r}")


@renders("mode_switch")
def _mode_switch(r: Record, sym: Symbolizer) -> str:
    return (f"mode switch: {r['from']} -> {r['to']} at {sym(r['rip'])} "
            f"(cs {r['cs']:#x}); the machine model is active from here")


@renders("flush_page")
def _flush_page(r: Record, sym: Symbolizer) -> str:
    return f"flush page {r['address']:#x} (port 0xe4, write {r['hit']}): translations dropped"


@renders("serial")
def _serial(r: Record, sym: Symbolizer) -> str:
    return f"serial | {r['text']}"


@renders("port")
def _port(r: Record, sym: Symbolizer) -> str:
    val = f" = {r['value']:#x}" if "value" in r else ""
    return f"port {r['direction']} {r['port']:#x}{val} (no device)"


# Kinds shown with their fields as JSON: rare, and every field matters.
renders("msr_fault", "apf_page_in_failed", "apic_timer", "apic_ignored_write")(as_json)
