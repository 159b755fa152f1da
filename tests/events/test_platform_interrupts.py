"""Device interrupts on the PC's wires (cpu/interrupts.py): a pc-testdev ISA line drives
an I/O APIC input, the redirection entry's message lands in the local APIC's IRR (and TMR
for level-triggered), and a level-triggered vector's EOI goes back to the I/O APIC, which
sends again while the line is still asserted (82093AA datasheet, "Redirection Table";
SDM Vol. 3A "Trigger Mode Register"). The HPET's registers are memory-mapped like the
APIC's."""

from __future__ import annotations

from cpu.devices.hpet import HPET_BASE
from cpu.devices.ioapic import IOAPIC_BASE
from cpu.layout import PageSpec
from tests.delivery.rig import CODE, KERNEL_STACK, build, gate
from tests.events.kit import APIC_BASE, SVR, SVR_ENABLED

DEVICE_PAGES = [PageSpec(va=IOAPIC_BASE, pa=IOAPIC_BASE, user=False, nx=True),
                PageSpec(va=HPET_BASE, pa=HPET_BASE, user=False, nx=True)]
LINE = 0x0E  # pc-testdev's line 14 drives IOAPIC input 14
EDGE, LEVEL = 0, 1 << 15


def program(trigger: int, *, release_in_handler: bool) -> str:
    release = "    mov dx, 0x200e\n    xor eax, eax\n    out dx, al\n" if release_in_handler else ""
    return f"""
    mov rbx, {APIC_BASE:#x}
    mov dword ptr [rbx+{SVR:#x}], {SVR_ENABLED:#x}
    mov rsi, {IOAPIC_BASE:#x}
    mov dword ptr [rsi], {0x10 + 2 * LINE:#x}          # IOREGSEL: entry 14, low half
    mov dword ptr [rsi+0x10], {0x76 | trigger:#x}      # vector 0x76, unmasked
    sti
    mov dx, {0x2000 + LINE:#x}
    mov al, 1
the_out:
    out dx, al                                        # line up
after_out:
    nop
    mov dx, {0x2000 + LINE:#x}
    xor eax, eax
    out dx, al                                        # line down
    hlt
isr:
    inc r12
{release}    mov dword ptr [rbx+0xb0], 0                       # EOI
    iretq
"""


def test_an_edge_on_a_testdev_line_is_delivered_at_the_boundary_right_after_the_out() -> None:
    m, sym = build(program(EDGE, release_in_handler=False), gates={0x76: gate("isr")},
                   pages=DEVICE_PAGES)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, max_insns=200)

    [d] = r.deliveries
    assert (d["name"], d["vector"], d["rip"], d["source"]) == ("vec 0x76", 0x76, sym["after_out"],
                                                                  "interrupt")
    [pending] = [p for p in r.trace.of_kind("interrupt_pending") if p["source"] == "ioapic"]
    assert (pending["vector"], pending["pin"], pending["level"]) == (0x76, LINE, False)
    assert m.apic is not None and m.engine.read_reg("r12") == 1


def test_a_level_line_still_asserted_at_eoi_is_sent_again_and_its_tmr_bit_is_set() -> None:
    """The ISR does not lower the line: the EOI broadcast clears Remote IRR and the
    IOAPIC sends the vector again, and again, until the line drops — here the guest's
    own loop never drops it, so the run ends at its event limit."""
    m, _sym = build(program(LEVEL, release_in_handler=False), gates={0x76: gate("isr")},
                    pages=DEVICE_PAGES)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, max_insns=2000, max_events=20)

    assert r.outcome == "max_events"
    assert {d["vector"] for d in r.deliveries} == {0x76}
    assert m.apic is not None and m.apic.read(0x180 + 0x30, 4, 0) & (1 << 22)  # TMR bit 0x76


def test_a_level_line_lowered_by_its_handler_is_delivered_once() -> None:
    m, _sym = build(program(LEVEL, release_in_handler=True), gates={0x76: gate("isr")},
                    pages=DEVICE_PAGES)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, max_insns=200)

    assert r.outcome == "hlt" and len(r.deliveries) == 1
    assert m.engine.read_reg("r12") == 1


def test_the_hpet_identifies_itself_and_its_counter_runs_with_the_cycles() -> None:
    m, _sym = build(f"""
    mov rsi, {HPET_BASE:#x}
    mov eax, dword ptr [rsi+4]          # capabilities, high half: the period in fs
    mov r8, rax
    mov dword ptr [rsi+0x10], 1         # ENABLE_CNF
    mov ecx, 1000
spin:
    loop spin
    mov eax, dword ptr [rsi+0xf0]       # main counter, low half
    mov r9, rax
    hlt
    """, pages=DEVICE_PAGES)

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=0x2, max_insns=5000)

    assert r.outcome == "hlt"
    r8, r9 = m.engine.read(("r8", "r9"))
    assert r8 == 10_000_000  # 10 ns, QEMU's HPET_CLK_PERIOD
    assert 0 < r9 < 10_000  # about a thousand cycles at the profile's clock, in 10-ns ticks
