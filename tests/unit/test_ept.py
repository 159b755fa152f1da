"""cpu/ept.py without an engine: the identity map, rights as the AND along the walk, which
entry's suppress-#VE bit a violation reports, splitting, misconfigurations, and the
generation counter (SDM Vol. 3C "EPT Translation Mechanism", "EPT Violations",
"EPT Misconfigurations")."""

from __future__ import annotations

import pytest

from cpu.ept import (
    EPT_LARGE,
    EPT_MT_WB,
    EPT_R,
    EPT_RWX,
    EPT_SUPPRESS_VE,
    EPT_W,
    EPT_X,
    Ept,
    EptMisconfig,
    EptViolation,
)
from cpu.mmu import Access

MIB = 1 << 20
GIB = 1 << 30
MEM = 16 * MIB


def violation(ept: Ept, gpa: int, access: Access) -> EptViolation:
    with pytest.raises(EptViolation) as info:
        ept.translate(gpa, access)
    return info.value


@pytest.fixture
def ept() -> Ept:
    return Ept(MEM)


# -- the identity map ------------------------------------------------------------------


@pytest.mark.parametrize("access", list(Access))
@pytest.mark.parametrize("gpa", [0, 0x1234, 2 * MIB + 0x10, MEM - 1])
def test_guest_memory_is_identity_mapped_for_every_access(ept: Ept, gpa: int, access: Access) -> None:
    assert ept.translate(gpa, access) == gpa


def test_the_identity_map_uses_2_mib_rwx_leaves_with_suppress_ve_clear(ept: Ept) -> None:
    pde = ept.entry(4 * MIB, 2)
    assert pde & EPT_LARGE and pde & EPT_RWX == EPT_RWX and not pde & EPT_SUPPRESS_VE
    assert pde & ~0xFFF & ((1 << 52) - 1) == 4 * MIB
    with pytest.raises(ValueError, match="PDE is a leaf"):
        ept.entry(4 * MIB, 1)
    assert ept.eptp % 4096 == 0


def test_the_map_rounds_up_to_2_mib_and_beyond_it_nothing_is_present(ept: Ept) -> None:
    small = Ept(3 * MIB)
    assert small.translate(4 * MIB - 1, Access.READ) == 4 * MIB - 1  # inside the last 2-MiB leaf
    v = violation(small, 4 * MIB, Access.READ)
    assert v.level == 2 and v.suppress_ve  # a sibling PDE of the new table: bit 63 = 1


def test_new_tables_are_filled_with_not_present_suppressed_entries_unless_asked_otherwise() -> None:
    kvm, zeroed = Ept(MEM), Ept(MEM, nonpresent_suppress_ve=False)
    assert kvm.entry(MEM, 2) == EPT_SUPPRESS_VE
    assert zeroed.entry(MEM, 2) == 0
    assert not violation(zeroed, MEM, Access.READ).suppress_ve


# -- rights ----------------------------------------------------------------------------


def test_a_read_only_range_refuses_writes_and_reports_rights_and_the_leafs_suppress_bit(ept: Ept) -> None:
    ept.set_range(0x5000, 0x2000, read=True, write=False, execute=False, suppress_ve=True)
    assert ept.translate(0x5008, Access.READ) == 0x5008
    v = violation(ept, 0x6010, Access.WRITE)
    assert (v.gpa, v.access, v.level) == (0x6010, Access.WRITE, 1)
    assert (v.readable, v.writable, v.executable) == (True, False, False)
    assert v.suppress_ve  # from the PTE
    assert "R--" in v.why and "PTE" in v.why
    assert violation(ept, 0x5000, Access.FETCH).suppress_ve
    ept.set_range(0x5000, 0x1000, read=True, write=False, execute=True)
    v = violation(ept, 0x5000, Access.WRITE)
    assert (v.readable, v.writable, v.executable, v.suppress_ve) == (True, False, True, False)
    assert ept.translate(0x5000, Access.FETCH) == 0x5000


def test_rights_are_the_and_along_the_walk(ept: Ept) -> None:
    """A present non-leaf without W refuses a write its RWX leaf would allow."""
    ept.set_range(0x3000, 0x1000, read=True, write=True, execute=True)
    pde = ept.entry(0x3000, 2)
    ept.set_entry(0x3000, 2, pde & ~EPT_W)
    v = violation(ept, 0x3000, Access.WRITE)
    assert (v.readable, v.writable, v.executable, v.level) == (True, False, True, 1)
    assert ept.translate(0x3000, Access.READ) == 0x3000


