"""cpu.debug_registers: breakpoint matching per DR7 (L/G, R/W, LEN, CR4.DE), DR6 on a #DB
(B0-B3 replaced, BD/BS/BT sticky), GD, MOV SS holding a data breakpoint, MOV DR faults.
The DR7 values are the ones guest_images/mb/debug_regs.S writes; the DR6 values the ones
Bochs 2.7 printed for it (tests/differential/bochs/debug_regs.log)."""

from __future__ import annotations

from cpu.debug_registers import (
    DB,
    DR6_BD,
    DR6_BS,
    DR6_INIT,
    DR7_GD,
    DR7_INIT,
    GP,
    UD,
    BreakKind,
    DebugRegisters,
    mov_dr_fault,
)

DATA = 0x10_2000


def regs(dr7: int, **addresses: int) -> DebugRegisters:
    d = DebugRegisters(dr7=DR7_INIT | dr7)
    for name, value in addresses.items():
        d.addresses[int(name[2])] = value
    return d


def test_a_disabled_breakpoint_matches_nothing() -> None:
    d = regs(0x0, dr0=DATA)
    assert d.breakpoint(0) is None
    assert d.instruction_hits(DATA) == 0
    assert d.data_hits(DATA, 8, write=True) == 0


def test_l1_execute_matches_the_first_byte_of_the_instruction_only() -> None:
    d = regs(0x4, dr1=0x10_0160)  # L1, R/W1 = 00, LEN1 = 00
    assert d.instruction_hits(0x10_0160) == 0b0010
    assert d.instruction_hits(0x10_0161) == 0
    assert d.data_hits(0x10_0160, 1, write=False) == 0


def test_rf_suppresses_the_instruction_breakpoint() -> None:
    d = regs(0x1, dr0=0x10_0160)
    assert d.instruction_hits(0x10_0160, rf=True) == 0


def test_g_enables_as_l_does() -> None:
    assert regs(0x2, dr0=0x5000).instruction_hits(0x5000) == 0b0001


def test_a_write_breakpoint_of_8_bytes_fires_on_writes_only() -> None:
    d = regs(0x1 | (0x1 << 16) | (0x2 << 18), dr0=DATA)  # 0x90001: L0, write, 8 bytes
    assert d.breakpoint(0) is not None and d.breakpoint(0).kind is BreakKind.WRITE
    assert d.data_hits(DATA, 8, write=True) == 0b0001
    assert d.data_hits(DATA + 7, 1, write=True) == 0b0001
    assert d.data_hits(DATA + 8, 8, write=True) == 0
    assert d.data_hits(DATA, 8, write=False) == 0


def test_a_read_write_breakpoint_fires_on_a_read() -> None:
    d = regs(0x10 | (0x3 << 24) | (0x3 << 26), dr2=DATA + 8)  # L2, RW, 4 bytes
    assert d.data_hits(DATA + 8, 4, write=False) == 0b0100
    assert d.data_hits(DATA + 11, 1, write=True) == 0b0100
    assert d.data_hits(DATA + 12, 4, write=False) == 0


def test_a_two_byte_range_is_hit_by_any_overlapping_byte() -> None:
    d = regs(0x40 | (0x1 << 28) | (0x1 << 30), dr3=DATA + 18)  # L3, write, 2 bytes
    assert d.data_hits(DATA + 16, 4, write=True) == 0b1000
    assert d.data_hits(DATA + 20, 1, write=True) == 0
    assert d.data_hits(DATA + 17, 1, write=True) == 0


def test_the_low_address_bits_are_ignored_for_the_range() -> None:
    d = regs(0x1 | (0x1 << 16) | (0x3 << 18), dr0=DATA + 6)  # 4 bytes at DATA+4..+7
    assert d.data_hits(DATA + 4, 1, write=True) == 0b0001
    assert d.data_hits(DATA + 8, 1, write=True) == 0


def test_an_io_breakpoint_needs_cr4_de() -> None:
    d = regs(0x10 | (0x2 << 24), dr2=0x80)  # L2, I/O, 1 byte
    assert d.io_hits(0x80, 1, cr4_de=True) == 0b0100
    assert d.io_hits(0x80, 1, cr4_de=False) == 0
    assert d.io_hits(0x7F, 2, cr4_de=True) == 0b0100
    assert d.io_hits(0x81, 1, cr4_de=True) == 0
    assert d.data_hits(0x80, 1, write=True) == 0


def test_several_breakpoints_report_together() -> None:
    d = regs(0x1 | 0x4 | (0x1 << 16) | (0x3 << 20), dr0=DATA, dr1=DATA)
    assert d.data_hits(DATA, 1, write=True) == 0b0011


def test_a_db_replaces_b0_to_b3_and_keeps_bs_and_bd() -> None:
    d = DebugRegisters()
    assert d.commit(bs=True) == 0xFFFF4FF0            # single step
    assert d.commit(0b0010) == 0xFFFF4FF2             # then DR1: BS is sticky
    assert d.commit(0b0001) == 0xFFFF4FF1             # B1 gone, B0 new
    assert d.commit(bd=True) == DR6_INIT | DR6_BS | DR6_BD


def test_single_step_and_a_data_breakpoint_are_one_db() -> None:
    assert DebugRegisters().commit(0b0001, bs=True) == 0xFFFF4FF1


def test_general_detect_faults_the_next_mov_dr_and_is_cleared_on_entry() -> None:
    d = DebugRegisters(dr7=DR7_INIT | DR7_GD)
    assert mov_dr_fault(0, cpl=0, cr4_de=False, dr7=d.dr7, write=False) == DB
    assert d.commit(bd=True) == 0xFFFF2FF0
    assert d.dr7 == 0x400
    assert mov_dr_fault(0, cpl=0, cr4_de=False, dr7=d.dr7, write=False) is None


def test_mov_dr_faults_in_the_sdm_order() -> None:
    gd = DR7_INIT | DR7_GD
    assert mov_dr_fault(7, cpl=3, cr4_de=True, dr7=gd, write=True) == GP
    assert mov_dr_fault(4, cpl=0, cr4_de=True, dr7=gd, write=False) == UD
    assert mov_dr_fault(4, cpl=0, cr4_de=False, dr7=gd, write=False) == DB
    assert mov_dr_fault(7, cpl=0, cr4_de=False, dr7=DR7_INIT, write=True, value=1 << 32) == GP
    assert mov_dr_fault(0, cpl=0, cr4_de=False, dr7=DR7_INIT, write=True, value=1 << 63) is None


def test_writes_keep_the_reserved_bits_and_dr4_dr5_alias_dr6_dr7() -> None:
    d = DebugRegisters()
    d.write(6, 0)
    assert d.read(6) == DR6_INIT
    d.write(7, 0x1 | 0x400 | (1 << 12) | (1 << 14))
    assert d.read(7) == 0x401
    d.write(4, 0xF)
    assert d.read(6) == 0xFFFF0FFF
    assert d.read(5) == d.read(7)


def test_a_data_breakpoint_hit_by_mov_ss_is_held_for_one_instruction() -> None:
    d = regs(0x1 | (0x3 << 16) | (0x1 << 18), dr0=DATA)  # 0x70001: L0, RW, 2 bytes
    d.hold(d.data_hits(DATA, 2, write=False))
    assert d.held == 0b0001
    assert d.commit(d.release()) == 0xFFFF0FF1
    assert d.held == 0
