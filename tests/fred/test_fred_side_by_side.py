"""The same handler races under IDT and under FRED: what FRED fixes and what remains.

* The nested-NMI IST clobber (idtlab/examples/explore/nested_nmi_naive.toml vs
  nested_nmi_fred.toml), explored with a second NMI at every boundary: 7 failing points
  under IDT+IST, none under FRED (the #BP handler's ERETS keeps NMIs blocked, and a
  same-level event never rewinds to the stack top).
* The CR2 race: an NMI whose handler takes a #PF lands inside a #PF handler before it
  reads CR2. CR2 is still overwritten under FRED (that race remains for code that reads
  CR2); the frame's event data still holds the outer #PF's address (what FRED fixes).
* A #DB inside the NMI handler: under IDT its IRET unblocks NMIs; under FRED the #DB
  runs at the NMI's stack level below the NMI frame and its ERETS keeps NMIs blocked.
"""

from __future__ import annotations

from pathlib import Path

from idtlab import scenario as scn
from idtlab.explore import explore
from tests.delivery.rig import build as idt_build
from tests.delivery.rig import gate
from tests.fred.rig import CODE, ERETS, RSP, build, records, start

EXAMPLES = Path(__file__).resolve().parents[2] / "idtlab" / "examples" / "explore"
IDT_NMI = EXAMPLES / "nested_nmi_naive.toml"
FRED_NMI = EXAMPLES / "nested_nmi_fred.toml"
IDT_CR2 = EXAMPLES / "cr2_race.toml"
FRED_CR2 = EXAMPLES / "cr2_race_fred.toml"
EVENT_DATA_READ = "    mov rsi, qword ptr [rsp + 168]  # the frame's event data: this #PF's address\n"


def test_the_nested_nmi_clobber_found_under_idt_is_gone_under_fred() -> None:
    idt = explore(IDT_NMI, "nmi", "nmi_handler", "main_done", invariants=("frames-intact",))
    fred = explore(FRED_NMI, "nmi", "fred_kernel_entry", "main_done",
                   invariants=("frames-intact",))
    assert sum(not f.ok for f in idt) == 7  # every point of the NMI handler
    # Under FRED: the handler (entry dispatch, NMI body, #BP handler, both ERETS) and the
    # loop after it; every schedule exits with two NMIs counted and no frame overwritten.
    assert len(fred) == 27
    assert [f.name for f in fred if not f.ok] == []
    assert {f.outcome for f in fred} == {"exit"}


def test_under_fred_two_more_nmis_at_every_ordered_pair_of_points_break_nothing() -> None:
    # Three NMIs in all (the scenario's and two explorer NMIs): 27 points, 378 ordered
    # pairs; no frame is overwritten in any of them, and every run finishes the loop.
    fred = explore(FRED_NMI, ("nmi", "nmi"), "fred_kernel_entry", "main_done",
                   invariants=("frames-intact",))
    assert len(fred) == 27 * 28 // 2
    assert [f.name for f in fred if not f.ok] == []
    assert {f.outcome for f in fred} == {"exit"}


def test_under_fred_a_second_nmi_in_the_bp_handler_waits_for_the_nmi_frames_erets() -> None:
    sc = scn.load(FRED_NMI)
    m = sc.machine
    assert m is not None
    m.inject("nmi", before="bp_eret")
    result = scn.run(sc)
    assert result.outcome == "exit" and result.exit_code == 2
    kinds = [r["kind"] for r in result.trace.records if r["kind"] in (
        "nmi_latched", "deliver", "eret", "frame_overwritten")]
    assert kinds == ["deliver", "deliver", "nmi_latched", "eret", "eret", "deliver",
                     "deliver", "eret", "eret"]
    second = [r for r in result.trace.records if r["kind"] == "deliver"][2]
    assert (second["name"], second["rip"], second["rsp"]) == ("NMI", sc.symbols["work"],
                                                             0x122000 - 64)


