"""Compare two self-logging runs record by record: `idtlab diff A B [--reference R]`.

A and B are serial logs of the same image from any origin (idtlab, Bochs, QEMU, real
hardware, or `idtlab run` output, which shows the serial lines with a prefix). Only
idtlog records count (docs/idtlog-format.md): a record starts at the first "idtlog1 "
in a line; everything else (firmware noise, prefixes, other output) is ignored.

The records are compared in order. A difference is *expected* when the known-divergence
table of the named reference explains it (`KNOWN_DIVERGENCES`: QEMU's RF = 0 in fault
frames, its vector*16+2 IDT error codes, ...; each entry cites the SDM), and so is the
verdict (PASS vs FAIL) and `end` count change such a difference causes inside the same
test. Everything else is a divergence; the comparison stops at the first one, because
after it the two runs need not line up any more. Exit status of the CLI: 0 when the logs
are equal modulo known divergences, 1 otherwise, 2 on bad input (unreadable file, no
records, logs of different images).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idtlab.errors import BadInput, read_input

RECORD_TAG = "idtlog1 "
REFERENCES = ("bochs", "qemu")

# Vector classes (SDM Vol. 3A, "Exception and Interrupt Reference", Table 6-4 "Interrupt
# and Exception Classes").
FAULT_VECTORS = frozenset({0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21})
SELECTOR_ERROR_VECTORS = frozenset({10, 11, 12, 13})
RF = 1 << 16


@dataclass(frozen=True)
class Record:
    """One idtlog record: where it is, its text from "idtlog1" on, and what it says."""

    lineno: int
    text: str
    kind: str                   # begin | end | event | check | verdict | other
    test: str = ""              # the test name; the image name for begin/end
    fields: tuple[tuple[str, str], ...] = ()
    verdict: str = ""           # PASS | FAIL (verdict records)
    reason: str = ""            # FAIL's reason words

    def get(self, key: str) -> str | None:
        return dict(self.fields).get(key)

    def int_field(self, key: str) -> int | None:
        v = self.get(key)
        if v is None:
            return None
        try:
            return int(v, 16)
        except ValueError:
            return None


@dataclass(frozen=True)
class KnownDivergence:
    """A documented way a reference departs from the SDM (or a value the SDM leaves
    undefined). `explains(record, field, value_a, value_b)` says whether this entry
    accounts for `field` differing between two event records of the same test and
    vector; `fail_reasons` are the FAIL reasons it may cause in that test's verdict."""

    id: str
    reference: str              # "qemu", "bochs", or "any"
    summary: str
    sdm: str
    explains: Callable[[Record, str, str, str], bool]
    fail_reasons: tuple[str, ...] = ()


def _ints(a: str, b: str) -> tuple[int, int] | None:
    try:
        return int(a, 16), int(b, 16)
    except ValueError:
        return None


def _vector(rec: Record) -> int | None:
    v = rec.get("ev")
    try:
        return int(v, 16) if v is not None else None
    except ValueError:
        return None


def _rf_only_in_one(rec: Record, key: str, a: str, b: str) -> bool:
    vals = _ints(a, b)
    vec = _vector(rec)
    return (key == "rflags" and vals is not None and vec is not None
            and vec in FAULT_VECTORS and vals[0] ^ vals[1] == RF)


def _idt_code_times_16(rec: Record, key: str, a: str, b: str) -> bool:
    vals = _ints(a, b)
    vec = _vector(rec)
    if key != "err" or vals is None or vec not in SELECTOR_ERROR_VECTORS:
        return False
    return any(sdm & 2 and other == (sdm >> 3) * 16 + 2 for sdm, other in (vals, vals[::-1]))


def _df_state_undefined(rec: Record, key: str, a: str, b: str) -> bool:
    if _vector(rec) != 8:
        return False
    vals = _ints(a, b)
    return key in ("rip", "cs") or (key == "rflags" and vals is not None
                                    and vals[0] ^ vals[1] == RF)


def _eptp_index_zero(rec: Record, key: str, a: str, b: str) -> bool:
    vals = _ints(a, b)
    return key == "eptp" and vals is not None and 0 in vals


def _ss_same_cpl_ist(rec: Record, key: str, a: str, b: str) -> bool:
    vals = _ints(a, b)
    return key == "ss" and vals is not None and 0 in vals and (vals[0] | vals[1]) & 3 == 0


