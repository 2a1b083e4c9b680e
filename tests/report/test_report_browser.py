"""The HTML report in a real browser: every figure loads and the console stays clean.

Needs Debian's chromium and chromium-driver and the selenium package (CI installs
them); skips with a reason where they are missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from klayer.cli.main import main

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="chromium and chromedriver not installed")

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,1400"]


def test_report_figures_load_without_console_errors(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["experiment", "init-sensitivity", "--dataset", "synthetic", "--quick",
                 "--out", str(out)]) == 0
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        driver.get((out / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
        title = driver.title
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert "init-sensitivity" in title
    assert len(images) == 2  # the figures of this experiment: 3 and 9 layers
    assert all(complete and width > 0 for complete, width in images), images
    assert errors == [], errors
    assert (tmp_path / "report.png").stat().st_size > 10_000