def test_the_explored_cr2_race_remains_for_cr2_readers_and_is_gone_with_event_data(
        tmp_path: Path) -> None:
    # Under IDT, and under FRED for a handler that still reads CR2 late: an NMI at any
    # boundary before the read (its handler's #PF rewrites CR2) breaks it, none after.
    idt = explore(IDT_CR2, "nmi", "pf_handler", "pf_done", invariants=("cr2-consistent",))
    text = FRED_CR2.read_text()
    assert EVENT_DATA_READ in text
    late = tmp_path / "cr2_race_fred_reads_cr2.toml"
    late.write_text(text.replace(EVENT_DATA_READ, "    mov rsi, cr2\n"))
    fred_cr2 = explore(late, "nmi", "pf_handler", "pf_done", invariants=("cr2-consistent",))
    for findings in (idt, fred_cr2):
        broken = [f for f in findings if not f.ok]
        assert len(broken) == 16
        assert all(f.point.label.startswith("pf_") for f in broken)
        assert all("expected 0x400000, got 0x500000" in " ".join(f.failures) for f in broken)
    # Under FRED, reading the frame's event data: no boundary breaks it.
    fred = explore(FRED_CR2, "nmi", "pf_handler", "pf_done")
    assert len(fred) == 37 and [f.name for f in fred if not f.ok] == []


CR2_KERNEL = f"""
    mov rax, [rsp+0x28]
    shr rax, 48
    and eax, 0xf
    cmp eax, 2
    je nmi_handler
    mov rax, [rsp+0x30]         # #PF: event data, the address this #PF is about
    cmp rax, 0xB000000
    je nmi_pf
outer_pf:
    nop                         # the NMI arrives here, before CR2 is read
    mov rbx, cr2
    mov rcx, [rsp+0x30]
    hlt
nmi_pf:
    add qword ptr [rsp+8], 3    # skip the NMI handler's faulting load
    {ERETS}
nmi_handler:
    mov rax, 0xB000000
    mov rdx, [rax]              # a #PF of its own (say, a perf NMI touching user memory)
    {ERETS}
"""


def test_the_cr2_race_remains_for_cr2_but_fred_event_data_keeps_the_address() -> None:
    m, _ = build("mov rax, 0xA000000\nmov rdx, [rax]\nhlt\n", kernel=CR2_KERNEL)
    m.inject("nmi", before="outer_pf")
    start(m, CODE)
    e = m.engine
    assert e.read_reg("rbx") == 0xB000000  # CR2: the NMI's #PF overwrote it
    assert e.read_reg("rcx") == 0xA000000  # the frame's event data: still the outer #PF's
    assert [r["name"] for r in records(m, "deliver")] == ["#PF", "NMI", "#PF"]


DB_KERNEL = f"""
    mov rax, [rsp+0x28]
    shr rax, 48
    and eax, 0xf
    cmp eax, 2
    je nmi_handler
db_handler:                     # INT1 (type 5) on the NMI's stack level
    nop
db_eret:
    {ERETS}
nmi_handler:
    .byte 0xf1                  # a #DB inside the NMI handler
    {ERETS}
"""


def test_a_db_inside_the_nmi_handler_keeps_nmis_blocked_under_fred() -> None:
    m, _ = build("nop\nhlt\n", kernel=DB_KERNEL)
    m.nmi()
    m.inject("nmi", before="db_eret")
    start(m, CODE)
    delivered = records(m, "deliver")
    assert [(d["name"], d["stack_level"]) for d in delivered] == [
        ("NMI", 2), ("#DB", 2), ("NMI", 2), ("#DB", 2)]
    # The second NMI comes back at CODE, after the first NMI's ERETS: a fresh frame at the
    # top of RSP2, and the first NMI's frame was never touched.
    assert (delivered[2]["rip"], delivered[2]["rsp"]) == (CODE, RSP[2] - 64)
    assert delivered[1]["rsp"] < RSP[2] - 64 - 64  # the #DB went below the NMI frame
    assert records(m, "frame_overwritten") == []
    assert [r["nmi_unblocked"] for r in records(m, "eret")] == [False, True, False, True]


def test_the_same_db_inside_an_idt_nmi_handler_reopens_nmis_and_clobbers_the_ist_frame() -> None:
    source = """
        nop
        hlt
    nmi_handler:
        .byte 0xf1
        iretq
    db_handler:
        nop
    db_iret:
        iretq
    """
    m, sym = idt_build(source, gates={2: gate("nmi_handler", ist=1), 1: gate("db_handler")})
    m.nmi()
    m.inject("nmi", before=sym["db_iret"])
    m.run(entry=0x100000, rsp=0x70000, max_insns=50)
    kinds = [r["kind"] for r in m.trace.records]
    assert "frame_overwritten" in kinds  # the #DB's IRETQ released the latched NMI
