"""Checkpoints (cpu.snapshot): a rollback puts back every piece of state a run changes —
registers, counters, guest memory written by the guest and by delivery, the EPT, the
machine's blocking state and injections, the trace — and only the pages written since
the checkpoint are copied."""

from __future__ import annotations

import pytest

from cpu.machine import Machine
from cpu.snapshot import CheckpointError
from cpu.vmx import VmxConfig
from tests.delivery.rig import CODE, DATA, IST1_TOP, KERNEL_STACK, build, gate

# Counts to 3 in a loop, storing into DATA each time, then takes an INT3 (its frame goes
# to IST1) whose handler writes DATA+8, and exits through port 0xF4.
SOURCE = """
    mov rcx, 0
loop:
    inc rcx
    mov qword ptr [DATA], rcx
    cmp rcx, 3
    jne loop
    int3
after:
    mov al, byte ptr [DATA]
    mov dx, 0xf4
    out dx, al
bp_handler:
    mov qword ptr [DATA + 8], 0x77
    iretq
"""


def machine(**kw: object) -> tuple[Machine, dict[str, int]]:
    m, sym = build(SOURCE, gates={3: gate("bp_handler", ist=1)}, **kw)  # type: ignore[arg-type]
    m.start_state(entry=CODE, rsp=KERNEL_STACK)
    return m, sym


def paused_at(m: Machine, address: int, hit: int = 1) -> None:
    r = m.run(pause_at=(address, hit))
    assert (r.outcome, r.rip) == ("pause", address)


def snapshot_of(m: Machine) -> tuple[object, ...]:
    e = m.engine
    return (tuple(e.read(("rax", "rcx", "rdx", "rsp", "rip", "rflags"))), e.icount, e.cycles,
            m.phys.read(DATA, 16), m.phys.read(IST1_TOP - 40, 40), len(m.trace.records),
            m.intr.nmi_blocked, m.intr.nmi_pending, dict(m.state.injections.arrivals))


def test_a_pause_stops_at_the_kth_arrival_with_no_end_record() -> None:
    m, sym = machine()
    paused_at(m, sym["loop"], 2)
    assert m.engine.read_reg("rcx") == 1  # one pass of the loop body done
    assert m.engine.icount == 5  # mov, inc, mov, cmp, jne
    assert [r["kind"] for r in m.trace.records] == []


def test_a_rollback_restores_registers_counters_memory_and_the_trace() -> None:
    m, sym = machine()
    paused_at(m, sym["loop"], 2)
    before = snapshot_of(m)
    cp = m.checkpoint()
    r = m.run()
    assert (r.outcome, r.exit_code) == ("exit", 3)
    assert m.phys.read_u64(DATA + 8) == 0x77  # the handler ran
    m.rollback(cp)
    assert snapshot_of(m) == before
    assert m.phys.read_u64(DATA + 8) == 0  # the guest's store is undone
    assert m.phys.read(IST1_TOP - 40, 40) == bytes(40)  # so is the pushed #BP frame


def test_a_run_after_a_rollback_gives_the_same_trace_as_the_first() -> None:
    m, sym = machine()
    paused_at(m, sym["loop"], 2)
    cp = m.checkpoint()
    first = [dict(r) for r in m.run().trace.records]
    for _ in range(3):
        m.rollback(cp)
        assert [dict(r) for r in m.run().trace.records] == first


def test_only_the_pages_written_since_the_checkpoint_are_kept() -> None:
    m, sym = machine()
    paused_at(m, sym["loop"], 2)
    cp = m.checkpoint()
    m.run()
    assert m.phys.dirty is not None
    # DATA (guest stores), the IST1 page (the frame), the page-table pages whose A/D bits
    # the walks set: a handful of pages out of 4096.
    assert DATA >> 12 in m.phys.dirty and (IST1_TOP - 8) >> 12 in m.phys.dirty
    assert len(m.phys.dirty) < 12
    m.rollback(cp)
    assert m.phys.dirty == {}


def test_an_injection_made_after_the_checkpoint_is_gone_after_the_rollback() -> None:
    m, sym = machine()
    m.set_gate(2, sym["bp_handler"], ist=1)
    paused_at(m, sym["loop"], 2)
    cp = m.checkpoint()
    m.inject("nmi", before=sym["after"])
    r = m.run()
    assert [d["name"] for d in r.deliveries] == ["#BP", "NMI"]
    m.rollback(cp)
    assert sym["after"] not in m.engine.site_addresses
    r = m.run()
    assert [d["name"] for d in r.deliveries] == ["#BP"]


def test_the_checkpoint_moves_forward_and_only_the_latest_can_be_restored() -> None:
    m, sym = machine()
    paused_at(m, sym["loop"], 2)
    old = m.checkpoint()
    paused_at(m, sym["loop"], 1)  # the next arrival: the one it stands at does not count
    new = m.checkpoint()
    assert m.engine.read_reg("rcx") == 2
    with pytest.raises(CheckpointError, match="latest"):
        m.rollback(old)
    m.run()
    m.rollback(new)
    assert m.engine.read_reg("rcx") == 2


def test_ept_changes_and_the_memory_they_guard_roll_back() -> None:
    m, sym = machine(vmx=VmxConfig())
    assert m.ept is not None
    paused_at(m, sym["loop"], 2)
    before = m.ept.mem.read(0, 0x4000)
    generation = m.ept.generation
    cp = m.checkpoint()
    m.ept.set_range(DATA, 0x1000, read=True, write=False, execute=False)
    r = m.run()
    assert r.outcome == "exit"
    assert any(x["kind"] == "vmexit" for x in r.trace.records)  # the store to DATA
    m.rollback(cp)
    assert m.ept.mem.read(0, 0x4000) == before and m.ept.generation == generation
    r = m.run()
    assert not any(x["kind"] == "vmexit" for x in r.trace.records)


def test_a_checkpoint_cannot_be_taken_in_the_middle_of_a_run() -> None:
    m, _ = machine()
    m.regs.running = True  # what a hook called from inside the engine would see
    with pytest.raises(CheckpointError, match="between runs"):
        m.checkpoint()


def test_a_pause_leaves_no_code_hook_behind_where_it_added_one() -> None:
    m, sym = machine()
    before = m.engine.site_addresses
    paused_at(m, sym["loop"], 2)
    assert m.engine.site_addresses == before and sym["loop"] not in m.state.injections.arrivals
    paused_at(m, sym["after"], 1)  # an address with no hook of its own either
    assert m.engine.site_addresses == before


def test_device_registers_written_after_the_checkpoint_roll_back() -> None:
    m, _ = build("""
        mov dx, 0x3fb
        mov al, 0x83
        out dx, al          # UART LCR: 8N1 with DLAB set
        mov dx, 0x510
        mov ax, 0x5
        out dx, ax          # fw_cfg selector: CPU count
        mov dx, 0xf4
        out dx, al
    """)
    m.start_state(entry=CODE, rsp=KERNEL_STACK)
    lcr, selector = m.uart.lcr, m.fwcfg.__dict__.copy()
    cp = m.checkpoint()
    assert m.run().outcome == "exit"
    assert m.uart.lcr == 0x83 and m.fwcfg.__dict__ != selector
    m.rollback(cp)
    assert m.uart.lcr == lcr and m.fwcfg.__dict__ == selector
