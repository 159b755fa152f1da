"""cpu.devices.apic: the xAPIC register page, priorities, EOI, self-IPIs and the timer
(SDM Vol. 3A "Advanced Programmable Interrupt Controller (APIC)"). No engine involved."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpu.devices.apic import (
    APIC_BASE,
    APIC_SIZE,
    MAX_REPORTED_EXPIRIES,
    ApicUnsupported,
    LocalApic,
)
from cpu.errors import Unsupported

ID, VERSION, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR = (
    0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0)
ISR, TMR, IRR, ESR = 0x100, 0x180, 0x200, 0x280
ICR_LOW, ICR_HIGH = 0x300, 0x310
LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = (
    0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370)
LVTS = (LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR)
INITIAL, CURRENT, DIVIDE = 0x380, 0x390, 0x3E0
MASKED = 1 << 16
PERIODIC = 1 << 17
ENABLE = 1 << 8

# ICR low halves: delivery mode << 8, shorthand << 18.
FIXED, NMI = 0b000 << 8, 0b100 << 8
NO_SHORTHAND, SELF, ALL_INCL, ALL_EXCL = 0b00 << 18, 0b01 << 18, 0b10 << 18, 0b11 << 18


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.nmis = 0

    def __call__(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def nmi(self) -> None:
        self.nmis += 1

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [fields for k, fields in self.events if k == kind]


def make(*, enabled: bool = True, apic_id: int = 0, ratio: int = 1) -> tuple[LocalApic, Recorder]:
    rec = Recorder()
    apic = LocalApic(apic_id=apic_id, timer_ratio=ratio, on_nmi=rec.nmi, on_event=rec)
    if enabled:
        apic.write(SVR, 4, ENABLE | 0xFF, 0)
    return apic, rec


def rd(apic: LocalApic, offset: int, now: int = 0) -> int:
    return apic.read(offset, 4, now)


def wr(apic: LocalApic, offset: int, value: int, now: int = 0) -> None:
    apic.write(offset, 4, value, now)


# ----- the page and its reset values ----------------------------------------------------


def test_the_page_sits_at_the_architectural_base_and_is_four_kib() -> None:
    assert (APIC_BASE, APIC_SIZE) == (0xFEE00000, 0x1000)


def test_apic_unsupported_is_an_idtlab_unsupported() -> None:
    assert issubclass(ApicUnsupported, Unsupported)


@pytest.mark.parametrize(("offset", "value"), [
    (ID, 0x00000000), (VERSION, 0x00050014), (TPR, 0), (APR, 0), (PPR, 0), (RRD, 0), (LDR, 0),
    (DFR, 0xFFFFFFFF), (SVR, 0x000000FF), (ESR, 0), (ICR_LOW, 0), (ICR_HIGH, 0),
    *((lvt, 0x00010000) for lvt in LVTS),
    (INITIAL, 0), (CURRENT, 0), (DIVIDE, 0),
    *((base + 0x10 * i, 0) for base in (ISR, TMR, IRR) for i in range(8)),
])
def test_every_register_reads_its_reset_value(offset: int, value: int) -> None:
    apic = LocalApic()
    assert rd(apic, offset) == value


def test_the_id_register_holds_the_apic_id_in_bits_31_to_24() -> None:
    assert rd(LocalApic(apic_id=5), ID) == 5 << 24


def test_the_apic_comes_out_of_reset_software_disabled() -> None:
    apic = LocalApic()
    assert not apic.software_enabled
    wr(apic, SVR, ENABLE | 0xEF)
    assert apic.software_enabled and rd(apic, SVR) == 0x1EF


def test_ldr_keeps_bits_31_to_24_and_dfr_keeps_the_model_with_ones_below() -> None:
    apic = LocalApic()
    wr(apic, LDR, 0x12345678)
    wr(apic, DFR, 0x0FFFFFFF)
    assert rd(apic, LDR) == 0x12000000
    assert rd(apic, DFR) == 0x0FFFFFFF


def test_esr_reads_zero_after_the_write_that_latches_it() -> None:
    apic = LocalApic()
    wr(apic, ESR, 0xFFFFFFFF)
    assert rd(apic, ESR) == 0


@pytest.mark.parametrize("offset", [ID, VERSION, APR, PPR, RRD, CURRENT, ISR + 0x30, TMR, IRR + 0x70])
def test_a_write_to_a_read_only_register_is_ignored_and_reported(offset: int) -> None:
    apic, rec = make()
    before = rd(apic, offset)
    wr(apic, offset, 0xFFFFFFFF)
    assert rd(apic, offset) == before
    [event] = rec.of("apic_ignored_write")
    assert event["offset"] == offset and event["value"] == 0xFFFFFFFF


@pytest.mark.parametrize(("offset", "size", "expected"), [
    (TPR, 1, 0x5A), (TPR + 1, 1, 0x00), (TPR, 2, 0x005A), (TPR, 8, 0x5A), (TPR + 4, 4, 0),
    (TPR + 1, 4, 0x00), (0x030, 1, 0x14), (0x030 + 2, 2, 0x0005),
])
def test_a_narrow_or_unaligned_load_reads_the_bytes_it_covers_and_bytes_4_to_15_read_0(
        offset: int, size: int, expected: int) -> None:
    """KVM `kvm_lapic_reg_read`, QEMU `apic_mem_read`: the register's bytes, shifted."""
    apic, _ = make()
    wr(apic, TPR, 0x5A)
    assert apic.read(offset, size, 0) == expected


