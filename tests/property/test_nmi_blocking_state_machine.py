"""NMI blocking, the one-deep NMI latch, IF and the NMI-before-INTR priority, checked as a
state machine: hypothesis draws random sequences of NMI arrivals, maskable interrupt
arrivals, INT3, INT 2, CLI/STI and IRETs, drives a real `cpu.machine.Machine` through
them, and after every step compares what the machine did with a small reference model
written here from the SDM (Vol. 3A "Handling Multiple NMIs", Table 6-2 priorities; it
shares no code with `idt.blocking`).

The guest is a command interpreter. Every context (the main program and every handler)
spins in the same loop, `spin`, reading a one-byte mailbox at DATA. A step writes one
command (INT3, INT 2, CLI, STI, IRETQ) to the mailbox, or makes an NMI / interrupt 0x40
pending through `Machine.nmi()` / `Machine.interrupt()`, and then continues the same
machine for a bounded number of instructions (`STEP_INSNS`), far more than any step
needs for the command to be taken and every deliverable event to be delivered: each
step ends with the machine quiescent in `spin` of the innermost context.

    handlers (all on the current stack; IST 0 so nested frames never overwrite each other)
      vector 2   NMI / INT 2   interrupt gate (IF <- 0)     push rax; jmp spin
      vector 3   #BP (INT3)    trap gate      (IF kept)     push rax; jmp spin
      vector 0x40 interrupt    interrupt gate (IF <- 0)     push rax; EOI; jmp spin
    `iretq` is reached as `pop rax; iretq`, so RAX survives nesting and every IRET returns
    into the context it interrupted.

The reference model (`Reference`) knows only the rules:

* delivering an NMI sets NMI blocking; INT 2 runs the same handler and sets nothing;
* any IRET clears NMI blocking (whoever's handler it ends) and restores the IF of the
  context it returns to;
* an NMI arriving while blocked is latched (one bit); one arriving while one is already
  pending or latched is dropped;
* NMIs ignore IF; a maskable interrupt needs IF = 1 and stays pending otherwise (the
  APIC IRR bit merges a second arrival of the same vector);
* at a boundary where both can be taken, the NMI goes first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cpu.devices.apic import APIC_BASE, REG_EOI, REG_SVR, SVR_ENABLE
from cpu.machine import Machine
from tests.delivery.rig import CODE, DATA, KERNEL_STACK, RFLAGS_IF, START_RFLAGS, build, gate

INTR_VECTOR = 0x40
MAILBOX = DATA
STEP_INSNS = 60  # per step; a step needs at most ~15 (command, delivery, handler entry)
MAX_DEPTH = 24  # nested contexts at most (kept small so the kernel stack stays tiny)

CMD_IRET, CMD_INT3, CMD_INT2, CMD_CLI, CMD_STI = 1, 2, 3, 4, 5

GUEST = f"""
start:
    mov eax, {APIC_BASE + REG_SVR:#x}
    mov dword ptr [rax], {SVR_ENABLE | 0xFF:#x}    # software-enable the local APIC
spin:
    xor eax, eax
    xchg al, byte ptr [{MAILBOX:#x}]               # take the command (and clear it)
    test al, al
    jz spin
    cmp al, {CMD_IRET}
    je do_iret
    cmp al, {CMD_INT3}
    je do_int3
    cmp al, {CMD_INT2}
    je do_int2
    cmp al, {CMD_CLI}
    je do_cli
    cmp al, {CMD_STI}
    je do_sti
    jmp spin
do_iret:
    pop rax
    iretq
do_int3:
    int3
    jmp spin
do_int2:
    int 2
    jmp spin
do_cli:
    cli
    jmp spin
do_sti:
    sti
    jmp spin
nmi_entry:
    push rax
    jmp spin
bp_entry:
    push rax
    jmp spin
intr_entry:
    push rax
    mov eax, {APIC_BASE + REG_EOI:#x}
    mov dword ptr [rax], 0                         # EOI at once: the ISR never holds 0x40
    jmp spin
"""

GATES = {
    2: gate("nmi_entry"),  # NMI and INT 2
    3: gate("bp_entry", gate_type="trap"),
    INTR_VECTOR: gate("intr_entry"),
}


# -- the reference model ---------------------------------------------------------------

@dataclass
class Reference:
    """The blocking rules and nothing else. A context is what a delivery pushed: the
    event's name and the IF to restore when its IRET runs."""

    nmi_blocked: bool = False
    nmi_pending: bool = False  # pending or latched: one bit
    intr_pending: bool = False  # the IRR bit of INTR_VECTOR
    if_flag: bool = True
    stack: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.stack)

    def _enter(self, name: str, *, clears_if: bool) -> tuple[str, int]:
        depth = self.depth
        self.stack.append((name, self.if_flag))
        if clears_if:
            self.if_flag = False
        return name, depth

    def nmi_arrives(self) -> str:
        if self.nmi_pending:
            return "nmi_dropped"
        self.nmi_pending = True
        return "nmi_latched" if self.nmi_blocked else "nmi_pending"

    def interrupt_arrives(self) -> None:
        self.intr_pending = True  # a second arrival merges with the first

    def int3(self) -> tuple[str, int]:
        return self._enter("#BP", clears_if=False)  # trap gate: IF unchanged

    def int2(self) -> tuple[str, int]:
        return self._enter("INT 2", clears_if=True)  # not an NMI: no blocking

    def iret(self) -> bool:
        """Returns whether this IRET ended NMI blocking."""
        was_blocked = self.nmi_blocked
        self.nmi_blocked = False
        _, self.if_flag = self.stack.pop()
        return was_blocked

    def settle(self) -> list[tuple[str, int]]:
        """Deliver what the rules allow at the boundary, in order: NMI before INTR."""
        out: list[tuple[str, int]] = []
        while True:
            if self.nmi_pending and not self.nmi_blocked:
                self.nmi_pending = False
                self.nmi_blocked = True
                out.append(self._enter("NMI", clears_if=True))
            elif self.intr_pending and self.if_flag:
                self.intr_pending = False
                out.append(self._enter("INTR", clears_if=True))
            else:
                return out


# -- reading the machine -----------------------------------------------------------------

def delivered(rec: dict[str, Any]) -> tuple[str, int]:
    """A `deliver` record in the reference's terms: (event, nesting depth before it)."""
    name = {(2, "nmi"): "NMI", (2, "software"): "INT 2", (3, "software"): "#BP",
            (INTR_VECTOR, "interrupt"): "INTR"}.get((rec["vector"], rec["source"]))
    assert name is not None, f"unexpected delivery {rec}"
    return name, rec["depth"]


class NmiBlockingStateMachine(RuleBasedStateMachine):
    """One machine and one reference per example; each rule does the same thing to both
    and checks the trace records of that step, the invariant checks the state after it."""

    def __init__(self) -> None:
        super().__init__()
        self.m: Machine
        self.m, _ = build(GUEST, gates=GATES)
        self.ref = Reference()
        self.limit = STEP_INSNS
        r = self.m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=self.limit)
        assert r.outcome == "max_insns", r.reason
        self.seen = len(self.m.trace.records)

    # -- driving the machine --------------------------------------------------------------

    def _step(self, command: int = 0) -> list[dict[str, Any]]:
        """Post `command` (0: none), run STEP_INSNS more instructions; the new records."""
        if command:
            self.m.phys.write(MAILBOX, bytes([command]))
        self.limit += STEP_INSNS
        r = self.m.run(max_insns=self.limit)
        assert r.outcome == "max_insns", f"{r.outcome}: {r.reason}"
        assert self.m.phys.read(MAILBOX, 1) == b"\0", "the guest did not take the command"
        records, self.seen = self.m.trace.records[self.seen :], len(self.m.trace.records)
        return records

    def _check(self, records: list[dict[str, Any]], expected: list[tuple[str, int]],
               irets: tuple[bool, ...] = ()) -> None:
        got = [delivered(r) for r in records if r["kind"] == "deliver"]
        assert got == expected, f"deliveries {got}, the rules say {expected}"
        got_irets = [r["nmi_unblocked"] for r in records if r["kind"] == "iret"]
        assert got_irets == list(irets), f"IRETs (nmi_unblocked) {got_irets}, the rules say {irets}"
        assert not [r for r in records if r["kind"] in ("iret_fault", "delivery_fault",
                                                          "frame_overwritten")]

    # -- rules ------------------------------------------------------------------------------

    @rule()
    def an_nmi_arrives(self) -> None:
        arrival = self.ref.nmi_arrives()
        self.m.nmi()
        expected = self.ref.settle()
        records = self._step()
        assert records[0]["kind"] == arrival, f"the NMI was {records[0]['kind']}, the rules say {arrival}"
        self._check(records, expected)

    @rule()
    def interrupt_0x40_arrives(self) -> None:
        self.ref.interrupt_arrives()
        self.m.interrupt(INTR_VECTOR)
        self._check(self._step(), self.ref.settle())

    @precondition(lambda self: self.ref.depth < MAX_DEPTH)
    @rule()
    def the_current_context_executes_int3(self) -> None:
        expected = [self.ref.int3(), *self.ref.settle()]
        self._check(self._step(CMD_INT3), expected)

    @precondition(lambda self: self.ref.depth < MAX_DEPTH)
    @rule()
    def the_current_context_executes_int_2(self) -> None:
        expected = [self.ref.int2(), *self.ref.settle()]
        self._check(self._step(CMD_INT2), expected)

    @rule()
    def the_current_context_executes_cli(self) -> None:
        self.ref.if_flag = False
        self._check(self._step(CMD_CLI), self.ref.settle())

    @rule()
    def the_current_context_executes_sti(self) -> None:
        self.ref.if_flag = True
        self._check(self._step(CMD_STI), self.ref.settle())

    @precondition(lambda self: self.ref.depth > 0)
    @rule()
    def the_current_handler_executes_iretq(self) -> None:
        unblocked = self.ref.iret()
        expected = self.ref.settle()
        self._check(self._step(CMD_IRET), expected, (unblocked,))

    # -- the state after every step ---------------------------------------------------------

    @invariant()
    def the_blocking_state_matches_the_reference(self) -> None:
        m, ref = self.m, self.ref
        assert m.apic is not None
        got = {"nmi_blocked": m.nmi_blocked, "nmi_pending": m.intr.nmi_pending,
               "intr_pending": INTR_VECTOR in m.apic.irr,
               "if": bool(m.engine.read_reg("rflags") & RFLAGS_IF)}
        want = {"nmi_blocked": ref.nmi_blocked, "nmi_pending": ref.nmi_pending,
                "intr_pending": ref.intr_pending, "if": ref.if_flag}
        assert got == want
        assert m.apic.isr == [], "every 0x40 handler EOIs on entry"


@pytest.mark.slow
def test_nmi_blocking_the_latch_if_and_priority_follow_the_rules_for_random_event_sequences() -> None:
    # derandomize: the same sequences on every run (about 7 s).
    run_state_machine_as_test(
        NmiBlockingStateMachine,
        settings=settings(max_examples=100, stateful_step_count=40, deadline=None, derandomize=True,
                          database=None),
    )