KNOWN_DIVERGENCES: tuple[KnownDivergence, ...] = (
    KnownDivergence(
        id="qemu-rf-fault-frames",
        reference="qemu",
        summary="QEMU 7.2 TCG pushes RF = 0 for fault-class exceptions; the SDM requires "
                "RF = 1 for every fault except an instruction-breakpoint #DB",
        sdm="SDM Vol. 3B, Debug Exception Conditions, Instruction-Breakpoint Exception "
            "Condition (the RF value pushed when calling an event handler)",
        explains=_rf_only_in_one,
        fail_reasons=(r"^rf is not set in the \w+ fault frame$",),
    ),
    KnownDivergence(
        id="qemu-idt-error-code",
        reference="qemu",
        summary="QEMU 7.2 TCG reports an IDT entry in a #GP/#NP/#TS/#SS error code as "
                "vector*16+2 without EXT; the SDM format is (vector << 3) | IDT (bit 1) | EXT "
                "(bit 0)",
        sdm="SDM Vol. 3A, Interrupt and Exception Handling, Error Code",
        explains=_idt_code_times_16,
        fail_reasons=(r"error code is not",),
    ),
    KnownDivergence(
        id="bochs-ve-eptp-index",
        reference="bochs",
        summary="Bochs 2.7 writes 0 as the EPTP index (offset 0x20 of the VE-information "
                "area) unless the index was set by VMFUNC EPTP switching; the SDM says the "
                "processor writes the VMCS EPTP-index field there",
        sdm="SDM Vol. 3C, Virtualization Exceptions, Convertible EPT Violations (the "
            "information saved)",
        explains=_eptp_index_zero,
    ),
    KnownDivergence(
        id="bochs-ss-same-cpl-ist",
        reference="bochs",
        summary="an IST stack switch without a privilege change: Bochs 2.7 leaves SS as "
                "it was, idtlab loads NULL as the SDM's IST prose says (unconfirmed on "
                "hardware; QEMU loads NULL with RPL = DPL)",
        sdm="SDM Vol. 3A, 64-Bit Mode Stack Frame / Interrupt Stack Table (SS is forced to "
            "NULL); Vol. 2A, INT n/INTO/INT3/INT1 pseudo-code (SS left alone at the same "
            "privilege level); Bochs exception.cc long_mode_int",
        explains=_ss_same_cpl_ist,
    ),
    KnownDivergence(
        id="df-state-undefined",
        reference="any",
        summary="a #DF's saved CS:RIP are undefined and so is the program state after it; "
                "the RF bit pushed in a #DF frame differs (Bochs 1: it set RF for the "
                "fault whose delivery failed; QEMU and idtlab 0)",
        sdm="SDM Vol. 3A, Interrupt 8—Double Fault Exception (Saved Instruction Pointer; "
            "Program State Change)",
        explains=_df_state_undefined,
    ),
)


def known_divergences(reference: str | None) -> tuple[KnownDivergence, ...]:
    """The entries that apply when one log comes from `reference` (None: only "any")."""
    if reference is not None and reference not in REFERENCES:
        raise BadInput(f"unknown reference {reference!r} (expected one of {', '.join(REFERENCES)})")
    return tuple(d for d in KNOWN_DIVERGENCES if d.reference in ("any", reference))


# ------------------------------------------------------------------------------ parsing

_KV_RE = re.compile(r"([a-z0-9_]+)=(\S+)")
_NAME_RE = re.compile(r"[a-z0-9_]+")


def parse_record(lineno: int, text: str) -> Record:
    """Classify one record (text starts with "idtlog1 "). Records that do not follow the
    format are kept as kind "other" and compared as text."""
    words = text.split()
    other = Record(lineno, text, "other")
    if len(words) < 2:
        return other
    if words[1] in ("begin", "end"):
        if len(words) < 3:
            return other
        fields = tuple((m.group(1), m.group(2)) for w in words[3:] if (m := _KV_RE.fullmatch(w)))
        return Record(lineno, text, words[1], words[2], fields)
    test = words[1]
    if not _NAME_RE.fullmatch(test) or len(words) < 3:
        return other
    if words[2] == "PASS" and len(words) == 3:
        return Record(lineno, text, "verdict", test, verdict="PASS")
    if words[2] == "FAIL":
        return Record(lineno, text, "verdict", test, verdict="FAIL", reason=" ".join(words[3:]))
    kind, kvs = ("check", words[3:]) if words[2] == "check" else ("event", words[2:])
    matches = [_KV_RE.fullmatch(w) for w in kvs]
    if not kvs or not all(matches):
        return other
    fields = tuple((m.group(1), m.group(2)) for m in matches if m)
    if kind == "event" and fields[0][0] != "ev":
        return other
    return Record(lineno, text, kind, test, fields)