@pytest.mark.parametrize(("offset", "size"), [(TPR, 1), (TPR, 2), (TPR, 8), (TPR + 4, 4), (TPR + 1, 4)])
def test_a_store_that_is_not_an_aligned_32_bit_one_is_dropped_and_reported(
        offset: int, size: int) -> None:
    """KVM `apic_mmio_write` ignores `len != 4 || offset & 0xf`."""
    apic, rec = make()
    apic.write(offset, size, 0x77, 0)
    assert rd(apic, TPR) == 0
    [event] = rec.of("apic_ignored_write")
    assert event == {"offset": offset, "register": f"{size}-byte store", "value": 0x77}


@pytest.mark.parametrize("offset", [0x000, 0x010, 0x040, 0x2A0, 0x3A0, 0x3F0, 0xFF0])
def test_a_reserved_register_offset_reads_0_and_a_store_to_it_is_dropped_and_reported(
        offset: int) -> None:
    apic, rec = make()
    assert rd(apic, offset) == 0
    wr(apic, offset, 0x1234)
    assert rec.of("apic_ignored_write") == [{"offset": offset, "register": "reserved",
                                             "value": 0x1234}]


def test_reading_the_write_only_eoi_register_gives_0() -> None:
    assert rd(LocalApic(), EOI) == 0


def test_an_access_outside_the_page_raises_naming_it() -> None:
    with pytest.raises(ApicUnsupported, match="outside the 4-KiB APIC page"):
        LocalApic().read(0xFFE, 4, 0)


# ----- priorities ("Task and Processor Priorities") -------------------------------------


def test_tpr_keeps_bits_7_to_0() -> None:
    apic = LocalApic()
    wr(apic, TPR, 0xFFFF_FF57)
    assert rd(apic, TPR) == 0x57 and apic.tpr == 0x57


def test_ppr_is_the_tpr_when_nothing_is_in_service() -> None:
    apic, _ = make()
    wr(apic, TPR, 0x35)
    assert rd(apic, PPR) == apic.ppr == 0x35


def test_ppr_is_the_in_service_class_when_it_is_above_the_tpr_class() -> None:
    apic, _ = make()
    wr(apic, TPR, 0x35)
    apic.set_irr(0x52)
    apic.acknowledge(0x52)
    assert apic.ppr == 0x50


