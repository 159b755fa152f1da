"""A multiboot kernel that drops to real-address mode takes INT n, exceptions and 8259A
interrupts through its interrupt vector table (cpu/real_mode.py), end to end on the
32-bit engine: the frames the handlers see, the records, and the #DF/shutdown chain."""

from __future__ import annotations

from typing import Any

from cpu.smsw import smsw_r32
from tests.multiboot.mbkit import boot

RM_BASE = 0x8000
RESULTS = 0x600


def words(m: Any, address: int, n: int) -> list[int]:
    return [m.phys.read_uint(address + 2 * i, 2) for i in range(n)]


def test_the_real_mode_kernel_takes_int_n_a_fault_and_an_irq_through_its_ivt() -> None:
    m, image, _info, r = boot("real_mode.S")
    s = image.symbols

    def low(name: str) -> int:  # where the copied real-mode code runs (CS = 0)
        return s[name] - s["rm_start"] + RM_BASE

    assert (r.outcome, r.exit_code) == ("exit", 0)
    # SP, then the frame at SS:SP (IP, CS, FLAGS), then FLAGS in the handler.
    assert words(m, RESULTS, 5) == [0x6FFA, low("after_int_30"), 0, 0x0203, 0x0003]
    assert words(m, RESULTS + 10, 5) == [0xFFFA, low("after_int_31"), 0, 0x0003, 0x0003]
    assert words(m, RESULTS + 20, 5) == [0x6FFA, low("div_site"), 0, 0x0046, 0x0046]
    assert words(m, RESULTS + 30, 5) == [0x6FFA, low("after_hlt"), 0, 0x0246, 0x0046]
    assert words(m, RESULTS + 40, 1) == [0x0005]  # the re-executed DIV: 10 / 2
    deliveries = [{k: d[k] for k in ("vector", "source", "rip", "cs", "rflags", "old_rsp",
                                      "rsp", "handler", "real_mode")} for d in r.deliveries]
    assert deliveries == [
        {"vector": 0x30, "source": "software", "rip": low("after_int_30"), "cs": 0,
         "rflags": 0x0203, "old_rsp": 0x7000, "rsp": 0x6FFA, "handler": low("handler_30"),
         "real_mode": True},
        {"vector": 0x31, "source": "software", "rip": low("after_int_31"), "cs": 0,
         "rflags": 0x0003, "old_rsp": 0, "rsp": 0xFFFA, "handler": low("handler_31"),
         "real_mode": True},
        {"vector": 0, "source": "exception", "rip": low("div_site"), "cs": 0,
         "rflags": 0x0046, "old_rsp": 0x7000, "rsp": 0x6FFA, "handler": low("handler_de"),
         "real_mode": True},
        {"vector": 0x73, "source": "interrupt", "rip": low("after_hlt"), "cs": 0,
         "rflags": 0x0246, "old_rsp": 0x7000, "rsp": 0x6FFA, "handler": low("handler_irq"),
         "real_mode": True},
    ]
    pending, = r.trace.of_kind("interrupt_pending")
    wake, = r.trace.of_kind("wake")
    assert (pending["vector"], pending["source"]) == (0x73, "pic")
    assert (wake["by"], wake["vector"]) == ("interrupt", 0x73)
    assert wake["seq"] + 1 == r.deliveries[3]["seq"]
    # The 8259A pair: IRQ 11 in service on the slave, the cascade on the master (the
    # handler sent no EOI), nothing requested any more.
    pic = m.state.platform.pic.state
    assert (pic.slave.isr, pic.slave.irr, pic.master.isr, pic.master.irr) == (0x08, 0, 0x04, 0)


PROLOGUE = """
    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002, 0, -0x1BADB002
    .text
    .code32
    .globl start
start:
    lgdt gdt_desc
    ljmp $0x08, $(pm16 - 0x100000)
    .code16
pm16:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %ss
    movl %cr0, %eax
    andl $~1, %eax
    movl %eax, %cr0
    ljmp $0xFFFF, $(real - 0xFFFF0)     # CS base 0xFFFF0 reaches the image at 1 MiB
real:
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $0x7000, %sp
    movw $0x3FF, 0x500                  # the IVT: IDTR limit 0x3FF, base 0
    movl $0, 0x502
    lidt 0x500
"""
EPILOGUE = """
    .data
    .balign 8
gdt:
    .quad 0
    .quad 0x00009B100000FFFF            # 16-bit code, base 0x100000
    .quad 0x000093000000FFFF            # 16-bit data, base 0
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
"""


def real_mode_source(body: str) -> str:
    return PROLOGUE + body + "\n" + EPILOGUE


