"""Dashboard throughput in a real browser against the same walk headless, in the same run (issue 10).

1. Headless reference: the same walk (goal and step rule from --query) stepped by the server's kind of engine in
   a separate process with nothing drawing (python -m geodesic's Walker through an Engine, as the app does).
2. Browser: `streamlit run` + Debian's Chromium; first paint (page opened → first chart drawn, start network
   cached by step 1), then Run, sampling the step counter the page shows and the points its live chart holds,
   for --seconds or until the walk ends. CPU use of Chromium (all its processes) and of the server during the walk.

Prints one JSON line: steps/s headless and in the browser and their ratio, chart refreshes/s (changes of the
drawn chart), cores used by Chromium and by the server, first paint, and the rate in the first and the last
fifth of the walk (does a long walk slow down?). "steady" counts from the first refresh that showed a step (the
first one can lag the Run click by up to a refresh interval).

Usage: python bench/dashboard_speed.py [--seconds 20] [--view Overview] [--query solver=penalty]
       python bench/dashboard_speed.py --query "goal=new-task&steps=100000" --seconds 80   # 2,000+ steps in one run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.parse

import psutil
from browser import ROOT, app_server, chromium, open_page

HEADLESS = r"""
import json, sys, time
from geodesic.config import GoalConfig, RunConfig, default_walk
from geodesic.engine import Engine
from geodesic.experiment import build
goal, solver, seconds, n_steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]) or None
walker = build(RunConfig(goal=GoalConfig(kind=goal), walk=default_walk(goal, solver, n_steps=n_steps))).walker
walker.branch(0).step()  # PyTorch's lazy imports, not timed
engine = Engine()
handle = engine.open(walker)
t0 = time.perf_counter()
handle.run()
while handle.is_running and time.perf_counter() - t0 < seconds:
    handle.touch()
    time.sleep(0.05)
