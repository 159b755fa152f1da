"""Enabling FRED: CPUID, CR4.FRED and the FRED MSRs (test-plan case 20 of docs/fred.md)."""

from __future__ import annotations

import pytest

from cpu.control_regs import ControlFault, check_cr4
from cpu.cpu_model import CpuidInputs, MsrFault, cpuid
from cpu.fred import FredConfig
from cpu.machine import Machine
from tests.fred.rig import CODE, DATA, build, start

CR4_LONG_MODE = 0x620
EFER_LMA = 1 << 10


def test_the_default_cpu_model_reports_no_fred_and_no_subleaf_1() -> None:
    m = Machine()
    assert m.model.cpuid(7, 0)[0] == 0
    assert m.model.cpuid(7, 1) == (0, 0, 0, 0)


def test_a_fred_machine_reports_fred_and_lkgs_in_cpuid_7_1_eax() -> None:
    m = Machine()
    m.enable_fred()
    assert m.model.cpuid(7, 0)[0] == 1  # the highest subleaf
    assert m.model.cpuid(7, 1)[0] == (1 << 17) | (1 << 18)
    assert cpuid(7, 1, CpuidInputs(fred=True, lkgs=False))[0] == 1 << 17


def test_case20_cr4_fred_is_reserved_without_fred_and_needs_lma_with_it() -> None:
    with pytest.raises(ControlFault):
        check_cr4(CR4_LONG_MODE | 1 << 32, efer=EFER_LMA)
    assert check_cr4(CR4_LONG_MODE | 1 << 32, efer=EFER_LMA, fred=True) == CR4_LONG_MODE | 1 << 32
    with pytest.raises(ControlFault, match="LMA"):
        check_cr4(0x20 | 1 << 32, efer=0, fred=True)


def test_cr4_fred_set_by_mov_to_cr4_routes_events_through_fred() -> None:
    main = """
        mov rax, cr4
        bts rax, 32
        mov cr4, rax
        ud2
    """
    m, _ = build(main, enable=False)
    start(m, CODE)
    (d,) = [r for r in m.trace.records if r["kind"] == "deliver"]
    assert d.get("fred") is True


@pytest.mark.parametrize(("msr", "value"), [
    (0x1CD, 0x81_0008),  # RSP1 not 64-byte aligned
    (0x1CC, 0x0000_8000_0000_0000),  # RSP0 non-canonical
    (0x1D1, 0x1004),  # SSP1 not 8-byte aligned
    (0x1D4, 0x400000 | 1 << 2), (0x1D4, 0x400000 | 1 << 4), (0x1D4, 0x400000 | 1 << 5),
    (0x1D4, 0x400000 | 1 << 11),
    (0x1D4, 0x8000_0000_0000_0000),  # non-canonical entry (the KVM check)
])
def test_case20_bad_fred_msr_writes_are_gp0(msr: int, value: int) -> None:
    m = Machine()
    m.enable_fred()
    with pytest.raises(MsrFault):
        m.model.wrmsr(msr, value)


def test_case20_stklvls_takes_any_value_and_config_accepts_a_noncanonical_entry_bochs_style() -> None:
    m = Machine()
    m.enable_fred(FredConfig(config_canonical_check=False))
    m.model.wrmsr(0x1D0, 2**64 - 1)
    assert m.model.rdmsr(0x1D0) == 2**64 - 1
    m.model.wrmsr(0x1D4, 0x8000_0000_0000_0000)
    assert m.model.rdmsr(0x1D4) == 0x8000_0000_0000_0000


def test_fred_msrs_do_not_exist_without_fred() -> None:
    m = Machine()
    with pytest.raises(MsrFault):
        m.model.rdmsr(0x1D4)
    with pytest.raises(MsrFault):
        m.model.wrmsr(0x1CC, 0x800000)


def test_a_noncanonical_entry_point_is_gp0_at_delivery_then_df() -> None:
    m, _ = build("ud2\n", config=0x8000_0000_0000_0000, fred=FredConfig(
        config_canonical_check=False))
    result = start(m, CODE)
    assert result.outcome == "shutdown"  # #GP on #UD is serial, #GP on #GP is #DF, then...
    faults = [r["fault_name"] for r in m.trace.records if r["kind"] == "delivery_fault"]
    assert faults == ["#GP", "#GP", "#GP"]


def test_case20_rdmsr_of_fred_config_in_the_level_2_interrupt_handler_reads_csl_2() -> None:
    kernel = f"""
        mov ecx, 0x1d4
        rdmsr
        mov [{DATA:#x}], eax
        hlt
    """
    m, _ = build("nop\nhlt\n", config=0x0000_0000_0040_0440, kernel=kernel)
    m.interrupt(0x30)
    start(m, CODE)
    assert int.from_bytes(m.read_linear(DATA, 4), "little") == 0x400440 | 2


def test_a_checkpoint_carries_the_fred_msrs_and_the_stack_level() -> None:
    m, _ = build("nop\nhlt\n", config=0x0000_0000_0040_0440)
    m.interrupt(0x30)
    m.start_state(entry=CODE, rsp=0x70000)
    cp = m.checkpoint()
    m.run()
    assert m.state.fred.config & 3 == 2  # the interrupt's level
    m.rollback(cp)
    assert m.state.fred.config == 0x0000_0000_0040_0440
    m.run()
    assert m.state.fred.config & 3 == 2
