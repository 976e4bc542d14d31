"""A real Chromium for dashboard tests: Debian's (`apt-get install chromium`) driven by Playwright for Python
(`playwright install` is not needed); skipped with the reason where it cannot run. Screenshots go to
$MODTAG_SCREENSHOT_DIR (default: the test's temporary directory)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("MODTAG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched Chromium (Playwright's Browser); pytest.skip when Playwright or Chromium is missing here."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MODTAG_CHROMIUM)")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} cannot be launched here: {str(exc).splitlines()[0]}")
        try:
            yield browser
        finally:
            browser.close()


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MODTAG_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
