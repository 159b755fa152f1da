"""Faults raised while delivering an event: serial delivery, #DF, and shutdown
(SDM Vol. 3A Table 6-4 "Interrupt and Exception Classes", Table 6-5 "Conditions for
Generating a Double Fault").

    first \\ second   | benign    contributory  page-fault
    contributory     | serial    #DF           serial
    page-fault       | serial    #DF           #DF
    #DF              | shutdown (any exception while delivering #DF)

#DF: vector 8, error code 0, its own gate and stack. The SDM leaves the saved CS:RIP of a
#DF undefined; idtlab pushes the first event's instruction address (as Bochs does), and
the tests hold it to that documented choice. RF in the #DF image is not architecturally
defined either (it is an abort), so the tests compare RFLAGS with RF masked out.

A stack page that is not present is modelled with a 4-KiB PageSpec override: STACK_PAGE
(0x500000) is not present, and a stack whose top is STACK_TOP (0x501000) pushes its SS
slot into it, at STACK_TOP - 8 = 0x500ff8.
"""

from __future__ import annotations

from typing import Any

from cpu.mmu import PTE_P, PTE_W
from tests.delivery.rig import (
    CODE,
    DATA,
    IST1_TOP,
    IST2_TOP,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    PROBE,
    RFLAGS_RF,
    START_RFLAGS,
    USER_CS,
    USER_DS,
    USER_STACK,
    Frame,
    PageSpec,
    assert_delivered,
    build,
    deliveries,
    gate,
    handler_rsp,
    read_frame,
)

STACK_PAGE = 0x500000
STACK_TOP = 0x501000
UNMAPPED_STACK = PageSpec(STACK_PAGE, STACK_PAGE, present=False)
DATA_PAGE = PROBE + 0x1000
DATA_ADDR = DATA_PAGE + 0x123
NOT_PRESENT_DATA = PageSpec(DATA_PAGE, DATA_PAGE, present=False)


def kinds(records: list[dict[str, Any]]) -> list[str]:
    return [r["kind"] for r in records]


def nested(records: list[dict[str, Any]]) -> list[tuple[int, int, int | None, str]]:
    """(vector being delivered, fault raised, its error code, matrix action) in order."""
    return [(r["vector"], r["fault"], r["error_code"], r["action"])
            for r in records if r["kind"] == "delivery_fault"]


def pte_address(m: Any, linear: int) -> int:
    """Physical address of the 4-KiB PTE that maps `linear` (walks the built tables)."""
    table = m.symbols["pml4"]
    for shift in (39, 30, 21):
        entry = m.phys.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
        assert entry & PTE_P and not entry & (1 << 7), "expected a 4-KiB mapping"
        table = entry & 0x000FFFFFFFFFF000
    return table + ((linear >> 12) & 0x1FF) * 8


