"""Screenshots of the dashboard for the README: runs the default walk for a while in Chromium and saves
the Overview, Path and Steps views to assets/. Usage: python bench/screenshots.py [--seconds 20]"""
from __future__ import annotations

import argparse
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
    parser.add_argument("--port", type=int, default=8598)
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
                viewport={"width": 1500, "height": 1100})
            page = context.new_page()
            page.goto(url)
            page.locator(".js-plotly-plot").first.wait_for(timeout=180_000)
            page.get_by_role("button", name="Run", exact=True).click()
            time.sleep(args.seconds)
            page.get_by_role("button", name="Pause", exact=True).click()
            page.get_by_role("button", name="Run", exact=True).wait_for(timeout=30_000)
            time.sleep(2)
            page.screenshot(path=str(ROOT / "assets" / "screenshot-overview.png"), full_page=True)
            for view, name in (("Path", "screenshot-path.png"), ("Steps", "screenshot-steps.png")):
                page.get_by_text(view, exact=True).click()
                time.sleep(3)
                page.screenshot(path=str(ROOT / "assets" / name), full_page=True)
            context.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