def test_an_execute_only_page_allows_fetches_only(ept: Ept) -> None:
    ept.set_range(0x8000, 0x1000, read=False, write=False, execute=True)
    assert ept.translate(0x8000, Access.FETCH) == 0x8000
    v = violation(ept, 0x8000, Access.READ)
    assert (v.readable, v.writable, v.executable) == (False, False, True)


# -- which suppress-#VE bit counts -----------------------------------------------------


@pytest.mark.parametrize("suppress", [False, True])
def test_a_not_present_4_kib_leaf_reports_its_own_bit_63(ept: Ept, suppress: bool) -> None:
    ept.set_range(0x7000, 0x1000, read=False, write=False, execute=False, suppress_ve=suppress)
    assert ept.entry(0x7000, 1) == (EPT_SUPPRESS_VE if suppress else 0)
    v = violation(ept, 0x7ABC, Access.READ)
    assert (v.level, v.suppress_ve) == (1, suppress)
    assert (v.readable, v.writable, v.executable) == (False, False, False)
    assert "not present" in v.why


@pytest.mark.parametrize("leaf_suppress", [False, True])
def test_bit_63_of_a_present_non_leaf_is_ignored(ept: Ept, leaf_suppress: bool) -> None:
    ept.set_range(0x9000, 0x1000, read=True, write=False, execute=False, suppress_ve=leaf_suppress)
    pdpte = ept.entry(0x9000, 3)
    ept.set_entry(0x9000, 3, pdpte | EPT_SUPPRESS_VE)
    pde = ept.entry(0x9000, 2)
    ept.set_entry(0x9000, 2, pde | EPT_SUPPRESS_VE)
    assert ept.translate(0x9000, Access.READ) == 0x9000  # bit 63 does not make it not present
    v = violation(ept, 0x9000, Access.WRITE)
    assert (v.level, v.suppress_ve) == (1, leaf_suppress)


def test_a_large_leaf_reports_its_own_bit_63(ept: Ept) -> None:
    ept.set_entry(6 * MIB, 2, ept.entry(6 * MIB, 2) & ~EPT_W | EPT_SUPPRESS_VE)
    v = violation(ept, 6 * MIB + 0x123, Access.WRITE)
    assert (v.level, v.suppress_ve, v.readable, v.writable) == (2, True, True, False)


@pytest.mark.parametrize("suppress", [False, True])
def test_a_not_present_pml4e_far_above_memory_reports_its_bit_63(ept: Ept, suppress: bool) -> None:
    far = 0x7F80_0000_0000  # PML4 index 255
    v = violation(ept, far, Access.READ)
    assert (v.level, v.suppress_ve) == (4, True)  # the default fill
    ept.set_not_present(far, 4, suppress_ve=suppress)
    assert ept.entry(far, 4) == (EPT_SUPPRESS_VE if suppress else 0)
    v = violation(ept, far + 0x1000, Access.FETCH)
    assert (v.level, v.suppress_ve, v.gpa) == (4, suppress, far + 0x1000)
    assert ept.translate(0x1000, Access.READ) == 0x1000


@pytest.mark.parametrize("level", [3, 2, 1])
def test_set_not_present_at_a_lower_level_creates_the_tables_above(ept: Ept, level: int) -> None:
    gpa = 5 * GIB + 0x3000
    ept.set_not_present(gpa, level, suppress_ve=False)
    v = violation(ept, gpa, Access.READ)
    assert (v.level, v.suppress_ve) == (level, False)
    # Its neighbours keep the bit 63 they had (inherited from the entry that was split open).
    neighbour = gpa + (1 << (12 + 9 * (level - 1)))
    assert violation(ept, neighbour, Access.READ).suppress_ve


def test_set_not_present_drops_what_was_below_and_returns_the_tables(ept: Ept) -> None:
    ept.set_range(0x1000, 0x1000, read=True, write=False, execute=False)  # splits one PDE
    before = ept.tables_in_use
    ept.set_not_present(0x1000, 2, suppress_ve=True)
    assert ept.tables_in_use == before - 1
    v = violation(ept, 0x1FFFFF, Access.READ)
    assert (v.level, v.suppress_ve) == (2, True)
    ept.fix(0x1000)
    assert ept.translate(0x1000, Access.WRITE) == 0x1000
    assert violation(ept, 0x2000, Access.READ).level == 1  # the new table's fill: not present


# -- splitting -------------------------------------------------------------------------


