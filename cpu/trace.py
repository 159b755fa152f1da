"""The event trace: an ordered list of records, each a flat dict with `seq`, `icount`,
`cycle` and `kind` first. idtlab/trace.py writes it as JSONL; its format is documented
in docs/trace-format.md and is a contract (kinds and fields only ever get added)."""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]


class Trace:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def emit(self, kind: str, icount: int, cycle: int = 0, **fields: Any) -> Record:
        rec: Record = {"seq": len(self.records), "icount": icount, "cycle": cycle, "kind": kind}
        rec.update(fields)
        self.records.append(rec)
        return rec

    def of_kind(self, *kinds: str) -> list[Record]:
        return [r for r in self.records if r["kind"] in kinds]