def parse_log(text: str) -> list[Record]:
    """Every idtlog record in a log, in order (lines without one are ignored)."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        at = line.find(RECORD_TAG)
        if at >= 0:
            records.append(parse_record(lineno, " ".join(line[at:].split())))
    return records


def read_log(path: str | Path) -> list[Record]:
    """The records of a log file; `BadInput` if it cannot be read or holds none."""
    name = str(path)
    raw = read_input(path, "a log")
    records = parse_log(raw.decode("latin-1"))
    if not records:
        raise BadInput(f"{name}: no '{RECORD_TAG.strip()}' records (not a serial log of a "
                       "self-logging image? see docs/idtlog-format.md)")
    return records


# ------------------------------------------------------------------------------ comparing

@dataclass(frozen=True)
class Expected:
    """A difference the known-divergence table explains."""

    index: int                  # record index in both logs
    a: Record
    b: Record
    ids: tuple[str, ...]
    detail: str


@dataclass
class DiffResult:
    a: list[Record]
    b: list[Record]
    reference: str | None
    identical: int = 0
    expected: list[Expected] = field(default_factory=list)
    first: int | None = None    # index of the first unexpected divergence
    why: str = ""

    @property
    def equal(self) -> bool:
        return self.first is None


HOST_PREFIX = "host_"  # records a hypervisor prints itself (test names host_*)


def guest_visible(records: list[Record]) -> list[Record]:
    """The records without the hypervisor's own (`host_*` tests): what a guest that runs
    alone (idtlab's model of the host in its place) prints too."""
    def test_name(r: Record) -> str:
        words = r.text.split()
        return r.test or (words[1] if len(words) > 1 else "")

    return [r for r in records if not test_name(r).startswith(HOST_PREFIX)]


def diff_records(a: list[Record], b: list[Record], reference: str | None = None, *,
                 guest_only: bool = False) -> DiffResult:
    """Compare two record lists (see the module docstring). `guest_only`: leave out the
    hypervisor's own records (`host_*`) on both sides first."""
    if guest_only:
        a, b = guest_visible(a), guest_visible(b)
    table = known_divergences(reference)
    image_a = next((r.test for r in a if r.kind == "begin"), None)
    image_b = next((r.test for r in b if r.kind == "begin"), None)
    if image_a is not None and image_b is not None and image_a != image_b:
        raise BadInput(f"the logs are of different images ({image_a} vs {image_b})")
    res = DiffResult(a, b, reference)
    matched: dict[str, set[str]] = {}       # test -> ids of entries seen in that test
    fail_delta = 0                          # expected (fails in a) - (fails in b)
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b):
            res.first = i
            short = "A" if i >= len(a) else "B"
            res.why = f"log {short} ends here ({min(len(a), len(b))} records)"
            return res
        ra, rb = a[i], b[i]
        if ra.text == rb.text:
            res.identical += 1
            continue
        explained = _explain(ra, rb, table, matched, fail_delta)
        if isinstance(explained, str):
            res.first = i
            res.why = explained
            return res
        ids, detail, delta = explained
        fail_delta += delta
        res.expected.append(Expected(i, ra, rb, ids, detail))
    return res


def _explain(ra: Record, rb: Record, table: tuple[KnownDivergence, ...],
             matched: dict[str, set[str]],
             fail_delta: int) -> tuple[tuple[str, ...], str, int] | str:
    """(ids, detail, change of the expected fail delta) if the table explains the
    difference between ra and rb, else the reason it is a divergence."""
    if ra.kind != rb.kind or ra.test != rb.test:
        return "different records"
    if ra.kind == "event":
        keys_a = [k for k, _ in ra.fields]
        if keys_a != [k for k, _ in rb.fields] or ra.get("ev") != rb.get("ev"):
            return "different events"
        ids: list[str] = []
        parts: list[str] = []
        for (key, va), (_, vb) in zip(ra.fields, rb.fields, strict=True):
            if va == vb:
                continue
            entry = next((d for d in table if d.explains(ra, key, va, vb)), None)
            if entry is None:
                return f"{key} differs ({va} vs {vb})"
            ids.append(entry.id)
            parts.append(f"{key} {va} vs {vb}")
            matched.setdefault(ra.test, set()).add(entry.id)
        return tuple(dict.fromkeys(ids)), ", ".join(parts), 0
    if ra.kind == "verdict":
        seen = [d for d in table if d.id in matched.get(ra.test, set())]
        reasons = [r.reason for r in (ra, rb) if r.verdict == "FAIL"]
        for d in seen:
            if all(any(re.search(p, reason) for p in d.fail_reasons) for reason in reasons):
                delta = (ra.verdict == "FAIL") - (rb.verdict == "FAIL")
                return (d.id,), f"{ra.verdict} vs {rb.verdict}", delta
        return "different verdicts"
    if ra.kind == "end":
        pa, fa = ra.int_field("pass"), ra.int_field("fail")
        pb, fb = rb.int_field("pass"), rb.int_field("fail")
        if (None not in (pa, fa, pb, fb) and fail_delta != 0 and fa is not None
                and fb is not None and pa is not None and pb is not None
                and fa - fb == fail_delta and pa - pb == -fail_delta):
            return (), f"pass/fail counts differ by the {abs(fail_delta)} expected verdict(s)", 0
        return "different end records"
    return "different records"


