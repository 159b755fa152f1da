"""The 8259A pair (cpu/devices/pic.py): initialisation, masking, priority, EOI, the
edge latch, level mode, the cascade vector, spurious IRQ 7/15, polling, the ELCR, and
the reset state a PC firmware leaves."""

from __future__ import annotations

import pytest

from cpu.devices.pic import Pic8259Pair, PicUnsupported


def pair() -> tuple[Pic8259Pair, list[bool]]:
    seen: list[bool] = []
    return Pic8259Pair(on_intr=seen.append), seen


def irr(p: Pic8259Pair, port: int) -> int:
    p.port_write(port, 1, 0x0A)  # OCW3: read IRR
    return p.port_read(port, 1)


def isr(p: Pic8259Pair, port: int) -> int:
    p.port_write(port, 1, 0x0B)  # OCW3: read ISR
    return p.port_read(port, 1)


def test_the_reset_state_is_what_a_pc_bios_programs_with_every_line_unmasked() -> None:
    p, seen = pair()
    st = p.state
    assert (st.master.irq_base, st.slave.irq_base) == (0x08, 0x70)
    assert (st.master.imr, st.slave.imr, st.master.init_state, st.slave.init_state) == (0, 0, 0, 0)
    assert (st.master.auto_eoi, st.master.elcr, st.slave.elcr) == (False, 0, 0)
    assert (p.port_read(0x21, 1), p.port_read(0xA1, 1)) == (0, 0)
    assert (p.intr, seen, p.pending_vector()) == (False, [], None)


def test_an_icw_sequence_sets_the_vector_bases_and_ocw1_the_masks() -> None:
    p = Pic8259Pair(firmware=False)
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFB),
                        (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01), (0xA1, 0xFF)):
        p.port_write(port, 1, value)
    assert (p.state.master.irq_base, p.state.slave.irq_base) == (0x20, 0x28)
    assert (p.port_read(0x21, 1), p.port_read(0xA1, 1)) == (0xFB, 0xFF)
    p.set_irq(9, True)                 # masked on the slave: latched, not raised
    assert (irr(p, 0xA0), p.intr) == (0x02, False)
    p.port_write(0xA1, 1, 0xFD)        # unmask IRQ 9
    assert (p.intr, p.acknowledge()) == (True, 0x29)


def test_an_edge_stays_latched_after_the_line_drops_until_inta() -> None:
    p, seen = pair()
    p.set_irq(11, True)
    p.set_irq(11, False)
    assert (irr(p, 0xA0), irr(p, 0x20), p.intr, seen) == (0x08, 0x04, True, [True])
    assert p.acknowledge() == 0x73    # slave base 0x70 + 3, through the cascade on IR2
    assert (isr(p, 0xA0), isr(p, 0x20), irr(p, 0xA0), irr(p, 0x20)) == (0x08, 0x04, 0, 0)
    assert (p.intr, seen) == (False, [True, False])
    p.set_irq(11, True)               # no EOI yet: IRQ 11 is in service, nothing is raised
    assert p.intr is False
    p.port_write(0xA0, 1, 0x20)       # non-specific EOI to both chips
    p.port_write(0x20, 1, 0x20)
    assert (p.intr, p.acknowledge()) == (True, 0x73)  # the new edge


def test_a_line_held_high_raises_only_once_per_edge() -> None:
    p, _ = pair()
    p.set_irq(3, True)
    assert p.acknowledge() == 0x0B
    p.port_write(0x20, 1, 0x20)
    p.set_irq(3, True)                # still high: not an edge
    assert (p.intr, irr(p, 0x20)) == (False, 0)


def test_a_level_triggered_line_follows_the_line_and_survives_inta() -> None:
    p, _ = pair()
    p.port_write(0x4D1, 1, 0x08)      # ELCR: IRQ 11 level-triggered
    assert p.port_read(0x4D1, 1) == 0x08
    p.set_irq(11, True)
    assert p.acknowledge() == 0x73
    assert irr(p, 0xA0) == 0x08       # INTA does not clear a level request
    p.set_irq(11, False)
    assert irr(p, 0xA0) == 0