handle.pause()
elapsed = time.perf_counter() - t0
engine.stop()
print(json.dumps({"steps": walker.n_steps, "seconds": elapsed}))
"""

# One round trip per sample: [step shown, chart updates applied so far, points on the chart].
READ = "() => { const m = document.querySelector('[data-testid=stMetricValue]'); " \
       "const c = document.querySelector('.geodesic-live-chart'); " \
       "return [m ? parseInt(m.innerText) : 0, c ? Number(c.dataset.draws || 0) : 0, " \
       "c ? Number(c.dataset.points || 0) : 0]; }"


def _chromium_cpu() -> float:
    """CPU seconds used so far by every Chromium process of this user."""
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        try:
            if "chrom" in (proc.info["name"] or "").lower():
                times = proc.cpu_times()
                total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _observer() -> list[psutil.Process]:
    """This benchmark's own processes: itself and Playwright's driver (not Chromium, not the server): the cost
    of watching the page, which shares the cores with the walk and is not part of the app."""
    procs = [psutil.Process()]
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" not in child.name().lower() and "python" not in child.name().lower():
                procs.append(child)
        except psutil.NoSuchProcess:
            continue
    return procs


def _own_cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds used so far by `proc` and its live child processes (the server's analysis process)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def headless(goal: str, solver: str, seconds: float, n_steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", HEADLESS, goal, solver, str(seconds), str(n_steps)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["steps"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8599)
    parser.add_argument("--view", default="Overview", help="which view is open while the walk runs")
    parser.add_argument("--query", default="", help="URL query for the set-up, e.g. solver=penalty")
    parser.add_argument("--samples", help="also write every sample (seconds, step shown, chart updates, points) here")
    parser.add_argument("--sample-every", type=float, default=0.25,
                        help="seconds between reads of the page's step counter (each read is a round trip "
                             "through Playwright's driver, which shares the cores with the walk)")
    args = parser.parse_args()
    query = dict(urllib.parse.parse_qsl(args.query))
    goal, solver = query.get("goal", "sparsify"), query.get("solver", "constrained")
    # the page's most steps per run (steps=) for the headless walk too: a run pauses there (0: the default's)
    reference = headless(goal, solver, args.seconds, int(query.get("steps", 0)))  # also caches the start network

    with app_server(args.port) as (url, server), chromium() as context:
        page, first_paint = open_page(context, f"{url}/?{args.query}" if args.query else url)
        if args.view != "Overview":
            page.get_by_text(args.view, exact=True).click()
            page.wait_for_timeout(1500)
        server_proc = psutil.Process(server.pid)
        observer = _observer()
        # CPU counters read before the click: reading them walks every process (tenths of a second), which must
        # not delay the first sample.
        cpu0, server0, observer0 = _chromium_cpu(), _cpu(server_proc), sum(_own_cpu(p) for p in observer)
        t_run = time.perf_counter()
        page.get_by_role("button", name="Run", exact=True).click()
        pause = page.get_by_role("button", name="Pause", exact=True)
        pause.wait_for(timeout=30_000)
        run_answer = time.perf_counter() - t_run  # Run click → Pause on screen
        samples, t0, finished = [], time.perf_counter(), False
        while time.perf_counter() - t0 < args.seconds:
            samples.append((time.perf_counter() - t0, *page.evaluate(READ)))
            if not pause.is_visible():  # the walk reached its goal: measure up to its last step
                finished = True
                break
            time.sleep(args.sample_every)
        wall = time.perf_counter() - t_run
        browser_cores = (_chromium_cpu() - cpu0) / wall
        server_cores = (_cpu(server_proc) - server0) / wall
        observer_cores = (sum(_own_cpu(p) for p in observer) - observer0) / wall
        pause_answer = None
        if not finished:  # the walk still runs: how long until the page answers a Pause click
            t_click = time.perf_counter()
            pause.click()
            page.get_by_role("button", name="Run", exact=True).wait_for(timeout=30_000)
            pause_answer = round(time.perf_counter() - t_click, 2)
        exceptions = page.locator("[data-testid=stException]").count()
    # Up to the first sample that shows the last step (a finished walk's page stays put after it).
    last = next(i for i, s in enumerate(samples) if s[1] == samples[-1][1])
    samples = samples[:last + 1]
    elapsed = samples[-1][0] - samples[0][0]
    steps = samples[-1][1] - samples[0][1]
    refreshes = samples[-1][2] - samples[0][2]  # chart updates the page applied in between
    fifth = max(1, len(samples) // 5)
    # From the first refresh that showed a step to the last: the walk's pace while the page shows it (the page
    # shows the newest step at each refresh, so the first one can lag the Run click by up to a refresh).
    moving = next((i for i, s in enumerate(samples) if s[1] > samples[0][1]), 0)
    steady = (samples[-1][1] - samples[moving][1]) / max(samples[-1][0] - samples[moving][0], 1e-9)

    def rate(part) -> float:
        return (part[-1][1] - part[0][1]) / max(part[-1][0] - part[0][0], 1e-9)

    result = {"query": args.query, "view": args.view, "first_paint_seconds": round(first_paint, 2),
              "headless_steps_per_second": round(reference, 1), "seconds": round(elapsed, 1),
              "walk_finished": finished, "steps": steps, "steps_per_second": round(steps / elapsed, 1),
              "browser_over_headless": round(steps / elapsed / reference, 2),
              "steady_steps_per_second": round(steady, 1), "steady_over_headless": round(steady / reference, 2),
              "chart_refreshes_per_second": round(refreshes / elapsed, 2),
              "chart_points_at_end": samples[-1][3], "chromium_cores": round(browser_cores, 2),
              "server_cores": round(server_cores, 2), "observer_cores": round(observer_cores, 2),
              "sample_every": args.sample_every, "exceptions_shown": exceptions,
              "pause_answer_seconds": pause_answer, "run_answer_seconds": round(run_answer, 2),
              "first_step_shown_seconds": next((round(t0 - t_run + t, 2) for t, step, *_ in samples if step > 0), None),
              "first_fifth_steps_per_second": round(rate(samples[:fifth]), 1),
              "last_fifth_steps_per_second": round(rate(samples[-fifth:]), 1)}
    print(json.dumps(result))
    if args.samples:
        with open(args.samples, "w") as f:
            json.dump(samples, f)


if __name__ == "__main__":
    main()
