"""A headless Chromium (Debian's chromium + chromium-driver) driven by selenium, one per test
session, with a fresh profile folder. Tests that ask for it are skipped, with the reason,
only where chromium/chromedriver are not installed (CI installs them: `.ci/run`)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PAGE_LOAD_LIMIT = 20.0


@pytest.fixture(scope="session")
def browser(tmp_path_factory) -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless browser tests need Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,1400",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_LIMIT)
    try:
        yield driver
    finally:
        driver.quit()
