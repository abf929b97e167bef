"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a live server.

Starts `streamlit run`, opens the page, clicks Step and Run, waits until the charts change, fails on
any exception shown on the page, and keeps screenshots in artifacts/screenshots/.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Chromium for the browser test (make test installs Debian's chromium)")
    pytest.skip("chromium is not installed (make test installs it as root)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "GEODESIC_CACHE": str(tmp_path_factory.mktemp("cache"))}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
                             "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"streamlit did not start: {proc.stdout.read().decode()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A persistent context in a fresh folder: a new, empty --user-data-dir for every run.
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium")),
                                                       executable_path=CHROMIUM, args=FLAGS, headless=True,
                                                       viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


def _no_exception(page) -> None:
    shown = page.locator("[data-testid='stException']")
    assert shown.count() == 0, shown.first.inner_text()


def _step_value(page) -> int:
    metric = page.locator("[data-testid='stMetric']").filter(has_text="step").first
    return int(metric.locator("[data-testid='stMetricValue']").inner_text())


def test_step_and_run_change_the_charts(server, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    page.goto(server)
    page.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "01-start.png"), full_page=True)
    assert _step_value(page) == 0

    page.get_by_role("button", name="Step", exact=True).click()
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stMetricValue]')]"
                           ".some(e => e.innerText.trim() === '1')", timeout=30_000)
    _no_exception(page)

    before = page.locator(".js-plotly-plot").first.evaluate("el => el._fullData[0].x.length")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("button", name="Pause", exact=True).wait_for(timeout=30_000)
    page.wait_for_function("(n) => { const el = document.querySelector('.js-plotly-plot');"
                           " return el && el._fullData && el._fullData[0].x.length > n + 10; }", arg=int(before),
                           timeout=60_000)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "02-running.png"), full_page=True)
    page.get_by_role("button", name="Pause", exact=True).click()
    page.get_by_role("button", name="Run", exact=True).wait_for(timeout=30_000)
    time.sleep(1.5)
    stopped = _step_value(page)
    time.sleep(1.5)
    assert _step_value(page) == stopped  # paused within one refresh
    assert stopped >= 5  # the charts grew by more than 10 points while running (checked above)

    page.get_by_text("Path", exact=True).click()
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    time.sleep(1)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "03-path.png"), full_page=True)
    page.get_by_text("Learn", exact=True).first.click()
    page.get_by_text("How a functionally invariant walk works").wait_for(timeout=30_000)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "04-learn.png"), full_page=True)
    page.close()
