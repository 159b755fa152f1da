"""`idtlab lab show`'s page in a real browser: Debian's chromium, headless, driven by
selenium. The stack pictures (SVG) and the timeline must render: present, visible, with
a non-zero size. Skips with a message when chromium, chromedriver or selenium is missing
(CI installs them: .ci/run)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idtlab.cli import main
from tests.browser import open_browser, size

SOLUTIONS = Path(__file__).resolve().parent / "solutions"
@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with open_browser("the lab show browser test", tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lab") / "work"
    assert main(["lab", "start", "05-nmi-ist", str(d)]) == 0
    shutil.copyfile(SOLUTIONS / "05-nmi-ist" / "wrong_executing_flag.s", d / "handler.s")
    assert main(["lab", "check", str(d)]) == 1
    assert main(["lab", "show", str(d)]) == 0
    return d / "lab.html"


def test_the_lab_page_renders_its_stack_pictures_and_timeline_in_chromium(
        browser: Any, page: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(page.as_uri())
    assert browser.title == "idtlab lab 05-nmi-ist: NMIs on IST"
    failing = browser.find_element(By.ID, "check-nmi-in-the-body")
    assert failing.get_attribute("open") is not None  # failed checks are open
    svgs = failing.find_elements(By.CSS_SELECTOR, "svg.stack-picture")
    assert len(svgs) >= 3
    for svg in svgs:
        assert svg.is_displayed()
        w, h = size(svg)
        assert w > 300 and h > 150, (w, h)
    slots = failing.find_elements(By.CSS_SELECTOR, "svg.stack-picture rect.slot")
    assert slots and all(size(s)[0] > 0 and size(s)[1] > 0 for s in slots)
    assert failing.find_elements(By.CSS_SELECTOR, "rect.gate-field")
    timeline = failing.find_element(By.CSS_SELECTOR, "ol.timeline")
    assert timeline.is_displayed() and size(timeline)[1] > 50
    rows = timeline.find_elements(By.TAG_NAME, "li")
    assert len(rows) > 5 and any("overwrites the live NMI frame" in r.text for r in rows)
    lesson = browser.find_element(By.ID, "surviving-the-nested-nmi")
    assert lesson.is_displayed() and lesson.text == "Surviving the nested NMI"
    shot = os.environ.get("IDTLAB_LAB_SCREENSHOT")
    if shot:  # for a person to look at: IDTLAB_LAB_SCREENSHOT=/tmp/lab.png pytest ...
        browser.execute_script("arguments[0].scrollIntoView()", failing)
        browser.save_screenshot(shot)
