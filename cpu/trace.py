"""The event trace: an ordered list of records, each a flat dict with `seq`, `icount`,
`cycle` and `kind` first. idtlab/trace.py writes it as JSONL; its format is documented
in docs/trace-format.md and is a contract (kinds and fields only ever get added).

A trace keeps every record by default. A long-running guest (a kvm-unit-tests kernel
takes millions of page faults on purpose) would make that memory grow with the run, so
`Trace(keep=N)` keeps only the last N to 2N records: older ones are dropped in bulk,
`seq` keeps counting from the start of the run, and `counts` still says how many records
of each kind were emitted.

    >>> t = Trace(keep=2)
    >>> for i in range(5):
    ...     _ = t.emit("deliver", icount=i)
    >>> [r["seq"] for r in t.records], t.dropped, t.counts["deliver"]
    ([2, 3, 4], 2, 5)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

Record = dict[str, Any]


class Trace:
    def __init__(self, keep: int | None = None) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"a trace keeps at least one record, not {keep}")
        self.records: list[Record] = []
        self.keep = keep
        self.dropped = 0  # records emitted, then dropped from the front (keep mode)
        self.counts: Counter[str] = Counter()

    @property
    def emitted(self) -> int:
        """Records emitted since the run started, kept or not."""
        return self.dropped + len(self.records)

    def emit(self, kind: str, icount: int, cycle: int = 0, **fields: Any) -> Record:
        return self.append(kind, icount, cycle, fields)

    def append(self, kind: str, icount: int, cycle: int, fields: dict[str, Any]) -> Record:
        """`emit` with the fields as one dict (a caller that already has them in one)."""
        rec: Record = {"seq": self.emitted, "icount": icount, "cycle": cycle, "kind": kind}
        rec.update(fields)
        self.records.append(rec)
        self.counts[kind] += 1
        if self.keep is not None and len(self.records) >= 2 * self.keep:
            drop = len(self.records) - self.keep
            del self.records[:drop]
            self.dropped += drop
        return rec

    def last(self) -> list[Record]:
        """The last `keep` records exactly (all of them without `keep`): what a user who
        asked for the last N is shown."""
        if self.keep is None or len(self.records) <= self.keep:
            return self.records
        return self.records[-self.keep:]

    def of_kind(self, *kinds: str) -> list[Record]:
        return [r for r in self.records if r["kind"] in kinds]

    def truncate(self, emitted: int, counts: Counter[str]) -> None:
        """Go back to when `emitted` records had been emitted (a checkpoint restore)."""
        kept = emitted - self.dropped
        if kept < 0:  # the checkpoint is older than the kept tail: nothing of it is left
            self.records.clear()
            self.dropped = emitted
        else:
            del self.records[kept:]
        self.counts = Counter(counts)
