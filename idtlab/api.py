"""The Python API for tests: build machines from assembly, and `raises()`, the one-line
"what does this instruction raise?" primitive (in the spirit of kvm-unit-tests'
`asm_safe`).

    >>> raises("mov cr3, rax", cpl=3)
    Raised(vector=13, name='#GP', error_code=0, cr2=None, rip=1048576)
    >>> raises("int 0x80", cpl=3).error_code == 0x402
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cpu.layout import PageSpec
from cpu.machine import Machine
from idtlab.assemble import CodeBlock, assemble_blocks

CODE_AT = 0x100000
STUB_AT = 0x1F0000


def load_asm(machine: Machine, source: str, at: int, *, origin: str = "api") -> dict[str, int]:
    r"""Assemble Intel-syntax `source` at `at` into `machine` (as code: IRET/HLT sites are
    intercepted); labels may use the machine's symbols, and join them. Returns the
    symbol table the code was assembled with: the machine's symbols and the new labels.

        >>> m = Machine()
        >>> hex(load_asm(m, "main:\n    int3\n    hlt\nhandler:\n    iretq", 0x100000)["handler"])
        '0x100002'
        >>> m.set_gate(3, m.symbols["handler"])
        >>> m.run(entry=0x100000, rsp=0x70000).outcome
        'hlt'
    """
    blocks, symbols = assemble_blocks([CodeBlock(at, source, origin, 1)], machine.symbols)
    for b in blocks:
        machine.load(b.at, b.code, code=True)
    machine.symbols.update(symbols)
    return symbols


@dataclass(frozen=True)
class Raised:
    """The first event `raises` saw delivered: its vector and name, the error code it
    pushed (None for a vector without one), CR2 for a #PF, and the RIP it saved.

        >>> raises("ud2")
        Raised(vector=6, name='#UD', error_code=None, cr2=None, rip=1048576)
    """

    vector: int
    name: str
    error_code: int | None
    cr2: int | None
    rip: int  # the saved RIP of the frame


def raises(insn: str, *, cpl: int = 0, regs: dict[str, int] | None = None,
           pages: Iterable[PageSpec] = (), gate_dpl: int = 0, rflags: int = 0x202,
           machine: Machine | None = None) -> Raised | None:
    """Execute one instruction (or `;`-separated ones; only the first event counts) in a
    fresh machine at `cpl`, with every vector routed to a present gate of DPL `gate_dpl`.
    Returns the first event delivered, or None if the instruction completed quietly.

        >>> raises("nop") is None
        True
        >>> raises("int3", cpl=3, gate_dpl=3).name
        '#BP'
        >>> r = raises("mov rax, [0x400000]", pages=[PageSpec(0x400000, 0x400000, present=False)])
        >>> r.name, hex(r.error_code), hex(r.cr2)
        ('#PF', '0x0', '0x400000')
    """
    m = machine or Machine()
    load_asm(m, insn, CODE_AT, origin="raises()")
    load_asm(m, "hlt", STUB_AT, origin="raises() stub")
    for v in range(256):
        m.set_gate(v, STUB_AT, dpl=gate_dpl)
    m.set_tss(rsp0=0x80000)
    for p in pages:
        m.set_page(p)
    result = m.run(entry=CODE_AT, rsp=0x70000, cpl=cpl, regs=regs, rflags=rflags,
                   max_insns=insn.count(";") + insn.count("\n") + 1)
    if not result.deliveries:
        return None
    d = result.deliveries[0]
    return Raised(d["vector"], d["name"], d["error_code"], d.get("cr2"), d["rip"])