def test_de_whose_frame_push_hits_a_not_present_stack_is_handled_serially_as_pf_then_de() -> None:
    # The #PF handler maps the stack page (PTE address and value are left for it in
    # DATA by the test), flushes the TLB entry and returns; DIV re-executes with the same
    # RSP and the #DE is delivered this time.
    m, sym = build("""
    start:
        mov ecx, 0
        mov eax, 1
    the_div:
        div ecx
        hlt
    pf_handler:
        mov rbx, qword ptr [DATA]
        mov rax, qword ptr [DATA + 8]
        mov qword ptr [rbx], rax
        mov rax, cr2
        invlpg [rax]
        add rsp, 8
        iretq
    de_handler:
        hlt
    """, gates={0: gate("de_handler"), 14: gate("pf_handler", ist=1)},
        pages=[UNMAPPED_STACK])
    m.build()
    m.phys.write_u64(DATA, pte_address(m, STACK_PAGE))
    m.phys.write_u64(DATA + 8, STACK_PAGE | PTE_P | PTE_W)
    rsp = STACK_TOP + 8  # aligned down to STACK_TOP: the SS slot is STACK_TOP - 8

    r = m.run(entry=CODE, rsp=rsp, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["de_handler"] + 1
    assert kinds(r.trace.records) == ["delivery_fault", "deliver", "iret", "deliver", "end"]
    # #DE (contributory) then #PF (page-fault class): serial, no #DF.
    assert nested(r.trace.records) == [(0, 14, 0x2, "serial")]
    pf, de = deliveries(r.trace.records)
    assert all(d["vector"] != 8 and "double_fault_of" not in d for d in (pf, de))
    # The #PF: a supervisor write (frame pushes are supervisor accesses), not present:
    # error code 0x2, CR2 = the SS slot. It is a fault on the DIV (saved RIP = DIV, RF=1),
    # on IST1, with the interrupted RSP in the frame.
    assert_delivered(m, pf, vector=14, stack="ist1", stack_top=IST1_TOP, cpl=0,
                     frame=Frame(error_code=0x2, rip=sym["the_div"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=rsp, ss=KERNEL_DS))
    assert pf["cr2"] == STACK_TOP - 8
    assert m.engine.read_reg("cr2") == STACK_TOP - 8
    # The IRET went back to the DIV with the original RSP; the #DE frame is now on the
    # (mapped) current stack.
    (iret,) = [x for x in r.trace.records if x["kind"] == "iret"]
    assert (iret["to_rip"], iret["to_rsp"], iret["to_cpl"]) == (sym["the_div"], rsp, 0)
    assert_delivered(m, de, vector=0, stack="current", stack_top=rsp, cpl=0,
                     frame=Frame(rip=sym["the_div"], cs=KERNEL_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=rsp, ss=KERNEL_DS))
    assert m.engine.read_reg("rsp") == STACK_TOP - 40


def test_gp_while_delivering_a_pf_through_a_gate_with_a_data_selector_becomes_df() -> None:
    m, sym = build("""
    start:
        mov rbx, DATA_ADDR
    the_load:
        mov rax, qword ptr [rbx]
        hlt
    pf_handler:
        hlt
    df_handler:
        hlt
    """, gates={14: gate("pf_handler", selector=KERNEL_DS), 8: gate("df_handler", ist=2)},
        pages=[NOT_PRESENT_DATA], known={"DATA_ADDR": DATA_ADDR})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["df_handler"] + 1
    # The #GP names the gate's selector with EXT=1 (a hardware exception was being
    # delivered): 0x10 | 1. #PF then contributory: #DF.
    assert nested(r.trace.records) == [(14, 13, 0x11, "double-fault")]
    (df,) = deliveries(r.trace.records)
    assert df["vector"] == 8 and df["double_fault_of"] == [14, 13]
    assert df["error_code"] == 0 and df["stack"] == "ist2" and df["cpl"] == 0
    want_rsp = handler_rsp(IST2_TOP, error_code=True)
    assert df["rsp"] == want_rsp == m.engine.read_reg("rsp")
    slots = read_frame(m, want_rsp, error_code=True)
    assert slots["rflags"] & ~RFLAGS_RF == START_RFLAGS
    assert slots == {"error_code": 0, "rip": sym["the_load"], "cs": KERNEL_CS,
                     "rflags": slots["rflags"], "rsp": KERNEL_STACK, "ss": KERNEL_DS}
    # CR2 was loaded when the #PF was detected, even though it became a #DF.
    assert m.engine.read_reg("cr2") == DATA_ADDR


def test_pf_while_delivering_a_df_shuts_the_processor_down() -> None:
    # #PF (not-present data) -> #GP (data selector in the #PF gate) -> #DF, whose IST2
    # stack is not present -> #PF during #DF delivery -> shutdown.
    m, sym = build("""
    start:
        mov rbx, DATA_ADDR
    the_load:
        mov rax, qword ptr [rbx]
        hlt
    pf_handler:
        hlt
    df_handler:
        hlt
    """, gates={14: gate("pf_handler", selector=KERNEL_DS), 8: gate("df_handler", ist=2)},
        pages=[NOT_PRESENT_DATA, UNMAPPED_STACK], known={"DATA_ADDR": DATA_ADDR},
        tss={"ist2": STACK_TOP})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "shutdown"
    assert kinds(r.trace.records) == ["delivery_fault", "delivery_fault", "shutdown", "end"]
    assert nested(r.trace.records) == [(14, 13, 0x11, "double-fault"), (8, 14, 0x2, "shutdown")]
    assert deliveries(r.trace.records) == []
    assert m.engine.read_reg("cr2") == STACK_TOP - 8  # the #DF's SS slot
    assert r.rip == sym["the_load"]


def test_pf_while_pushing_a_pf_frame_onto_a_not_present_ist_stack_becomes_df() -> None:
    m, sym = build("""
    start:
        mov rbx, DATA_ADDR
    the_load:
        mov rax, qword ptr [rbx]
        hlt
    pf_handler:
        hlt
    df_handler:
        hlt
    """, gates={14: gate("pf_handler", ist=1), 8: gate("df_handler", ist=2)},
        pages=[NOT_PRESENT_DATA, UNMAPPED_STACK], known={"DATA_ADDR": DATA_ADDR},
        tss={"ist1": STACK_TOP})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["df_handler"] + 1
    # Page-fault class, then page-fault class: #DF. The second #PF is a supervisor write
    # to the IST1 SS slot.
    assert nested(r.trace.records) == [(14, 14, 0x2, "double-fault")]
    (df,) = deliveries(r.trace.records)
    assert df["vector"] == 8 and df["double_fault_of"] == [14, 14]
    assert df["error_code"] == 0 and df["stack"] == "ist2" and df["cpl"] == 0
    want_rsp = handler_rsp(IST2_TOP, error_code=True)
    assert df["rsp"] == want_rsp == m.engine.read_reg("rsp")
    slots = read_frame(m, want_rsp, error_code=True)
    assert slots["rflags"] & ~RFLAGS_RF == START_RFLAGS
    assert slots == {"error_code": 0, "rip": sym["the_load"], "cs": KERNEL_CS,
                     "rflags": slots["rflags"], "rsp": KERNEL_STACK, "ss": KERNEL_DS}
    # CR2 holds the address of the second #PF, the last one detected.
    assert m.engine.read_reg("cr2") == STACK_TOP - 8


def test_the_pf_error_code_of_a_frame_push_from_cpl3_is_a_supervisor_access() -> None:
    # A CPL3 #DE whose RSP0 stack is not present: the #PF raised by the frame push is an
    # implicit supervisor write (U/S=0), delivered serially on IST1.
    m, sym = build("""
    start:
        mov ecx, 0
    the_div:
        div ecx
        hlt
    de_handler:
        hlt
    pf_handler:
        hlt
    """, gates={0: gate("de_handler"), 14: gate("pf_handler", ist=1)},
        pages=[UNMAPPED_STACK], tss={"rsp0": STACK_TOP})

    r = m.run(entry=CODE, rsp=USER_STACK, cpl=3, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["pf_handler"] + 1
    assert nested(r.trace.records) == [(0, 14, 0x2, "serial")]
    (pf,) = deliveries(r.trace.records)
    assert_delivered(m, pf, vector=14, stack="ist1", stack_top=IST1_TOP, cpl=0,
                     frame=Frame(error_code=0x2, rip=sym["the_div"], cs=USER_CS,
                                 rflags=START_RFLAGS | RFLAGS_RF, rsp=USER_STACK, ss=USER_DS))
    assert pf["cr2"] == m.engine.read_reg("cr2") == STACK_TOP - 8
