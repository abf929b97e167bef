"""Dashboard throughput in a real browser: steps per second and chart refreshes per second of the
default walk while it runs. Starts the app, clicks Run, samples the page for DURATION seconds.

Usage: python bench/dashboard_speed.py [--seconds 20] [--steps-per-refresh 12]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8599)
    parser.add_argument("--view", default="Overview", help="which view is open while the walk runs")
    parser.add_argument("--query", default="", help="URL query for the set-up, e.g. solver=penalty")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.headless",
                             "true", "--server.port", str(args.port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(180):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=shutil.which("chromium"), args=FLAGS, headless=True,
                viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            t_open = time.perf_counter()
            page.goto(f"{url}/?{args.query}" if args.query else url)
            page.locator(".js-plotly-plot").first.wait_for(timeout=180_000)
            first_paint = time.perf_counter() - t_open
            if args.view != "Overview":
                page.get_by_text(args.view, exact=True).click()
                page.wait_for_timeout(1500)
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("button", name="Pause", exact=True).wait_for(timeout=30_000)
            # The step counter shown by the page (the first st.metric), read as the page renders it.
            read = "() => { const el = document.querySelector('[data-testid=stMetricValue]');" \
                   " return el ? parseInt(el.innerText) : 0; }"
            samples, t0 = [], time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                samples.append((time.perf_counter() - t0, page.evaluate(read)))
                time.sleep(0.05)
            page.get_by_role("button", name="Pause", exact=True).click()
            context.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    points = [n for _, n in samples]
    refreshes = sum(1 for a, b in zip(points, points[1:], strict=False) if b != a)
    elapsed = samples[-1][0] - samples[0][0]
    result = {"query": args.query, "view": args.view, "first_paint_seconds": round(first_paint, 2),
              "seconds": round(elapsed, 1),
              "steps": points[-1] - points[0], "steps_per_second": round((points[-1] - points[0]) / elapsed, 1),
              "chart_refreshes_per_second": round(refreshes / elapsed, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
