"""The platform devices test kernels use (cpu/devices/uart.py, fwcfg.py, testports.py and
the machine's port handlers): the 16550 UART, fw_cfg, Bochs' shutdown port, pc-testdev's
flush-page port (also an injection point), unknown ports, and CPUID."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cpu.devices.fwcfg import FwCfg
from cpu.devices.testports import BochsShutdown
from cpu.devices.uart import Uart16550
from cpu.layout import PageSpec
from cpu.machine import Machine
from cpu.outcomes import RunResult
from cpu.platform import SHUTDOWN_DETAIL
from idtlab import load_asm

CODE = 0x100000
OUT = 0x80000  # where the test programs store what they read


def run_asm(src: str, *, mode: str = "fast", memory: int = 16 << 20, apic: bool = True,
            pages: tuple[PageSpec, ...] = ()) -> tuple[Machine, RunResult]:
    m = Machine(memory, mode=mode, apic=apic)
    for p in pages:
        m.set_page(p)
    load_asm(m, src, CODE)
    return m, m.run(entry=m.symbols["main"], rsp=0x70000)


# -- the UART model ---------------------------------------------------------------------------
def test_the_uart_reports_the_transmitter_empty_and_no_interrupt_pending() -> None:
    u = Uart16550()
    assert (u.read(0x3FD), u.read(0x3FA), u.read(0x3FE)) == (0x60, 0x01, 0xB0)


def test_uart_registers_read_back_what_was_written() -> None:
    u = Uart16550()
    for port, value in ((0x3F9, 0xFF), (0x3FB, 0x03), (0x3FC, 0xFF), (0x3FF, 0x5A)):
        u.write(port, value)
    assert [u.read(p) for p in (0x3F9, 0x3FB, 0x3FC, 0x3FF)] == [0x0F, 0x03, 0x1F, 0x5A]


def test_the_divisor_latch_is_behind_dlab_and_leaves_thr_and_ier_alone() -> None:
    sent: list[int] = []
    u = Uart16550(on_byte=sent.append)
    u.write(0x3F9, 0x05)
    u.write(0x3FB, 0x80)  # DLAB
    u.write(0x3F8, 0x01)  # DLL
    u.write(0x3F9, 0x02)  # DLM
    assert (u.read(0x3F8), u.read(0x3F9)) == (0x01, 0x02)
    u.write(0x3FB, 0x03)
    assert (u.read(0x3F9), sent) == (0x05, [])
    u.write(0x3F8, 0x41)
    assert sent == [0x41]


def test_fifo_enable_shows_in_iir_bits_7_and_6() -> None:
    u = Uart16550()
    u.write(0x3FA, 0x07)
    assert u.read(0x3FA) == 0xC1
    u.write(0x3FA, 0x00)
    assert u.read(0x3FA) == 0x01


def test_loopback_receives_what_is_sent_and_reflects_mcr_in_msr() -> None:
    sent: list[int] = []
    u = Uart16550(on_byte=sent.append)
    u.write(0x3FC, 0x10 | 0x0F)  # LOOP, OUT2, OUT1, RTS, DTR
    assert u.read(0x3FE) == 0xF0
    u.write(0x3F8, 0xAE)
    assert (sent, u.read(0x3FD)) == ([], 0x61)
    assert (u.read(0x3F8), u.read(0x3FD), u.read(0x3F8)) == (0xAE, 0x60, 0)
    u.write(0x3FC, 0x10 | 0x02)
    assert u.read(0x3FE) == 0x10  # RTS -> CTS only


# -- fw_cfg and the Bochs port models -------------------------------------------------------
def read_item(f: FwCfg, key: int, n: int) -> bytes:
    f.select(key)
    return bytes(f.read_data() for _ in range(n))


def test_fw_cfg_items_are_encoded_as_qemu_encodes_them() -> None:
    f = FwCfg(ram_size=64 << 20)
    assert read_item(f, 0x0000, 6) == b"QEMU\0\0"
    assert read_item(f, 0x0001, 4) == struct.pack("<I", 1)
    assert read_item(f, 0x0003, 8) == struct.pack("<Q", 64 << 20)
    assert read_item(f, 0x0005, 2) == b"\x01\x00"
    assert read_item(f, 0x000F, 2) == b"\x01\x00"
    assert read_item(f, 0x0019, 4) == bytes(4)
    assert read_item(f, 0x1234, 4) == bytes(4)


def test_selecting_an_item_again_restarts_it() -> None:
    f = FwCfg(ram_size=1 << 20)
    assert read_item(f, 0, 2) == b"QE"
    assert read_item(f, 0, 4) == b"QEMU"


def test_the_bochs_shutdown_string_must_come_in_order() -> None:
    b = BochsShutdown()
    assert [b.write(c) for c in b"ShutShutdown"] == [False] * 11 + [True]
    assert not any(b.write(c) for c in b"Shutdowx")
    assert not any(b.write(c) for c in b"hutdown")


# -- through the machine -------------------------------------------------------------------------
PUTS = """
main:
    lea rsi, [rip + msg]
