"""The pure real-address-mode delivery model (idt/real_mode.py): the IVT entry and its
limit check, the three-word frame at SS:SP with SP wrapping, the flags cleared, the
#SS of a push across the stack limit and the #DF/shutdown chain."""

from __future__ import annotations

import pytest

from idt.real_mode import RealModeCpu, deliver_once, deliver_real
from idt.state import ArchFault, Event, Source
from idt.vectors import Vector


class Ivt:
    """1 MiB of physical memory holding an IVT whose entry n is n*0x10:n (offset n)."""

    def read(self, address: int, size: int) -> bytes:
        out = bytearray()
        for a in range(address, address + size):
            entry, byte = divmod(a, 4)
            word = entry if byte < 2 else entry * 0x10
            out.append((word >> (8 * (byte & 1))) & 0xFF)
        return bytes(out)


def cpu(**kw: int | bool) -> RealModeCpu:
    base: dict[str, int | bool] = {"eflags": 0x00050B03, "cs": 0x1234, "esp": 0xABCD7000,
                                   "ss_base": 0x20000}
    base.update(kw)
    return RealModeCpu(**base)  # type: ignore[arg-type]


def test_an_int_n_pushes_flags_cs_ip_and_loads_the_ivt_entry() -> None:
    d = deliver_once(Ivt(), cpu(), Event(0x21, Source.SOFTWARE, 0x0102, 0x0100))
    assert (d.new_cs, d.new_ip) == (0x210, 0x21)
    assert (d.ip, d.cs, d.flags) == (0x0102, 0x1234, 0x0B03)
    # Only SP changes: ESP's high half stays.
    assert (d.old_esp, d.new_esp) == (0xABCD7000, 0xABCD6FFA)
    assert d.slots == (0x26FFA, 0x26FFC, 0x26FFE)
    assert d.frame_address == 0x26FFA
    assert d.frame == bytes([0x02, 0x01, 0x34, 0x12, 0x03, 0x0B])
    # IF (bit 9), TF (bit 8), AC (bit 18) and RF (bit 16) cleared; the rest stays.
    assert d.new_eflags == 0x00000803  # OF, CF and bit 1 stay


def test_sp_0_wraps_the_frame_to_the_top_of_the_segment() -> None:
    d = deliver_once(Ivt(), cpu(esp=0x0000), Event(3, Source.SOFTWARE, 0x51, 0x50))
    assert d.new_esp == 0xFFFA
    assert d.slots == (0x2FFFA, 0x2FFFC, 0x2FFFE)


def test_sp_2_splits_the_frame_across_the_wrap() -> None:
    d = deliver_once(Ivt(), cpu(esp=0x0002), Event(3, Source.SOFTWARE, 0x51, 0x50))
    assert d.new_esp == 0xFFFC
    assert d.slots == (0x2FFFC, 0x2FFFE, 0x20000)  # IP, CS at the top; FLAGS at offset 0


def test_sp_1_is_ss_because_the_first_word_crosses_the_limit() -> None:
    with pytest.raises(ArchFault) as info:
        deliver_once(Ivt(), cpu(esp=1), Event(3, Source.SOFTWARE, 0x51, 0x50))
    assert (info.value.vector, info.value.error_code) == (Vector.SS, 0)


def test_sp_1_ends_in_shutdown_as_the_push_note_of_the_sdm_says() -> None:
    out = deliver_real(Ivt(), cpu(esp=1), Event(Vector.DE, Source.EXCEPTION, 0x40, 0x40))
    assert out.delivery is None
    assert [(int(n.during.vector), n.fault.vector, n.action.value) for n in out.nested] == [
        (0, 12, "double-fault"), (8, 12, "shutdown")]
    assert out.double_fault_of == (0, 12)


def test_a_32_bit_stack_uses_esp() -> None:
    d = deliver_once(Ivt(), cpu(esp=0x12340004, stack_32=True, ss_base=0, ss_limit=0xFFFFFFFF),
                     Event(3, Source.SOFTWARE, 0x51, 0x50))
    assert d.new_esp == 0x1233FFFE
    assert d.slots == (0x1233FFFE, 0x12340000, 0x12340002)


def test_the_ivt_limit_check_covers_all_four_bytes_of_the_entry() -> None:
    ok = deliver_once(Ivt(), cpu(idtr_limit=0x87), Event(0x21, Source.SOFTWARE, 2, 0))
    assert ok.new_ip == 0x21  # bytes 0x84-0x87
    with pytest.raises(ArchFault) as info:
        deliver_once(Ivt(), cpu(idtr_limit=0x86), Event(0x21, Source.SOFTWARE, 2, 0))
    assert (info.value.vector, info.value.error_code) == (Vector.GP, 0)


def test_the_ivt_is_read_at_the_idtr_base() -> None:
    d = deliver_once(Ivt(), cpu(idtr_base=0x400), Event(2, Source.NMI, 0x77, 0x77))
    assert (d.new_cs, d.new_ip) == (0x1020, 0x102)  # entry 0x102 of the fake memory


def test_an_int_n_past_the_limit_becomes_gp_through_the_ivt_pushing_the_int_s_ip() -> None:
    out = deliver_real(Ivt(), cpu(idtr_limit=0x3F), Event(0x21, Source.SOFTWARE, 0x0102, 0x0100))
    d = out.delivery
    assert d is not None
    assert (d.event.vector, d.event.source, d.ip, d.new_ip) == (Vector.GP, Source.EXCEPTION,
                                                                 0x0100, 13)
    assert [(n.fault.vector, n.action.value) for n in out.nested] == [(13, "serial")]
    assert out.double_fault_of is None


def test_an_exception_past_the_limit_is_df_and_a_limit_below_df_is_shutdown() -> None:
    df = deliver_real(Ivt(), cpu(idtr_limit=0x27), Event(Vector.GP, Source.EXCEPTION, 9, 9))
    assert df.delivery is not None and df.delivery.event.vector == Vector.DF
    assert df.double_fault_of == (13, 13)
    assert df.delivery.ip == 9  # no error code: the frame is the same three words
    down = deliver_real(Ivt(), cpu(idtr_limit=0), Event(0x30, Source.SOFTWARE, 2, 0))
    assert down.delivery is None
    assert down.shutdown_reason == ("triple fault: #GP(0x0): IVT entry 0x8 (bytes 0x20-0x23) "
                                    "is past the IDTR limit 0x0 while delivering #DF")