def test_ppr_is_the_whole_tpr_when_the_classes_are_equal() -> None:
    apic, _ = make()
    apic.set_irr(0x52)
    apic.acknowledge(0x52)
    wr(apic, TPR, 0x5A)
    assert apic.ppr == 0x5A


def test_tpr_masks_a_vector_in_the_same_priority_class() -> None:
    apic, _ = make()
    wr(apic, TPR, 0x40)
    apic.set_irr(0x4F)
    assert apic.pending_vector() is None
    apic.set_irr(0x50)
    assert apic.pending_vector() == 0x50


def test_pending_vector_picks_the_highest_requested_vector() -> None:
    apic, _ = make()
    for v in (0x31, 0x80, 0x7F, 0x20):
        apic.set_irr(v)
    assert apic.pending_vector() == 0x80
    assert apic.irr == [0x20, 0x31, 0x7F, 0x80]
    assert rd(apic, IRR + 0x10 * 4) == 1 << 0  # vector 0x80 is bit 0 of IRR4
    assert rd(apic, IRR + 0x10 * 3) == 1 << 31  # 0x7F is bit 31 of IRR3


def test_an_in_service_vector_holds_back_requests_of_its_own_class_and_below() -> None:
    apic, _ = make()
    apic.set_irr(0x61)
    apic.acknowledge(0x61)
    apic.set_irr(0x6F)
    apic.set_irr(0x45)
    assert apic.pending_vector() is None
    apic.set_irr(0x70)
    assert apic.pending_vector() == 0x70


def test_a_vector_already_requested_merges_with_the_new_request() -> None:
    apic, _ = make()
    apic.set_irr(0x40)
    apic.set_irr(0x40)
    apic.acknowledge(0x40)
    assert apic.irr == [] and apic.isr == [0x40]


def test_acknowledge_moves_the_vector_from_irr_to_isr() -> None:
    apic, _ = make()
    apic.set_irr(0x41)
    apic.acknowledge(0x41)
    assert apic.irr == [] and apic.isr == [0x41]
    assert rd(apic, ISR + 0x20) == 1 << 1


def test_acknowledging_anything_but_the_deliverable_vector_is_a_caller_bug() -> None:
    apic, _ = make()
    apic.set_irr(0x41)
    apic.set_irr(0x51)
    with pytest.raises(ValueError, match="acknowledge"):
        apic.acknowledge(0x41)


@pytest.mark.parametrize("vector", [0, 2, 15, 256, -1])
def test_an_illegal_vector_raises_naming_it(vector: int) -> None:
    apic, _ = make()
    with pytest.raises(ValueError, match=f"{vector:#04x}"):
        apic.set_irr(vector)


# ----- EOI ("Signaling Interrupt Servicing Completion") ---------------------------------


def test_eoi_clears_the_highest_in_service_vector_first() -> None:
    apic, _ = make()
    apic.set_irr(0x40)
    apic.acknowledge(0x40)
    apic.set_irr(0x90)  # nests above the in-service 0x40
    apic.acknowledge(0x90)
    assert apic.isr == [0x40, 0x90] and apic.ppr == 0x90
    wr(apic, EOI, 0)
    assert apic.isr == [0x40] and apic.ppr == 0x40
    wr(apic, EOI, 0x1234)  # any value
    assert apic.isr == [] and apic.ppr == 0


def test_eoi_lets_a_held_back_lower_vector_through() -> None:
    apic, _ = make()
    apic.set_irr(0x80)
    apic.acknowledge(0x80)
    apic.set_irr(0x30)
    assert apic.pending_vector() is None
    wr(apic, EOI, 0)
    assert apic.pending_vector() == 0x30


def test_eoi_with_nothing_in_service_has_no_effect() -> None:
    apic, _ = make()
    apic.set_irr(0x30)
    wr(apic, EOI, 0)
    assert apic.irr == [0x30] and apic.isr == []


def test_the_trigger_mode_register_stays_clear() -> None:
    apic, _ = make()
    apic.set_irr(0x40)
    apic.acknowledge(0x40)
    assert all(rd(apic, TMR + 0x10 * i) == 0 for i in range(8))


