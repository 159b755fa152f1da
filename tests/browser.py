"""Headless Chromium for the tests that look at idtlab's HTML pages in a real browser:
Debian's `chromium` and `chromium-driver`, driven by selenium. `open_browser` skips the
calling test with a message saying how to get them when any is missing (CI installs
them: .ci/run)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

HOW = ("needs Debian's chromium and chromium-driver (apt-get install chromium "
       "chromium-driver) and selenium (pip install -e '.[test]')")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


def binary(*names: str) -> str | None:
    """The first of `names` on PATH."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def open_browser(what: str, profile: Path) -> Iterator[Any]:
    """A headless Chromium WebDriver with its profile in `profile`; skips `what` (the
    test's name for itself) when Chromium, chromedriver or selenium is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"{what} {HOW}")
    chromium = binary("chromium", "chromium-browser")
    driver_bin = binary("chromedriver")
    if chromium is None or driver_bin is None:
        pytest.skip(f"{what} {HOW}")
    opts = Options()
    opts.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(driver_bin))
    try:
        yield driver
    finally:
        driver.quit()


def size(el: Any) -> tuple[float, float]:
    """An element's rendered (width, height)."""
    rect = el.rect
    return float(rect["width"]), float(rect["height"])