next:
    mov al, byte ptr [rsi]
    test al, al
    jz done
    mov dx, 0x3fd
wait:
    in al, dx
    test al, 0x20
    jz wait
    mov al, byte ptr [rsi]
    mov dx, 0x3f8
    out dx, al
    inc rsi
    jmp next
done:
    hlt
msg:
    .byte 0x68, 0x69, 0x0a, 0x6f, 0x6b, 0x0a, 0
"""


def test_the_guest_prints_through_the_uart_and_each_line_is_a_serial_record() -> None:
    _m, r = run_asm(PUTS)
    lines: list[str] = []
    assert (r.outcome, r.serial) == ("hlt", "hi\nok\n")
    assert [x["text"] for x in r.trace.of_kind("serial")] == ["hi", "ok"]
    assert r.trace.of_kind("port") == []  # the UART is a device, not an unknown port
    m2 = Machine()
    m2.on_serial_line.append(lines.append)
    load_asm(m2, PUTS, CODE)
    m2.run(entry=m2.symbols["main"], rsp=0x70000)
    assert lines == ["hi", "ok"]


def test_uart_registers_through_in_and_out() -> None:
    m, r = run_asm(f"""
main:
    mov rdi, {OUT}
    mov dx, 0x3fb
    mov al, 0x83
    out dx, al            # LCR: DLAB, 8 bits
    mov dx, 0x3f8
    mov al, 0x0c
    out dx, al            # DLL
    in al, dx
    mov byte ptr [rdi], al
    mov dx, 0x3fb
    mov al, 0x03
    out dx, al            # DLAB off
    in al, dx
    mov byte ptr [rdi + 1], al
    mov dx, 0x3ff
    mov al, 0xa5
    out dx, al            # SCR
    in al, dx
    mov byte ptr [rdi + 2], al
    mov dx, 0x3fa
    in al, dx             # IIR
    mov byte ptr [rdi + 3], al
    mov dx, 0x3fd
    in al, dx             # LSR
    mov byte ptr [rdi + 4], al
    mov dx, 0x3f8
    in ax, dx             # RBR and IER at once (a 16-bit read of byte registers)
    mov word ptr [rdi + 5], ax
    hlt
""")
    assert r.outcome == "hlt"
    assert m.phys.read(OUT, 7) == bytes([0x0C, 0x03, 0xA5, 0x01, 0x60, 0x00, 0x00])
    assert r.serial == ""


def test_unknown_ports_read_all_ones_ignore_writes_and_appear_in_the_trace() -> None:
    m, r = run_asm("""
main:
    mov dx, 0x80
    in eax, dx
    mov ebx, eax
    mov al, 0x12
    out 0x80, al
    mov dx, 0x61
    in al, dx
    hlt
