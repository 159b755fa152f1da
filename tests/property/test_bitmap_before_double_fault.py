"""The VMX order of SDM Vol. 3C "Other Causes of VM Exits" (the table of the host-model
reference): for any first event E1 whose delivery raises E2, and any exception bitmap
with any #PF filter, `deliver_event(..., intercept=)` ends in exactly the outcome the
table gives — an exit with II = E2 and IDT-vectoring = E1 when the bitmap takes E2;
otherwise serial delivery, or #DF (an exit without IDT-vectoring when the bitmap takes
vector 8). The expected outcome is computed here from Table 6-4/6-5 written out, not
from idt/."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from idt.double_fault import deliver_event
from idt.state import Event
from idt.vmx_events import ExceptionBitmap
from tests.unit import fakes

BENIGN = {1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19}
CONTRIBUTORY = {0, 10, 11, 12, 13, 21}
PAGE_FAULT = {14, 20}
FIRSTS: list[int | str] = [*sorted((BENIGN | CONTRIBUTORY | PAGE_FAULT) - {2}), "nmi", "intr", "int"]
NP, PF = 11, 14
PF_STACK_WRITE = 0x2  # supervisor write, not present


def klass(v: int) -> str:
    return "C" if v in CONTRIBUTORY else "P" if v in PAGE_FAULT else "B"


def first_event(kind: int | str) -> Event:
    if kind == "nmi":
        return fakes.nmi()
    if kind == "intr":
        return fakes.interrupt(0x30)
    if kind == "int":
        return fakes.software(0x80)
    v = int(kind)
    return fakes.exception(v, 0 if v in (10, 11, 12, 13, 14, 17, 21) else None,
                           cr2=0x1234 if v == 14 else None)


@given(first=st.sampled_from(FIRSTS), how=st.sampled_from(["gate", "stack"]),
       bitmap=st.integers(0, 2**32 - 1), mask=st.sampled_from([0, 0x2, 0x4, 0xFFFF]),
       match=st.sampled_from([0, 0x2, 0x4, 0xFFFFFFFF]))
def test_the_bitmap_sees_the_second_exception_before_any_double_fault(
        first: int | str, how: str, bitmap: int, mask: int, match: int) -> None:
    w = fakes.World()
    ev = first_event(first)
    v1 = ev.vector
    for v in (NP, PF, 8, 13, 12, 10):
        w.set_gate(v, ist=2)  # nested events deliver on a good stack
    if how == "gate":
        # E1's gate is absent (#NP), unless E1 is one of the vectors above: then make
        # its gate absent too, and E2 is still #NP.
        if v1 in (NP, PF, 8, 13, 12, 10):
            w.set_gate(v1, present=False)
        e2, e2_code = NP, (v1 << 3) | 2 | (0 if first == "int" else 1)
        if first == "int":
            w.set_gate(0x80, present=False, dpl=3)
    else:
        # E1's frame push hits a not-present stack page (E1 on the current stack).
        w.set_gate(v1, ist=0, dpl=3)
        w.mem.not_present.add((fakes.KERNEL_RSP - 1) & ~0xFFF)
        e2, e2_code = PF, PF_STACK_WRITE
    eb = ExceptionBitmap(bitmap, mask, match)
    st_ = fakes.make_state()
    out = deliver_event(w.mem, st_, ev, intercept=eb.exits)

    pf_exits = bool(bitmap >> 14 & 1) ^ ((e2_code & mask) != match)
    e2_exits = pf_exits if e2 == PF else bool(bitmap >> e2 & 1)
    if e2_exits:
        assert out.intercepted is not None and out.intercepted_during is ev
        assert (out.intercepted.vector, out.intercepted.error_code) == (e2, e2_code)
        assert out.delivery is None and not out.nested
        if e2 == PF:
            assert st_.cr2 == (ev.cr2 or 0)  # the second #PF exits directly: CR2 not loaded
        return
    is_exception = first not in ("nmi", "intr", "int")
    double = is_exception and ((klass(v1), klass(e2)) in {("C", "C"), ("P", "C"), ("P", "P")})
    if double and bitmap >> 8 & 1:
        assert out.intercepted is not None and out.intercepted.vector == 8
        assert out.intercepted_during is None  # an exit due to #DF: no IDT-vectoring
        return
    assert out.intercepted is None and not out.triple_fault
    assert out.delivery is not None
    assert out.delivery.event.vector == (8 if double else e2)
