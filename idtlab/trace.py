"""JSONL trace output and the readable timeline.

JSONL: one record per line, keys in emission order, compact separators, so the same
scenario gives byte-identical files (tests check it). Format: docs/trace-format.md.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cpu.devices.apf import MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT
from cpu.machine import MSR_APIC_BASE, MSR_EFER, MSR_TSC
from idt.vectors import vector_name


def to_jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    Path(path).write_text(to_jsonl(records))


class Symbolizer:
    """Addresses as `symbol+0x10` (nearest symbol at or below, within 64 KiB)."""

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


_MSR_NAMES = {MSR_KVM_ASYNC_PF_EN: "MSR_KVM_ASYNC_PF_EN", MSR_KVM_ASYNC_PF_INT: "MSR_KVM_ASYNC_PF_INT",
              MSR_KVM_ASYNC_PF_ACK: "MSR_KVM_ASYNC_PF_ACK", MSR_EFER: "EFER",
              MSR_APIC_BASE: "IA32_APIC_BASE", MSR_TSC: "TSC"}


def timeline(records: Iterable[Mapping[str, Any]], sym: Symbolizer, *,
             cycles: bool = False) -> list[str]:
    """Readable lines: icount (and the cycle stamp with `cycles`), nesting by
    indentation, names instead of numbers."""
    out: list[str] = []
    depth = 0
    for r in records:
        kind = r["kind"]
        depth = int(r.get("depth", depth))
        pad = "  " * depth
        head = f"{r['icount']:>10}  " + (f"{r['cycle']:>12}  " if cycles else "")
        if kind == "deliver":
            ec = "" if r["error_code"] is None else f"({r['error_code']:#x})"
            extra = ""
            if "cr2" in r:
                extra += f" cr2={r['cr2']:#x}"
            if "double_fault_of" in r:
                a, b = r["double_fault_of"]
                extra += f" [double fault: {vector_name(a)} then {vector_name(b)}]"
            out.append(f"{head}{pad}{r['name']}{ec} {r['source']} at {sym(r['rip'])} -> "
                       f"{sym(r['handler'])}  stack={r['stack']} rsp={r['rsp']:#x} "
                       f"cpl {r['cs'] & 3}->{r['cpl']}{extra}")
        elif kind == "iret":
            nmi = "  (NMIs unblocked)" if r["nmi_unblocked"] else ""
            out.append(f"{head}{pad}iret at {sym(r['rip'])} -> {sym(r['to_rip'])} "
                       f"rsp={r['to_rsp']:#x} cpl {r['to_cpl']}{nmi}")
        elif kind == "iret_fault":
            out.append(f"{head}{pad}iret at {sym(r['rip'])} faults: {vector_name(r['vector'])}"
                       f"({r['error_code']:#x}) {r['why']}"
                       + ("  (NMIs unblocked anyway)" if r["nmi_unblocked"] else ""))
        elif kind == "delivery_fault":
            ec = "" if r["error_code"] is None else f"({r['error_code']:#x})"
            out.append(f"{head}{pad}! {r['fault_name']}{ec} while delivering {r['name']}: "
                       f"{r['why']} -> {r['action']}")
        elif kind == "shutdown":
            out.append(f"{head}{pad}SHUTDOWN: {r['reason']}")
        elif kind == "end":
            detail = f" ({r['detail']})" if r.get("detail") else ""
            out.append(f"{head}end: {r['reason']} at {sym(r['rip'])}{detail}")
        elif kind in ("nmi_pending", "nmi_latched", "nmi_dropped", "interrupt_pending"):
            what = "NMI" if kind.startswith("nmi") else f"interrupt {r['vector']:#x}"
            verb = {"nmi_pending": "pending", "nmi_latched": "LATCHED (NMIs blocked)",
                    "nmi_dropped": "DROPPED (one already latched)",
                    "interrupt_pending": "pending in IRR"}[kind]
            where = f" before {sym(r['before'])}" if "before" in r else ""
            if "hit" in r and r["hit"] != 1:
                where += f" (arrival {r['hit']})"
            out.append(f"{head}{pad}~ {what} arrives ({r.get('source', '?')}){where}: {verb}")
        elif kind == "cr2_read":
            pf = r.get("pf_cr2")
            verdict = "" if pf is None else (
                f" (the #PF being handled had CR2 = {pf:#x})" if pf == r["value"] else
                f" -- WRONG: the #PF being handled had CR2 = {pf:#x}")
            out.append(f"{head}{pad}{sym(r['rip'])}: reads CR2 = {r['value']:#x}{verdict}")
        elif kind == "ept_revoke":
            where = f" before {sym(r['before'])}" if "before" in r else ""
            out.append(f"{head}{pad}~ host revokes EPT access to GPA {r['gpa']:#x}{where} "
                       "(not present, suppress-#VE clear)")
        elif kind == "frame_overwritten":
            out.append(f"{head}{pad}!! {r['by']} frame at {r['at']:#x} overwrites the live "
                       f"{r['victim']} frame (pushed at icount {r['victim_icount']}):")
            for slot, old, new in r["slots"]:
                mark = "  <- changed" if old != new else ""
                out.append(f"{' ' * len(head)}{pad}   {slot:<7} {old:#x} -> {new:#x}{mark}")
        elif kind == "ve_info_written":
            bits = [b for b in ("read", "write", "fetch") if r.get(b)]
            rights = "".join(c if r.get(k) else "-" for c, k in
                             (("R", "readable"), ("W", "writable"), ("X", "executable")))
            out.append(f"{head}{pad}EPT violation -> #VE: {'/'.join(bits)} of GPA {r['gpa']:#x} "
                       f"(GLA {r['gla']:#x}, rights {rights}); VE info at {r['at']:#x}: "
                       f"qualification {r['qualification']:#x}, busy word set")
        elif kind == "vmexit":
            gla = "-" if r["gla"] is None else f"{r['gla']:#x}"
            during = f", during delivery of {r['during_delivery']}" if r["during_delivery"] else ""
            nmi = ", NMI unblocked by IRET" if r["nmi_unblocked_by_iret"] else ""
            out.append(f"{head}{pad}VM EXIT (EPT violation, reason {r['reason']}) at {sym(r['rip'])}: "
                       f"GPA {r['gpa']:#x} GLA {gla} qualification {r['qualification']:#x}{during}"
                       f"{nmi} [not #VE: {r['why']}] -> host: {r['action']}")
        elif kind == "apic_write":
            out.append(f"{head}{pad}APIC write [{r['offset']:#x}] = {r['value']:#x}")
        elif kind == "apic_ipi":
            to = r.get("shorthand", "?")
            status = "" if r.get("delivered", True) else " (no target)"
            out.append(f"{head}{pad}IPI {r.get('mode', '?')} vector {r.get('vector', 0):#x} to {to}"
                       f"{status}")
        elif kind in ("msr_read", "msr_write"):
            verb = "WRMSR" if kind == "msr_write" else "RDMSR"
            out.append(f"{head}{pad}{verb} {_MSR_NAMES.get(r['msr'], hex(r['msr']))} "
                       f"{'=' if kind == 'msr_write' else '->'} {r['value']:#x}")
        elif kind == "apf_not_present":
            gpa = "?" if r.get("gpa") is None else f"{r['gpa']:#x}"
            if r["decision"] == "inject":
                out.append(f"{head}{pad}async #PF: GPA {gpa} swapped out -> host injects page-not-"
                           f"present, token {r['token']:#x} ({r['policy']}: {r['reason']})")
            else:
                out.append(f"{head}{pad}async #PF: GPA {gpa} swapped out -> host stalls the vCPU "
                           f"({r['policy']}: {r['reason']})")
        elif kind == "apf_halt":
            out.append(f"{head}{pad}vCPU halted {r['cycles']} cycles until GPA {r['gpa']:#x} is in")
        elif kind == "apf_page_in_done":
            ok = "paged in" if r["ok"] else "page-in FAILED"
            out.append(f"{head}{pad}host: GPA {r['gpa']:#x} {ok} (token {r['token']:#x})")
        elif kind == "apf_page_ready":
            how = f"interrupt {r['vector']:#x}" if r["layout"] == "2020" else "#PF (reason 2)"
            out.append(f"{head}{pad}page ready: token {r['token']:#x} by {how}")
        elif kind == "boot":
            out.append(f"{head}{pad}{r['protocol']} boot: 32-bit entry at {sym(r['entry'])}, "
                       f"EAX={r['eax']:#x} EBX={r['info']:#x} (boot information), "
                       f"cmdline {r['cmdline']!r}")
        elif kind == "mode_switch":
            out.append(f"{head}{pad}mode switch: {r['from']} -> {r['to']} at {sym(r['rip'])} "
                       f"(cs {r['cs']:#x}); the machine model is active from here")
        elif kind == "flush_page":
            out.append(f"{head}{pad}flush page {r['address']:#x} (port 0xe4, write {r['hit']}): "
                       "translations dropped")
        elif kind == "serial":
            out.append(f"{head}{pad}serial | {r['text']}")
        elif kind == "hlt":
            out.append(f"{head}{pad}hlt at {sym(r['rip'])}: waiting")
        elif kind == "wake":
            out.append(f"{head}{pad}wake-up by {r['by']}")
        elif kind == "port":
            val = f" = {r['value']:#x}" if "value" in r else ""
            out.append(f"{head}{pad}port {r['direction']} {r['port']:#x}{val} (no device)")
        else:
            rest = {k: v for k, v in r.items() if k not in ("seq", "icount", "cycle", "kind")}
            out.append(f"{head}{pad}{kind} {json.dumps(rest)}")
    return out
