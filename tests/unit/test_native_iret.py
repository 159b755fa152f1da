"""The native IRETQ (cpu/native/paths.c `idtlab_iret_site`, cpu/native_paths.py) gives
exactly the trace, counts and state of the Python path: every case runs with the native
hook allowed and with it refused (`NativePaths.iret_enabled = False`) and is compared
record for record; each test checks that the native hook really executed IRETQs, and
the cases where it must hand the IRETQ back to Python (a descriptor or the frame's page
changed, TF, an injection point) end as Python ends them."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from cpu.layout import KERNEL_CS
from cpu.machine import Machine
from idt.vectors import Vector
from idtlab import explore as ex
from idtlab.assemble import CodeBlock, assemble_blocks

ROOT = Path(__file__).resolve().parents[2]
CR2_RACE = ROOT / "idtlab" / "examples" / "explore" / "cr2_race.toml"
CODE, HANDLER, STACK = 0x100000, 0x101000, 0x70000

# An IRETQ chain: each pass builds a same-level frame returning to `again` and IRETs
# through it (`mov rcx, N` passes). `setup` runs first; `tamper` when RCX reaches 50
# (without any instruction idtlab intercepts, and jumping to `build`, so the IRETQ's
# translation block stays the one the native hook was armed in).
CHAIN = """
start:
{setup}
    mov rcx, 100
again:
    dec rcx
    jz done
    cmp rcx, 50
    jne build
{tamper}
    jmp build
build:
    mov rax, rsp
    push 0x10
    push rax
    pushfq
    push 0x08
    lea rax, [rip + again]
    push rax
the_iret:
    iretq
done:
    hlt
handler:
    hlt
"""


def chain_machine(tamper: str = "", *, native: bool, setup: str = "") -> tuple[
        Machine, dict[str, int]]:
    source = textwrap.dedent(CHAIN).format(tamper=textwrap.indent(tamper, "    "),
                                           setup=textwrap.indent(setup, "    "))
    blocks, symbols = assemble_blocks([CodeBlock(CODE, source, "test", 1)], {})
    m = Machine(4 << 20, max_insns=100_000)
    for b in blocks:
        m.load(b.at, b.code, code=True)
    for vector in (Vector.NP, Vector.GP, Vector.DB, Vector.PF):
        m.set_gate(vector, symbols["handler"])
    m.engine.paths.iret_enabled = native
    return m, symbols


def run_both(tamper: str = "", setup: str = "") -> tuple[tuple[Any, ...], Machine,
                                                        dict[str, int]]:
    results = []
    machines = []
    for native in (True, False):
        m, symbols = chain_machine(tamper, native=native, setup=setup)
        r = m.run(entry=symbols["start"], rsp=STACK)
        regs = m.engine.read(("rip", "rsp", "rflags", "rcx", "rax"))
        results.append((r.outcome, r.rip, r.icount, r.cycles, regs, r.trace.records))
        machines.append(m)
    assert results[0] == results[1]
    assert machines[1].engine.paths.iret_hits == 0
    return results[0], machines[0], symbols


def test_an_iretq_chain_runs_natively_and_traces_as_the_python_path() -> None:
    got, m, s = run_both()
    assert got[0] == "hlt" and got[1] == s["done"] + 1
    irets = [r for r in got[5] if r["kind"] == "iret"]
    assert len(irets) == 99
    assert all(r["rip"] == s["the_iret"] and r["to_rip"] == s["again"] for r in irets)
    assert m.engine.paths.iret_hits >= 90  # the first is Python's (it vouches)


def test_a_code_descriptor_made_not_present_mid_chain_is_np_as_in_python() -> None:
    # SGDT first (R9 = the GDT; the `or` makes the engine's TLB hold the page for
    # writes, so the tamper needs no fill, a Python hook), then clear P (bit 47) of the
    # CS descriptor: the next IRETQ is #NP(CS).
    got, m, s = run_both("btr qword ptr [r9 + 8], 47\n", setup="""\
sub rsp, 16
sgdt [rsp]
mov r9, qword ptr [rsp + 2]
add rsp, 16
or qword ptr [r9 + 8], 0
""")
    (fault,) = [r for r in got[5] if r["kind"] == "iret_fault"]
    assert (fault["rip"], fault["vector"], fault["error_code"]) == (s["the_iret"], Vector.NP,
                                                                    KERNEL_CS)
    assert fault["why"] == "IRET CS 0x8 not present"
    assert sum(r["kind"] == "iret" for r in got[5]) == 49  # the 50th pass faults
    # The #NP handler's own CS is that descriptor: #NP while delivering, #DF, shutdown.
    assert got[0] == "shutdown"
    assert m.engine.paths.iret_hits >= 40


def test_a_reserved_bit_set_under_the_frame_faults_the_next_iretq_as_in_python() -> None:
    # R8 = the 2-MiB PDE that maps the stack (and the code); set its bit 13, reserved in
    # a 2-MiB PDE (SDM Vol. 3A "4-Level Paging": bits 20:13 of a PDE that maps a 2-MByte
    # page are reserved), without INVLPG: the guest's own accesses keep using the
    # engine's TLB, but the next IRETQ's frame read walks the tables: #PF with RSVD.
    setup = """\
