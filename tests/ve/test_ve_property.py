"""Property: over random EPT states, busy words and accesses, the machine never crashes
and a #VE is delivered exactly when the SDM's conversion rule says so (SDM Vol. 3C
"EPT Violations", "Convertible EPT Violations"):

    #VE  <=>  the access violates the EPT rights
              and "EPT-violation #VE" is enabled
              and the counted entry's suppress-#VE bit is 0
              and the busy word is 0
              and the access is not part of delivering an event through the IDT

Each example builds one machine: four 4-KiB pages with random rights (not present, or a
legal R/W/X combination: W without R is a misconfiguration, not a violation) and random
suppress-#VE bits, each touched once by a random access (read, write, or fetch), plus
one INT3 whose IST1 stack page gets a random EPT state too (its frame pushes are writes
during delivery), in random order. The #VE handler logs the GPA, re-arms or not (random)
and resumes after the access; the host fixes every VM exit ("resume-fixed"), so every
access eventually completes. The expected sequence of #VEs and VM exits is computed by
the predicate above, independently of idt.ve.

Every page is touched by one access only: a second access of another kind to the same
page would meet a known deviation (test_ve_rules.py, TLB_RIGHTS_BUG).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import example, given, settings
from hypothesis import strategies as st

from cpu.outcomes import OUTCOMES
from tests.ve.kit import DATA, IST1_TOP, KERNEL_STACK, PAGE, PROBE, VE_INFO, build, of_kind

RIGHTS = ["---", "R--", "R-X", "RW-", "RWX", "--X"]  # legal EPT leaf states
ACCESSES = ["read", "write", "fetch"]
NEEDS = {"read": "R", "write": "W", "fetch": "X", "push": "W"}
INSN = {
    "read": "mov rax, qword ptr [rcx]",
    "write": "mov qword ptr [rcx], rdx",
    "fetch": "jmp rcx",  # the page holds "jmp r15": back to the continuation
    "push": "int3",  # its frame goes to IST1: writes during delivery
}
JMP_R15 = b"\x41\xff\xe7"
PUSH_PAGE = IST1_TOP - PAGE


@dataclass(frozen=True)
class Step:
    kind: str  # read | write | fetch | push
    gpa: int  # the page touched (the IST1 top page for a push)
    rights: str
    suppress: bool


# Weighted towards the interesting case (enabled, armed, not suppressed), so that
# examples with several #VEs, and #VEs followed by busy-word VM exits, are common.
suppress_bits = st.sampled_from([False, False, True])
steps_strategy = st.lists(
    st.tuples(st.sampled_from(ACCESSES), st.sampled_from(RIGHTS), suppress_bits),
    min_size=4, max_size=4,
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Step], bool, int, bool]:
    pages = draw(steps_strategy)
    steps = [Step(kind, PROBE + i * PAGE, rights, sup) for i, (kind, rights, sup) in enumerate(pages)]
    push = Step("push", PUSH_PAGE, draw(st.sampled_from(RIGHTS)), draw(suppress_bits))
    steps.insert(draw(st.integers(0, len(steps))), push)
    enabled = draw(st.sampled_from([True, True, True, False]))
    busy = draw(st.one_of(st.just(0), st.just(0), st.just(0xFFFFFFFF), st.integers(1, 2**32 - 1)))
    rearm = draw(st.booleans())
    return steps, enabled, busy, rearm


def program(steps: list[Step]) -> str:
    lines = ["main:", "    mov rdx, 0x1234"]
    for i, step in enumerate(steps):
        lines += [f"    mov r15, cont_{i}", f"    mov rcx, {step.gpa:#x}", f"    {INSN[step.kind]}",
                  f"cont_{i}:"]
    lines += [
        "    mov dx, 0xf4",
        "    mov al, byte ptr [DATA]",
        "    out dx, al",
        "bp_handler:",
        "    iretq",
        "ve_handler:",  # log the GPA, re-arm if r14 != 0, resume at the continuation (r15)
        "    push rax",
        "    push rbx",
        "    mov rbx, qword ptr [DATA]",
        "    mov rax, qword ptr [VE_INFO + 0x18]",
        "    mov qword ptr [DATA + 8 + rbx*8], rax",
        "    inc qword ptr [DATA]",
        "    test r14, r14",
        "    jz ve_keep_busy",
        "    mov dword ptr [VE_INFO + 4], 0",
        "ve_keep_busy:",
        "    mov qword ptr [rsp + 16], r15",
        "    pop rbx",
        "    pop rax",
        "    iretq",
    ]
    return "\n".join(lines) + "\n"


def expected(steps: list[Step], enabled: bool, busy: int, rearm: bool) -> list[tuple[str, int]]:
    """("ve" | "exit", page) for every violation, in order, by the SDM rule."""
    out: list[tuple[str, int]] = []
    for step in steps:
        if NEEDS[step.kind] in step.rights:
            continue  # allowed: no violation
        during = step.kind == "push"
        if enabled and not step.suppress and busy == 0 and not during:
            out.append(("ve", step.gpa))
            busy = 0 if rearm else 0xFFFFFFFF
        else:
            out.append(("exit", step.gpa))
    return out


def _all(kind: str, rights: str, suppress: bool = False) -> list[Step]:
    """Four pages in the same state and the INT3 (stack page not present) in the middle."""
    pages = [Step(kind, PROBE + i * PAGE, rights, suppress) for i in range(4)]
    return [*pages[:2], Step("push", PUSH_PAGE, "---", False), *pages[2:]]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(scenarios())
@example((_all("read", "---"), True, 0, True))  # re-armed each time: four #VEs
@example((_all("write", "R-X"), True, 0, False))  # never re-armed: one #VE, then VM exits
@example((_all("fetch", "RW-"), True, 0, True))
@example((_all("read", "--X", suppress=True), True, 0, True))  # all suppressed: VM exits
def test_a_ve_is_delivered_exactly_when_the_conversion_rule_allows_it(
        case: tuple[list[Step], bool, int, bool]) -> None:
    steps, enabled, busy, rearm = case
    m, s = build(program(steps), ve=enabled, gates={3: {"handler": "bp_handler", "ist": 1},
                                                    20: {"handler": "ve_handler"}})
    assert m.ept is not None
    m.phys.write(VE_INFO + 4, busy.to_bytes(4, "little"))
    for step in steps:
        if step.kind == "fetch":
            m.phys.write(step.gpa, JMP_R15)
        m.ept.set_range(step.gpa, PAGE, read="R" in step.rights, write="W" in step.rights,
                        execute="X" in step.rights, suppress_ve=step.suppress)
    m.on_ept_violation = "resume-fixed"
    result = m.run(entry=s["main"], rsp=KERNEL_STACK, regs={"r14": int(rearm)}, max_insns=10_000)
    assert result.outcome in OUTCOMES
    assert result.outcome == "exit", result.reason

    want = expected(steps, enabled, busy, rearm)
    recs = result.trace.records
    got = [("ve" if r["kind"] == "ve_info_written" else "exit", r["gpa"] & ~(PAGE - 1))
           for r in recs if r["kind"] in ("ve_info_written", "vmexit")]
    assert got == want
    ve_gpas = [gpa for what, gpa in want if what == "ve"]
    # Each #VE frame's saved RIP: the faulting instruction (the 3-byte MOV before the
    # continuation), or for a fetch the target it could not fetch.
    ve_rips = [step.gpa if step.kind == "fetch" else s[f"cont_{i}"] - 3
               for i, step in enumerate(steps) if ("ve", step.gpa) in want]
    assert [d["rip"] for d in of_kind(recs, "deliver") if d["vector"] == 20] == ve_rips
    assert result.exit_code == len(ve_gpas)
    assert [m.phys.read_u64(DATA + 8 + 8 * i) for i in range(len(ve_gpas))] == ve_gpas
    # The INT3's #BP is delivered exactly once, whatever its stack's EPT state.
    assert sum(1 for d in of_kind(recs, "deliver") if d["vector"] == 3) == 1
