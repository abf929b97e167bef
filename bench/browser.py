"""Shared by the browser benchmarks: start the app with `streamlit run` and open it in Debian's Chromium
through Playwright (no browser download), then stop both."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def app_server(port: int) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of the app as `make app` starts it (python -m app.serve) on 127.0.0.1:port, once it answers
    its health check."""
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--server.headless",
                             "true", "--server.port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.contextmanager
def chromium(viewport: tuple[int, int] = (1400, 1000)) -> Iterator:
    """A Playwright browser context in Debian's Chromium (each page in it is its own Streamlit session)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=shutil.which("chromium"), args=FLAGS, headless=True,
            viewport={"width": viewport[0], "height": viewport[1]})
        yield context
        context.close()


def open_page(context, url: str) -> tuple:
    """(page, first paint in seconds): a new page at `url`, once its first chart is drawn."""
    page = context.new_page()
    t_open = time.perf_counter()
    page.goto(url)
    page.locator(".js-plotly-plot").first.wait_for(timeout=180_000)
    return page, time.perf_counter() - t_open


@contextlib.contextmanager
def app_page(port: int, path: str = "", viewport: tuple[int, int] = (1400, 1000)) -> Iterator:
    """(page, first paint in seconds): a Playwright page showing the app at http://127.0.0.1:port/path once
    its first chart is drawn, and how long that took from opening the page."""
    with app_server(port) as (url, _), chromium(viewport) as context:
        yield open_page(context, f"{url}/{path}")


def bring_charts_up_to_date(page) -> None:
    """Scroll every live chart into view and back: a chart out of sight keeps its updates until it is seen
    (app/live_chart.py), and a full-page screenshot does not scroll."""
    for chart in page.locator(".geodesic-live-chart").all():
        chart.scroll_into_view_if_needed()
        page.wait_for_timeout(400)
    # Streamlit scrolls an inner container, not the window: put every scrolled element back at its top.
    page.evaluate("() => { for (const el of document.querySelectorAll('*')) if (el.scrollTop) el.scrollTop = 0; }")
    page.wait_for_timeout(400)
