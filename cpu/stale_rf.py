"""RFLAGS.RF in the 32-bit phase: what the engine leaves set that the CPU clears.

RF (the resume flag, SDM Vol. 3B "Debug Exceptions" on RF) suppresses instruction
breakpoints for one instruction: IRET loads it from the popped image (real-address
mode IRETD and protected-mode IRETD both take bit 16 of the image: Vol. 2 IRET), and
"the processor clears the RF flag after every instruction that completes successfully"
(Vol. 3B "Instruction-Breakpoint Exception Condition"), so it is set for exactly the
first instruction after that IRET. Whatever RF is, PUSHF/PUSHFD never store it: "the RF
flag is cleared in the image pushed", and VM likewise (Vol. 2 PUSHF).

Unicorn 2.1.4 gets both wrong, measured with a real-mode probe (`pushfd; or eax,
0x10000; push eax; push cs; call 1f; jmp 2f; 1: iretd; 2: nop; pushfd` stores
EFLAGS with RF = 1):

* its `helper_read_eflags`, which PUSHF calls, returns `cpu_compute_eflags(env)` with
  RF and VM in it (upstream QEMU masks `~(VM_MASK | RF_MASK)` there);
* it clears RF only when a translation block that started with RF = 1 ends through
  `gen_eob` (`gen_helper_reset_rf`); a block that ends with a direct jump chains to the
  next one (`goto_tb`) and RF stays set for as long as blocks keep chaining.

kvm-unit-tests' realmode.flat checks it ("rflags.rf": IRETD with RF set in the image,
then `jmp`, then `pushfl`), and QEMU 7.2 TCG passes only thanks to the PUSHF mask.

What idtlab does, in the 32-bit phase, where a Python callback already runs at the start
of every translation block (cpu/boot32.py): RF found set there is cleared. RF can only
have been set by an IRET (POPF clears it, Vol. 2 POPF), which ends a block, so a block
that starts with RF = 1 is either the first block at the IRET's target or a later one
that inherited a stale RF; clearing it in both makes every PUSHF after the IRET store
RF = 0, as the SDM says. What it gives up is the one effect RF has on the first
instruction after the IRET, suppressing an instruction breakpoint armed in DR7 on that
instruction: not modelled before long mode (the breakpoint's #DB then fires). Long
mode's IRETQ is emulated by the machine (cpu/emulated.py), which records where RF was
loaded (cpu/debug.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from idt.state import RFLAGS_RF

if TYPE_CHECKING:
    from cpu.engine import Engine


def clear_stale_rf(e: Engine) -> None:
    """At the start of a translation block of the 32-bit phase: clear RF if set."""
    rflags = e.read_reg("rflags")
    if rflags & RFLAGS_RF:
        e.write({"rflags": rflags & ~RFLAGS_RF})
