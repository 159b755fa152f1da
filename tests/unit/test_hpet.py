"""cpu.devices.hpet: capabilities, the main counter against the machine's cycles, and the
comparators in one-shot, periodic, edge, level and legacy-route modes (IA-PC HPET
Specification 1.0a). No engine involved."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cpu.devices.hpet import HPET_BASE, HPET_SIZE, Hpet, HpetState, HpetTimerState, HpetUnsupported
from cpu.errors import Unsupported

CAP, CFG, STATUS, COUNTER = 0x000, 0x010, 0x020, 0x0F0
ENABLE, LEGACY = 1, 2
LEVEL, INT_ENB, PERIODIC, VAL_SET = 1 << 1, 1 << 2, 1 << 3, 1 << 6
ROUTE2 = 2 << 9
CYCLES_PER_TICK = 24  # 10 ns at 2.4 GHz


def tn_cfg(n: int) -> int:
    return 0x100 + 0x20 * n


def tn_cmp(n: int) -> int:
    return 0x108 + 0x20 * n


class Rig:
    def __init__(self, cpu_mhz: int = 2400) -> None:
        self.irqs: list[tuple[int, bool]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.hpet = Hpet(cpu_mhz=cpu_mhz, on_irq=lambda pin, up: self.irqs.append((pin, up)),
                         on_event=lambda kind, **f: self.events.append((kind, f)))

    def start(self, at: int = 0) -> None:
        self.hpet.write(CFG, 8, ENABLE, at)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_the_block_is_at_0xfed00000_and_1_kib_long() -> None:
    assert (HPET_BASE, HPET_SIZE) == (0xFED00000, 0x400)


def test_the_capabilities_say_10_ns_vendor_8086_legacy_route_64_bit_three_timers(rig: Rig) -> None:
    # Period 10 000 000 fs = 0x989680; 0x8086 vendor; LEG_RT_CAP 15; COUNT_SIZE_CAP 13;
    # NUM_TIM_CAP 2 (three timers); REV_ID 1.
    assert rig.hpet.read(CAP, 8, 0) == 0x00989680_8086A201
    assert (rig.hpet.read(CAP, 4, 0), rig.hpet.read(CAP + 4, 4, 0)) == (0x8086A201, 0x00989680)
    rig.hpet.write(CAP, 8, 0, 0)
    assert rig.hpet.read(CAP, 8, 0) == 0x00989680_8086A201


def test_out_of_reset_the_counter_is_halted_at_0_and_every_comparator_is_all_ones(rig: Rig) -> None:
    assert rig.hpet.read(CFG, 8, 0) == 0
    assert rig.hpet.read(COUNTER, 8, 10_000) == 0
    assert [rig.hpet.read(tn_cmp(n), 8, 0) for n in range(3)] == [(1 << 64) - 1] * 3
    # Caps: route cap input 2 in bits 63:32, 64-bit comparator, periodic capable.
    assert [rig.hpet.read(tn_cfg(n), 8, 0) for n in range(3)] == [0x4_0000_0030] * 3


def test_the_running_counter_advances_one_tick_per_24_cycles_at_2400_mhz(rig: Rig) -> None:
    rig.start(at=100)
    assert rig.hpet.read(COUNTER, 8, 100 + 5 * CYCLES_PER_TICK - 1) == 4
    assert rig.hpet.read(COUNTER, 8, 100 + 5 * CYCLES_PER_TICK) == 5
    assert rig.hpet.read(COUNTER + 4, 4, 100 + 5 * CYCLES_PER_TICK) == 0


def test_at_1_ghz_a_tick_is_10_cycles() -> None:
    r = Rig(cpu_mhz=1000)
    r.start(at=0)
    assert r.hpet.read(COUNTER, 8, 1234) == 123


def test_hpet_read_tests_read_modify_write_of_the_configuration_starts_the_counter(rig: Rig) -> None:
    # x86/hpet_read_test.c: *(u64 *)HPET_CONFIG |= 1, then 64-bit counter reads.
    rig.hpet.write(CFG, 8, rig.hpet.read(CFG, 8, 0) | ENABLE, 0)
    first = rig.hpet.read(COUNTER, 8, 2400)
    assert (first, rig.hpet.read(COUNTER, 8, 4800)) == (100, 200)


def test_halting_keeps_the_value_and_running_again_continues_from_it(rig: Rig) -> None:
    rig.start(at=0)
    rig.hpet.write(CFG, 8, 0, 240)
    assert rig.hpet.read(COUNTER, 8, 100_000) == 10
    rig.hpet.write(CFG, 8, ENABLE, 100_000)
    assert rig.hpet.read(COUNTER, 8, 100_000 + 240) == 20


def test_only_enable_and_legacy_route_are_writable_in_the_configuration(rig: Rig) -> None:
    rig.hpet.write(CFG, 8, (1 << 64) - 1 - ENABLE, 0)
    assert rig.hpet.read(CFG, 8, 0) == LEGACY
    assert rig.hpet.read(CFG + 4, 4, 0) == 0


def test_the_counter_may_be_written_whole_or_by_halves_while_halted(rig: Rig) -> None:
    rig.hpet.write(COUNTER, 8, 0x1122334455667788, 0)
    rig.hpet.write(COUNTER + 4, 4, 0xAABBCCDD, 0)
    assert rig.hpet.read(COUNTER, 8, 0) == 0xAABBCCDD55667788
    rig.hpet.write(COUNTER, 4, 0x01020304, 0)
    assert rig.hpet.read(COUNTER, 8, 0) == 0xAABBCCDD01020304


def test_a_one_shot_edge_timer_pulses_its_input_when_the_counter_reaches_the_comparator(rig: Rig) -> None:
    rig.hpet.write(tn_cmp(0), 8, 10, 0)
    rig.hpet.write(tn_cfg(0), 8, INT_ENB | ROUTE2, 0)
    rig.start(at=1000)
    assert rig.hpet.next_deadline() == 1000 + 10 * CYCLES_PER_TICK
    rig.hpet.tick(1000 + 10 * CYCLES_PER_TICK - 1)
    assert rig.irqs == []
    rig.hpet.tick(1000 + 10 * CYCLES_PER_TICK)
    assert rig.irqs == [(2, True), (2, False)]
    assert rig.events == [("hpet_fire", {"timer": 0, "cycle": 1240, "pin": 2, "level": False,
                                         "matches": 1})]
    assert rig.hpet.read(STATUS, 8, 2000) == 0  # edge mode leaves the status bit alone
    rig.hpet.tick(10**9)
    assert len(rig.irqs) == 2 and rig.hpet.next_deadline() is None


def test_a_comparator_the_counter_has_passed_does_not_fire(rig: Rig) -> None:
    rig.start(at=0)
    rig.hpet.write(tn_cfg(0), 8, INT_ENB | ROUTE2, 2400)  # the counter is at 100
    rig.hpet.write(tn_cmp(0), 8, 50, 2400)
    assert rig.hpet.next_deadline() is None
    rig.hpet.tick(10**7)
    assert rig.irqs == []


def test_a_periodic_timer_takes_the_comparator_with_val_set_then_the_period(rig: Rig) -> None:
    # Linux hpet_set_periodic: TYPE|VAL_SET, comparator = now + delta, comparator = delta.
    rig.start(at=0)
    rig.hpet.write(tn_cfg(0), 8, INT_ENB | PERIODIC | VAL_SET | ROUTE2, 0)
    rig.hpet.write(tn_cmp(0), 8, 100, 0)
    rig.hpet.write(tn_cmp(0), 8, 50, 0)
    assert rig.hpet.read(tn_cfg(0), 8, 0) & VAL_SET == 0  # clears itself
    assert rig.hpet.read(tn_cmp(0), 8, 0) == 100
    rig.hpet.tick(100 * CYCLES_PER_TICK)
    assert rig.hpet.read(tn_cmp(0), 8, 100 * CYCLES_PER_TICK) == 150
    assert rig.hpet.next_deadline() == 150 * CYCLES_PER_TICK
    # Three matches (150, 200, 250) inside one tick: one pulse, reported with the count.
    rig.hpet.tick(260 * CYCLES_PER_TICK)
    assert rig.irqs == [(2, True), (2, False)] * 2
    assert rig.events[-1] == ("hpet_fire", {"timer": 0, "cycle": 150 * CYCLES_PER_TICK, "pin": 2,
                                            "level": False, "matches": 3})
    assert rig.hpet.read(tn_cmp(0), 8, 260 * CYCLES_PER_TICK) == 300


def test_a_level_timer_holds_its_input_until_its_status_bit_is_written_with_1(rig: Rig) -> None:
    rig.hpet.write(tn_cmp(0), 8, 1, 0)
    rig.hpet.write(tn_cfg(0), 8, LEVEL | INT_ENB | ROUTE2, 0)
    rig.start(at=0)
    rig.hpet.tick(CYCLES_PER_TICK)
    assert rig.irqs == [(2, True)]
    assert rig.hpet.read(STATUS, 8, CYCLES_PER_TICK) == 0b001
    rig.hpet.write(STATUS, 8, 0b110, CYCLES_PER_TICK)  # other bits: no effect
    assert rig.hpet.read(STATUS, 8, CYCLES_PER_TICK) == 0b001
    rig.hpet.write(STATUS, 8, 0b001, CYCLES_PER_TICK)
    assert rig.irqs == [(2, True), (2, False)]
    assert rig.hpet.read(STATUS, 8, CYCLES_PER_TICK) == 0


def test_a_level_timer_without_interrupts_enabled_still_sets_its_status_bit(rig: Rig) -> None:
    rig.hpet.write(tn_cmp(1), 8, 3, 0)
    rig.hpet.write(tn_cfg(1), 8, LEVEL | ROUTE2, 0)
    rig.start(at=0)
    assert rig.hpet.next_deadline() is None  # nothing would interrupt
    assert rig.hpet.read(STATUS, 8, 3 * CYCLES_PER_TICK) == 0b010
    assert rig.irqs == []


def test_under_legacy_route_timer_0_reaches_input_2_and_timer_1_input_8(rig: Rig) -> None:
    for n, at in ((0, 5), (1, 6)):
        rig.hpet.write(tn_cmp(n), 8, at, 0)
        rig.hpet.write(tn_cfg(n), 8, INT_ENB, 0)  # route 0: allowed only under legacy route
    rig.hpet.write(CFG, 8, ENABLE | LEGACY, 0)
    rig.hpet.tick(10 * CYCLES_PER_TICK)
    assert rig.irqs == [(2, True), (2, False), (8, True), (8, False)]


def test_a_route_the_timer_cannot_use_is_not_taken(rig: Rig) -> None:
    rig.hpet.write(tn_cfg(2), 8, INT_ENB | (11 << 9), 0)
    assert rig.hpet.read(tn_cfg(2), 8, 0) == 0x4_0000_0030 | INT_ENB


def test_halting_releases_level_inputs_and_clears_status(rig: Rig) -> None:
    rig.hpet.write(tn_cmp(0), 8, 1, 0)
    rig.hpet.write(tn_cfg(0), 8, LEVEL | INT_ENB | ROUTE2, 0)
    rig.start(at=0)
    rig.hpet.tick(CYCLES_PER_TICK)
    rig.hpet.write(CFG, 8, 0, 2 * CYCLES_PER_TICK)
    assert rig.irqs == [(2, True), (2, False)]
    assert rig.hpet.read(STATUS, 8, 0) == 0


def test_a_match_before_a_register_access_is_seen_before_it(rig: Rig) -> None:
    rig.hpet.write(tn_cmp(0), 8, 2, 0)
    rig.hpet.write(tn_cfg(0), 8, LEVEL | INT_ENB | ROUTE2, 0)
    rig.start(at=0)
    # No tick: the status read at cycle 48 processes the match at cycle 48 first.
    assert rig.hpet.read(STATUS, 4, 2 * CYCLES_PER_TICK) == 1
    assert rig.irqs == [(2, True)]


@pytest.mark.parametrize(("op", "message"), [
    (lambda h: h.read(CFG, 2, 0), "HPET: 2-byte read at offset 0x10 (only aligned 32- and "
                                  "64-bit accesses are defined)"),
    (lambda h: h.read(COUNTER + 4, 8, 0), "HPET: 8-byte read at offset 0xf4"),
    (lambda h: h.write(0x30, 4, 0, 0), "HPET: write at offset 0x30: no register there"),
    (lambda h: h.read(tn_cfg(3), 8, 0), "HPET: read at offset 0x160: no register there"),
    (lambda h: (h.write(CFG, 8, ENABLE, 0), h.write(COUNTER, 8, 5, 0)),
     "HPET: main counter written while it runs"),
    (lambda h: h.write(tn_cfg(0), 8, 1 << 8, 0), "HPET: timer 0 set to 32-bit mode"),
    (lambda h: h.write(tn_cfg(1), 8, 1 << 14, 0), "HPET: timer 1 set to FSB delivery"),
    (lambda h: h.write(0x110, 8, 0xFEE00000, 0), "HPET: timer 0 FSB route written"),
    (lambda h: (h.write(tn_cmp(0), 8, 1, 0), h.write(tn_cfg(0), 8, INT_ENB, 0),
                h.write(CFG, 8, ENABLE, 0), h.tick(100)),
     "HPET: timer 0 fires with interrupt route 0, which Tn_INT_ROUTE_CAP (0x4) does not allow"),
])
def test_what_is_not_modelled_raises_naming_it(op: object, message: str) -> None:
    h = Hpet(cpu_mhz=2400)
    with pytest.raises(HpetUnsupported) as info:
        op(h)  # type: ignore[operator]
    assert str(info.value).startswith(message)
    assert isinstance(info.value, Unsupported)


def test_all_mutable_state_is_one_dataclass_that_save_and_restore_copy_whole(rig: Rig) -> None:
    rig.hpet.write(tn_cmp(0), 8, 2, 0)
    rig.hpet.write(tn_cfg(0), 8, LEVEL | INT_ENB | ROUTE2, 0)
    rig.start(at=0)
    rig.hpet.tick(2 * CYCLES_PER_TICK)
    saved = rig.hpet.save()
    assert saved == HpetState(config=ENABLE, status=1, counter=0, counter_cycle=0, seen=2,
                              now=48, asserted=1 << 2,
                              timers=[HpetTimerState(LEVEL | INT_ENB | ROUTE2, 2, 0),
                                      HpetTimerState(), HpetTimerState()])
    rig.hpet.write(STATUS, 8, 1, 100)
    rig.hpet.restore(saved)
    assert rig.hpet.state == saved and rig.hpet.state.timers is not saved.timers
    assert {f.name for f in dataclasses.fields(HpetState)} == {
        "config", "status", "counter", "counter_cycle", "seen", "now", "asserted", "timers"}
    # The rest is configuration and wiring, fixed at construction.
    assert set(vars(rig.hpet)) == {"state", "cpu_mhz", "on_irq", "on_event", "_num", "_den"}
