"""The 2022 nested-injection thread as tests (S20 of the host-model test plan): the
exception an outer host (L0) intercepts while the guest (L2) vectors another event
must be checked against the inner hypervisor's (L1's) bitmap with its own vector before
any #DF merge. "sdm" does that (Linux 6.1, `kvm_multiple_exception` →
`nested_vmx_is_exception_vmexit`); "kvm-pre-6.1" merges first."""

from __future__ import annotations

from typing import Any

import pytest

from cpu.machine import Machine
from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Inject
from idt.vmx_events import ExceptionBitmap
from idtlab.cli import main
from tests.delivery.rig import IST2_TOP, gate, handler_rsp
from tests.hyper.kit import (
    IDT,
    RSP0_PAGE,
    N,
    build,
    entries,
    exits,
    of_kind,
    one,
    run,
    unmapped,
)

GP_GUEST = """
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
IDT_PAGE = IDT & ~0xFFF
ALL_PF = VmxControls(exception_bitmap=1 << 14)  # L0 shadow-pages: every #PF exits


def gp_machine(host: str, *, host_pages: tuple[int, ...] = (), l1: ExceptionBitmap | None
               ) -> tuple[Machine, dict[str, int]]:
    return build(GP_GUEST, gates={13: gate("gp"), 14: gate("pf"), 8: gate("df", ist=2)},
                 pages=unmapped(IDT_PAGE), controls=ALL_PF, host=host,
                 host_pages=host_pages, l1=l1, known={"N": N})


@pytest.mark.parametrize("host", ["sdm", "kvm-pre-6.1"])
def test_s20a_a_page_the_outer_host_owns_is_fixed_and_the_gp_reinjected_l1_never_runs(
        host: str) -> None:
    m, sym = gp_machine(host, host_pages=(IDT_PAGE,), l1=ExceptionBitmap(1 << 14))
    r = run(m)
    x = one(r.trace.records, "vmexit")
    assert (x["interruption_info"], x["interruption_error_code"], x["qualification"],
            x["idt_vectoring_info"], x["idt_vectoring_error_code"]) == (
        0x80000B0E, 0x0, IDT + 13 * 16, 0x80000B0D, 0)
    assert one(r.trace.records, "vmentry")["injected"] == 0x80000B0D
    assert of_kind(r.trace.records, "nested_vmexit") == []
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["handler"]) == (13, 0, sym["gp"])


def test_s20b_the_sdm_host_exits_to_l1_with_the_pf_and_the_gp_in_idt_vectoring() -> None:
    m, _sym = gp_machine("sdm", l1=ExceptionBitmap(1 << 14))
    r = run(m)
    n = one(r.trace.records, "nested_vmexit")
    assert (n["exit_reason"], n["interruption_info"], n["interruption_error_code"],
            n["qualification"], n["idt_vectoring_info"], n["idt_vectoring_error_code"]) == (
        0, 0x80000B0E, 0x0, IDT + 13 * 16, 0x80000B0D, 0)
    assert m.engine.read_reg("cr2") == 0  # L2's CR2 untouched
    assert r.outcome == "vmexit" and entries(r) == []


def test_s20b_before_6_1_the_exit_to_l1_lost_the_gp() -> None:
    m, _sym = gp_machine("kvm-pre-6.1", l1=ExceptionBitmap(1 << 14))
    r = run(m)
    n = one(r.trace.records, "nested_vmexit")
    assert (n["interruption_info"], n["idt_vectoring_info"]) == (0x80000B0E, 0)


@pytest.mark.parametrize("host", ["sdm", "kvm-pre-6.1"])
def test_s20c_when_l1_does_not_intercept_the_pf_is_injected_into_l2_with_cr2(host: str) -> None:
    m, _sym = build(GP_GUEST, gates={13: gate("gp"), 14: gate("pf", ist=1), 8: gate("df", ist=2)},
                   pages=unmapped(0x6F000),
                   controls=ALL_PF, host=host, l1=ExceptionBitmap(0), known={"N": N})
    r = run(m)
    e = one(r.trace.records, "vmentry")
    assert (e["injected"], e["error_code"]) == (0x80000B0E, 0x2)
    assert e["cr2"] & ~0xFFF == 0x6F000
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["cr2"]) == (14, e["cr2"])


# -- the KVM selftest (nested_exceptions_test.c) one level down ---------------------------
def ss_machine(host: str, l1: int) -> tuple[Machine, dict[str, int]]:
    m, sym = build(GP_GUEST, controls=VmxControls(exception_bitmap=(1 << 13) | (1 << 8)),
                   host=host, l1=ExceptionBitmap(l1), known={"N": N})
    m.build()
    m.engine.write_table("idtr", 0, IDT, 0)
    m.vmx_exits.launch(Inject(0x80000B0C, 0xBEEF))  # L1 injected #SS(0xbeef) into L2
    return m, sym


def test_the_selftests_gp_during_an_injected_ss_reaches_l1_as_gp_under_the_sdm_host() -> None:
    m, _ = ss_machine("sdm", (1 << 12) | (1 << 13) | (1 << 8))
    r = run(m)
    n = one(r.trace.records, "nested_vmexit")
    assert (n["interruption_info"], n["interruption_error_code"], n["idt_vectoring_info"],
            n["idt_vectoring_error_code"]) == (0x80000B0D, 0x63, 0x80000B0C, 0xBEEF)


def test_before_6_1_the_selftests_gp_became_a_df_exit_to_l1() -> None:
    m, _ = ss_machine("kvm-pre-6.1", (1 << 12) | (1 << 13) | (1 << 8))
    r = run(m)
    n = one(r.trace.records, "nested_vmexit")
    assert (n["interruption_info"], n["interruption_error_code"], n["idt_vectoring_info"]) == (
        0x80000B08, 0, 0)


# -- #DF routing under both hosts: #PF while vectoring #PF ---------------------------------
PF_PF_GUEST = """
start:
    mov rax, [0x400000]
    hlt