# ------------------------------------------------------------------------------ report

def report(res: DiffResult, name_a: str = "A", name_b: str = "B", context: int = 3,
           max_expected: int = 20) -> list[str]:
    """The human-readable comparison: expected divergences, the first divergence with
    `context` records around it, and a summary line."""
    lines: list[str] = []
    by_id: dict[str, KnownDivergence] = {d.id: d for d in KNOWN_DIVERGENCES}
    for n, e in enumerate(res.expected):
        if n == max_expected:
            lines.append(f"  ... and {len(res.expected) - max_expected} more expected divergences")
            break
        why = "; ".join(e.ids) if e.ids else "follows from the expected verdicts"
        lines.append(f"expected  {name_a}:{e.a.lineno} / {name_b}:{e.b.lineno}  {e.a.test}: "
                     f"{e.detail}  [{why}]")
    if res.first is not None:
        i = res.first
        lines.append("")
        lines.append(f"first divergence: record {i + 1}: {res.why}")
        for name, recs in ((name_a, res.a), (name_b, res.b)):
            lines.append(f"--- {name}")
            for j in range(max(0, i - context), min(len(recs), i + context)):
                mark = ">" if j == i else " "
                lines.append(f"{mark} {recs[j].lineno:5}  {recs[j].text}")
            if i >= len(recs):
                lines.append(f"> (end of log after {len(recs)} records)")
    counts = Counter(d_id for e in res.expected for d_id in e.ids)
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    compared = res.identical + len(res.expected) + (0 if res.first is None else 1)
    summary = (f"{compared} records compared: {res.identical} identical, "
               f"{len(res.expected)} expected divergences" + (f" ({kinds})" if kinds else ""))
    if res.first is None:
        summary += f"; equal modulo known divergences (reference: {res.reference or 'none'})"
    else:
        summary += f"; first unexpected divergence at record {res.first + 1}"
    lines.append("")
    lines.append(summary)
    for d_id in sorted(counts):
        d = by_id[d_id]
        lines.append(f"  {d.id}: {d.summary} [{d.sdm}]")
    return lines


def diff_files(path_a: str | Path, path_b: str | Path,
               reference: str | None = None) -> tuple[DiffResult, list[str]]:
    """Read, compare and report; `BadInput` for unreadable or incomparable logs."""
    res = diff_records(read_log(path_a), read_log(path_b), reference)
    return res, report(res, str(path_a), str(path_b))


# ------------------------------------------------------------------------------ CLI

def add_parser(sub: Any) -> None:
    """`idtlab diff A B [--reference bochs|qemu]` (registered by idtlab/cli.py)."""
    p = sub.add_parser("diff", help="compare two idtlog serial logs; known divergences of "
                       "a reference are reported as expected")
    p.add_argument("log_a", type=Path, metavar="A")
    p.add_argument("log_b", type=Path, metavar="B")
    p.add_argument("--reference", choices=REFERENCES,
                   help="one of the logs comes from this reference: its known divergences "
                        "are expected (default: only what the SDM leaves undefined)")
    p.add_argument("--context", type=int, default=3, help="records of context (3)")
    p.add_argument("--guest-only", action="store_true",
                   help="leave out the hypervisor's own records (tests named host_*), e.g. "
                        "to compare the #VE image on Bochs with its guest part on idtlab")


def run_cli(args: Any) -> int:
    res = diff_records(read_log(args.log_a), read_log(args.log_b), args.reference,
                       guest_only=args.guest_only)
    for line in report(res, str(args.log_a), str(args.log_b), context=max(0, args.context)):
        print(line)
    return 0 if res.equal else 1
