"""cpu.devices.ioapic: the 82093AA register windows, redirection entries, edge and level
inputs, remote IRR and the EOI broadcast (82093AA datasheet; the checks kvm-unit-tests'
x86/ioapic.c makes on one CPU). No engine involved."""

from __future__ import annotations

import dataclasses

import pytest

from cpu.devices.ioapic import (
    IOAPIC_BASE,
    IOAPIC_SIZE,
    Ioapic,
    IoapicMessage,
    IoapicState,
    IoapicUnsupported,
    isa_irq_to_pin,
)
from cpu.errors import Unsupported

IOREGSEL, IOWIN = 0x00, 0x10
ID, VER, ARB = 0x00, 0x01, 0x02
LEVEL, MASKED, REMOTE_IRR, DELIVERY_STATUS = 1 << 15, 1 << 16, 1 << 14, 1 << 12


class Rig:
    """An IOAPIC and the messages it sent."""

    def __init__(self) -> None:
        self.sent: list[IoapicMessage] = []
        self.io = Ioapic(on_message=self.sent.append)

    def reg(self, index: int) -> int:
        self.io.write(IOREGSEL, 4, index)
        return self.io.read(IOWIN, 4)

    def set_reg(self, index: int, value: int) -> None:
        self.io.write(IOREGSEL, 4, index)
        self.io.write(IOWIN, 4, value)

    def set_entry(self, pin: int, vector: int, *, level: bool = False, masked: bool = False,
                  high: int = 0) -> None:
        """As lib/x86/apic.c ioapic_write_redir: the low half, then the high half."""
        self.set_reg(0x10 + 2 * pin, vector | (LEVEL if level else 0) | (MASKED if masked else 0))
        self.set_reg(0x11 + 2 * pin, high)

    def vectors(self) -> list[int]:
        return [m.vector for m in self.sent]


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_the_page_is_at_0xfec00000_and_4_kib_long() -> None:
    assert (IOAPIC_BASE, IOAPIC_SIZE) == (0xFEC00000, 0x1000)


def test_the_version_register_says_0x11_with_23_as_the_highest_entry_and_is_read_only(rig: Rig) -> None:
    assert rig.reg(VER) == 0x00170011
    rig.set_reg(VER, 0x00170011 ^ 0xFFFFFFFF)
    assert rig.reg(VER) == 0x00170011


def test_only_id_bits_27_to_24_are_writable(rig: Rig) -> None:
    before = rig.reg(ID)
    rig.set_reg(ID, before ^ 0xFFFFFFFF)
    assert before ^ rig.reg(ID) == 0x0F000000  # kvm-unit-tests ioapic_reg_id


def test_writing_the_id_loads_the_arbitration_id_which_is_read_only(rig: Rig) -> None:
    rig.set_reg(ID, 0x0F000000)
    assert rig.reg(ARB) == 0x0F000000
    rig.set_reg(ARB, 0)
    assert rig.reg(ARB) == 0x0F000000  # kvm-unit-tests ioapic_arbitration_id


def test_the_id_given_at_construction_reads_back_in_bits_27_to_24() -> None:
    io = Ioapic(ioapic_id=5)
    io.write(IOREGSEL, 4, ID)
    assert io.read(IOWIN, 4) == 0x05000000
    with pytest.raises(ValueError, match="does not fit bits 27:24"):
        Ioapic(ioapic_id=16)


def test_out_of_reset_every_entry_is_masked_and_otherwise_zero(rig: Rig) -> None:
    assert [rig.reg(0x10 + i) for i in range(48)] == [MASKED, 0] * 24


def test_ioregsel_keeps_its_8_bits_and_reads_back(rig: Rig) -> None:
    rig.io.write(IOREGSEL, 4, 0x12345613)
    assert rig.io.read(IOREGSEL, 4) == 0x13
    rig.io.write(IOREGSEL, 1, 0x11)
    assert rig.io.read(IOREGSEL, 1) == 0x11


def test_an_entry_reads_back_every_bit_written_but_the_read_only_ones(rig: Rig) -> None:
    rig.set_reg(0x10 + 2 * 3, 0xFFFFFFFF & ~LEVEL)
    rig.set_reg(0x11 + 2 * 3, 0xAB000000)
    assert rig.reg(0x10 + 2 * 3) == 0xFFFFFFFF & ~(LEVEL | REMOTE_IRR | DELIVERY_STATUS)
    assert rig.io.entry(3) == 0xAB000000_FFFF2FFF & ~LEVEL