pf:
    hlt
df:
    hlt
"""


def pf_pf(host: str, l1: ExceptionBitmap) -> tuple[Machine, dict[str, int]]:
    return build(PF_PF_GUEST, gates={14: gate("pf"), 8: gate("df", ist=2)},
                 pages=unmapped(0x400000, RSP0_PAGE), controls=ALL_PF, host=host, l1=l1)


L1_SUPERVISOR_PF = ExceptionBitmap(1 << 14, pfec_mask=0x4, pfec_match=0)


def test_df_routing_sdm_the_pf_during_pf_goes_to_l1_with_the_first_pf_vectoring() -> None:
    m, _sym = pf_pf("sdm", L1_SUPERVISOR_PF)
    r = run(m, cpl=3)
    reflect, second = exits(r)
    assert (reflect["interruption_info"], reflect["interruption_error_code"],
            reflect["idt_vectoring_info"]) == (0x80000B0E, 0x4, 0)
    assert (second["interruption_error_code"], second["idt_vectoring_info"],
            second["idt_vectoring_error_code"]) == (0x2, 0x80000B0E, 0x4)
    n = one(r.trace.records, "nested_vmexit")
    assert (n["interruption_info"], n["interruption_error_code"], n["idt_vectoring_info"],
            n["idt_vectoring_error_code"]) == (0x80000B0E, 0x2, 0x80000B0E, 0x4)
    assert of_kind(r.trace.records, "deliver") == []


def test_df_routing_kvm_pre_6_1_delivers_a_spurious_df_in_l2() -> None:
    m, _sym = pf_pf("kvm-pre-6.1", L1_SUPERVISOR_PF)
    r = run(m, cpl=3)
    assert [e["injected"] for e in entries(r)] == [0x80000B0E, 0x80000B08]
    assert of_kind(r.trace.records, "nested_vmexit") == []
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["error_code"], d["stack"], d["rsp"]) == (
        8, 0, "ist2", handler_rsp(IST2_TOP, error_code=True))


def test_df_routing_kvm_pre_6_1_with_l1_intercepting_df_exits_to_l1_as_df_without_vectoring(
        ) -> None:
    m, _sym = pf_pf("kvm-pre-6.1", ExceptionBitmap((1 << 14) | (1 << 8), 0x4, 0))
    r = run(m, cpl=3)
    n = one(r.trace.records, "nested_vmexit")
    assert (n["interruption_info"], n["interruption_error_code"], n["qualification"],
            n["idt_vectoring_info"]) == (0x80000B08, 0, 0, 0)


def test_the_demo_prints_both_hosts_side_by_side(capsys: Any) -> None:

    assert main(["demo", "nested-injection"]) == 0
    out = capsys.readouterr().out
    assert "nested_injection_sdm.toml: vmexit; 3/3 expectations hold" in out
    assert "nested_injection_kvm_pre61.toml: hlt; 3/3 expectations hold" in out
    assert "EXIT TO L1" in out
