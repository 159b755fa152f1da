"""The race explorer's HTML report in a real browser: Debian's chromium, headless,
driven by selenium (the pattern of tests/labs/test_lab_show_browser.py). The legend, the
run's parameters, the minimal schedule of a random search, the filter, a group opened
onto its schedules and one expanded timeline (with a stack picture) must render:
present, visible, with a size. Skips with a message when chromium, chromedriver or
selenium is missing (CI installs them: .ci/run). `IDTLAB_EXPLORE_SCREENSHOT=/tmp/x.png`
saves a screenshot for a person to look at."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idtlab.cli import main
from tests.browser import open_browser, size

EXAMPLES = Path(__file__).resolve().parents[2] / "idtlab" / "examples" / "explore"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with open_browser("the explore report browser test", tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A random search over the naive nested-NMI handler: its minimal schedule is one
    # NMI at the handler's entry, and its counterexamples overwrite the live NMI frame.
    out = tmp_path_factory.mktemp("explore") / "report.html"
    assert main(["explore", str(EXAMPLES / "nested_nmi_naive.toml"), "--random", "40",
                 "--seed", "3", "--window", "nmi_handler..main_done", "--invariant",
                 "frames-intact", "--html", str(out)]) == 1
    return out


def _visible(el: Any) -> bool:
    w, h = size(el)
    return bool(el.is_displayed()) and w > 0 and h > 0


def test_the_report_renders_its_legend_parameters_and_minimal_schedule(
        browser: Any, report: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(report.as_uri())
    assert browser.title == "idtlab explore: nested_nmi_naive.toml"
    verdict = browser.find_element(By.ID, "verdict")
    assert _visible(verdict) and "break an expectation or invariant" in verdict.text
    params = browser.find_element(By.ID, "parameters")
    assert _visible(params)
    for text in ("nmi_handler..main_done", "40 random schedules", "frames-intact",
                 "idtlab explore"):
        assert text in params.text, text
    legend = browser.find_element(By.ID, "legend")
    assert _visible(legend)
    assert "BREAKS" in legend.text and "not applicable" in legend.text
    assert "!!" in legend.text and "(#k)" in legend.text
    minimal = browser.find_element(By.ID, "minimal")
    assert _visible(minimal)
    assert "nmi @ nmi_handler (#1)" in minimal.text
    assert "invariant frames-intact: the NMI frame at 0x121fd8 was overwritten" in minimal.text


def test_the_filter_hides_the_rows_that_do_not_match_and_the_status_switches_too(
        browser: Any, report: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(report.as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "details.group")
    assert len(rows) > 3 and all(r.is_displayed() for r in rows)
    box = browser.find_element(By.ID, "filter")
    box.send_keys("work (#3)")
    shown = [r for r in rows if r.is_displayed()]
    assert 0 < len(shown) < len(rows)
    assert all("work (#3)" in r.get_attribute("data-text") for r in shown)
    box.clear()
    box.send_keys(" ")  # an input event with an empty query: everything again
    ok_toggle = browser.find_element(By.CSS_SELECTOR, "input.st-toggle[value='ok']")
    ok_toggle.click()
    shown = [r for r in rows if r.is_displayed()]
    assert shown and all(r.get_attribute("data-status") != "ok" for r in shown)
    assert int(browser.find_element(By.ID, "shown").text) == len(shown)


def test_a_row_opens_onto_its_schedules_and_a_timeline_expands_with_its_pictures(
        browser: Any, report: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(report.as_uri())
    group = browser.find_element(By.CSS_SELECTOR, "details.group.st-breaks")
    group.find_element(By.TAG_NAME, "summary").click()
    table = group.find_element(By.CSS_SELECTOR, "table.schedules")
    assert _visible(table) and len(table.find_elements(By.TAG_NAME, "tr")) >= 2
    link = group.find_element(By.CSS_SELECTOR, "a.to-timeline")
    target = link.get_attribute("href").rsplit("#", 1)[1]
    timeline = browser.find_element(By.ID, target)
    assert timeline.get_attribute("open") is None  # closed until asked for
    link.click()
    assert timeline.get_attribute("open") is not None
    lines = timeline.find_element(By.CSS_SELECTOR, "ol.lines")
    assert _visible(lines) and size(lines)[1] > 100
    texts = [li.text for li in lines.find_elements(By.TAG_NAME, "li")]
    assert any("overwrites the live NMI frame" in t for t in texts)
    assert any("\u00d7 iret at nmi_iret -> nmi_after_int3" in t for t in texts)  # collapsed
    stuck = timeline.find_element(By.CSS_SELECTOR, "p.stuck")
    assert _visible(stuck) and "the guest is stuck" in stuck.text
    # The delivery that overwrote the live frame shows its picture open: slots, old and
    # new values, the stack it landed on.
    svg = timeline.find_element(By.CSS_SELECTOR, "details.frame[open] svg.stack-picture")
    browser.execute_script("arguments[0].scrollIntoView()", svg)
    w, h = size(svg)
    assert svg.is_displayed() and w > 300 and h > 150, (w, h)
    assert "IST1" in svg.get_attribute("aria-label") or "ist1" in lines.text
    slots = svg.find_elements(By.CSS_SELECTOR, "rect.slot")
    assert len(slots) == 5 and all(size(s)[0] > 0 for s in slots)
    shot = os.environ.get("IDTLAB_EXPLORE_SCREENSHOT")
    if shot:
        browser.execute_script("arguments[0].scrollIntoView()", timeline)
        browser.save_screenshot(shot)