# ----- IPIs ("Issuing Interprocessor Interrupts") ---------------------------------------


@pytest.mark.parametrize(("shorthand", "name"), [(SELF, "self"), (ALL_INCL, "all-including-self")])
def test_a_fixed_ipi_to_self_sets_the_irr_bit(shorthand: int, name: str) -> None:
    apic, rec = make()
    wr(apic, ICR_LOW, shorthand | FIXED | 0x42)
    assert apic.irr == [0x42] and apic.pending_vector() == 0x42
    assert rec.of("ipi") == [dict(mode="fixed", vector=0x42, shorthand=name, destination=0,
                                  delivered=True)]


@pytest.mark.parametrize("destination", [3, 0xFF])
def test_a_fixed_ipi_without_shorthand_to_own_id_or_broadcast_reaches_self(destination: int) -> None:
    apic, rec = make(apic_id=3)
    wr(apic, ICR_HIGH, destination << 24 | 0x00FFFFFF)
    assert rd(apic, ICR_HIGH) == destination << 24
    wr(apic, ICR_LOW, NO_SHORTHAND | FIXED | 0x42)
    assert apic.irr == [0x42]
    assert rec.of("ipi")[0]["delivered"] and rec.of("ipi")[0]["shorthand"] == "none"


def test_a_fixed_ipi_to_all_excluding_self_reaches_no_one() -> None:
    apic, rec = make()
    wr(apic, ICR_LOW, ALL_EXCL | FIXED | 0x42)
    assert apic.irr == []
    assert rec.of("ipi")[0]["delivered"] is False


@pytest.mark.parametrize("destination", [3, 0xFF])
def test_an_nmi_ipi_without_shorthand_to_own_id_or_broadcast_signals_the_nmi(destination: int) -> None:
    apic, rec = make(apic_id=3)
    wr(apic, ICR_HIGH, destination << 24)
    wr(apic, ICR_LOW, NO_SHORTHAND | NMI)
    assert rec.nmis == 1 and apic.irr == []
    assert rec.of("ipi") == [dict(mode="nmi", vector=2, shorthand="none", destination=destination,
                                  delivered=True)]


def test_an_nmi_ipi_to_all_excluding_self_reaches_no_one() -> None:
    apic, rec = make()
    wr(apic, ICR_LOW, ALL_EXCL | NMI)
    assert rec.nmis == 0 and rec.of("ipi")[0]["delivered"] is False


@pytest.mark.parametrize("shorthand", [SELF, ALL_INCL])
def test_an_nmi_ipi_with_a_self_shorthand_is_an_invalid_combination_and_raises(shorthand: int) -> None:
    apic, rec = make()
    with pytest.raises(ApicUnsupported, match="ICR delivery mode NMI with destination shorthand"):
        wr(apic, ICR_LOW, shorthand | NMI)
    assert rec.nmis == 0


def test_an_nmi_ipi_reaches_a_software_disabled_apic() -> None:
    apic, rec = make(enabled=False)
    wr(apic, ICR_LOW, NO_SHORTHAND | NMI)
    assert rec.nmis == 1


def test_the_icr_delivery_status_reads_idle_and_the_rest_reads_back() -> None:
    apic, _ = make()
    wr(apic, ICR_LOW, SELF | FIXED | 1 << 12 | 1 << 14 | 0x42)
    assert rd(apic, ICR_LOW) == SELF | 1 << 14 | 0x42


@pytest.mark.parametrize(("mode", "text"), [
    (0b001, r"lowest priority \(001b\)"), (0b010, r"SMI \(010b\)"), (0b011, r"reserved \(011b\)"),
    (0b111, r"reserved \(111b\)"),
])
def test_an_unmodelled_icr_delivery_mode_raises_naming_the_register_and_mode(mode: int, text: str) -> None:
    apic, _ = make()
    with pytest.raises(ApicUnsupported, match=rf"ICR delivery mode {text} is not modelled"):
        wr(apic, ICR_LOW, SELF | mode << 8 | 0x42)


