"""The built-in web page in a real headless browser (Debian's chromium, driven by Playwright over the
DevTools protocol): type a prompt, Generate, the progress bar advances, the image appears (and equals the
Python API's), Cancel stops a job; a screenshot is kept under the test's temp dir."""

from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import pytest

from sdrt.pipeline import Pipeline
from tests.serve_fixtures import PROMPT, SlowExecutor, ThreadServer, pixels

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium "
                                                                             "(.ci/run installs it)")]


@pytest.fixture(scope="module")
def served(tiny_engine_dir):
    from sdrt.serve.executor import LocalExecutor

    local = LocalExecutor(str(tiny_engine_dir), threads=1)
    local.warm_up()
    slow = SlowExecutor(local, delay=0.05)  # ~20 steps/s, so the bar is seen between 0 and 100
    slow.gate_open.set()
    srv = ThreadServer(slow)
    yield srv, slow
    srv.close()


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--headless", *FLAGS])
        try:
            yield browser.new_page(viewport={"width": 900, "height": 1100})
        finally:
            browser.close()


def _progress_values(page, until, timeout=120.0) -> list[int]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(int(page.get_attribute("#bar", "aria-valuenow")))
        if until():
            return seen
        time.sleep(0.03)
    raise AssertionError(f"timed out; progress seen {seen[-20:]}, status {page.inner_text('#status')!r}")


def test_page_generates_with_live_progress(served, page, tiny_engine_dir, tmp_path):
    srv, _ = served
    page.goto(srv.url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 1", timeout=30000)
    page.fill("#prompt", PROMPT)
    page.fill("#negative_prompt", "blurry")
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "24"), ("#guidance", "6"),
                         ("#seed", "1234")):
        page.fill(field, value)
    page.select_option("#sampler", "Euler a")
    page.click("#generate")
    seen = _progress_values(page, lambda: page.is_visible("#image") and page.inner_text("#status").startswith("done"))
    assert any(0 < v < 100 for v in seen), seen  # the bar moved through intermediate values
    assert seen == sorted(seen) and seen[-1] == 100
    assert page.evaluate("document.getElementById('image').naturalWidth") == 64
    text = page.inner_text("#parameters")
    assert text.startswith(PROMPT) and "Steps: 24, Sampler: Euler a, CFG scale: 6.0, Seed: 1234" in text
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    src = page.evaluate("document.getElementById('image').src")
    shown = pixels(httpx.get(src, timeout=30).content)
    expected = Pipeline(tiny_engine_dir, threads=1).txt2img(PROMPT, negative_prompt="blurry", steps=24, guidance=6.0,
                                                            seed=1234, width=64, height=64, scheduler="Euler a")
    np.testing.assert_array_equal(shown, expected.images[0])


def test_page_cancel_button(served, page, tmp_path):
    srv, _ = served
    page.goto(srv.url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 1", timeout=30000)
    page.fill("#prompt", "to be cancelled")
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "150")):
        page.fill(field, value)
    page.click("#generate")
    _progress_values(page, lambda: int(page.get_attribute("#bar", "aria-valuenow")) > 0)
    page.click("#cancel")
    _progress_values(page, lambda: page.inner_text("#status") == "cancelled", 60)
    job = next(j for j in srv.state.queue.store.jobs() if j.request.prompt == "to be cancelled")
    assert job.state == "cancelled" and job.step < 150
    page.screenshot(path=str(tmp_path / "cancelled.png"))
