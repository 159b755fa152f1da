"""S2-S6 of the host-model test plan: an exception raised while the guest vectors
another one. The bitmap sees the *second* exception first (SDM Vol. 3C "Other Causes of
VM Exits", "Information for VM Exits That Occur During Event Delivery"); an exit keeps
the first in the IDT-vectoring information; only a second exception the bitmap lets
through meets Table 6-5."""

from __future__ import annotations

from typing import Any

from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Inject, Resume
from tests.delivery.rig import IST1_TOP, IST2_TOP, PROBE, USER_CS, gate, handler_rsp
from tests.hyper.kit import (
    KERNEL_STACK,
    RSP0_PAGE,
    STACK_PAGE,
    N,
    Script,
    build,
    exits,
    of_kind,
    one,
    read_frame,
    run,
    unmapped,
)

GP_THEN_PUSH = """
start:
    mov rax, [N]
    hlt
gp:
    hlt
pf:
    hlt
df:
    hlt
"""
GATES = {13: gate("gp"), 14: gate("pf", ist=1), 8: gate("df", ist=2)}


def regs_at_exit(log: list[dict[str, int]]) -> Any:
    """A host step that notes RSP and CR2 as the exit left them, then answers `then`."""
    def step(then: Any) -> Any:
        def answer(exit_: Any, vcpu: Any) -> Any:
            log.append({"rsp": vcpu.m.engine.read_reg("rsp"), "cr2": vcpu.cr2})
            return then(exit_, vcpu) if callable(then) else then
        return answer
    return step


def test_s2_a_pf_on_the_stack_while_vectoring_gp_exits_with_the_gp_in_idt_vectoring() -> None:
    seen: list[dict[str, int]] = []
    host = Script(regs_at_exit(seen)(lambda e, v: (v.map_page(e.qualification),
                                                    Inject(0x80000B0D, 0))[1]))
    m, sym = build(GP_THEN_PUSH, gates={13: gate("gp"), 14: gate("pf")},
                   pages=unmapped(STACK_PAGE), controls=VmxControls(exception_bitmap=1 << 14),
                   host=host, known={"N": N})
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["exit_reason"], x["interruption_info"], x["interruption_error_code"],
            x["idt_vectoring_info"], x["idt_vectoring_error_code"], x["interruptibility"],
            x["rip"]) == (0, 0x80000B0E, 0x0002, 0x80000B0D, 0x0000, 0, sym["start"])
    assert x["qualification"] & ~0xFFF == STACK_PAGE
    assert seen == [{"rsp": KERNEL_STACK, "cr2": 0}]  # RSP unchanged, CR2 untouched
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["rip"]) == (13, 0, sym["start"])
    assert d["handler"] == sym["gp"] and r.outcome == "hlt"


def test_s3_the_sdm_host_reflects_a_guest_pf_as_pf_with_cr2_from_the_qualification() -> None:
    m, sym = build(GP_THEN_PUSH, gates=GATES, pages=unmapped(STACK_PAGE),
                   controls=VmxControls(exception_bitmap=1 << 14), host="sdm", known={"N": N})
    r = run(m)
    x = one(r.trace.records, "vmexit")
    e = one(r.trace.records, "vmentry")
    assert (e["injected"], e["error_code"], e["cr2"]) == (0x80000B0E, 0x2, x["qualification"])
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["stack"], d["rsp"]) == (
        14, 0x2, "ist1", handler_rsp(IST1_TOP, error_code=True))
    assert d["cr2"] & ~0xFFF == STACK_PAGE
    assert d["handler"] == sym["pf"] and r.outcome == "hlt"


