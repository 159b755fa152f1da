"""A tiny builder for delivery tests: assemble one block of Intel-syntax code, load it,
configure the IDT from a declarative table, and check a delivered frame slot by slot.

Expected values in the tests are computed from the SDM rules (Vol. 3A "Exception and
Interrupt Handling in 64-bit Mode", "Exception and Interrupt Reference"), never
from running the code: the helpers here only *read* what the machine produced and compare
it with what the test wrote down.

Fixed layout used by every test (all inside the default identity map, user pages):

    0x060000  USER_STACK   initial RSP for CPL3 code
    0x070000  KERNEL_STACK initial RSP for CPL0 code
    0x080000  RSP0_TOP     TSS.RSP0
    0x090000  IST1_TOP     TSS.IST1
    0x0A0000  IST2_TOP     TSS.IST2
    0x100000  CODE         the test's code block (entry at its first instruction)
    0x300000  DATA         scratch area handlers write to
    0x400000  PROBE        a 2-MiB region the tests remap page by page (PageSpec)
"""

from __future__ import annotations

import struct
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cpu.board import PC, BoardConfig
from cpu.layout import KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, PageSpec
from cpu.machine import Machine
from cpu.vmx import VmxConfig
from idtlab.assemble import CodeBlock, assemble_blocks

MEMORY = 16 << 20
USER_STACK = 0x60000
KERNEL_STACK = 0x70000
RSP0_TOP = 0x80000
IST1_TOP = 0x90000
IST2_TOP = 0xA0000
CODE = 0x100000
DATA = 0x300000
PROBE = 0x400000

RFLAGS_FIXED = 1 << 1
RFLAGS_IF = 1 << 9
RFLAGS_RF = 1 << 16
START_RFLAGS = RFLAGS_IF | RFLAGS_FIXED  # 0x202, what every test starts with

__all__ = [
    "CODE", "DATA", "IST1_TOP", "IST2_TOP", "KERNEL_CS", "KERNEL_DS", "KERNEL_STACK",
    "PROBE", "RFLAGS_IF", "RFLAGS_RF", "RSP0_TOP", "START_RFLAGS", "USER_CS", "USER_DS",
    "USER_STACK", "Frame", "PageSpec", "assert_delivered", "assert_record", "build", "deliveries", "gate",
    "handler_rsp", "of_kind", "one", "read_frame",
]


def gate(handler: str | int, *, ist: int = 0, gate_type: str = "interrupt", dpl: int = 0,
         present: bool = True, selector: int = KERNEL_CS) -> dict[str, Any]:
    """One row of a test's IDT table; `handler` is a label of the test's code or an address."""
    return {"handler": handler, "ist": ist, "gate_type": gate_type, "dpl": dpl,
            "present": present, "selector": selector}


def build(source: str, *, gates: Mapping[int, Mapping[str, Any]] | None = None,
          pages: Iterable[PageSpec] = (), known: Mapping[str, int] | None = None,
          tss: Mapping[str, int] | None = None,
          vmx: VmxConfig | None = None,
          board: BoardConfig = PC) -> tuple[Machine, dict[str, int]]:
    """A fresh machine with `source` assembled at CODE, the IDT rows of `gates`, the page
    overrides `pages` and a TSS with RSP0/IST1/IST2 at their *_TOP values (override with
    `tss`); a VMX guest with EPT when `vmx` is given; the machine type and devices of
    `board` (cpu/board.py). Returns the machine and the symbol
    table (labels of `source`)."""
    blocks, symbols = assemble_blocks(
        [CodeBlock(CODE, textwrap.dedent(source), origin="test", first_line=1)],
        known={"DATA": DATA, "PROBE": PROBE, **(known or {})})
    m = Machine(MEMORY, vmx=vmx, board=board)
    for b in blocks:
        m.load(b.at, b.code, code=True)
    for spec in pages:
        m.set_page(spec)
    m.set_tss(**{"rsp0": RSP0_TOP, "ist1": IST1_TOP, "ist2": IST2_TOP, **(tss or {})})
    for vector, row in (gates or {}).items():
        row = dict(row)
        handler = row.pop("handler")
        m.set_gate(vector, symbols[handler] if isinstance(handler, str) else handler, **row)
    return m, symbols


def of_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The trace records of one kind, in order."""
    return [r for r in records if r["kind"] == kind]


def one(records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The only trace record of `kind` (fails the test if there are none or several)."""
    found = of_kind(records, kind)
    assert len(found) == 1, f"expected one {kind!r} record, got {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Frame:
    """An expected 64-bit interrupt frame (SDM Vol. 3A "64-Bit Mode Stack Frame"), from the
    final RSP up."""

    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int
    error_code: int | None = None

    def slots(self) -> dict[str, int]:
        out = {} if self.error_code is None else {"error_code": self.error_code}
        out.update(rip=self.rip, cs=self.cs, rflags=self.rflags, rsp=self.rsp, ss=self.ss)
        return out


def handler_rsp(stack_top: int, *, error_code: bool) -> int:
    """SDM: RSP &= ~0xF, then 5 (or 6, with an error code) 8-byte pushes."""
    return (stack_top & ~0xF) - (48 if error_code else 40)


def read_frame(m: Machine, rsp: int, *, error_code: bool) -> dict[str, int]:
    """The frame at guest-physical `rsp` (identity map), labelled slot by slot."""
    names = (["error_code"] if error_code else []) + ["rip", "cs", "rflags", "rsp", "ss"]
    raw = m.phys.read(rsp, 8 * len(names))
    return dict(zip(names, struct.unpack(f"<{len(names)}Q", raw), strict=True))


def deliveries(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "deliver"]


def assert_record(rec: dict[str, Any], *, vector: int, frame: Frame, stack: str,
                  stack_top: int, cpl: int = 0) -> None:
    """Check one `deliver` record against the expected delivery (see `assert_delivered`)."""
    want_rsp = handler_rsp(stack_top, error_code=frame.error_code is not None)
    assert rec["kind"] == "deliver"
    fields = ("vector", "error_code", "stack", "rsp", "cpl", "rip", "cs", "rflags", "old_rsp",
              "ss")
    got = {k: rec.get(k) for k in fields}
    want = {"vector": vector, "error_code": frame.error_code, "stack": stack, "rsp": want_rsp,
            "cpl": cpl, "rip": frame.rip, "cs": frame.cs, "rflags": frame.rflags,
            "old_rsp": frame.rsp, "ss": frame.ss}
    assert got == want


def assert_delivered(m: Machine, rec: dict[str, Any], *, vector: int, frame: Frame,
                     stack: str, stack_top: int, cpl: int = 0) -> None:
    """Check one `deliver` record and the frame it left in guest memory.

    `stack_top` is the RSP the delivery started from on the chosen stack (TSS slot or the
    interrupted RSP); the final RSP is derived from it by the SDM rule and the frame is
    read back from guest memory there, every slot labelled.
    """
    assert_record(rec, vector=vector, frame=frame, stack=stack, stack_top=stack_top, cpl=cpl)
    has_ec = frame.error_code is not None
    assert read_frame(m, handler_rsp(stack_top, error_code=has_ec),
                      error_code=has_ec) == frame.slots()
