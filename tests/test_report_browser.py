"""The HTML report in a real browser (headless Chromium through Playwright): it loads offline, makes no
request, logs no error, shows its sections, sorts its tables, and runs none of the markup in user text.

Screenshots (full page, screen and print media) are saved under the test's tmp dir and copied to
/tmp/report-shots/ for a human to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from robustlab.reports import compare, render
from report_support import XSS, demo_like, hostile

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path("/tmp/report-shots")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    demo = demo_like(root / "demo")
    bad = hostile(root / "hostile")
    return {"demo": render(demo), "hostile": render(bad), "compare": compare(demo, bad, root / "compare.html")}


class Visit:
    """A page opened from file:// with everything it did recorded."""

    def __init__(self, browser, path: Path, **context):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, **context)
        self.page = self.context.new_page()
        self.url = path.resolve().as_uri()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(self.url, wait_until="load")
        self.page.wait_for_timeout(200)

    def outside(self) -> list[str]:
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]

    def shot(self, tmp_path: Path, name: str, media: str = "screen") -> Path:
        self.page.emulate_media(media=media)
        self.page.evaluate("window.scrollTo(0, 0)")
        path = tmp_path / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
        return path

    def close(self) -> None:
        self.context.close()


def test_demo_report_in_chromium(browser, reports, tmp_path):
    visit = Visit(browser, reports["demo"])
    page = visit.page
    try:
        assert visit.errors == [] and visit.dialogs == []
        assert visit.outside() == [], visit.outside()
        for sid in ("verdict", "audited", "accuracy", "targeted", "per-class", "norms", "examples"):
            assert page.locator(f"section#{sid}").is_visible(), sid
        assert page.locator("#verdict .card").count() == 2  # untargeted and targeted (next)
        assert page.locator("#verdict .card").first.inner_text().count("Integrity checks: not run") == 1
        # every image decoded (inline data: URIs only)
        broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
        assert broken == 0 and page.evaluate("document.images.length") > 30
        # the accuracy table sorts by a column, numerically
        table = page.locator("#accuracy table.sortable").first
        header = table.locator("thead th", has_text="eps=0.2")
        header.click()
        assert header.get_attribute("aria-sort") == "ascending"
        values = table.locator("tbody tr td:last-child").evaluate_all("cells => cells.map(c => +c.dataset.v)")
        assert values == sorted(values) and len(values) == 8
        header.click()
        assert header.get_attribute("aria-sort") == "descending"
        visit.shot(tmp_path, "report-demo")
        visit.shot(tmp_path, "report-demo-print", media="print")
        assert page.locator("nav.toc").is_hidden()  # print CSS
        assert visit.errors == [] and visit.outside() == []
    finally:
        visit.close()


def test_markup_in_user_text_never_runs(browser, reports, tmp_path):
    visit = Visit(browser, reports["hostile"])
    page = visit.page
    try:
        page.wait_for_timeout(300)
        assert visit.dialogs == [], visit.dialogs
        assert visit.errors == [] and visit.outside() == []
        assert page.evaluate("document.querySelectorAll('script').length") == 1
        assert page.evaluate("document.querySelectorAll('img[src=\"x\"], img[onerror], [onerror]').length") == 0
        text = page.evaluate("document.body.innerText")
        assert XSS[0] in text and XSS[1] in text  # shown as text
        assert page.title().startswith("Robustness audit: " + XSS[0])
        visit.shot(tmp_path, "report-escaping")
    finally:
        visit.close()


def test_comparison_in_chromium(browser, reports, tmp_path):
    visit = Visit(browser, reports["compare"])
    try:
        assert visit.errors == [] and visit.dialogs == [] and visit.outside() == []
        assert visit.page.locator("section#overview").is_visible()
        assert "better" in visit.page.locator("section#overview").inner_text()
        visit.shot(tmp_path, "compare")
    finally:
        visit.close()
