"""Random guests survive: whatever the guest code, gates, TSS, page attributes and
injected events, a run ends with one of the documented outcomes, no exception escapes
`Machine.run`, and two runs of the same guest give the same trace.

The programs are built from encoded instruction snippets (system instructions, faults,
privileged and undefined bytes, stack games), not assembled text, so a run costs
milliseconds. The budget: IDTLAB_FUZZ_EXAMPLES examples (default 60, a few seconds in
CI); set it to thousands for a long local run. The seed is hypothesis's own (printed on
failure, with the shrunk program).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpu.events import AtIcount, Interrupt, Nmi
from cpu.layout import PageSpec
from cpu.machine import Machine
from cpu.outcomes import OUTCOMES

EXAMPLES = int(os.environ.get("IDTLAB_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CODE = 0x100000
HANDLERS = 0x101000  # handler k at HANDLERS + 0x100 * k
N_HANDLERS = 6
DATA = 0x200000
MEMORY = 8 << 20

# Encoded snippets: system instructions, faults, stack and privilege games.
SNIPPETS = [bytes.fromhex(h) for h in (
    "48cf",          # iretq
    "cf",            # iretd (not modelled: an outcome)
    "cc",            # int3
    "cd80", "cd02", "cd08", "cd0e", "cd20",  # int n
    "f1",            # int1
    "0f0b",          # ud2
    "06",            # #UD in 64-bit mode
    "f4",            # hlt
    "fb", "fa",      # sti, cli
    "90", "f390",    # nop, pause
    "9c", "9d",      # pushfq, popfq
    "50", "58",      # push rax, pop rax
    "8ed0",          # mov ss, ax
    "66b81000", "66b82b00", "66b80000",  # mov ax, 0x10 / 0x2b / 0
    "31c0", "31c9",  # xor eax, eax / xor ecx, ecx
    "f7f1",          # div ecx (#DE when ECX = 0)
    "0f30", "0f32",  # wrmsr, rdmsr
    "0fa2",          # cpuid
    "0f22c0", "0f20c0", "0f22e0", "0f22d8", "0f20d0",  # mov cr0/cr4/cr3 <- rax, rax <- cr0/cr2
    "440f22c0", "440f20c0",  # mov cr8, rax / mov rax, cr8
    "0f05", "480f07",  # syscall, sysretq
    "0f34", "480f35",  # sysenter, sysexit
    "e680", "e460", "ee", "ec", "e6f4",  # out 0x80, al / in al, 0x60 / out dx, al / in al, dx / exit port
    "0f0118", "0f0110", "0f00d8", "0f0100",  # lidt [rax], lgdt [rax], ltr ax, sgdt [rax]
    "0f01d1", "0f01d0",  # xsetbv, xgetbv
    "0f01f8",        # swapgs
    "f3480faed0",    # wrfsbase rax
    "0f23f8", "0f21f8",  # mov dr7, rax / mov rax, dr7
    "f090", "f00000",  # lock nop (#UD), lock add [rax], al
    "0f31",          # rdtsc
    "8800", "488b00", "48890424",  # mov [rax], al / mov rax, [rax] / mov [rsp], rax
    "c3",            # ret
    "eb00", "ebfe",  # jmp +0, jmp self
    "48c7c400100000", "48c7c4f0ff0700", "48c7c40000a000",  # mov rsp, imm
    "0f0b0f0b",
    "48cf48cf",
)]
VALUES = [0, 1, 0x10, 0x2B, 0x1B, 0x8, 0x80000, 0x90000, 0x7F000, 0x1000, 0x2000, 0x3000,
          DATA, CODE, HANDLERS, 0xFEE00000, 0xC0000080, 0xC0000082, 0x1B, 0x174, 0x10 << 40,
          0x8000000000000000, 0xFFFF800000000000, 2**64 - 1, 0x80000011, 0x20, 0x620]


@st.composite
def snippet(draw: Any) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # mov rax/rcx/rdx/rsp, imm64
        reg = draw(st.sampled_from([0xB8, 0xB9, 0xBA, 0xBC]))
        value = draw(st.sampled_from(VALUES) | st.integers(0, 2**64 - 1))
        return bytes([0x48, reg]) + value.to_bytes(8, "little")
    if kind == 1:
        return draw(st.binary(min_size=1, max_size=6))
    return draw(st.sampled_from(SNIPPETS))


code_block = st.lists(snippet(), min_size=1, max_size=12).map(b"".join)


@dataclass(frozen=True)
class Guest:
    main: bytes
    handlers: tuple[bytes, ...]
    gates: tuple[tuple[int, int, int, str, int, bool, int], ...]
    tss: tuple[tuple[str, int], ...]
    pages: tuple[PageSpec, ...]
    injections: tuple[tuple[str, int, int], ...]
    cpl: int
    mode: str
    rsp: int


STACKS = [0x7F000, 0x80000, 0x90000, 0x6F000, DATA + 0x1000, 0, 0x7FFFF, 1 << 47,
          0xFFFF800000000000, MEMORY + 0x1000]
PAGES = [CODE, HANDLERS, DATA, 0x7E000, 0x7F000, 0x8F000, 0x6E000, 0x3000, 0x2000, 0x1000]

guests = st.builds(
    Guest,
    main=code_block,
    handlers=st.lists(code_block, min_size=N_HANDLERS, max_size=N_HANDLERS).map(tuple),
    gates=st.lists(st.tuples(
        st.sampled_from([0, 1, 2, 3, 6, 8, 13, 14, 0x20, 0x80, 255]),
        st.integers(0, N_HANDLERS) ,  # N_HANDLERS: a random address
        st.integers(0, 7),
        st.sampled_from(["interrupt", "trap"]),
        st.integers(0, 3),
        st.booleans(),
        st.sampled_from([0x08, 0x10, 0x1B, 0x23, 0, 0x28, 0xFFF8])), max_size=8).map(tuple),
    tss=st.lists(st.tuples(st.sampled_from(["rsp0", "ist1", "ist2", "ist3"]),
                           st.sampled_from(STACKS)), max_size=4).map(tuple),
    pages=st.lists(st.builds(lambda va, pa, p, w, u, nx: PageSpec(va, pa, p, w, u, nx),
                             st.sampled_from(PAGES), st.sampled_from(PAGES), st.booleans(),
                             st.booleans(), st.booleans(), st.booleans()),
                   max_size=4).map(tuple),
    injections=st.lists(st.tuples(st.sampled_from(["nmi", "interrupt"]),
                                  st.integers(0x20, 0xFF), st.integers(0, 300)),
                        max_size=3).map(tuple),
    cpl=st.sampled_from([0, 0, 3]),
    mode=st.sampled_from(["fast", "timed"]),
    rsp=st.sampled_from(STACKS),
)


def run_guest(g: Guest) -> tuple[str, list[dict[str, Any]], bytes]:
    m = Machine(MEMORY, mode=g.mode, max_insns=3000, max_events=300)
    m.load(CODE, g.main, code=True)
    for k, h in enumerate(g.handlers):
        m.load(HANDLERS + 0x100 * k, h[:0x100], code=True)
    for vector, k, ist, kind, dpl, present, selector in g.gates:
        handler = HANDLERS + 0x100 * k if k < N_HANDLERS else 0x3FFFF0
        m.set_gate(vector, handler, ist=ist, gate_type=kind, dpl=dpl, present=present,
                   selector=selector)
    m.set_tss(**dict(g.tss))
    for spec in g.pages:
        with contextlib.suppress(ValueError):  # the GDT/TSS page must stay present, in place
            m.set_page(spec)
    for kind, vector, icount in g.injections:
        m.inject(Nmi() if kind == "nmi" else Interrupt(vector), AtIcount(icount))
    result = m.run(entry=CODE, rsp=g.rsp, cpl=g.cpl)
    return result.outcome, list(result.trace.records), bytes(m.serial)


@FUZZ
@given(guests)
def test_a_random_guest_ends_with_a_documented_outcome_the_same_way_twice(g: Guest) -> None:
    outcome, trace, serial = run_guest(g)
    assert outcome in OUTCOMES
    assert trace and trace[-1]["kind"] == "end"
    assert run_guest(g) == (outcome, trace, serial)
