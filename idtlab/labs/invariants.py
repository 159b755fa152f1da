"""Explorer invariants the built-in labs use, by name `idtlab.labs.invariants:NAME`.

Each is a function `(result, machine) -> str | None` (idtlab.explore: a message when the
invariant is broken). They read the run through `idtlab.labs.runner`, never the trace
vocabulary directly.
"""

from __future__ import annotations

from typing import Any

from idtlab.labs import runner

BODY_PORT = 0x80  # the labs' nmi_body starts with `out 0x80, al`


def nmi_handled(result: Any, machine: Any) -> str | None:
    """No NMI is lost: after every NMI's delivery, a run of the lab's `nmi_body` starts
    (its first instruction writes port 0x80). NMIs may be *collapsed* - one body run
    after several NMIs handles them all, as Linux's handler does, since the body looks
    at every NMI source - but an NMI after which no body starts is lost."""
    last_nmi: dict[str, Any] | None = None
    last_body: dict[str, Any] | None = None
    for r in runner.records_of(result):
        if r["kind"] == "deliver" and r["source"] == "nmi":
            last_nmi = r
        elif r["kind"] == "port" and r.get("port") == BODY_PORT:
            last_body = r
    if last_nmi is not None and (last_body is None or last_body["seq"] < last_nmi["seq"]):
        where = runner.symbolize(machine, int(last_nmi["rip"]))
        return (f"the NMI delivered at icount {last_nmi['icount']} (interrupting {where}) was "
                "lost: no nmi_body run started after it")
    return None
