"""idt/blocking.py on its own: the NMI latch and the arbiter's answer for every
combination of blocking state (SDM Vol. 3A "Handling Multiple NMIs", Table 6-2, and the
interruptibility-state shadows, SDM Vol. 3C "Interruptibility State")."""

from __future__ import annotations

import itertools

import pytest

from idt.blocking import Held, Interruptibility, NmiArrival, Shadow, arbitrate, shadow_after


def test_an_nmi_arriving_unblocked_is_pending_a_second_is_dropped() -> None:
    st = Interruptibility()
    assert st.nmi_arrives() is NmiArrival.PENDING
    assert st.nmi_arrives() is NmiArrival.DROPPED
    assert st.nmi_pending


def test_an_nmi_arriving_while_blocked_is_latched_and_extras_are_dropped() -> None:
    st = Interruptibility(nmi_blocked=True)
    assert [st.nmi_arrives() for _ in range(3)] == [
        NmiArrival.LATCHED, NmiArrival.DROPPED, NmiArrival.DROPPED]


def reference(nmi_pending: bool, nmi_blocked: bool, shadow: Shadow, sti_blocks_nmi: bool,
              if_flag: bool, intr: bool) -> str | None:
    """The rules written out independently: NMI first unless blocked or shadowed (MOV SS
    always, STI if the option says so); then INTR if IF = 1 and no shadow."""
    nmi_shadowed = bool(shadow & Shadow.MOV_SS) or (bool(shadow & Shadow.STI) and sti_blocks_nmi)
    if nmi_pending and not nmi_blocked and not nmi_shadowed:
        return "nmi"
    if intr and if_flag and shadow == Shadow.NONE:
        return "intr"
    return None


SHADOWS = [Shadow.NONE, Shadow.STI, Shadow.MOV_SS]


@pytest.mark.parametrize(("nmi_pending", "nmi_blocked", "shadow", "sti_blocks_nmi", "if_flag", "intr"),
                         list(itertools.product([False, True], [False, True], SHADOWS, [False, True],
                                                [False, True], [False, True])))
def test_the_arbiter_delivers_what_the_rules_allow_in_priority_order(
        nmi_pending: bool, nmi_blocked: bool, shadow: Shadow, sti_blocks_nmi: bool, if_flag: bool,
        intr: bool) -> None:
    st = Interruptibility(nmi_blocked=nmi_blocked, nmi_pending=nmi_pending, shadow=shadow,
                          sti_blocks_nmi=sti_blocks_nmi)
    choice = arbitrate(st, if_flag=if_flag, intr_pending=intr)
    assert choice.deliver == reference(nmi_pending, nmi_blocked, shadow, sti_blocks_nmi, if_flag, intr)


def test_a_held_event_names_its_reason_and_stepping_is_asked_only_for_one_instruction_reasons() -> None:
    blocked = arbitrate(Interruptibility(nmi_blocked=True, nmi_pending=True), if_flag=True,
                        intr_pending=False)
    assert blocked.held == (("nmi", Held.NMI_BLOCKED),) and not blocked.needs_stepping
    movss = arbitrate(Interruptibility(nmi_pending=True, shadow=Shadow.MOV_SS), if_flag=True,
                      intr_pending=True)
    assert movss.held == (("nmi", Held.MOV_SS_SHADOW), ("intr", Held.MOV_SS_SHADOW))
    assert movss.needs_stepping
    if_clear = arbitrate(Interruptibility(), if_flag=False, intr_pending=True)
    assert if_clear.held == (("intr", Held.IF_CLEAR),) and if_clear.waits_for_if
    assert not if_clear.needs_stepping  # IF = 0 ends at an IF-setting instruction, a stop


def test_an_nmi_wins_over_an_interrupt_which_stays_held_not_dropped() -> None:
    choice = arbitrate(Interruptibility(nmi_pending=True), if_flag=True, intr_pending=True)
    assert choice.deliver == "nmi" and choice.held == ()


# -- chained shadows (SDM-corner rule 13; docs/sdm-map.md "Chained shadows") --------------

def test_mov_ss_right_after_sti_opens_its_own_shadow() -> None:
    assert shadow_after(Shadow.STI, Shadow.MOV_SS, if_before=True) is Shadow.MOV_SS


def test_sti_right_after_mov_ss_opens_its_own_shadow_when_it_sets_if() -> None:
    assert shadow_after(Shadow.MOV_SS, Shadow.STI, if_before=False) is Shadow.STI


def test_sti_with_if_already_set_opens_none_even_after_sti() -> None:
    assert shadow_after(Shadow.STI, Shadow.STI, if_before=True) is Shadow.NONE
    assert shadow_after(Shadow.NONE, Shadow.STI, if_before=True) is Shadow.NONE


def test_mov_ss_right_after_mov_ss_is_not_rearmed() -> None:
    assert shadow_after(Shadow.MOV_SS, Shadow.MOV_SS, if_before=False) is Shadow.NONE


def test_a_lone_shadow_opener_opens_its_shadow() -> None:
    assert shadow_after(Shadow.NONE, Shadow.MOV_SS, if_before=True) is Shadow.MOV_SS
    assert shadow_after(Shadow.NONE, Shadow.STI, if_before=False) is Shadow.STI


def test_only_sti_and_mov_ss_open_shadows() -> None:
    with pytest.raises(ValueError):
        shadow_after(Shadow.NONE, Shadow.NONE, if_before=False)