mov rax, cr3
shr rax, 12
shl rax, 12
mov rax, qword ptr [rax]
btr rax, 63
shr rax, 12
shl rax, 12
mov rax, qword ptr [rax]
btr rax, 63
shr rax, 12
shl rax, 12
mov r8, rax
or qword ptr [r8], 0
"""
    got, m, s = run_both("bts qword ptr [r8], 13\n", setup=setup)
    (fault,) = [r for r in got[5] if r["kind"] == "iret_fault"]
    assert (fault["rip"], fault["vector"]) == (s["the_iret"], Vector.PF)
    assert fault["error_code"] == 0b1001  # present, read, supervisor, RSVD
    assert sum(r["kind"] == "iret" for r in got[5]) == 49
    assert m.engine.paths.iret_hits >= 40


def test_tf_set_mid_chain_hands_the_iretq_back_to_python() -> None:
    got, m, _ = run_both("""\
pushfq
or qword ptr [rsp], 0x100
popfq
""")
    # Single-stepping from there on: #DB traps (the handler HLTs at the first one).
    delivered = [r for r in got[5] if r["kind"] == "deliver"]
    assert delivered and delivered[0]["vector"] == Vector.DB
    assert m.engine.paths.iret_hits >= 40


def test_an_injection_point_at_the_iretq_target_is_counted_as_in_python() -> None:
    results = []
    for native in (True, False):
        m, s = chain_machine(native=native)
        m.inject("nmi", before=s["again"], hit=60)
        m.set_gate(Vector.NMI, s["handler"])
        r = m.run(entry=s["start"], rsp=STACK)
        results.append((r.outcome, r.icount, r.cycles, r.trace.records))
    assert results[0] == results[1]
    delivered = [r for r in results[0][3] if r["kind"] == "deliver"]
    assert [r["vector"] for r in delivered] == [Vector.NMI]


def test_the_cr2_race_pairs_give_the_same_findings_with_and_without_the_native_iretq() -> None:
    plan = ex.plan_for(CR2_RACE, "pf_handler", "pf_done", invariants=("cr2-consistent",))
    points = plan.window.points
    schedules = [(("nmi", "nmi"), (a, b)) for i, a in enumerate(points) for b in points[i:]
                 ][::7]
    hits: list[int] = []

    def native(m: Machine) -> None:
        hits.append(0)
        machines.append(m)
    machines: list[Machine] = []
    for events, schedule in schedules[:12]:
        _, got = ex.replay(plan, events, schedule, observe=native)
        _, want = ex.replay(plan, events, schedule, observe=lambda m: setattr(
            m.engine.paths, "iret_enabled", False))
        assert got.trace.records == want.trace.records
        assert (got.outcome, got.icount, got.cycles) == (want.outcome, want.icount, want.cycles)
    assert sum(m.engine.paths.iret_hits for m in machines) > 100


def int3_loop(native: bool) -> Machine:
    """`int3` twenty times into a handler that is `nop; iretq` (the IRETQ at HANDLER + 1,
    reached by execution, not at a boundary the machine holds)."""
    m = Machine(2 << 20, max_insns=10_000)
    blocks, _ = assemble_blocks([CodeBlock(CODE, "mov rcx, 20\nl:\nint3\ndec rcx\njnz l\nhlt\n",
                                           "test", 1), CodeBlock(HANDLER, "nop\niretq\n", "test", 1)],
                                {})
    for b in blocks:
        m.load(b.at, b.code, code=True)
    m.set_gate(Vector.BP, HANDLER)
    m.set_gate(Vector.NMI, HANDLER)
    m.engine.paths.iret_enabled = native
    return m


def test_an_iretq_after_a_delivery_between_runs_runs_natively_as_in_python() -> None:
    results = []
    for native in (True, False):
        m = int3_loop(native)
        r = m.run(entry=CODE, rsp=STACK)
        results.append((r.outcome, r.icount, r.cycles, r.trace.records,
                        m.engine.paths.iret_hits))
    assert results[0][:4] == results[1][:4]
    assert results[0][4] == 19 and results[1][4] == 0  # all but the first (Python vouches)


def test_an_injection_point_put_at_the_iretq_between_runs_is_counted_as_in_python() -> None:
    # Run part of the loop (the native hook is vouched for), then watch the IRETQ itself:
    # an NMI before its 3rd arrival from there on. A run start must not re-arm the native
    # hook at a watched site: the arrivals are counted in Python.
    results = []
    for native in (True, False):
        m = int3_loop(native)
        m.run(entry=CODE, rsp=STACK, max_insns=30)
        m.inject("nmi", before=HANDLER + 1, hit=3)
        r = m.run(max_insns=10_000)
        delivered = [(d["vector"], d["icount"]) for d in r.trace.of_kind("deliver")]
        results.append((r.outcome, r.icount, r.cycles, r.trace.records, delivered))
    assert results[0] == results[1]
    assert results[0][0] == "hlt"
    assert [v for v, _ in results[0][4]].count(Vector.NMI) == 1


def nmi_loop(native: bool, ist: int = 0) -> Machine:
    """`l: jmp l`, one instruction run, and an NMI gate (through IST `ist`) to `iretq`."""
    m = Machine(2 << 20, max_insns=10_000)
    blocks, _ = assemble_blocks([CodeBlock(CODE, "l:\njmp l\n", "test", 1),
                                 CodeBlock(HANDLER, "iretq\n", "test", 1)], {})
    for b in blocks:
        m.load(b.at, b.code, code=True)
    m.set_gate(Vector.NMI, HANDLER, ist=ist)
    m.set_tss(ist1=0x90000)
    m.engine.paths.iret_enabled = native
    m.start_state(entry=CODE, rsp=STACK)
    m.run(max_insns=1)
    return m


def test_an_nmi_handlers_iretq_unblocks_nmis_natively_as_in_python() -> None:
    # NMI, then a short run (the handler's IRETQ and one loop instruction), ten times:
    # every IRETQ after the first runs natively and unblocks NMIs, so each next NMI is
    # delivered at once, not latched.
    results = []
    for native in (True, False):
        m = nmi_loop(native)
        for _ in range(10):
            m.nmi()
            m.run(max_insns=m.engine.icount + 2)
        irets = m.trace.of_kind("iret")
        results.append((m.engine.icount, m.engine.cycles, m.trace.records, m.intr.nmi_blocked,
                        [r["nmi_unblocked"] for r in irets], m.engine.paths.iret_hits))
    assert results[0][:5] == results[1][:5]
    assert results[0][4] == [True] * 10 and results[0][3] is False
    assert not any(r["kind"] in ("nmi_latched", "nmi_dropped") for r in results[0][2])
    assert results[0][5] == 9 and results[1][5] == 0


def test_an_ist_handlers_iretq_loads_ss_natively_as_in_python() -> None:
    # The NMI gate has an IST, so the handler runs with a null SS (cpu/deliver: SS is
    # NULL whenever the stack is switched); its IRETQ returns to SS = 0x10, whose cache
    # the native hook loads from the descriptor vouched for, as Python's path does.
    results = []
    for native in (True, False):
        m = nmi_loop(native, ist=1)
        caches = []
        for _ in range(10):
            m.nmi()
            m.run(max_insns=m.engine.icount + 2)
            caches.append((m.engine.read(("ss", "rsp")), m.engine.segment_cache("ss")))
        results.append((m.engine.icount, m.engine.cycles, m.trace.records, caches,
                        m.engine.paths.iret_hits))
    assert results[0][:4] == results[1][:4]
    assert [r["stack"] for r in results[0][2] if r["kind"] == "deliver"] == ["ist1"] * 10
    assert results[0][3][-1][0] == [0x10, STACK]
    assert results[0][3][-1][1][0] == 0x10 and results[0][3][-1][1][2] == 0xFFFFFFFF
    assert results[0][4] == 9 and results[1][4] == 0


def test_a_vouch_is_not_rearmed_under_other_paging_controls() -> None:
    # The vouched memory (the frame page's physical page, the entries that map it) is
    # only meaningful under the CR0/CR3/CR4/EFER and GDT base it was vouched under: a run
    # starting under others must leave every vouch unused.
    m = int3_loop(True)
    m.run(entry=CODE, rsp=STACK)
    paths = m.engine.paths
    scope = m.engine.control_scope()
    other = (scope[0], scope[1] + 0x1000, *scope[2:])  # another CR3
    assert not paths.rearm_iret(progress=None, site_ok=lambda a: True, nmi_blocked=False,
                                scope=other)
    assert not any(c.live for c in paths.iret.ctx)
    assert paths.rearm_iret(progress=None, site_ok=lambda a: True, nmi_blocked=False,
                            scope=scope)
    assert any(c.live for c in paths.iret.ctx)
