"""NMI blocking under FRED: test-plan cases 9-11 of docs/fred.md. Only an ERET whose SS
slot has bit 18 unblocks NMIs; a same-level event nests below the live frame."""

from __future__ import annotations

from typing import Any

from tests.fred.rig import (
    CODE,
    ERETS,
    KCS,
    KERNEL_RSP,
    KSS,
    RSP,
    build,
    csl,
    expect_frame,
    frame,
    records,
    ss,
    start,
)

DISPATCH = """
    mov rax, [rsp+0x28]
    shr rax, 48
    and eax, 0xf
    cmp eax, 2
    je nmi_handler
    cmp eax, 6
    je bp_handler
"""


def events(m: Any) -> list[tuple[str, Any]]:
    """(kind, name or stack level) for every deliver and eret, in order."""
    out: list[tuple[str, Any]] = []
    for r in m.trace.records:
        if r["kind"] == "deliver":
            out.append(("deliver", r["name"]))
        elif r["kind"] == "eret":
            out.append(("eret", r["nmi_unblocked"]))
    return out


def test_case9_an_nmi_and_a_nested_int1_share_the_nmi_level_and_two_erets_unwind() -> None:
    kernel = DISPATCH + f"""
        {ERETS}
    bp_handler:
        hlt
    nmi_handler:
        .byte 0xf1
    after_int1:
        {ERETS}
    """
    m, sym = build("hlt\n", kernel=kernel)
    m.nmi()
    start(m, CODE)
    nmi_frame = RSP[2] - 64
    assert frame(m, nmi_frame) == expect_frame(
        rip=CODE, cs=KCS, rflags=0x202, rsp=KERNEL_RSP, ss=ss(KSS, 2, 2, 1 << 18))
    assert frame(m, nmi_frame)["ss"] == 0x0202_0002_0004_0010
    int1_frame = ((nmi_frame - 0x40) & ~0x3F) - 64
    assert frame(m, int1_frame) == expect_frame(
        # RFLAGS: 0x2 from delivery, then ZF and PF from the dispatch's `cmp eax, 2`.
        rip=sym["after_int1"], cs=KCS | 2 << 16, rflags=0x46, rsp=nmi_frame,
        ss=ss(KSS, 5, 1, 0, 1))
    nmi, int1 = records(m, "deliver")
    assert (nmi["stack"], nmi["stack_level"]) == ("rsp2", 2)
    assert (int1["stack"], int1["stack_level"], int1["rsp"]) == ("current", 2, int1_frame)
    first, second = records(m, "eret")
    assert (first["stack_level"], first["nmi_unblocked"]) == (2, False)
    assert (second["stack_level"], second["nmi_unblocked"], second["to_rip"],
            second["to_rsp"]) == (0, True, CODE, KERNEL_RSP)
    assert not m.intr.nmi_blocked and csl(m) == 0
    assert records(m, "frame_overwritten") == []


def test_case10_a_latched_nmi_waits_for_the_nmi_frames_erets_not_the_pf_handlers() -> None:
    kernel = DISPATCH + f"""
        add qword ptr [rsp+8], 3
        {ERETS}
    bp_handler:
        hlt
    nmi_handler:
        mov rax, 0xDEAD000
    pf_here:
        mov rbx, [rax]
        {ERETS}
    """
    m, _ = build("hlt\n", kernel=kernel)
    m.nmi()
    m.inject("nmi", before="pf_here")
    start(m, CODE)
    assert events(m) == [
        ("deliver", "NMI"), ("deliver", "#PF"), ("eret", False), ("eret", True),
        ("deliver", "NMI"), ("deliver", "#PF"), ("eret", False), ("eret", True)]
    erets = records(m, "eret")
    nmis = [r for r in records(m, "deliver") if r["name"] == "NMI"]
    # The held NMI comes at the boundary right after the NMI frame's ERETS: no
    # instruction at CODE ran in between, and its frame is at the top of RSP2 again.
    assert nmis[1]["icount"] == erets[1]["icount"]
    assert (nmis[1]["rip"], nmis[1]["rsp"]) == (CODE, RSP[2] - 64)
    assert records(m, "frame_overwritten") == []


def test_case11_erets_through_an_int3_frame_with_bit_18_set_unblocks_nmis() -> None:
    kernel = DISPATCH + f"""
        hlt
    bp_handler:
        bts qword ptr [rsp+0x28], 18
        {ERETS}
    nmi_handler:
        int3
        hlt
    """
    m, _ = build("hlt\n", kernel=kernel)
    m.nmi()
    start(m, CODE)
    (eret,) = records(m, "eret")
    assert eret["nmi_unblocked"] is True
    assert not m.intr.nmi_blocked


def test_case11_erets_through_an_nmi_frame_with_bit_18_cleared_leaves_nmis_blocked() -> None:
    kernel = DISPATCH + f"""
        hlt
    bp_handler:
        hlt
    nmi_handler:
        btr qword ptr [rsp+0x28], 18
        {ERETS}
    """
    m, _ = build("nop\nhlt\n", kernel=kernel)
    m.nmi()
    m.inject("nmi", before=CODE + 1)
    start(m, CODE)
    (eret,) = records(m, "eret")
    assert eret["nmi_unblocked"] is False
    assert m.intr.nmi_blocked
    assert [r["name"] for r in records(m, "deliver")] == ["NMI"]  # the second stays latched
    assert m.intr.nmi_pending