@pytest.mark.parametrize("mode", [0b101, 0b110])
@pytest.mark.parametrize("level", [0, 1 << 14])
def test_init_and_startup_ipis_to_all_excluding_self_reach_no_one_on_one_cpu(
        mode: int, level: int) -> None:
    """kvm-unit-tests' smp_init on a one-CPU machine: INIT assert, INIT de-assert, SIPI to
    all-excluding-self ("Issuing Interprocessor Interrupts"): no target, nothing happens."""
    apic, rec = make()
    wr(apic, ICR_LOW, ALL_EXCL | mode << 8 | level | 0x01)
    [ipi] = rec.of("ipi")
    assert ipi["delivered"] is False and ipi["mode"] == {0b101: "init", 0b110: "startup"}[mode]
    assert apic.irr == [] and rec.nmis == 0


def test_an_init_ipi_to_this_cpu_is_named_as_not_modelled() -> None:
    apic, _ = make()
    with pytest.raises(ApicUnsupported, match="INIT IPI to this CPU"):
        wr(apic, ICR_LOW, SELF | 0b101 << 8)


def test_an_ipi_in_logical_destination_mode_raises() -> None:
    apic, _ = make()
    wr(apic, ICR_HIGH, 1 << 24)
    with pytest.raises(ApicUnsupported, match="ICR logical destination mode"):
        wr(apic, ICR_LOW, NO_SHORTHAND | 1 << 11 | FIXED | 0x42)


def test_an_ipi_to_another_apic_id_reaches_no_one_because_there_is_one_cpu() -> None:
    apic, rec = make(apic_id=0)
    wr(apic, ICR_HIGH, 1 << 24)
    wr(apic, ICR_LOW, NO_SHORTHAND | FIXED | 0x42)
    assert [ipi["delivered"] for ipi in rec.of("ipi")] == [False] and apic.irr == []


def test_clearing_the_global_enable_loses_interrupts_and_setting_it_again_resets_the_apic() -> None:
    """IA32_APIC_BASE[11] ("Enabling or Disabling the Local APIC"): while disabled the
    APIC takes nothing; re-enabled, it is in its power-up state (SVR = 0xFF)."""
    apic, _ = make(apic_id=3)
    wr(apic, TPR, 0x20)
    apic.set_irr(0x40)
    apic.set_global_enable(False)
    apic.set_irr(0x41)
    assert apic.pending_vector() is None and apic.irr == []
    apic.set_global_enable(True)
    assert (rd(apic, SVR), rd(apic, TPR), apic.irr, apic.apic_id) == (0xFF, 0, [], 3)


def test_a_fixed_ipi_with_an_illegal_vector_raises() -> None:
    apic, _ = make()
    with pytest.raises(ApicUnsupported, match="ICR fixed IPI with illegal vector 0x05"):
        wr(apic, ICR_LOW, SELF | FIXED | 0x05)


def test_an_nmi_without_a_wired_sink_raises_rather_than_vanishes() -> None:
    apic = LocalApic()
    with pytest.raises(ApicUnsupported, match="on_nmi"):
        wr(apic, ICR_LOW, NO_SHORTHAND | NMI)


# ----- LVT and software disable ("Local Vector Table", "Spurious-Interrupt Vector Register")


@pytest.mark.parametrize("lvt", LVTS)
def test_a_software_disabled_apic_keeps_every_lvt_mask_set(lvt: int) -> None:
    apic, _ = make(enabled=False)
    wr(apic, lvt, 0x40)
    assert rd(apic, lvt) == MASKED | 0x40


@pytest.mark.parametrize("lvt", LVTS)
def test_software_disabling_sets_every_lvt_mask_and_reenabling_leaves_them_set(lvt: int) -> None:
    apic, _ = make()
    wr(apic, lvt, 0x40)
    assert rd(apic, lvt) == 0x40
    wr(apic, SVR, 0xFF)
    assert rd(apic, lvt) == MASKED | 0x40
    wr(apic, SVR, ENABLE | 0xFF)
    assert rd(apic, lvt) == MASKED | 0x40
    wr(apic, lvt, 0x40)
    assert rd(apic, lvt) == 0x40


