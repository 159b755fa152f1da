"""Runaway guests end in seconds, in bounded memory, with an outcome that says why: an
IRET loop through a clobbered frame (cpu/progress.py), a handler that never IRETs
(cpu/frames.py keeps at most MAX_LIVE_FRAMES frames and reports each overwrite once)."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from cpu import progress
from cpu.frames import MAX_LIVE_FRAMES
from cpu.machine import Machine
from idtlab import scenario as scn
from idtlab.assemble import CodeBlock, assemble_blocks

ROOT = Path(__file__).resolve().parents[2]
NAIVE = ROOT / "idtlab" / "examples" / "nested_nmi_naive.toml"


def test_the_naive_nmi_example_with_one_more_nmi_ends_as_a_loop_without_progress(
        tmp_path: Path) -> None:
    # A third NMI at the second return to nmi_after_int3 sends the guest round
    # `pop rax; iretq` through a frame that points back at it. Without the example's
    # own max_insns it would run to the 10-million-instruction default.
    text = NAIVE.read_text().replace("max_insns = 40\n", "")
    text += '\n[[inject]]\nevent = "nmi"\nbefore = "nmi_after_int3"\nhit = 2\n'
    p = tmp_path / "naive_plus_one.toml"
    p.write_text(text)
    sc = scn.load(p)
    started = time.monotonic()
    result = scn.run(sc)
    assert time.monotonic() - started < 60
    assert result.outcome == "max_events"
    assert result.reason is not None and result.reason.startswith("no progress: the IRET at ")
    irets = sum(1 for r in result.trace.records if r["kind"] == "iret")
    assert progress.NO_PROGRESS_IRETS <= irets <= progress.NO_PROGRESS_IRETS + 10


def build(source: str) -> tuple[Machine, dict[str, int]]:
    blocks, symbols = assemble_blocks([CodeBlock(0x100000, textwrap.dedent(source), "test", 1)], {})
    m = Machine(16 << 20)
    for b in blocks:
        m.load(b.at, b.code, code=True)
    return m, symbols


def test_an_iret_loop_whose_registers_change_is_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "NO_PROGRESS_IRETS", 20)
    # IRETQ as a jump: each round trip builds a frame back to `again`; RCX counts down.
    m, s = build("""
        start:
            mov rcx, 100
        again:
            dec rcx
            jz done
            mov rax, rsp
            push 0x10
            push rax
            pushfq
            push 0x08
            lea rax, [rip + again]
            push rax
            iretq
        done:
            hlt
    """)
    result = m.run(entry=s["start"], rsp=0x70000)
    assert (result.outcome, result.rip) == ("hlt", s["done"] + 1)
    assert sum(1 for r in result.trace.records if r["kind"] == "iret") == 99


def test_the_same_iret_loop_without_a_counter_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "NO_PROGRESS_IRETS", 20)
    m, s = build("""
        start:
            mov rcx, 100
        again:
            mov rax, rsp
            push 0x10
            push rax
            pushfq
            push 0x08
            lea rax, [rip + again]
            push rax
        the_iret:
            iretq
    """)
    result = m.run(entry=s["start"], rsp=0x70000)
    assert result.outcome == "max_events"
    assert result.reason == (f"no progress: the IRET at {s['the_iret']:#x} returned to "
                             f"{s['again']:#x} 20 times with the same registers and no event "
                             "in between")


def test_a_handler_that_never_irets_keeps_few_live_frames_and_ends_in_seconds() -> None:
    # Each #BP handler jumps back to the INT3 without IRET: the kernel stack grows by a
    # frame per delivery, every one of them "live" for ever.
    m, s = build("""
        start:
            int3
            jmp start
        handler:
            jmp start
    """)
    m.set_gate(3, s["handler"])
    started = time.monotonic()
    result = m.run(entry=s["start"], rsp=0x800000, max_events=4000)
    assert time.monotonic() - started < 60
    assert result.outcome == "max_events"
    assert len(m.state.frames.live) <= MAX_LIVE_FRAMES
    assert sum(1 for r in result.trace.records if r["kind"] == "frame_overwritten") == 0
    assert len(result.trace.records) <= 4000 + 10
