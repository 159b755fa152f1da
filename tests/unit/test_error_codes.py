"""idt.error_codes: the selector format names IDT entries by vector (v<<3), never v*16."""

from __future__ import annotations

import pytest

from idt.error_codes import EXT, IDT, TI, PFErr, idt_error_code, selector_code, selector_error_code


def test_int_0x80_into_a_dpl0_gate_reports_0x402_not_qemus_0x802() -> None:
    assert idt_error_code(0x80, ext=False) == 0x402


def test_an_nmi_through_a_not_present_gate_reports_0x13() -> None:
    assert idt_error_code(2, ext=True) == 0x13


def test_irq_0x20_through_a_not_present_gate_reports_0x103() -> None:
    assert idt_error_code(0x20, ext=True) == 0x103


@pytest.mark.parametrize("vector", [0, 1, 8, 13, 14, 0x80, 0xFF])
def test_the_idt_code_is_the_vector_shifted_by_three_with_the_idt_bit(vector: int) -> None:
    assert idt_error_code(vector, ext=False) == (vector << 3) | 2
    assert idt_error_code(vector, ext=True) == (vector << 3) | 3


def test_the_flag_bits_are_ext_idt_ti() -> None:
    assert (EXT, IDT, TI) == (1, 2, 4)
    assert selector_error_code(5, ti=True, ext=True) == 0x2D


@pytest.mark.parametrize("index", [-1, 0x2000])
def test_an_index_wider_than_13_bits_is_refused(index: int) -> None:
    with pytest.raises(ValueError):
        selector_error_code(index)


@pytest.mark.parametrize(("selector", "ext", "code"), [
    (0x1B, False, 0x18), (0x1B, True, 0x19), (0x0C, True, 0x0D), (0x0, True, 0x1),
    (0xFFFF, False, 0xFFFC),
])
def test_a_selector_code_drops_the_rpl_keeps_ti_and_ors_ext(selector: int, ext: bool,
                                                           code: int) -> None:
    assert selector_code(selector, ext=ext) == code


def test_the_page_fault_bits_are_where_the_sdm_puts_them() -> None:
    assert [int(b) for b in (PFErr.P, PFErr.W, PFErr.U, PFErr.RSVD, PFErr.ID, PFErr.PK,
                             PFErr.SS, PFErr.SGX)] == [1, 2, 4, 8, 16, 32, 64, 0x8000]