""")
    assert r.outcome == "hlt"
    assert (m.engine.read_reg("rbx"), m.engine.read_reg("rax") & 0xFF) == (0xFFFFFFFF, 0xFF)
    assert [{k: p[k] for k in p if k not in ("seq", "icount", "cycle")}
            for p in r.trace.of_kind("port")] == [
        {"kind": "port", "direction": "in", "port": 0x80, "size": 4},
        {"kind": "port", "direction": "out", "port": 0x80, "size": 1, "value": 0x12},
        {"kind": "port", "direction": "in", "port": 0x61, "size": 1}]


def fw_cfg_program(key: int, n: int) -> str:
    reads = "\n".join(f"    in al, dx\n    mov byte ptr [rdi + {i}], al" for i in range(n))
    return f"""
main:
    mov rdi, {OUT}
    mov dx, 0x510
    mov ax, {key}
    out dx, ax
    mov dx, 0x511
{reads}
    hlt
"""


@pytest.mark.parametrize(("key", "expected"), [
    (0x0000, b"QEMU"),
    (0x0003, struct.pack("<Q", 32 << 20)),
    (0x0005, struct.pack("<H", 1)),
    (0x0042, bytes(4)),
])
def test_fw_cfg_through_the_ports(key: int, expected: bytes) -> None:
    m, r = run_asm(fw_cfg_program(key, len(expected)), memory=32 << 20)
    assert r.outcome == "hlt"
    assert m.phys.read(OUT, len(expected)) == expected
    assert r.trace.of_kind("port") == []


def test_a_byte_write_to_the_fw_cfg_selector_is_an_unknown_port_access() -> None:
    _m, r = run_asm("main:\n mov dx, 0x510\n mov al, 3\n out dx, al\n hlt\n")
    assert [(p["direction"], p["port"], p["size"]) for p in r.trace.of_kind("port")] == [
        ("out", 0x510, 1)]


SHUTDOWN = """
main:
    lea rsi, [rip + text]
    mov dx, 0x8900
again:
    mov al, byte ptr [rsi]
    test al, al
    jz stop
    out dx, al
after_out:
    inc rsi
    jmp again
stop:
    hlt
text:
    .byte {bytes}, 0
"""


@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_shutdown_written_to_port_0x8900_ends_the_run_right_after_the_last_out(mode: str) -> None:
    m, r = run_asm(SHUTDOWN.format(bytes=", ".join(str(c) for c in b"Shutdown")), mode=mode)
    assert (r.outcome, r.exit_code, r.reason) == ("exit", None, SHUTDOWN_DETAIL)
    assert r.rip == m.symbols["after_out"]
    assert r.icount == 2 + 7 * 6 + 4  # lea, mov; 6 per byte; the last byte's mov, test, jz, out
    assert r.trace.of_kind("port") == []


def test_a_wrong_shutdown_string_does_not_end_the_run() -> None:
    _m, r = run_asm(SHUTDOWN.format(bytes=", ".join(str(c) for c in b"Shutdowx")))
    assert r.outcome == "hlt"


def pte_address(m: Machine, va: int) -> int:
    table = m.symbols["pml4"]
    for shift in (39, 30, 21):
        table = m.phys.read_u64(table + 8 * ((va >> shift) & 0x1FF)) & ~0xFFF & ((1 << 52) - 1)
    return table + 8 * ((va >> 12) & 0x1FF)


STALE = """
main:
    mov rax, qword ptr [0x400000]     # fills the engine's TLB: VA 0x400000 -> PA 0x400000
    mov rdx, {new_pte}
    mov qword ptr [{pte}], rdx        # now VA 0x400000 -> PA 0x401000, without INVLPG
    mov rbx, qword ptr [0x400000]     # the stale translation
    mov eax, 0x400000
    {flush}
    mov rcx, qword ptr [0x400000]
    hlt
