"""The built-in labs as a course: at least seven, in order, each with a lesson that cites
the SDM and draws a picture, starter assembly with TODOs, visible example checks and
hidden checks, at least one of them handing the handler to the race explorer."""

from __future__ import annotations

import re

import pytest

from idtlab.labs import folder

LABS = folder.all_labs(None)


def test_the_course_has_at_least_seven_labs_numbered_in_order() -> None:
    assert len(LABS) >= 7
    assert [lab.number for lab in LABS] == list(range(1, len(LABS) + 1))


@pytest.mark.parametrize("lab", LABS, ids=lambda lab: lab.name)
def test_every_lab_has_a_lesson_with_the_sdm_and_a_picture(lab: folder.Lab) -> None:
    lesson = lab.lesson
    assert lesson.startswith(f"# Lab {lab.number}: {lab.title}")
    assert "Intel SDM Vol." in lesson
    assert re.search(r"```\n.*[+|].*\n.*```", lesson, re.S), "no ASCII picture"
    assert lab.sdm and lab.concepts
    for c in lab.checks:
        assert c.hint in folder.headings(lesson)


@pytest.mark.parametrize("lab", LABS, ids=lambda lab: lab.name)
def test_every_lab_has_a_starter_with_todos_visible_checks_and_hidden_explored_checks(
        lab: folder.Lab) -> None:
    starter = (lab.path / "starter" / lab.files[0]).read_text()
    assert "TODO" in starter and "lesson" in starter
    assert any(c.visible for c in lab.checks)
    assert any(not c.visible and c.kind == "explore" for c in lab.checks)
    for c in lab.checks:
        text = lab.check_path(c).read_text()
        assert 'file = "../handler.s"' in text, c.name
        if c.kind == "explore":
            assert c.window.split("..")[0] in text + starter, c.name


def test_a_lab_is_found_by_folder_name_number_or_short_name() -> None:
    assert folder.find_lab("05-nmi-ist", None).name == "05-nmi-ist"
    assert folder.find_lab("5", None).name == "05-nmi-ist"
    assert folder.find_lab("05", None).name == "05-nmi-ist"
    assert folder.find_lab("nmi-ist", None).name == "05-nmi-ist"
