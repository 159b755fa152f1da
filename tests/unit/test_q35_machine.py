"""The q35 board in a machine (cpu/q35.py, cpu/board.py): the pc machine has no PCI and
no VT-d page; on q35 the guest reaches the configuration ports and the VT-d registers,
edu's interrupts go through the I/O APIC or MSI and the IOMMU to the local APIC, its DMA
through the IOMMU to RAM, and checkpoints carry all of it."""

from __future__ import annotations

import struct

import pytest

from cpu.board import BoardConfig, parse
from cpu.devices.edu import Edu
from cpu.devices.ioapic import IOAPIC_BASE
from cpu.devices.vtd import VTD_BASE, IntelIommu
from cpu.layout import PageSpec
from cpu.machine import Machine
from tests.delivery.rig import CODE, KERNEL_STACK, build

Q35 = parse("q35", ["intel-iommu", "edu"])
VTD_PAGE = PageSpec(va=VTD_BASE, pa=VTD_BASE, user=False, nx=True)
EDU_BAR = 0xFEA00000
GCMD, RTADDR, IRTA, FSTS, FRCD = 0x18, 0x20, 0xB8, 0x34, 0x220
TE, SRTP, IRE, SIRTP = 1 << 31, 1 << 30, 1 << 25, 1 << 24


def q35_parts(m: Machine) -> tuple[IntelIommu, Edu]:
    st = m.state.q35
    assert st is not None and st.iommu is not None and st.edu is not None
    return st.iommu, st.edu


def test_the_pc_machine_has_no_pci_and_no_vtd_registers() -> None:
    m, _ = build("""
        mov dx, 0xcf8
        mov eax, 0x80000000
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        mov r8, rax
        mov eax, dword ptr [rbx]
        hlt
    """, pages=[VTD_PAGE])
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, regs={"rbx": VTD_BASE}, max_insns=100)
    assert m.state.q35 is None
    assert m.engine.read_reg("r8") == 0xFFFFFFFF
    assert (r.outcome, r.reason) == ("outside_memory", f"read of {VTD_BASE:#x} maps to physical "
                                     f"{VTD_BASE:#x}, outside guest memory")


def test_on_q35_the_guest_reads_the_host_bridge_id_and_the_vtd_version() -> None:
    m, _ = build("""
        mov dx, 0xcf8
        mov eax, 0x80000000
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        mov r8, rax
        mov eax, dword ptr [rbx]
        mov r9, qword ptr [rbx+8]
        hlt
    """, pages=[VTD_PAGE], board=Q35)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, regs={"rbx": VTD_BASE}, max_insns=100)
    assert r.outcome == "hlt"
    assert [m.engine.read_reg(x) for x in ("r8", "rax", "r9")] == \
        [0x29C08086, 0x10, 0x00D2008C22260206]


def test_a_configuration_write_the_model_does_not_define_ends_the_run_as_unsupported() -> None:
    m, sym = build("""
        mov dx, 0xcf8
        mov eax, 0x80000060
        out dx, eax
        mov dx, 0xcfc
        mov eax, 0xb0000001
        out dx, eax
    after:
        nop
        hlt
    """, board=Q35)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, max_insns=100)
    # The engine stops as soon as it can from inside the port hook: after the OUT or, in
    # the same translation block, the NOP after it (cpu/platform.py device_unsupported).
    assert r.outcome == "unsupported" and sym["after"] <= r.rip <= sym["after"] + 1
    assert r.reason == ("PCI 00:00.0 q35 host bridge: 4-byte configuration write of 0xb0000001 "
                        "at offset 0x60: a device-specific register this model does not define")


def test_firmware_leaves_edu_at_00_02_0_with_bar0_at_0xfea00000_and_interrupt_line_11() -> None:
    m = Machine(16 << 20, board=Q35)
    _, edu = q35_parts(m)
    assert (edu.get(0x10, 4), edu.get(0x3C, 1), edu.get(0x04, 2)) == (EDU_BAR, 11, 0x0103)
    p = m.platform
    p.port_out(0xCF8, 4, 0x80001000)
    assert p.port_in(0xCFC, 4) == 0x11E81234


