"""Pictures of a delivery for the labs: the stack the CPU pushed onto, and the gate it
went through, drawn by idtlab/stack_pictures.py (shared with the race explorer's HTML
report) from a lab run's trace and the gates and TSS captured at each delivery."""

from __future__ import annotations

from idtlab.labs.runner import RunReport
from idtlab.stack_pictures import GateField, Picture, Slot, svg, text
from idtlab.stack_pictures import pictures as _pictures

__all__ = ["GateField", "Picture", "Slot", "pictures", "svg", "text"]


def pictures(run: RunReport) -> list[Picture]:
    """One picture per `deliver` record of the run, in order."""
    return _pictures(run.records, run.symbol, run.gates, run.tss)