def test_the_elcr_cannot_make_irq_0_1_2_8_or_13_level_triggered() -> None:
    p, _ = pair()
    p.port_write(0x4D0, 2, 0xFFFF)
    assert (p.port_read(0x4D0, 1), p.port_read(0x4D1, 1)) == (0xF8, 0xDE)


def test_the_lowest_input_has_priority_and_an_in_service_one_holds_lower_ones() -> None:
    p, _ = pair()
    p.set_irq(5, True)
    p.set_irq(1, True)
    assert p.acknowledge() == 0x09    # IR1 before IR5
    assert p.intr is False            # IR5 is below IR1 in service
    p.set_irq(0, True)                # IR0 is above it: nested
    assert p.acknowledge() == 0x08
    assert isr(p, 0x20) == 0x03
    p.port_write(0x20, 1, 0x20)       # EOI clears the highest in service: IR0
    assert isr(p, 0x20) == 0x02
    p.port_write(0x20, 1, 0x61)       # specific EOI of IR1
    assert (isr(p, 0x20), p.acknowledge()) == (0, 0x0D)


def test_a_slave_request_ranks_at_the_cascade_input_of_the_master() -> None:
    p, _ = pair()
    p.set_irq(8, True)                # slave IR0: the master's IR2
    p.set_irq(3, True)
    assert p.acknowledge() == 0x70    # IR2 (from the slave) before IR3
    assert p.intr is False            # IR3 is below IR2, which is in service
    p.port_write(0x20, 1, 0x20)       # EOI to the master only
    assert p.acknowledge() == 0x0B


def test_rotation_makes_the_input_after_the_serviced_one_highest() -> None:
    p, _ = pair()
    p.set_irq(1, True)
    assert p.acknowledge() == 0x09
    p.port_write(0x20, 1, 0xA0)       # rotate on non-specific EOI: IR2 now highest
    p.set_irq(0, True)
    p.set_irq(4, True)
    assert p.acknowledge() == 0x0C    # IR4 comes before IR0 now


def test_masked_inputs_latch_and_an_unmask_raises_them() -> None:
    p, seen = pair()
    p.port_write(0x21, 1, 0x10)
    p.set_irq(4, True)
    assert (p.intr, seen) == (False, [])
    p.port_write(0x21, 1, 0x00)
    assert (p.intr, seen) == (True, [True])


def test_inta_with_nothing_requested_is_a_spurious_irq_7_or_15() -> None:
    p, _ = pair()
    assert p.acknowledge() == 0x0F    # spurious on the master: IR7's vector, no ISR bit
    assert isr(p, 0x20) == 0
    p.port_write(0x4D1, 1, 0x08)      # level-triggered IRQ 11, removed before INTA
    p.set_irq(11, True)
    assert p.intr is True
    p.state.slave.irr = 0             # the request goes away between INT and INTA
    assert p.acknowledge() == 0x77    # spurious on the slave: IRQ 15's vector
    assert (isr(p, 0xA0), isr(p, 0x20)) == (0, 0x04)  # the master still took IR2


def test_a_poll_reads_the_highest_request_and_acknowledges_it() -> None:
    p, _ = pair()
    p.set_irq(6, True)
    p.port_write(0x20, 1, 0x0C)       # OCW3: poll
    assert p.port_read(0x20, 1) == 0x86
    assert (isr(p, 0x20), p.intr) == (0x40, False)
    p.port_write(0x20, 1, 0x0C)
    assert p.port_read(0x20, 1) == 0  # nothing requested


def test_auto_eoi_sets_no_in_service_bit() -> None:
    p = Pic8259Pair(firmware=False)
    for port, value in ((0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x03), (0x21, 0)):
        p.port_write(port, 1, value)
    p.set_irq(1, True)
    assert (p.acknowledge(), isr(p, 0x20)) == (0x09, 0)


def test_single_mode_and_mcs80_mode_are_not_modelled() -> None:
    p, _ = pair()
    with pytest.raises(PicUnsupported, match="single mode"):
        p.port_write(0x20, 1, 0x13)
    p.port_write(0x20, 1, 0x11)
    p.port_write(0x21, 1, 0x08)
    p.port_write(0x21, 1, 0x04)
    with pytest.raises(PicUnsupported, match="MCS-80/85"):
        p.port_write(0x21, 1, 0x00)
