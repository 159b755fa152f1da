"""A remembered delivery (cpu/delivery_memo.py) gives exactly what the pure model gives:
every case runs with the memo on and off (`DeliveryMemo.enabled`) and is compared record
for record, with registers and the memory the frames went to; each test checks how many
deliveries were replayed, and the cases where memory a plan depends on changed between
deliveries (the gate, the IST pointer, the stack's page-table entry, the stack itself)
run the model again and end as it ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpu.layout import PageSpec
from cpu.machine import Machine
from cpu.mmu import Access
from idt.vectors import Vector
from idtlab import explore as ex
from idtlab.assemble import CodeBlock, assemble_blocks

ROOT = Path(__file__).resolve().parents[2]
CR2_RACE = ROOT / "idtlab" / "examples" / "explore" / "cr2_race.toml"
CODE, HANDLER, OTHER, STACK, IST = 0x100000, 0x101000, 0x102000, 0x70000, 0x90000


def asm(source: str, at: int) -> bytes:
    blocks, _ = assemble_blocks([CodeBlock(at, source, origin="test", first_line=1)], known={})
    return blocks[0].code


def build(code: str, *, memo: bool, ist: int = 0) -> tuple[Machine, list[bool]]:
    """`code` at CODE; #BP's handler at HANDLER is `iretq`, the one at OTHER counts in
    RBX; the stack's top page has its own page-table entry; the list says, per delivery
    made by the memo, whether it was replayed."""
    m = Machine(2 << 20, max_insns=20_000)
    m.set_page(PageSpec(va=STACK - 0x1000, pa=STACK - 0x1000))
    m.load(CODE, asm(code, CODE), code=True)
    m.load(HANDLER, asm("iretq\n", HANDLER), code=True)
    m.load(OTHER, asm("inc rbx\niretq\n", OTHER), code=True)
    m.set_gate(Vector.BP, HANDLER, ist=ist)
    for vector in (Vector.DF, Vector.PF, Vector.GP, Vector.NP, Vector.SS):
        m.set_gate(vector, OTHER, ist=2)  # faults on the frame go to another stack
    m.set_tss(ist1=IST, ist2=0xA0000)
    m.delivery_memo.enabled = memo
    replayed: list[bool] = []
    inner = m.delivery_memo._replay

    def spy(*a: Any) -> bool:
        done = inner(*a)
        replayed.append(done)
        return done
    m.delivery_memo._replay = spy  # type: ignore[method-assign, assignment]
    return m, replayed


def both(code: str, *, ist: int = 0, between: Callable[[Machine], None] | None = None,
         ) -> tuple[tuple[Any, ...], list[bool]]:
    results, plays = [], []
    for memo in (True, False):
        m, replayed = build(code, memo=memo, ist=ist)
        r = m.run(entry=CODE, rsp=STACK, max_insns=40)
        if between is not None:
            between(m)
        r = m.run(max_insns=20_000)
        regs = m.engine.read(("rip", "rsp", "rflags", "rbx", "rcx", "cs", "ss"))
        frames = (m.phys.read(STACK - 0x100, 0x100), m.phys.read(IST - 0x100, 0x100),
                  m.phys.read(0xA0000 - 0x100, 0x100))
        results.append((r.outcome, r.icount, r.cycles, regs, frames, m.trace.records))
        plays.append(replayed)
    assert results[0] == results[1]
    assert plays[1] == []  # memo off: nothing replayed (the model ran every time)
    return results[0], plays[0]


LOOP = "mov rcx, 30\nl:\nint3\ndec rcx\njnz l\nhlt\n"


def test_an_int3_loop_replays_all_but_the_first_deliveries() -> None:
    # The first frame sets the D bit of the 2-MiB page the IDT, the GDT and the stack
    # share, so the first plan's check of the IDT's page fails once: learnt again.
    got, replayed = both(LOOP)
    assert got[0] == "hlt"
    assert replayed.count(True) >= 28


def test_an_ist_delivery_replays_with_the_stack_from_the_tss() -> None:
    got, replayed = both(LOOP, ist=1)
    assert [r["stack"] for r in got[5] if r["kind"] == "deliver"] == ["ist1"] * 30
    assert replayed.count(True) >= 28


def test_a_gate_rewritten_between_deliveries_is_read_again() -> None:
    def retarget(m: Machine) -> None:
        m.set_gate(Vector.BP, OTHER)
    got, replayed = both(LOOP, between=retarget)
    assert got[3][3] > 0  # RBX: the later INT3s went to OTHER
    assert False in replayed[1:]


def test_an_ist_pointer_changed_between_deliveries_is_read_again() -> None:
    def move(m: Machine) -> None:
        m.set_tss(ist1=IST - 0x800)
    got, replayed = both(LOOP, ist=1, between=move)
    rsps = [r["rsp"] for r in got[5] if r["kind"] == "deliver"]
    assert rsps[0] != rsps[-1]
    assert replayed.count(True) >= 20


def test_a_stack_page_made_not_present_between_deliveries_faults_as_the_model_does() -> None:
    def unmap(m: Machine) -> None:
        walks = m.sysmem.walks
        walks.walk(m.regs.paging(), STACK - 0x1000, Access.READ, user=False)
        pte, _value = walks.last_used[-1]
        m.phys.write(pte, bytes(8))
        m.engine.flush_tlb()
    got, replayed = both(LOOP, between=unmap)
    kinds = [(r["kind"], r.get("fault")) for r in got[5] if r["kind"] == "delivery_fault"]
    assert kinds and kinds[0][1] == Vector.PF
    assert False in replayed


def test_a_stack_moving_to_another_page_is_not_replayed_onto_the_old_one() -> None:
    # Each pass moves RSP down by 0x400: every fourth frame is on a new page.
    code = "mov rcx, 12\nl:\nsub rsp, 0x400\nint3\ndec rcx\njnz l\nhlt\n"
    got, replayed = both(code)
    assert got[0] == "hlt"
    assert replayed.count(False) >= 2 and replayed.count(True) >= 6


def test_the_cr2_race_singles_give_the_same_findings_with_and_without_the_memo() -> None:
    plan = ex.plan_for(CR2_RACE, "pf_handler", "pf_done", invariants=("cr2-consistent",))
    memos: list[Machine] = []
    for point in plan.window.points[::5]:
        _, got = ex.replay(plan, ("nmi",), (point,), observe=memos.append)
        _, want = ex.replay(plan, ("nmi",), (point,), observe=lambda m: setattr(
            m.delivery_memo, "enabled", False))
        assert got.trace.records == want.trace.records
        assert (got.outcome, got.icount, got.cycles) == (want.outcome, want.icount, want.cycles)
    assert memos
