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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpu.cpu_model import MSR_APIC_BASE, MSR_EFER, MSR_TSC
from cpu.devices.apf import MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT
from idt.vectors import vector_name

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
    """Addresses as `symbol+0x10` (nearest symbol at or below, within 64 KiB).

    >>> sym = Symbolizer({"main": 0x100000, "idt": 0x2000}, hide=["idt"])
    >>> sym(0x100010), sym(0x2000)
    ('main+0x10', '0x2000')
    """

    def __init__(self, symbols: Mapping[str, int], hide: Iterable[str] = ()) -> None:
        hidden = set(hide)
        pairs = sorted((v, k) for k, v in symbols.items() if k not in hidden)
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

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


def timeline(records: Iterable[Record], sym: Symbolizer, *, cycles: bool = False) -> list[str]:
    r"""Readable lines: icount (and the cycle stamp with `cycles`), nesting by
    indentation, names instead of numbers.

        >>> from idtlab.api import load_asm
        >>> from cpu.machine import Machine
        >>> m = Machine()
        >>> _ = load_asm(m, "main:\n    int3\n    hlt\nbp_handler:\n    iretq", 0x100000)
        >>> m.set_gate(3, m.symbols["bp_handler"])
        >>> for line in timeline(m.run(entry=0x100000, rsp=0x70000).trace.records,
        ...                      Symbolizer({"main": 0x100000, "bp_handler": 0x100002})):
        ...     print(line)
                 1  #BP software at main+0x1 -> bp_handler  stack=current rsp=0x6ffd8 cpl 0->0
                 2  iret at bp_handler -> main+0x1 rsp=0x70000 cpl 0
                 3  end: hlt at bp_handler (HLT with no event that can wake the CPU)
    """
    out: list[str] = []
    depth = 0
    for r in records:
        depth = int(r.get("depth", depth))
        head = f"{r['icount']:>10}  " + (f"{r['cycle']:>12}  " if cycles else "")
        renderer = RENDERERS.get(r["kind"], FALLBACK)
        text = renderer.render(r, sym)
        lines = [text] if isinstance(text, str) else text
        pad = "  " * depth if renderer.nested else ""
        out.append(f"{head}{pad}{lines[0]}")
        out.extend(f"{' ' * len(head)}{pad}{line}" for line in lines[1:])
    return out


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
    return (f"{r['name']}{ec} {r['source']} at {sym(r['rip'])} -> "
            f"{sym(r['handler'])}  stack={r['stack']} rsp={r['rsp']:#x} "
            f"cpl {r['cs'] & 3}->{r['cpl']}{extra}")


@renders("delivery_fault")
def _delivery_fault(r: Record, sym: Symbolizer) -> str:
    ec = "" if r["error_code"] is None else f"({r['error_code']:#x})"
    return f"! {r['fault_name']}{ec} while delivering {r['name']}: {r['why']} -> {r['action']}"


@renders("iret")
def _iret(r: Record, sym: Symbolizer) -> str:
    nmi = "  (NMIs unblocked)" if r["nmi_unblocked"] else ""
    return f"iret at {sym(r['rip'])} -> {sym(r['to_rip'])} rsp={r['to_rsp']:#x} cpl {r['to_cpl']}{nmi}"


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
    return f"end: {r['reason']} at {sym(r['rip'])}{detail}"


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
    gla = "-" if r["gla"] is None else f"{r['gla']:#x}"
    during = f", during delivery of {r['during_delivery']}" if r["during_delivery"] else ""
    nmi = ", NMI unblocked by IRET" if r["nmi_unblocked_by_iret"] else ""
    return (f"VM EXIT (EPT violation, reason {r['reason']}) at {sym(r['rip'])}: "
            f"GPA {r['gpa']:#x} GLA {gla} qualification {r['qualification']:#x}{during}"
            f"{nmi} [not #VE: {r['why']}] -> host: {r['action']}")


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
