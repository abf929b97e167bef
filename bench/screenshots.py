"""Screenshots of the dashboard for the README: runs the default walk for a while in Chromium and saves
the Overview, Path and Steps views to assets/. Usage: python bench/screenshots.py [--seconds 20]"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from browser import ROOT, app_page, bring_charts_up_to_date


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8598)
    parser.add_argument("--query", default="", help="URL query of the set-up, e.g. 'auto=1' (default: the defaults)")
    parser.add_argument("--out", default=str(ROOT / "assets"), help="folder for the PNG files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with app_page(args.port, f"?{args.query}" if args.query else "", viewport=(1500, 1100)) as (page, _):
        page.get_by_role("button", name="Run", exact=True).click()
        pause = page.get_by_role("button", name="Pause", exact=True)
        pause.wait_for(timeout=30_000)
        t0 = time.perf_counter()
        while pause.is_visible() and time.perf_counter() - t0 < args.seconds:  # until done or time is up
            time.sleep(0.2)
        if pause.is_visible():
            pause.click()
        page.get_by_role("button", name="Run", exact=True).wait_for(timeout=30_000)
        time.sleep(2)
        bring_charts_up_to_date(page)
        page.screenshot(path=str(out / "screenshot-overview.png"), full_page=True)
        for view, name in (("Path", "screenshot-path.png"), ("Steps", "screenshot-steps.png")):
            page.get_by_text(view, exact=True).click()
            time.sleep(3)
            bring_charts_up_to_date(page)
            page.screenshot(path=str(out / name), full_page=True)


if __name__ == "__main__":
    main()