def test_software_disabling_keeps_irr_and_isr() -> None:
    apic, _ = make()
    apic.set_irr(0x50)
    apic.acknowledge(0x50)
    apic.set_irr(0x60)
    wr(apic, SVR, 0xFF)
    assert apic.irr == [0x60] and apic.isr == [0x50]
    assert apic.pending_vector() == 0x60


def test_an_unmasked_level_triggered_lint_entry_raises_naming_it() -> None:
    apic, _ = make()
    wr(apic, LVT_LINT0, MASKED | 1 << 15 | 0x40)  # masked: stored
    with pytest.raises(ApicUnsupported, match="LVT LINT1 level-triggered"):
        wr(apic, LVT_LINT1, 1 << 15 | 0x40)


def test_an_unmasked_tsc_deadline_timer_raises_naming_the_mode() -> None:
    apic, _ = make()
    wr(apic, LVT_TIMER, MASKED | 0b10 << 17 | 0x40)  # masked: stored
    with pytest.raises(ApicUnsupported, match=r"LVT timer mode TSC-deadline \(10b\)"):
        wr(apic, LVT_TIMER, 0b10 << 17 | 0x40)


def test_an_unmasked_timer_with_a_delivery_mode_other_than_fixed_raises() -> None:
    apic, _ = make()
    with pytest.raises(ApicUnsupported, match=r"LVT timer delivery mode NMI \(100b\)"):
        wr(apic, LVT_TIMER, 0b100 << 8 | 0x40)


def test_an_unmasked_timer_with_an_illegal_vector_raises() -> None:
    apic, _ = make()
    with pytest.raises(ApicUnsupported, match="LVT timer vector 0x03"):
        wr(apic, LVT_TIMER, 0x03)


# ----- the timer ("APIC Timer") ----------------------------------------------------------


@pytest.mark.parametrize(("bits", "divisor"), [
    (0b0000, 2), (0b0001, 4), (0b0010, 8), (0b0011, 16), (0b1000, 32), (0b1001, 64), (0b1010, 128),
    (0b1011, 1),
])
def test_a_one_shot_timer_fires_exactly_initial_times_divisor_times_ratio_cycles_after_its_start(
        bits: int, divisor: int) -> None:
    apic, rec = make(ratio=3)
    wr(apic, DIVIDE, bits)
    wr(apic, LVT_TIMER, 0x40)
    wr(apic, INITIAL, 10, now=1000)
    expiry = 1000 + 10 * divisor * 3
    assert apic.next_deadline() == expiry
    apic.tick(expiry - 1)
    assert apic.irr == [] and rec.of("timer") == []
    apic.tick(expiry)
    assert apic.irr == [0x40]
    assert rec.of("timer") == [dict(vector=0x40, cycle=expiry, masked=False)]
    assert apic.next_deadline() is None
    assert rd(apic, CURRENT, now=expiry + 10**6) == 0


def test_the_current_count_drops_by_one_every_divisor_times_ratio_cycles() -> None:
    apic, _ = make(ratio=2)
    wr(apic, DIVIDE, 0b0001)  # divide by 4: a decrement every 8 cycles
    wr(apic, LVT_TIMER, MASKED | 0x40)
    wr(apic, INITIAL, 5, now=100)
    counts = [rd(apic, CURRENT, now=t) for t in (100, 107, 108, 115, 116, 139, 140)]
    assert counts == [5, 5, 4, 4, 3, 1, 0]
    assert rd(apic, INITIAL) == 5