"""


@pytest.mark.parametrize("mode", ["fast", "timed"])
@pytest.mark.parametrize("flush", [True, False], ids=["flushed", "not-flushed"])
def test_the_flush_page_port_makes_a_changed_pte_visible(mode: str, flush: bool) -> None:
    m = Machine(mode=mode)
    m.set_page(PageSpec(va=0x400000, pa=0x400000))
    m.build()
    pte = pte_address(m, 0x400000)
    assert m.phys.read_u64(pte) & ~0xFFF == 0x400000
    m.phys.write_u64(0x400000, 0x1111)
    m.phys.write_u64(0x401000, 0x2222)
    load_asm(m, STALE.format(new_pte=hex(0x401000 | 7), pte=hex(pte),
                             flush="out 0xe4, eax" if flush else "nop"), CODE)
    r = m.run(entry=m.symbols["main"], rsp=0x70000)
    assert r.outcome == "hlt"
    assert m.engine.read_reg("rbx") == 0x1111  # no INVLPG: the TLB still holds the old entry
    assert m.engine.read_reg("rcx") == (0x2222 if flush else 0x1111)
    flushes = [(x["address"], x["hit"]) for x in r.trace.of_kind("flush_page")]
    assert flushes == ([(0x400000, 1)] if flush else [])


FLUSH_TWICE = """
main:
    mov eax, 0x200000
    out 0xe4, eax
after_first:
    nop
    out 0xe4, eax
after_second:
    nop
    hlt
nmi_handler:
    iretq
"""


@pytest.mark.parametrize("mode", ["fast", "timed"])
@pytest.mark.parametrize("hit", [1, 2])
def test_an_nmi_at_the_flush_page_port_arrives_right_after_that_write(mode: str, hit: int) -> None:
    m = Machine(mode=mode)
    load_asm(m, FLUSH_TWICE, CODE)
    m.set_gate(2, m.symbols["nmi_handler"])
    m.inject("nmi", at_port="flush_page", hit=hit)
    r = m.run(entry=m.symbols["main"], rsp=0x70000)
    (d,) = r.deliveries
    expected = m.symbols["after_first" if hit == 1 else "after_second"]
    assert (d["source"], d["rip"], d["icount"]) == ("nmi", expected, 2 if hit == 1 else 4)
    (pending,) = r.trace.of_kind("nmi_pending")
    assert (pending["at_port"], pending["hit"], pending["icount"]) == ("flush_page", hit, d["icount"])


def test_the_flush_page_injection_point_from_a_scenario(tmp_path: Path) -> None:
    from idtlab import scenario as scn

    toml = tmp_path / "flush.toml"
    toml.write_text(f'''
[[code]]
at = 0x100000
asm = """{FLUSH_TWICE}"""
[idt]
2 = {{ handler = "nmi_handler" }}
[run]
entry = "main"
[[inject]]
event = "nmi"
at_port = "flush_page"
hit = 2
[[expect]]
deliveries = ["NMI"]
[[expect]]
kinds = ["flush_page", "flush_page", "nmi_pending", "deliver", "iret", "end"]
''')
    sc = scn.load(toml)
    result = scn.run(sc)
    assert scn.check(sc, result) == []
    assert result.deliveries[0]["rip"] == sc.symbols["after_second"]


def test_an_unknown_port_point_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown port point 'flush'"):
        Machine().inject("nmi", at_port="flush")


CPUID = """
main:
    mov eax, {leaf}
    xor ecx, ecx
    cpuid
    hlt
"""


@pytest.mark.parametrize("apic", [True, False])
def test_cpuid_leaf_1_says_whether_there_is_a_local_apic_and_no_hypervisor(apic: bool) -> None:
    m, r = run_asm(CPUID.format(leaf=1), apic=apic)
    assert r.outcome == "hlt"
    assert bool(m.engine.read_reg("rdx") & (1 << 9)) is apic
    assert m.engine.read_reg("rcx") & (1 << 31) == 0
    assert m.engine.read_reg("rbx") >> 24 & 0xFF == 0  # initial APIC ID


def test_cpuid_has_no_hypervisor_leaves_without_kvm_and_reports_1_gib_pages() -> None:
    m, _r = run_asm(CPUID.format(leaf=0x40000000))
    assert [m.engine.read_reg(x) for x in ("rax", "rbx", "rcx", "rdx")] == [0, 0, 0, 0]
    m, _r = run_asm(CPUID.format(leaf=0x80000001))
    assert m.engine.read_reg("rdx") & (1 << 26)
