"""Single-step over the instructions the machine executes itself (SDM Vol. 3B
"Single-Step Exception Condition": "the processor generates a single-step debug
exception ... after the execution of each instruction" while TF = 1). The #DB is a trap:
RIP = the next instruction, RFLAGS as the instruction left them, DR6.BS = 1 (DR6 reads
0xFFFF4FF0: B0-B3 clear, the reserved bits as they read).

* IRETQ: TF as IRET found it — one that loads TF = 0 traps after itself, with the loaded
  RFLAGS in the frame; one that loads TF = 1 from TF = 0 traps only after the next
  instruction.
* RDMSR, WRMSR, CPUID, a local APIC access: the trap right after each.
* HLT: the trap is owed at the boundary after the HLT, where the CPU waits; it is
  delivered when an event wakes the CPU, before that event (Bochs 2.7), which is then
  taken at the same RIP once the #DB handler returns with IF = 1.

Each #DB handler clears TF in its frame (one trap per test) and returns.
"""

from __future__ import annotations

from typing import Any

import pytest

from cpu.machine import Machine
from cpu.outcomes import RunResult
from tests.delivery.rig import (
    CODE,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    START_RFLAGS,
    Frame,
    gate,
)
from tests.events.kit import APIC_BASE, TPR, Frames, build, expect, kinds

MODES = ["fast", "timed"]
DB, VEC = 1, 0x30
RFLAGS_TF = 0x100
DR6_BS = 0xFFFF4FF0
SET_TF = """
    pushfq
    or qword ptr [rsp], 0x100
    popfq                           # TF = 1 from the next instruction on
"""
DB_HANDLER = """
db_handler:
    and qword ptr [rsp + 16], ~0x100
    iretq
"""


def at(rip: int, rflags: int) -> Frame:
    return Frame(rip=rip, cs=KERNEL_CS, rflags=rflags, rsp=KERNEL_STACK, ss=KERNEL_DS)


def run(body: str, mode: str, *, gates: dict[int, dict[str, Any]] | None = None
        ) -> tuple[Machine, dict[str, int], RunResult, Frames]:
    m, sym = build("start:\n" + body + DB_HANDLER, gates={DB: gate("db_handler"), **(gates or {})},
                   mode=mode)
    frames = Frames(m)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS, max_insns=100)
    return m, sym, r, frames


@pytest.mark.parametrize("mode", MODES)
def test_an_iretq_started_with_tf_traps_after_itself_with_the_loaded_rflags(mode: str) -> None:
    m, sym, r, frames = run("""
    mov rax, rsp
    push 0x10
    push rax
    push 0x202                      # the popped RFLAGS: TF = 0
    push 0x8
    lea rax, [rip + target]
    push rax
""" + SET_TF + """
the_iret:
    iretq
target:
    nop
    hlt
""", mode)

    assert kinds(r.trace.records) == ["iret", "deliver", "iret", "end"]
    expect(frames.seen[0], vector=DB, frame=at(sym["target"], START_RFLAGS), stack="current",
           stack_top=KERNEL_STACK, source="exception", handler=sym["db_handler"])
    assert frames.seen[0][0]["icount"] == 11  # seven to build the frame, three to set TF, IRETQ
    assert m.engine.read_reg("dr6") == DR6_BS


@pytest.mark.parametrize("mode", MODES)
def test_an_iretq_that_loads_tf_traps_only_after_the_next_instruction(mode: str) -> None:
    _, sym, r, frames = run("""
    mov rax, rsp
    push 0x10
    push rax
    push 0x302                      # the popped RFLAGS: TF = 1
    push 0x8
    lea rax, [rip + target]
    push rax
    iretq
target:
    nop
after_nop:
    hlt
""", mode)

    assert kinds(r.trace.records) == ["iret", "deliver", "iret", "end"]
    expect(frames.seen[0], vector=DB, frame=at(sym["after_nop"], START_RFLAGS | RFLAGS_TF),
           stack="current", stack_top=KERNEL_STACK, source="exception",
           handler=sym["db_handler"])
    assert frames.seen[0][0]["icount"] == 9  # seven to build the frame, IRETQ, NOP


@pytest.mark.parametrize("insn", [
    "mov ecx, 0xc0000080\n    rdmsr",
    "mov ecx, 0xc0000080\n    rdmsr\n    wrmsr",
    "mov eax, 0\n    cpuid",
    f"mov rbx, {APIC_BASE:#x}\n    mov eax, dword ptr [rbx + {TPR:#x}]",
])
@pytest.mark.parametrize("mode", MODES)
def test_an_emulated_instruction_with_tf_traps_right_after_itself(insn: str, mode: str) -> None:
    *setup, last = insn.split("\n")
    m, sym, r, frames = run("\n".join(setup) + "\n" + SET_TF + f"""
{last}
after:
    nop
    hlt
""", mode)

    (seen,) = frames.seen
    expect(seen, vector=DB, frame=at(sym["after"], START_RFLAGS | RFLAGS_TF), stack="current",
           stack_top=KERNEL_STACK, source="exception", handler=sym["db_handler"])
    assert seen[0]["icount"] == len(setup) + 3 + 1
    assert m.engine.read_reg("dr6") == DR6_BS
    assert (r.outcome, r.rip) == ("hlt", sym["after"] + 2)


@pytest.mark.parametrize("mode", MODES)
def test_a_hlt_with_tf_delivers_its_trap_when_an_interrupt_wakes_it_then_the_interrupt(mode: str) -> None:
    m, sym, r, frames = run(SET_TF + """
the_hlt:
    hlt
after_hlt:
    cli
    hlt
h30:
    iretq
""", mode, gates={VEC: gate("h30")})
    # (the run above ends at the first HLT: nothing wakes it; run again with a wake-up)
    assert (r.outcome, r.rip) == ("hlt", sym["after_hlt"])
    assert m.debug.state.step_on_wake

    m.inject("interrupt", vector=VEC, cycle=r.cycles + 1000)
    r = m.run()

    assert kinds(r.trace.records)[-7:] == ["interrupt_pending", "wake", "deliver", "iret",
                                           "deliver", "iret", "end"]
    assert r.trace.records[-6]["first"] == "#DB"
    db, intr = frames.seen
    expect(db, vector=DB, frame=at(sym["after_hlt"], START_RFLAGS | RFLAGS_TF), stack="current",
           stack_top=KERNEL_STACK, source="exception", handler=sym["db_handler"])
    expect(intr, vector=VEC, frame=at(sym["after_hlt"], START_RFLAGS), stack="current",
           stack_top=KERNEL_STACK, source="interrupt", handler=sym["h30"])
    assert db[0]["icount"] == intr[0]["icount"] - 2 == 4  # the #DB handler's AND and IRETQ between
    assert m.engine.read_reg("dr6") == DR6_BS