def test_a_periodic_timer_fires_at_every_period() -> None:
    apic, rec = make(ratio=2)
    wr(apic, DIVIDE, 0b0000)  # divide by 2: a decrement every 4 cycles, period 4 * 25 = 100
    wr(apic, LVT_TIMER, PERIODIC | 0x40)
    wr(apic, INITIAL, 25, now=50)
    assert apic.next_deadline() == 150
    apic.tick(150)
    assert apic.next_deadline() == 250
    apic.set_irr(0x41)  # the guest would take and EOI it; here just look at the cycles
    apic.tick(360)
    assert [e["cycle"] for e in rec.of("timer")] == [150, 250, 350]
    assert apic.next_deadline() == 450
    assert rd(apic, CURRENT, now=360) == 25 - 10 // 4
    assert rd(apic, CURRENT, now=450) == 25  # reloaded at the expiry


def test_periodic_expiries_inside_one_tick_merge_into_one_irr_bit() -> None:
    apic, rec = make()
    wr(apic, DIVIDE, 0b1011)  # divide by 1
    wr(apic, LVT_TIMER, PERIODIC | 0x40)
    wr(apic, INITIAL, 10, now=0)
    apic.tick(35)
    assert [e["cycle"] for e in rec.of("timer")] == [10, 20, 30]
    assert apic.irr == [0x40]
    apic.acknowledge(0x40)
    apic.tick(40)
    assert apic.irr == [0x40] and apic.isr == [0x40]  # the second interrupt of a vector


def test_a_long_run_of_periodic_expiries_is_reported_compactly() -> None:
    apic, rec = make()
    wr(apic, DIVIDE, 0b1011)
    wr(apic, LVT_TIMER, MASKED | PERIODIC | 0x40)
    wr(apic, INITIAL, 1, now=0)
    apic.tick(10**9)
    events = rec.of("timer")
    assert len(events) == MAX_REPORTED_EXPIRIES + 1
    assert [e["cycle"] for e in events[:3]] == [1, 2, 3]
    assert events[-1] == dict(vector=0x40, cycle=10**9, masked=True, first_cycle=MAX_REPORTED_EXPIRIES + 1,
                              repeats=10**9 - MAX_REPORTED_EXPIRIES)
    assert apic.next_expiry() == 10**9 + 1


def test_a_masked_timer_expiry_sets_no_irr_bit_but_is_reported() -> None:
    apic, rec = make()
    wr(apic, LVT_TIMER, MASKED | 0x40)
    wr(apic, INITIAL, 4, now=0)
    assert apic.next_deadline() is None and apic.next_expiry() == 8
    apic.tick(100)
    assert apic.irr == []
    assert rec.of("timer") == [dict(vector=0x40, cycle=8, masked=True)]


def test_a_software_disabled_apic_timer_sets_no_irr_bit() -> None:
    apic, _ = make(enabled=False)
    wr(apic, LVT_TIMER, 0x40)  # the mask sticks
    wr(apic, INITIAL, 4, now=0)
    apic.tick(100)
    assert apic.irr == []


def test_writing_the_initial_count_restarts_the_timer_and_zero_stops_it() -> None:
    apic, rec = make()
    wr(apic, LVT_TIMER, 0x40)
    wr(apic, INITIAL, 10, now=0)
    wr(apic, INITIAL, 10, now=15)
    assert apic.next_deadline() == 35
    wr(apic, INITIAL, 0, now=20)
    assert apic.next_deadline() is None and rd(apic, CURRENT, now=20) == 0
    apic.tick(1000)
    assert rec.of("timer") == [] and apic.irr == []


def test_an_mmio_access_replays_the_expiries_before_it() -> None:
    apic, rec = make()
    wr(apic, LVT_TIMER, 0x40)
    wr(apic, INITIAL, 10, now=0)
    assert rd(apic, IRR + 0x20, now=20) == 1  # vector 0x40 = bit 0 of IRR2
    assert rec.of("timer") == [dict(vector=0x40, cycle=20, masked=False)]


def test_unmasking_the_timer_while_it_runs_exposes_its_deadline() -> None:
    apic, _ = make()
    wr(apic, LVT_TIMER, MASKED | PERIODIC | 0x40)
    wr(apic, INITIAL, 10, now=0)
    assert apic.next_deadline() is None
    wr(apic, LVT_TIMER, PERIODIC | 0x40, now=45)
    assert apic.next_deadline() == 60