def test_splitting_a_2_mib_leaf_keeps_its_neighbours_rights(ept: Ept) -> None:
    ept.set_entry(8 * MIB, 2, ept.entry(8 * MIB, 2) & ~EPT_X)  # an RW- 2-MiB leaf
    ept.set_range(8 * MIB + 0x5000, 0x1000, read=True, write=False, execute=False)
    for page in (8 * MIB, 8 * MIB + 0x4000, 8 * MIB + 0x6000, 10 * MIB - 0x1000):
        pte = ept.entry(page, 1)
        assert pte & EPT_RWX == EPT_R | EPT_W and pte & EPT_MT_WB == EPT_MT_WB and not pte & EPT_LARGE
        assert ept.translate(page, Access.WRITE) == page
        assert not violation(ept, page, Access.FETCH).suppress_ve
    assert ept.entry(8 * MIB + 0x5000, 1) & EPT_RWX == EPT_R
    assert ept.entry(8 * MIB, 2) & EPT_RWX == EPT_RWX and not ept.entry(8 * MIB, 2) & EPT_LARGE
    assert ept.translate(10 * MIB, Access.FETCH) == 10 * MIB  # the next PDE is untouched


def test_splitting_a_1_gib_leaf_gives_2_mib_leaves_then_ptes() -> None:
    ept = Ept(MEM)
    far = 3 * GIB
    ept.set_not_present(far, 3, suppress_ve=False)
    ept.set_entry(far, 3, far | EPT_R | EPT_X | EPT_MT_WB | EPT_LARGE)  # a hand-made 1-GiB leaf
    assert ept.translate(far + 0x12345678, Access.READ) == far + 0x12345678
    ept.set_range(far + 0x200000, 0x1000, read=True, write=True, execute=True)
    assert ept.entry(far, 2) & EPT_LARGE and ept.entry(far, 2) & EPT_RWX == EPT_R | EPT_X
    assert ept.translate(far + 0x200000, Access.WRITE) == far + 0x200000
    assert violation(ept, far + 0x201000, Access.WRITE).level == 1
    assert violation(ept, far + 0x400000, Access.WRITE).level == 2


# -- misconfigurations -----------------------------------------------------------------


def test_write_without_read_is_a_misconfiguration_not_a_violation(ept: Ept) -> None:
    ept.set_range(0xA000, 0x1000, read=False, write=True, execute=False)
    with pytest.raises(EptMisconfig) as info:
        ept.translate(0xA000, Access.READ)
    assert (info.value.level, info.value.gpa) == (1, 0xA000)
    assert "without read" in str(info.value)


def test_a_write_only_non_leaf_is_a_misconfiguration_too(ept: Ept) -> None:
    ept.set_entry(0, 4, ept.entry(0, 4) & ~EPT_RWX | EPT_W)
    with pytest.raises(EptMisconfig):
        ept.translate(0x1000, Access.FETCH)


# -- the generation counter ------------------------------------------------------------


def test_every_change_moves_the_generation_and_reads_do_not(ept: Ept) -> None:
    seen = [ept.generation]

    def moved() -> bool:
        seen.append(ept.generation)
        return seen[-1] != seen[-2]

    ept.translate(0x1000, Access.READ)
    ept.entry(0x1000, 2)
    assert not moved()
    ept.set_range(0x1000, 0x1000, read=True, write=False, execute=False)
    assert moved()
    ept.set_not_present(0x2000, 1, suppress_ve=True)
    assert moved()
    ept.fix(0x2000)
    assert moved()
    ept.set_entry(0x1000, 1, ept.entry(0x1000, 1) | EPT_SUPPRESS_VE)
    assert moved()
    with pytest.raises(EptViolation):
        ept.translate(MEM, Access.READ)
    assert not moved()


# -- arguments and capacity ------------------------------------------------------------


def test_unaligned_ranges_and_unknown_levels_are_refused(ept: Ept) -> None:
    with pytest.raises(ValueError, match="4-KiB"):
        ept.set_range(0x1001, 0x1000, read=True, write=True, execute=True)
    with pytest.raises(ValueError, match="level"):
        ept.set_not_present(0, 5, suppress_ve=True)
    with pytest.raises(ValueError, match="48-bit"):
        ept.translate(1 << 48, Access.READ)


def test_the_table_buffer_grows_when_the_first_2_mib_are_used_up() -> None:
    ept = Ept(2 * MIB)
    for i in range(600):  # one page table (plus a PD or PDPT now and then) per 2-MiB region
        ept.set_range(i * 2 * MIB, 0x1000, read=True, write=True, execute=True)
    assert ept.mem.size > 2 * MIB
    assert ept.translate(599 * 2 * MIB, Access.WRITE) == 599 * 2 * MIB
    assert ept.translate(0x1000, Access.READ) == 0x1000