def test_on_q35_without_devices_there_is_only_the_host_bridge() -> None:
    m = Machine(16 << 20, board=BoardConfig("q35"))
    p = m.platform
    p.port_out(0xCF8, 4, 0x80001000)
    assert p.port_in(0xCFC, 4) == 0xFFFFFFFF
    assert m.state.q35 is not None and m.state.q35.iommu is None
    assert not m.mmio.claims(VTD_BASE) and not m.mmio.claims(EDU_BAR)


def test_a_guest_load_from_edu_bar0_reaches_the_device_at_its_offset() -> None:
    m, _ = build("""
        mov dword ptr [rbx+4], 0x0f0f0f0f
        mov eax, dword ptr [rbx+4]
        mov ecx, dword ptr [rbx+0x80000]
        hlt
    """, pages=[PageSpec(va=EDU_BAR, pa=EDU_BAR, user=False, nx=True),
                PageSpec(va=EDU_BAR + 0x80000, pa=EDU_BAR + 0x80000, user=False, nx=True)],
        board=Q35)
    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, regs={"rbx": EDU_BAR}, max_insns=100)
    assert r.outcome == "hlt"
    assert (m.engine.read_reg("rax"), m.engine.read_reg("rcx")) == (0xF0F0F0F0, 0xFFFFFFFF)
    assert [w["value"] for w in r.trace.of_kind("edu_write")] == [0x0F0F0F0F]


def setup_remapping(m: Machine) -> IntelIommu:
    iommu, _ = q35_parts(m)
    irt = 0x200000
    for index, vector in ((1, 0xED), (2, 0xEE)):
        m.phys.write(irt + 16 * index, struct.pack("<QQ", 1 | 2 | vector << 16, 0x0010 | 1 << 18))
    iommu.write(IRTA, 8, irt | 0xF)
    iommu.write(GCMD, 4, SIRTP)
    iommu.write(GCMD, 4, SIRTP | IRE)
    assert m.apic is not None
    m.apic.write(0xF0, 4, 0x1FF, 0)     # software-enable the local APIC
    return iommu


def test_edu_intx_through_a_remappable_ioapic_entry_arrives_with_the_irtes_vector() -> None:
    m = Machine(16 << 20, board=Q35)
    setup_remapping(m)
    _, edu = q35_parts(m)
    io = m.state.platform.ioapic
    assert io is not None
    rte = 0x30 | 1 << 48 | 1 << 49      # vector field 0x30; index 1, remappable format
    io.write(0x00, 4, 0x10 + 2 * 11)
    io.write(0x10, 4, rte & 0xFFFFFFFF)
    io.write(0x00, 4, 0x11 + 2 * 11)
    io.write(0x10, 4, rte >> 32)
    edu.write(0x60, 4, 1)
    assert m.apic is not None and m.apic.pending_vector() == 0xED
    [pending] = m.trace.of_kind("interrupt_pending")
    assert (pending["source"], pending["pin"], pending["irte"]) == ("ioapic", 11, 1)


def test_edu_msi_is_remapped_through_irte_2() -> None:
    m = Machine(16 << 20, board=Q35)
    setup_remapping(m)
    _, edu = q35_parts(m)
    edu.write_config(0x44, 4, 0xFEE00050)
    edu.write_config(0x42, 2, 1)
    edu.write(0x60, 4, 1)
    assert m.apic is not None and m.apic.pending_vector() == 0xEE
    [pending] = m.trace.of_kind("interrupt_pending")
    assert (pending["source"], pending["device"], pending["irte"]) == ("msi", "edu", 2)


