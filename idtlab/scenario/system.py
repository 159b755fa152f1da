"""`[idt]`, `[tss]` and `[[pages]]`: the system structures event delivery reads.

The machine starts with a GDT, a 64-bit TSS, an IDT of 256 not-present interrupt gates
and identity-mapped 4-level paging (`cpu.machine`). `[idt]` fills gates (SDM Vol. 3A,
"IDT Descriptors" and "64-Bit Mode IDT": handler, IST index, interrupt or trap type,
DPL, present bit, code selector), `[tss]` the stack pointers of the 64-bit TSS (SDM
Vol. 3A, "Task Management in 64-bit Mode": RSP0-RSP2, IST1-IST7), and `[[pages]]`
overrides 4-KiB pages of the identity map with their own frame and rights (SDM Vol. 3A,
"Access Rights").
"""

from __future__ import annotations

from cpu.layout import GDT_BASE, PageSpec
from idtlab.scenario.context import Build

GATE_KEYS = ("handler", "ist", "type", "dpl", "present", "selector")
GATE_TYPES = ("interrupt", "trap")
TSS_KEYS = ("rsp0", "rsp1", "rsp2", "ist1", "ist2", "ist3", "ist4", "ist5", "ist6", "ist7")
PAGE_KEYS = ("va", "pa", "count", "present", "writable", "user", "nx")
PAGE_FLAGS = ("present", "writable", "user", "nx")
SYSTEM_PAGE = GDT_BASE  # the GDT and the TSS share this page (cpu/layout.py)


def build_idt(b: Build) -> None:
    """`[idt]`: `<vector> = { handler = ..., ist = ..., ... }` for each gate given."""
    chk = b.chk
    idt = chk.table(b.data.get("idt", {}), "[idt]")
    for key, gate in idt.items():
        try:
            vector = int(key, 0)
        except ValueError:
            raise chk.fail("[idt]", f"key '{key}' is not a vector number") from None
        where = f"[idt] {key}"
        if not 0 <= vector <= 255:
            raise chk.fail(where, f"vector {vector} outside 0..255")
        gate = chk.table(gate, where)
        chk.keys(gate, GATE_KEYS, where)
        if "handler" not in gate:
            raise chk.fail(where, "missing key 'handler'")
        gtype = gate.get("type", "interrupt")
        if gtype not in GATE_TYPES:
            raise chk.fail(f"{where} type", f"'{gtype}' is not 'interrupt' or 'trap'")
        b.machine.set_gate(
            vector, b.addr(gate["handler"], f"{where} handler"),
            ist=chk.int_(gate.get("ist", 0), f"{where} ist", 0, 7),
            gate_type=gtype, dpl=chk.int_(gate.get("dpl", 0), f"{where} dpl", 0, 3),
            present=chk.bool_(gate.get("present", True), f"{where} present"),
            selector=chk.int_(gate.get("selector", 0x08), f"{where} selector", 0, 0xFFFF))


def build_tss(b: Build) -> None:
    """`[tss]`: the TSS stack pointers given (addresses or symbols)."""
    tss = b.chk.table(b.data.get("tss", {}), "[tss]")
    b.chk.keys(tss, TSS_KEYS, "[tss]")
    b.machine.set_tss(**{k: b.addr(v, f"[tss] {k}") for k, v in tss.items()})


def build_pages(b: Build) -> None:
    """`[[pages]]`: `count` 4-KiB pages from `va` mapped to `pa` with the rights given."""
    chk, m = b.chk, b.machine
    for i, p in enumerate(chk.array_of_tables(b.data.get("pages", []), "[[pages]]"), 1):
        where = f"[[pages]] #{i}"
        chk.keys(p, PAGE_KEYS, where)
        if "va" not in p:
            raise chk.fail(where, "missing key 'va'")
        va = b.addr(p["va"], f"{where} va")
        pa = b.addr(p.get("pa", va), f"{where} pa")
        count = chk.int_(p.get("count", 1), f"{where} count", 1, 1 << 20)
        if va % 4096 or pa % 4096:
            raise chk.fail(where, "va and pa must be 4-KiB aligned")
        if va >= 1 << 47:
            raise chk.fail(f"{where} va", f"{va:#x} is not a lower-half canonical address")
        if pa + 4096 * count > b.memory and m.ept is None:
            # (In a VMX guest a guest-physical page outside RAM is legitimate: EPT decides
            # what an access to it does, e.g. a violation at a not-present PML4 entry.)
            raise chk.fail(f"{where} pa", f"{pa:#x} is outside guest memory (0..{b.memory:#x})")
        flags = {k: chk.bool_(p[k], f"{where} {k}") for k in PAGE_FLAGS if k in p}
        if va <= SYSTEM_PAGE < va + 4096 * count and (
                not flags.get("present", True) or pa + (SYSTEM_PAGE - va) != SYSTEM_PAGE):
            raise chk.fail(f"{where} va", f"{va:#x}..{va + 4096 * count:#x} unmaps or moves the "
                           f"machine's GDT and TSS page at {SYSTEM_PAGE:#x} (the CPU reads it at "
                           "start and at every privilege change); its rights may change")
        for n in range(count):
            m.set_page(PageSpec(va=va + 4096 * n, pa=pa + 4096 * n, **flags))
        problem = m.layout.tables_problem()
        if problem is not None:
            raise chk.fail(where, problem)
