"""Dashboard throughput in a real browser: steps per second and chart refreshes per second of the
default walk while it runs. Starts the app, clicks Run, samples the page for DURATION seconds.

Usage: python bench/dashboard_speed.py [--seconds 20] [--view Overview] [--query solver=penalty]
"""
from __future__ import annotations

import argparse
import json
import time

from browser import app_page


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8599)
    parser.add_argument("--view", default="Overview", help="which view is open while the walk runs")
    parser.add_argument("--query", default="", help="URL query for the set-up, e.g. solver=penalty")
    args = parser.parse_args()
    with app_page(args.port, f"?{args.query}" if args.query else "") as (page, first_paint):
        if args.view != "Overview":
            page.get_by_text(args.view, exact=True).click()
            page.wait_for_timeout(1500)
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("button", name="Pause", exact=True).wait_for(timeout=30_000)
        # The step counter shown by the page (the first st.metric), read as the page renders it.
        read = "() => { const el = document.querySelector('[data-testid=stMetricValue]');" \
               " return el ? parseInt(el.innerText) : 0; }"
        pause = page.get_by_role("button", name="Pause", exact=True)
        samples, t0 = [], time.perf_counter()
        finished = False
        while time.perf_counter() - t0 < args.seconds:
            samples.append((time.perf_counter() - t0, page.evaluate(read)))
            if not pause.is_visible():  # the walk reached its goal: measure up to its last step
                finished = True
                break
            time.sleep(0.05)
        if not finished:
            pause.click()
    # Up to the first sample that shows the last step (a finished walk's page stays put after it).
    last = next(i for i, (_, n) in enumerate(samples) if n == samples[-1][1])
    samples = samples[:last + 1]
    points = [n for _, n in samples]
    refreshes = sum(1 for a, b in zip(points, points[1:], strict=False) if b != a)
    elapsed = samples[-1][0] - samples[0][0]
    result = {"query": args.query, "view": args.view, "first_paint_seconds": round(first_paint, 2),
              "seconds": round(elapsed, 1), "walk_finished": finished,
              "steps": points[-1] - points[0], "steps_per_second": round((points[-1] - points[0]) / elapsed, 1),
              "chart_refreshes_per_second": round(refreshes / elapsed, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