def test_edu_dma_goes_through_the_iommu_and_an_unmapped_iova_leaves_a_fault_record() -> None:
    m = Machine(16 << 20, board=Q35)
    iommu, edu = q35_parts(m)
    root, ctx, l3, l2, l1, page = 0x200000, 0x201000, 0x202000, 0x203000, 0x204000, 0x300000
    m.phys.write(root, struct.pack("<QQ", ctx | 1, 0))
    m.phys.write(ctx + 16 * 0x10, struct.pack("<QQ", l3 | 1, 0x10 << 8 | 1))
    for table, entry in ((l3, l2), (l2, l1), (l1, page)):
        m.phys.write(table, struct.pack("<Q", entry | 3))
    m.phys.write(page, b"\x78\x56\x34\x12")
    iommu.write(RTADDR, 8, root)
    iommu.write(GCMD, 4, SRTP)
    iommu.write(GCMD, 4, SRTP | TE)
    edu.write_config(0x04, 2, 0x0107)   # the driver enables bus mastering
    for reg, value in ((0x80, 0), (0x88, 0x40000), (0x90, 4)):
        edu.write(reg, 8, value)
    edu.write(0x98, 4, 1)
    assert bytes(edu.edu.buffer[:4]) == b"\x78\x56\x34\x12"
    for reg, value in ((0x80, 0x40000), (0x88, 0x5000), (0x90, 4)):
        edu.write(reg, 8, value)
    edu.write(0x98, 4, 3)
    assert (iommu.read(FSTS, 4), iommu.read(FRCD, 8), iommu.read(FRCD + 8, 8)) == \
        (0x2, 0x5000, 1 << 63 | 0x5 << 32 | 0x10)   # a write to a not-present page: 5h
    [read, write] = m.trace.of_kind("dma")
    assert (read["memory"], read["done"], write["memory"], write["done"]) == ([page], 4, [], 0)
    assert m.trace.of_kind("vtd_fault")[0]["reason"] == 0x5


def test_a_rollback_restores_the_pci_devices_and_the_iommu() -> None:
    m = Machine(16 << 20, board=Q35)
    m.build()
    iommu, edu = q35_parts(m)
    edu.write(0x04, 4, 1)
    iommu.write(RTADDR, 8, 0x5000)
    cp = m.checkpoint()
    iommu2, edu2 = q35_parts(m)
    edu2.write(0x04, 4, 2)
    iommu2.write(RTADDR, 8, 0x6000)
    m.platform.port_out(0xCF8, 4, 0x80001004)
    m.rollback(cp)
    iommu3, edu3 = q35_parts(m)
    assert (edu3.read(0x04, 4), iommu3.read(RTADDR, 8), m.state.q35.bus.state.address
            if m.state.q35 else None) == (0xFFFFFFFE, 0x5000, 0)


@pytest.mark.parametrize(("machine", "devices", "message"), [
    ("q36", [], "--machine q36: unknown machine type (known: pc, q35)"),
    ("pc", ["edu"], "--device edu needs --machine q35 (the pc machine is modelled without PCI)"),
    ("q35", ["e1000"], "--device e1000: unknown device (known: intel-iommu, edu)"),
    ("q35", ["intel-iommu,intremap=off"], "--device intel-iommu,intremap=off: idtlab models "
                                          "intel-iommu with intremap=on,eim=off only (not "
                                          "intremap=off)"),
    ("q35", ["edu", "edu"], "--device edu given twice (one of each is modelled)"),
])
def test_a_board_request_idtlab_cannot_build_names_what_is_wrong(machine: str, devices: list[str],
                                                                 message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse(machine, devices)
    assert str(exc.value) == message


def test_the_ioapic_page_and_the_vtd_page_are_distinct_device_pages() -> None:
    m = Machine(16 << 20, board=Q35)
    assert m.mmio.claims(IOAPIC_BASE) and m.mmio.claims(VTD_BASE) and m.mmio.claims(EDU_BAR)
    assert not m.mmio.claims(VTD_BASE + 0x1000)