def test_s3b_a_reflected_pf_whose_delivery_faults_again_is_answered_with_df() -> None:
    m, sym = build(GP_THEN_PUSH, gates={13: gate("gp"), 14: gate("pf"), 8: gate("df", ist=2)},
                   pages=unmapped(STACK_PAGE), controls=VmxControls(exception_bitmap=1 << 14),
                   host="sdm", known={"N": N})
    r = run(m)
    first, second = exits(r)
    assert first["idt_vectoring_info"] == 0x80000B0D
    # The second exit interrupted the *injected* #PF.
    assert (second["interruption_info"], second["interruption_error_code"],
            second["idt_vectoring_info"], second["idt_vectoring_error_code"]) == (
        0x80000B0E, 0x2, 0x80000B0E, 0x2)
    assert [e["injected"] for e in of_kind(r.trace.records, "vmentry")] == [0x80000B0E,
                                                                           0x80000B08]
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["stack"]) == (8, 0, "ist2")
    assert read_frame(m, handler_rsp(IST2_TOP, error_code=True), error_code=True)["rip"] == \
        sym["start"]


def test_s4_without_interception_the_pf_is_delivered_serially_and_the_gp_is_lost() -> None:
    m, sym = build(GP_THEN_PUSH, gates=GATES, pages=unmapped(STACK_PAGE),
                   controls=VmxControls(exception_bitmap=0), host="sdm", known={"N": N})
    r = run(m)
    assert exits(r) == []
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["stack"], d["rip"]) == (14, 0x2, "ist1",
                                                                    sym["start"])
    assert d["cr2"] & ~0xFFF == STACK_PAGE
    assert "double_fault_of" not in d


USER_PF = """
start:
    mov rax, [PROBE]
    hlt
pf:
    hlt
df:
    hlt
"""


def test_s5_a_supervisor_pf_while_vectoring_a_user_pf_exits_and_cr2_holds_the_first_address(
        ) -> None:
    seen: list[dict[str, int]] = []
    host = Script(regs_at_exit(seen)(lambda e, v: (v.map_page(e.qualification),
                                                    Inject(0x80000B0E, 0x4))[1]))
    m, sym = build(USER_PF, gates={14: gate("pf")}, pages=unmapped(PROBE, RSP0_PAGE),
                   controls=VmxControls(exception_bitmap=1 << 14, pfec_mask=0x4, pfec_match=0),
                   host=host)
    r = run(m, cpl=3)
    x = one(r.trace.records, "vmexit")
    assert (x["interruption_info"], x["interruption_error_code"], x["idt_vectoring_info"],
            x["idt_vectoring_error_code"], x["rip"]) == (0x80000B0E, 0x2, 0x80000B0E, 0x4,
                                                         sym["start"])
    assert x["qualification"] & ~0xFFF == RSP0_PAGE
    assert seen[0]["cr2"] == PROBE  # the first #PF exits indirectly: CR2 loaded
    assert m.engine.read_reg("cr2") == PROBE  # injection does not touch it
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["cr2"], d["cs"] & 3, d["rip"]) == (
        14, 0x4, PROBE, 3, sym["start"])
    assert d["cs"] == USER_CS


def test_s6_pf_during_pf_with_only_df_intercepted_exits_as_df_without_idt_vectoring() -> None:
    host = Script(Inject(0x80000B08, 0))
    m, sym = build(USER_PF, gates={14: gate("pf"), 8: gate("df", ist=2)},
                   pages=unmapped(PROBE, RSP0_PAGE),
                   controls=VmxControls(exception_bitmap=1 << 8), host=host)
    r = run(m, cpl=3)
    x = one(r.trace.records, "vmexit")
    assert (x["interruption_info"], x["interruption_error_code"], x["idt_vectoring_info"],
            x["qualification"]) == (0x80000B08, 0, 0, 0)
    # CR2: each #PF loads it as it is raised (Bochs); the second is the RSP0 page.
    assert host.seen[0].rip == sym["start"]
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["stack"]) == (8, 0, "ist2")


def test_s6b_fixing_the_stack_and_resuming_after_a_df_exit_redelivers_the_first_pf() -> None:
    host = Script(lambda e, v: (v.map_page(RSP0_PAGE), Resume())[1])
    m, sym = build(USER_PF, gates={14: gate("pf"), 8: gate("df", ist=2)},
                   pages=unmapped(PROBE, RSP0_PAGE),
                   controls=VmxControls(exception_bitmap=1 << 8), host=host)
    r = run(m, cpl=3)
    assert one(r.trace.records, "vmexit")["interruption_info"] == 0x80000B08
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["cr2"], d["rip"]) == (14, 0x4, PROBE, sym["start"])