def test_a_new_divisor_keeps_the_current_count_and_counts_on_at_the_new_rate() -> None:
    apic, _ = make()
    wr(apic, DIVIDE, 0b1011)  # by 1
    wr(apic, LVT_TIMER, 0x40)
    wr(apic, INITIAL, 10, now=0)
    wr(apic, DIVIDE, 0b0000, now=4)  # by 2, with 6 left
    assert rd(apic, CURRENT, now=4) == 6
    assert apic.next_deadline() == 4 + 6 * 2


def test_time_never_goes_back() -> None:
    apic, _ = make()
    wr(apic, LVT_TIMER, MASKED | 0x40)
    wr(apic, INITIAL, 100, now=0)
    assert rd(apic, CURRENT, now=60) == 70
    assert rd(apic, CURRENT, now=10) == 70


def test_next_deadline_is_none_while_the_timer_is_stopped() -> None:
    apic, _ = make()
    wr(apic, LVT_TIMER, 0x40)
    assert apic.next_deadline() is None


def test_can_ever_interrupt_sees_a_request_even_one_held_back_by_the_tpr() -> None:
    apic, _ = make()
    assert not apic.can_ever_interrupt()
    apic.set_irr(0x40)
    wr(apic, TPR, 0xF0)  # held back, but an EOI or a TPR write could release it
    assert apic.pending_vector() is None and apic.can_ever_interrupt()


def test_can_ever_interrupt_needs_the_timer_unmasked_and_running() -> None:
    apic, _ = make()
    wr(apic, LVT_TIMER, MASKED | 0x40)
    wr(apic, INITIAL, 10, now=0)
    assert not apic.can_ever_interrupt()
    wr(apic, LVT_TIMER, 0x40)
    assert apic.can_ever_interrupt()
    apic.tick(20)
    apic.acknowledge(0x40)
    assert not apic.can_ever_interrupt()  # one-shot spent, vector in service only


# ----- PPR and dispatch against an independent reference ---------------------------------


def reference(tpr: int, isr: set[int], irr: set[int]) -> tuple[int, int | None]:
    """SDM "Task and Processor Priorities" and "Interrupt Acceptance for Fixed Interrupts",
    written from the prose with sets, not bits."""
    isrv = max(isr, default=0)
    ppr = tpr if tpr // 16 >= isrv // 16 else (isrv // 16) * 16
    candidates = [v for v in irr if v // 16 > ppr // 16]
    top = max(irr, default=None)
    return ppr, (top if top is not None and top in candidates else None)


# In-service sets the architecture can reach: a vector enters the ISR only when its class
# is above PPR, hence above every class already in service, so at most one per class.
in_service = st.dictionaries(st.integers(min_value=1, max_value=15), st.integers(min_value=0, max_value=15),
                             max_size=6).map(lambda d: {c << 4 | low for c, low in d.items()})
requested = st.sets(st.integers(min_value=16, max_value=255), max_size=6)


@settings(max_examples=300, deadline=None)
@given(tpr=st.integers(min_value=0, max_value=255), isr=in_service, irr=requested)
def test_ppr_and_pending_vector_agree_with_a_reference(tpr: int, isr: set[int], irr: set[int]) -> None:
    apic, _ = make()
    for v in sorted(isr):  # lowest class first, TPR 0: each one is deliverable in turn
        apic.set_irr(v)
        apic.acknowledge(v)
    assert apic.isr == sorted(isr)
    for v in irr:
        apic.set_irr(v)
    wr(apic, TPR, tpr)
    ppr, pending = reference(tpr, isr, irr)
    assert apic.ppr == rd(apic, PPR) == ppr
    assert apic.pending_vector() == pending
    if pending is not None:
        apic.acknowledge(pending)
        assert pending in apic.isr and pending not in apic.irr