def test_an_edge_on_an_unmasked_pin_sends_the_entrys_message_once(rig: Rig) -> None:
    # Vector 0x76, lowest priority (001), logical, destination 0x03.
    rig.set_reg(0x10 + 2 * 14, 0x76 | (0b001 << 8) | (1 << 11))
    rig.set_reg(0x11 + 2 * 14, 0x03000000)
    rig.io.set_irq(14, True)
    rig.io.set_irq(14, False)
    assert rig.sent == [IoapicMessage(pin=14, vector=0x76, delivery_mode=0b001, logical=True,
                                      destination=0x03, level=False)]
    assert rig.sent[0].mode_name == "lowest priority"
    assert rig.io.entry(14) & (DELIVERY_STATUS | REMOTE_IRR) == 0  # delivery is instant


def test_holding_an_edge_input_asserted_is_not_another_edge(rig: Rig) -> None:
    rig.set_entry(14, 0x76)
    rig.io.set_irq(14, True)
    rig.io.set_irq(14, True)
    rig.io.set_irq(14, False)
    rig.io.set_irq(14, True)
    assert rig.vectors() == [0x76, 0x76]


def test_an_edge_on_a_masked_pin_is_lost_even_after_unmasking(rig: Rig) -> None:
    # kvm-unit-tests test_ioapic_edge_mask, and the datasheet's "Interrupt Mask".
    rig.set_entry(14, 0x81, masked=True)
    rig.io.set_irq(14, True)
    rig.io.set_irq(14, False)
    rig.set_entry(14, 0x81)
    assert rig.sent == []
    rig.io.set_irq(14, True)
    assert rig.vectors() == [0x81]


def test_a_level_interrupt_sets_remote_irr_and_is_coalesced_until_its_eoi(rig: Rig) -> None:
    # kvm-unit-tests test_ioapic_level_coalesce: the handler lowers and raises the line
    # again, then lowers it, then EOIs: one delivery.
    rig.set_entry(14, 0x98, level=True)
    rig.io.set_irq(14, True)
    assert rig.sent == [IoapicMessage(pin=14, vector=0x98, delivery_mode=0, logical=False,
                                      destination=0, level=True)]
    assert rig.reg(0x10 + 2 * 14) == 0x98 | LEVEL | REMOTE_IRR
    rig.io.set_irq(14, False)
    rig.io.set_irq(14, True)
    rig.io.set_irq(14, False)
    rig.io.eoi(0x98)
    assert rig.vectors() == [0x98]
    assert rig.reg(0x10 + 2 * 14) == 0x98 | LEVEL


def test_a_level_input_still_asserted_at_its_eoi_is_sent_again(rig: Rig) -> None:
    # kvm-unit-tests test_ioapic_level_retrigger.
    rig.set_entry(14, 0x9A, level=True)
    rig.io.set_irq(14, True)
    rig.io.eoi(0x9A)
    assert rig.vectors() == [0x9A, 0x9A]
    assert rig.io.entry(14) & REMOTE_IRR


def test_an_eoi_for_another_vector_leaves_remote_irr_set(rig: Rig) -> None:
    rig.set_entry(14, 0x9A, level=True)
    rig.io.set_irq(14, True)
    rig.io.eoi(0x9B)
    assert rig.vectors() == [0x9A]
    assert rig.io.entry(14) & REMOTE_IRR


def test_a_level_raised_again_after_its_eoi_is_a_second_interrupt(rig: Rig) -> None:
    # kvm-unit-tests test_ioapic_level_sequential: the handler lowers the line and EOIs.
    rig.set_entry(14, 0x99, level=True)
    rig.io.set_irq(14, True)
    rig.io.set_irq(14, False)
    rig.io.eoi(0x99)
    rig.io.set_irq(14, True)
    assert rig.vectors() == [0x99, 0x99]


def test_a_masked_asserted_level_input_is_sent_when_unmasked(rig: Rig) -> None:
    # kvm-unit-tests test_ioapic_level_mask.
    rig.set_entry(14, 0x82, level=True, masked=True)
    rig.io.set_irq(14, True)
    assert rig.sent == []
    rig.set_entry(14, 0x82, level=True)
    assert rig.vectors() == [0x82]


def test_masking_in_the_handler_then_unmasking_sends_the_still_asserted_level_again(rig: Rig) -> None:
    # kvm-unit-tests test_ioapic_level_retrigger_mask: the handler masks and EOIs.
    rig.set_entry(14, 0x83, level=True)
    rig.io.set_irq(14, True)
    rig.set_entry(14, 0x83, level=True, masked=True)
    rig.io.eoi(0x83)
    assert rig.vectors() == [0x83]
    rig.set_entry(14, 0x83, level=True)
    assert rig.vectors() == [0x83, 0x83]