def test_an_int_n_past_the_ivt_limit_is_gp_then_df_then_shutdown() -> None:
    _m, image, _info, r = boot(real_mode_source("""
    movw $0, 0x500                      # IDTR limit 0, base 0
    movl $0, 0x502
    lidt 0x500
    .globl int_site
int_site:
    int $0x30
    hlt
"""))
    ip = image.symbols["int_site"] - 0xFFFF0
    assert (r.outcome, r.rip) == ("shutdown", ip)
    assert r.deliveries == []
    assert [(f["vector"], f["fault"], f["action"]) for f in r.trace.of_kind("delivery_fault")] == [
        (0x30, 13, "serial"), (13, 13, "double-fault"), (8, 13, "shutdown")]
    assert r.reason == ("triple fault: #GP(0x0): IVT entry 0x8 (bytes 0x20-0x23) is past the "
                        "IDTR limit 0x0 while delivering #DF")


def test_a_hlt_in_real_mode_with_if_clear_and_nothing_pending_ends_the_run() -> None:
    _m, image, _info, r = boot(real_mode_source("""
    cli
    .globl halt
halt:
    hlt
"""))
    assert (r.outcome, r.rip) == ("hlt", image.symbols["halt"] + 1 - 0xFFFF0)
    assert r.reason == "HLT in 32-bit mode with no event that can wake the CPU"


def test_an_irq_raised_with_if_clear_waits_for_sti_and_its_shadow() -> None:
    # IRQ 3 (master base 0x08 + 3 = vector 0x0B) raised with IF = 0; `sti; nop`: the
    # interrupt is taken at the boundary after the NOP (the STI shadow covers the NOP).
    m, image, _info, r = boot(real_mode_source("""
    movw $(handler - 0xFFFF0), 0x0B * 4
    movw $0xFFFF, 0x0B * 4 + 2
    cli
    movw $0x2003, %dx
    movb $1, %al
    outb %al, %dx
    movb $0, %al
    outb %al, %dx
    nop
    sti
    .globl shadowed
shadowed:
    nop
    .globl taken
taken:
    nop
    movb $0, %al
    outb %al, $0xf4
handler:
    movw %sp, 0x600
    iret
"""))
    assert (r.outcome, r.exit_code) == ("exit", 0)
    irq, = r.deliveries
    assert (irq["vector"], irq["rip"], irq["cs"], irq["rflags"]) == (
        0x0B, image.symbols["taken"] - 0xFFFF0, 0xFFFF, 0x0246)  # ZF, PF: from `xorw`
    assert m.phys.read_uint(0x600, 2) == 0x6FFA


def test_smsw_to_a_32_bit_register_in_real_mode_stores_all_of_cr0s_low_doubleword() -> None:
    # CR0 = 0x60000010 after the drop to real mode (CD, NW, ET as the entry left them);
    # EBX and ECX start all ones: `smsw %ebx` (66 0F 01 E3) must leave CR0[31:0] in EBX
    # (processors, Bochs, QEMU 7.2: cpu/smsw.py), `smsw %cx` only CR0[15:0] in CX, the
    # upper half of ECX untouched (a 16-bit destination), `smsw 0x700` a word in memory.
    m, _image, _info, r = boot(real_mode_source("""
    movl %cr0, %eax
    orl $0x60000000, %eax
    movl %eax, %cr0
    movl $0xFFFFFFFF, %ebx
    movl $0xFFFFFFFF, %ecx
    smsw %ebx
    smsw %cx
    movl $0xFFFFFFFF, 0x700
    smsw 0x700
    movl %ebx, 0x710
    movl %ecx, 0x714
    movw $0xF4, %dx
    movb $0, %al
    outb %al, %dx
"""))
    assert (r.outcome, r.exit_code) == ("exit", 0)
    cr0 = m.phys.read_uint(0x710, 4)
    assert cr0 == 0x60000010 | (cr0 & 0xFFFF)  # CR0[31:16] stored: PE = 0, ET = 1 ...
    assert cr0 & 0xFFFF0000 == 0x60000000 and cr0 & 1 == 0
    assert m.phys.read_uint(0x714, 4) == 0xFFFF0000 | (cr0 & 0xFFFF)
    assert m.phys.read_uint(0x700, 4) == 0xFFFF0000 | (cr0 & 0xFFFF)


def test_smsw_decoding_sees_the_operand_size_of_the_code_segment() -> None:
    assert smsw_r32(bytes.fromhex("660f01e3"), default32=False) == (4, 3)  # smsw ebx
    assert smsw_r32(bytes.fromhex("0f01e1"), default32=False) is None     # smsw cx
    assert smsw_r32(bytes.fromhex("0f01e1"), default32=True) == (3, 1)    # smsw ecx
    assert smsw_r32(bytes.fromhex("660f01e1"), default32=True) is None    # smsw cx
    assert smsw_r32(bytes.fromhex("0f0126"), default32=True) is None      # smsw [esi]
    assert smsw_r32(bytes.fromhex("0f01c8"), default32=True) is None      # monitor (reg 1)
