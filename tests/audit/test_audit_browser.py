"""The audit report in a real browser: Debian's Chromium driven by Playwright.

The report is served by ``http.server`` on 127.0.0.1 (an ephemeral port, in a
thread) and also opened from ``file://``; every ``<img>`` must load and the
console must stay free of errors. A full-page screenshot goes to ``tmp_path``.
No browser is downloaded: CI installs Chromium with ``tests/install-browser.sh``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_audit import PROMPTS, tiny_audit_model, write_images

from captum_iclip.audit import audit

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is absent; install it with tests/install-browser.sh (apt-get install chromium)",
)

ALL_IMAGES_LOADED = """() => Array.from(document.images).map(img => ({
    src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth }))"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report of 2 images and a corrupt file, with central-patch masks, a prompt that needs escaping and the
    prompts' words coloured by Grad-ECLIP's text relevance."""
    folder = tmp_path_factory.mktemp("audit_browser")
    write_images(folder / "in", 2)
    prompts = PROMPTS + ['<b>&"']
    model = tiny_audit_model(prompts)
    return audit(
        folder / "in",
        prompts,
        sim=model.sim,
        preprocess=model.preprocess,
        out_dir=folder / "report",
        mask_provider=model.mask_provider,
        top_k=2,
        model_name=model.name,
        progress=False,
        text_method="gradeclip",
    ).index


@pytest.fixture(scope="module")
def server(report) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(report.parent))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, url: str):
    """Open ``url`` and return (page, errors): console errors and uncaught page errors."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(f"console: {message.text}") if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
    page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
    page.goto(url, wait_until="load")
    return page, errors


def test_report_over_http_loads_every_image(browser, server, report, tmp_path):
    page, errors = open_page(browser, server + "index.html")
    images = page.evaluate(ALL_IMAGES_LOADED)
    # 2 images x (thumbnail + 2 prompts x 4 methods).
    assert len(images) == 2 * (1 + 2 * 4)
    assert [image["src"] for image in images if not (image["complete"] and image["width"] > 0)] == []
    assert page.title().startswith("Audit report")
    assert page.locator("#unreadable tr.broken").count() == 1
    assert '<b>&"' in page.locator("#prompts").inner_text()  # escaped in the source, shown as typed
    screenshot = tmp_path / "audit-report.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    page.close()
    assert errors == []


def test_report_shows_each_prompts_words_coloured(browser, report):
    page, errors = open_page(browser, report.as_uri())
    words = page.locator(".words")
    assert words.count() == 2 * 2  # 2 images x 2 prompts
    spans = page.evaluate(
        """() => Array.from(document.querySelectorAll(".words span")).map(span => ({
            text: span.textContent, background: getComputedStyle(span).backgroundColor,
            visible: span.getBoundingClientRect().width > 0, value: Number(span.title) }))"""
    )
    assert spans and all(span["visible"] and span["text"] for span in spans)
    # Grad-ECLIP's relevances are >= 0 and sum to 1 per prompt of at most 5 words: its strongest word is coloured.
    strongest = [span for span in spans if span["value"] >= 0.2]
    assert strongest and all(span["background"] != "rgb(255, 255, 255)" for span in strongest)
    assert all(span["value"] >= 0 for span in spans)
    page.close()
    assert errors == []


def test_report_from_file_url_loads_every_image(browser, report):
    page, errors = open_page(browser, report.as_uri())
    images = page.evaluate(ALL_IMAGES_LOADED)
    assert len(images) == 2 * (1 + 2 * 4)
    assert [image["src"] for image in images if not (image["complete"] and image["width"] > 0)] == []
    page.close()
    assert errors == []
