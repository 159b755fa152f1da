"""S1 of the host-model test plan: the exception bitmap and the #PF error-code filter
(SDM Vol. 3C "Exception Bitmap": a #PF exits iff bit 14 XOR ((PFEC & mask) != match)),
and `INT n`, which the bitmap never sees."""

from __future__ import annotations

import pytest

from cpu.vmx_exits import VmxControls
from tests.delivery.rig import PROBE, gate
from tests.hyper.kit import STOP, build, exits, of_kind, one, run, unmapped

USER_READ = """
start:
    mov rax, [PROBE]
    hlt
pf:
    hlt
"""
SUPERVISOR_WRITE = """
start:
    mov qword ptr [PROBE], 1
    hlt
pf:
    hlt
"""

FILTERS = [(0, 0), (0, 0xFFFFFFFF), (0x4, 0), (0x4, 0x4)]


@pytest.mark.parametrize("bit14", [0, 1])
@pytest.mark.parametrize("mask,match", FILTERS)
@pytest.mark.parametrize("source,cpl,pfec", [(USER_READ, 3, 0x4), (SUPERVISOR_WRITE, 0, 0x2)])
def test_a_page_fault_exits_iff_bit_14_xor_the_error_code_filter_mismatch(
        bit14: int, mask: int, match: int, source: str, cpl: int, pfec: int) -> None:
    m, sym = build(source, gates={14: gate("pf")}, pages=unmapped(PROBE),
                   controls=VmxControls(exception_bitmap=bit14 << 14, pfec_mask=mask,
                                        pfec_match=match), host=lambda e, v: STOP)
    r = run(m, cpl=cpl)
    should_exit = bool(bit14) ^ ((pfec & mask) != match)  # the SDM's rule, written out
    if should_exit:
        x = one(r.trace.records, "vmexit")
        assert (x["exit_reason"], x["interruption_info"], x["interruption_error_code"],
                x["qualification"], x["idt_vectoring_info"], x["rip"]) == (
            0, 0x80000B0E, pfec, PROBE, 0, sym["start"])
        assert r.outcome == "vmexit"
        assert m.engine.read_reg("cr2") == 0  # a direct exit does not load CR2
        assert of_kind(r.trace.records, "deliver") == []
    else:
        assert exits(r) == []
        d = one(r.trace.records, "deliver")
        assert (d["vector"], d["error_code"], d["cr2"]) == (14, pfec, PROBE)


def test_int_0x0e_is_a_software_interrupt_the_bitmap_never_sees() -> None:
    m, sym = build("""
    start:
        int 0x0e
    back:
        hlt
    h14:
        hlt
    """, gates={14: gate("h14")}, controls=VmxControls(exception_bitmap=0xFFFFFFFF),
        host=lambda e, v: STOP)
    r = run(m)
    assert exits(r) == []
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["source"], d["error_code"], d["rip"]) == (14, "software", None,
                                                                     sym["back"])


def test_int3_exits_as_a_software_exception_with_its_length_and_rip_on_the_int3() -> None:
    m, sym = build("""
    start:
        int3
        hlt
    """, controls=VmxControls(exception_bitmap=1 << 3), host=lambda e, v: STOP)
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["interruption_info"], x["instruction_length"], x["rip"]) == (
        0x80000603, 1, sym["start"])
    assert r.icount == 0  # the INT3 did not retire
