"""Headless Chromium from Debian's packages (``chromium``, ``chromium-driver``), driven by selenium.

Selenium's calls block; the servers under test run in the test's event loop, so every call goes through a
thread (:func:`asyncio.to_thread`). :meth:`Browser.wait_text` waits on a condition with a deadline.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

CHROMIUM = os.environ.get("INFOGAP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("INFOGAP_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
#: set to a directory to save a screenshot of each page a test names (docs/console/ holds the README's)
SCREENSHOTS = os.environ.get("INFOGAP_SCREENSHOTS")


class Browser:
    def __init__(self, width: int = 1280, height: int = 900):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={width},{height}", "--hide-scrollbars"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.alerts: list[str] = []

    async def open(self, url: str) -> None:
        await asyncio.to_thread(self.driver.get, url)

    def _text(self, css: str) -> str:
        """The element's visible text, "" when there is none. The pages replace their live part every refresh: an
        element found just before a refresh is stale when its text is read, so it is found again (a stale read is
        not an empty page)."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        for _ in range(20):
            try:
                return self.driver.find_element("css selector", css).text
            except NoSuchElementException:
                return ""
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"{css} was replaced 20 times in a row while its text was read")

    async def text(self, css: str = "body") -> str:
        return await asyncio.to_thread(self._text, css)

    async def wait_text(self, css: str, predicate, deadline_s: float = 30.0, what: str = "") -> str:
        """The text of ``css`` once ``predicate(text)`` holds (the page refreshes itself meanwhile)."""
        end = time.monotonic() + deadline_s
        while True:
            text = await self.text(css)
            if predicate(text):
                return text
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what or css}; it shows: {text[:500]!r}")
            await asyncio.sleep(0.2)

    async def alert_open(self) -> bool:
        """Whether a script opened an alert (what an injected ``alert(1)`` would do)."""
        def probe() -> bool:
            from selenium.common.exceptions import NoAlertPresentException

            try:
                self.driver.switch_to.alert.text
                return True
            except NoAlertPresentException:
                return False
        return await asyncio.to_thread(probe)

    async def screenshot(self, name: str) -> None:
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(self.driver.save_screenshot, str(Path(SCREENSHOTS) / f"{name}.png"))

    async def close(self) -> None:
        await asyncio.to_thread(self.driver.quit)
