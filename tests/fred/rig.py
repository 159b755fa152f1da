"""A FRED machine for the tests of tests/fred/, laid out like the common setup of the
test plan in docs/fred.md (adapted to the machine's GDT: kernel CS 0x08, SS 0x10, user
CS 0x1B, SS 0x23).

    0x070000  KERNEL_RSP   RSP of ring-0 code (the plan's 0x9000)
    0x07F000  USER_RSP_PAGE; ring-3 code runs with RSP = USER_RSP = 0x7F0123 (unaligned)
    0x100000  CODE         the test's main code
    0x400000  USER_ENTRY   IA32_FRED_CONFIG[63:12]: events from ring 3 enter here
    0x400100  KERNEL_ENTRY events from ring 0 enter here (+256)
    0x800000  RSP0..RSP3   0x80_0000, 0x81_0000, 0x82_0000, 0x83_0000

CONFIG = 0x40_0040 (red zone 64, interrupt level 0, CSL 0); STKLVLS = Linux's
0x0000_0020_0003_0024 (#DB 1, NMI 2, #DF 3, #MC 2). IA32_STAR[47:32] = 0x08 (ring-3 events
load CS 0x08 / SS 0x10); IA32_STAR[63:48] = 0x33, so ERETU's standard pair is CS 0x43 /
SS 0x3B, selectors outside the GDT (a GDT read would fault).

Expected values are written from the FRED rules (SDM Vol. 3A "FRED Event Delivery", the
ERETS/ERETU pages), never taken from a run.
"""

from __future__ import annotations

import struct
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

from cpu.fred import FredConfig
from cpu.layout import PageSpec
from cpu.machine import Machine
from cpu.vmx import VmxConfig
from idtlab.assemble import CodeBlock, assemble_blocks

MEMORY = 16 << 20
CODE = 0x100000
DATA = 0x300000
USER_ENTRY = 0x400000
KERNEL_ENTRY = 0x400100
KERNEL_RSP = 0x70000
USER_RSP = 0x7F0123
RSP = (0x800000, 0x810000, 0x820000, 0x830000)
CONFIG = 0x0000_0000_0040_0040
STKLVLS = 0x0000_0020_0003_0024
STAR = (0x33 << 48) | (0x08 << 32)
KCS, KSS, UCS, USS = 0x08, 0x10, 0x1B, 0x23
STD_UCS, STD_USS = 0x43, 0x3B  # IA32_STAR[63:48] + 16, + 8
K_GS, U_GS = 0xFFFF_8000_0000_1000, 0x7000_0000  # GS.base in ring 0 / ring 3

ERETS = ".byte 0xf2, 0x0f, 0x01, 0xca"
ERETU = ".byte 0xf3, 0x0f, 0x01, 0xca"
HANDLERS = """
user_entry:
    hlt
"""

SLOTS = ("error_code", "rip", "cs", "rflags", "rsp", "ss", "event_data", "reserved")


def ss(sel: int, t: int, v: int, flags: int = 0, length: int = 0, *, l64: int = 1,
       nested: int = 0) -> int:
    """The plan's SS(sel, t, v, flags, len, l, n): the augmented SS slot."""
    return sel | flags | v << 32 | t << 48 | l64 << 57 | nested << 58 | length << 60


def build(main: str, *, user: str = "hlt", kernel: str = "hlt", extra: Mapping[int, str] | None = None,
          config: int = CONFIG, stklvls: int = STKLVLS, pages: Iterable[PageSpec] = (),
          star: int = STAR, fred: FredConfig | None = None, enable: bool = True,
          rsp: tuple[int, int, int, int] = RSP,
          vmx: VmxConfig | None = None) -> tuple[Machine, dict[str, int]]:
    """A fresh FRED machine: `main` at CODE, `user` at the ring-3 entry, `kernel` at the
    ring-0 entry, `extra` blocks at their addresses."""
    blocks = [CodeBlock(CODE, textwrap.dedent(main), origin="main", first_line=1),
              CodeBlock(USER_ENTRY, "user_entry:\n" + textwrap.dedent(user), origin="user",
                        first_line=1),
              CodeBlock(KERNEL_ENTRY, "kernel_entry:\n" + textwrap.dedent(kernel),
                        origin="kernel", first_line=1)]
    for at, src in (extra or {}).items():
        blocks.append(CodeBlock(at, textwrap.dedent(src), origin=f"block {at:#x}", first_line=1))
    assembled, symbols = assemble_blocks(blocks, known={"DATA": DATA})
    m = Machine(MEMORY, vmx=vmx)
    m.symbols.update(symbols)
    for b in assembled:
        m.load(b.at, b.code, code=True)
    for spec in pages:
        m.set_page(spec)
    m.enable_fred(fred, enable=enable, config=config, stklvls=stklvls, rsp0=rsp[0],
                  rsp1=rsp[1], rsp2=rsp[2], rsp3=rsp[3])
    m.build()
    e = m.engine
    e.write_msr(0xC0000081, star)
    return m, symbols


def start(m: Machine, entry: int, *, cpl: int = 0, rsp: int | None = None,
          rflags: int | None = None, regs: Mapping[str, int] | None = None, **kw: Any) -> Any:
    """Run from `entry` at `cpl` with the plan's registers (GS bases: K/U in ring 0,
    reversed in ring 3)."""
    if rsp is None:
        rsp = USER_RSP if cpl == 3 else KERNEL_RSP
    if rflags is None:
        rflags = 0x246 if cpl == 3 else 0x202
    gs, kgs = (U_GS, K_GS) if cpl == 3 else (K_GS, U_GS)
    m.start_state(entry=entry, rsp=rsp, cpl=cpl, rflags=rflags, regs=dict(regs or {}))
    m.engine.write_msr(0xC0000101, gs)
    m.engine.write_msr(0xC0000102, kgs)
    return m.run(**kw)


def frame(m: Machine, at: int) -> dict[str, int]:
    """The eight slots of the FRED frame at `at`, by name."""
    words = struct.unpack("<8Q", m.read_linear(at, 64))
    return dict(zip(SLOTS, words, strict=True))


def expect_frame(**slots: int) -> dict[str, int]:
    """An expected frame: every slot not given is 0."""
    out = dict.fromkeys(SLOTS, 0)
    for k, v in slots.items():
        assert k in out, k
        out[k] = v
    return out


def records(m: Machine, kind: str) -> list[dict[str, Any]]:
    return [r for r in m.trace.records if r["kind"] == kind]


def csl(m: Machine) -> int:
    return m.state.fred.config & 3