def test_making_an_entry_edge_triggered_clears_its_remote_irr(rig: Rig) -> None:
    # What Linux's __eoi_ioapic_pin does on IOAPICs without an EOI register.
    rig.set_entry(14, 0x64, level=True)
    rig.io.set_irq(14, True)
    rig.io.set_irq(14, False)
    assert rig.io.entry(14) & REMOTE_IRR
    rig.set_reg(0x10 + 2 * 14, 0x64 | MASKED)
    assert rig.io.entry(14) & REMOTE_IRR == 0


def test_a_write_to_a_level_entry_keeps_its_remote_irr(rig: Rig) -> None:
    rig.set_entry(14, 0x64, level=True)
    rig.io.set_irq(14, True)
    rig.set_reg(0x11 + 2 * 14, 0x01000000)  # kvm-unit-tests ioapic_reconfigure_dest
    assert rig.reg(0x10 + 2 * 14) == 0x64 | LEVEL | REMOTE_IRR
    assert rig.vectors() == [0x64]


def test_level_messages_released_by_one_write_come_out_in_pin_order(rig: Rig) -> None:
    for pin, vector in ((9, 0x59), (3, 0x53)):
        rig.set_entry(pin, vector, level=True, masked=True)
        rig.io.set_irq(pin, True)
    rig.set_entry(9, 0x59, level=True)  # unmasking 9 services every level input
    rig.set_entry(3, 0x53, level=True)
    assert rig.vectors() == [0x59, 0x53]
    rig.io.eoi(0x59)
    rig.io.eoi(0x53)
    assert rig.vectors() == [0x59, 0x53, 0x59, 0x53]


def test_isa_irq_0_reaches_input_2_and_the_others_their_own() -> None:
    assert [isa_irq_to_pin(i) for i in (0, 1, 8, 14, 15)] == [2, 1, 8, 14, 15]


@pytest.mark.parametrize(("op", "message"), [
    (lambda io: io.read(IOWIN, 1), "IOAPIC: 1-byte read of IOWIN (only 32-bit accesses to IOWIN "
                                   "are defined)"),
    (lambda io: io.write(IOWIN, 8, 0), "IOAPIC: 8-byte write of IOWIN"),
    (lambda io: io.read(0x40, 4), "IOAPIC: read at offset 0x40 (4 bytes): only IOREGSEL (0x00) "
                                  "and IOWIN (0x10) exist"),
    (lambda io: (io.write(IOREGSEL, 4, 0x03), io.read(IOWIN, 4)),
     "IOAPIC: read of register 0x03 through IOWIN (reserved: the registers are 0x00-0x02 and "
     "0x10-0x3f)"),
    (lambda io: (io.write(IOREGSEL, 4, 0x40), io.write(IOWIN, 4, 1)),
     "IOAPIC: write of register 0x40 through IOWIN"),
    (lambda io: io.set_irq(24, True), "IOAPIC: input 24 does not exist (inputs 0-23)"),
])
def test_what_is_not_modelled_raises_naming_it(op: object, message: str) -> None:
    io = Ioapic()
    with pytest.raises(IoapicUnsupported) as info:
        op(io)  # type: ignore[operator]
    assert str(info.value).startswith(message)
    assert isinstance(info.value, Unsupported)


def test_all_mutable_state_is_one_dataclass_that_save_and_restore_copy_whole(rig: Rig) -> None:
    rig.set_entry(14, 0x98, level=True)
    rig.io.set_irq(14, True)
    saved = rig.io.save()
    assert saved == IoapicState(id=0, arbitration=0, ioregsel=0x11 + 2 * 14,
                                redirection=[MASKED] * 14 + [0x98 | LEVEL | REMOTE_IRR]
                                + [MASKED] * 9, pins=1 << 14)
    rig.io.eoi(0x98)
    rig.set_reg(ID, 0x07000000)
    rig.io.restore(saved)
    assert rig.io.state == saved and rig.io.state is not saved
    assert rig.io.state.redirection is not saved.redirection
    # Nothing mutable outside `state`: the other attributes are the message sink only.
    assert {f.name for f in dataclasses.fields(IoapicState)} == {"id", "arbitration", "ioregsel",
                                                                 "redirection", "pins"}
    assert set(vars(rig.io)) == {"state", "on_message"}
