"""Load benchmark for one server: many people walking at once (issue: a class on one server).

Part 1, sessions: K simulated sessions against one engine, the way the dashboard calls it (each a thread: Run,
then every 0.3 s mark the walk watched and read its table, Reset when the walk finishes), plus one more session
clicking Step while they run. Reference in the same run: one lone walk through the same engine. Prints, for each
set-up: per-session steps/s (min, median), total, total ÷ lone, slowest ÷ fastest, errors, and the p95 time of a
Step (click to point recorded).

Part 2, pages (--pages M): one `streamlit run` server and Debian's Chromium; a first page opens the walk and
waits for its baselines (the teacher opening the link: pages opening the same walk share them, so the lone page
and the M pages all find them ready), then one page runs the walk alone, then M pages run at once (each its own
session), first on their own, then while a further page clicks Step. Prints per-page steps/s (read from each
page's step counter), each as a fraction of the lone page (without and with the clicking page), errors shown on
the pages, and the p95 time from a Step click to the new step number on screen.

Usage: python bench/load.py [--walks 1,8,32] [--solvers constrained,penalty] [--goals sparsify,new-task,connect]
                            [--seconds 8] [--device cpu] [--pages 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As the server sets it (app/serve.py): OpenMP workers spin briefly between parallel regions, then sleep.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

from geodesic.config import DataConfig, GoalConfig, ModelConfig, RunConfig, default_walk  # noqa: E402
from geodesic.engine import Engine, EngineSettings, on_a_passing_thread  # noqa: E402
from geodesic.experiment import build  # noqa: E402


def _p95(values: list[float]) -> float | None:
    return round(statistics.quantiles(values, n=20)[-1], 4) if len(values) >= 2 else None


def simulate(goal: str, solver: str, n_walks: int, seconds: float, device: str, threads: int,
             batching: bool = True, auto: bool = False, dataset: str = "digits", model: str = "mlp",
             tune: bool = True) -> dict:
    """n_walks sessions on one engine for `seconds`, and a Step-clicking session beside them."""
    config = RunConfig(goal=GoalConfig(kind=goal), data=DataConfig(name=dataset), model=ModelConfig(name=model),
                       walk=default_walk(goal, solver, model=model, adaptive_step=auto or None,
                                                    n_steps=10**9), device=device)  # runs never pause for steps
    engine = Engine(EngineSettings(threads=threads, max_walks=max(64, n_walks), max_walks_per_session=1,
                                   batching=batching, tune_threads=tune))
    def prepare() -> tuple[list, object]:
        starts = [build(config.replace(seed=i % 4)).walker for i in range(n_walks)]
        clicker = build(config).walker
        clicker.branch(0).step()  # PyTorch imports parts of itself on a first step (seconds on some machines)
        return starts, clicker

    # As app.serve warms up: on a thread that ends, so that no OpenMP team outlives it (engine.on_a_passing_thread)
    starts, clicker = on_a_passing_thread(prepare)
    steps, errors, latencies = [0] * n_walks, [], []
    stop = threading.Event()

    def fresh_walk(i: int):
        # A page builds its walk in a script run, on a thread that ends with the run; these sessions live on, so
        # they build it on a thread that ends likewise: one that kept an OpenMP team (the branch's matrix products
        # start one) would throttle the engine's (engine.on_a_passing_thread).
        return on_a_passing_thread(lambda: starts[i].branch(0))

    def session(i: int) -> None:
        handle = engine.open(fresh_walk(i), session=f"s{i}")
        handle.run()
        done = 0
        while not stop.is_set():
            handle.touch()
            handle.walker.record.to_frame()  # what each refresh of the page reads
            if handle.error:
                errors.append(handle.error)
                break
            if handle.walker.is_done:  # a user presses Reset: a fresh walk from the same start
                done += handle.walker.n_steps
                handle.swap(fresh_walk(i))
                handle.run()
            steps[i] = done + handle.walker.n_steps
            time.sleep(0.3)
        handle.pause()
        steps[i] = done + handle.walker.n_steps

    def click() -> None:
        handle = engine.open(clicker, session="clicker")
        time.sleep(1.0)
        while not stop.is_set() and not clicker.is_done:
            t0 = time.perf_counter()
            if handle.step_once() is None:
                errors.append(handle.error)
                break
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.2)

    threads_ = [threading.Thread(target=session, args=(i,)) for i in range(n_walks)] + [threading.Thread(target=click)]
    t0 = time.perf_counter()
    for t in threads_:
        t.start()
    time.sleep(seconds)
    if engine.n_steps == 0:  # nothing moved: show where every thread is (a hang, not a slow machine)
        alive = engine._thread is not None and engine._thread.is_alive()
        print(f"no step in {seconds:g} s; engine thread alive: {alive}, errors: {errors[:3]}", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(all_threads=True)
    stop.set()
    for t in threads_:
        t.join()
    elapsed = time.perf_counter() - t0
    engine.stop()
    rates = [s / elapsed for s in steps]
    return {"goal": goal, "solver": solver, "model": model, "walks": n_walks, "batching": batching,
            "seconds": round(elapsed, 1),
            "min_steps_per_s": round(min(rates), 1), "median_steps_per_s": round(statistics.median(rates), 1),
            "total_steps_per_s": round(sum(rates), 1), "slowest_over_fastest":
                round(min(rates) / max(rates), 2) if max(rates) else None,
            "errors": len(errors), "error_messages": errors[:3], "step_click_p95_s": _p95(latencies),
            "threads_chosen": sorted(set(engine.tuner.chosen().values()))}


def pages(n_pages: int, seconds: float, port: int, query: str = "goal=new-task&steps=1000000") -> dict:
    """One server; a lone page, then n_pages at once plus a page clicking Step. query: the walk the pages run
    (default a new-task walk, which has no end: the default sparsify walk now finishes in a few seconds)."""
    from browser import app_server, chromium, open_page

    read = "() => { const el = document.querySelector('[data-testid=stMetricValue]');" \
           " return el ? parseInt(el.innerText) : 0; }"
    errors_js = "() => document.querySelectorAll('[data-testid=stException]').length"

    def rates_over(pages_, seconds_: float, clicker=None) -> tuple[list[float], list[float]]:
        """(steps/s of each walking page over `seconds_`, Step click latencies of `clicker` meanwhile)."""
        start = [page.evaluate(read) for page in pages_]
        latencies, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < seconds_:
            if clicker is not None:
                before = clicker.evaluate(read)
                t_click = time.perf_counter()
                clicker.get_by_role("button", name="Step", exact=True).click()
                clicker.wait_for_function(f"() => ({read})() > {before}", timeout=30_000, polling=20)
                latencies.append(time.perf_counter() - t_click)
            time.sleep(0.3)
        elapsed = time.perf_counter() - t0
        return [(page.evaluate(read) - s0) / elapsed for page, s0 in zip(pages_, start, strict=True)], latencies

    def run_pages(context, url: str, n: int, clicker: bool) -> tuple[list[float], int, list[float], list[float]]:
        """n pages run the walk at once: their steps/s, then (clicker) their steps/s while one more page clicks
        Step every 0.3 s, and the click latencies. The target (each page >= 0.4 of a lone page) names n pages;
        the clicks, a further session's full reruns, are the Step-latency target's load and measured apart."""
        opened = [open_page(context, url)[0] for _ in range(n + (1 if clicker else 0))]
        walking = opened[:n]
        for page in walking:
            page.get_by_role("button", name="Run", exact=True).click()
        for page in walking:
            page.get_by_role("button", name="Pause", exact=True).wait_for(timeout=60_000)
        rates, _ = rates_over(walking, seconds)
        clicking, latencies = rates_over(walking, seconds, opened[-1]) if clicker else ([], [])
        shown = sum(page.evaluate(errors_js) for page in opened)
        for page in walking:
            pause = page.get_by_role("button", name="Pause", exact=True)
            if pause.is_visible():
                pause.click()
        for page in opened:
            page.close()
        return rates, shown, latencies, clicking

    with app_server(port) as (url, _), chromium() as context:
        url = f"{url}/?{query}" if query else url
        first = open_page(context, url)[0]  # the teacher's page: the baselines every later page shares
        first.get_by_text("Computing the baselines", exact=False).wait_for(state="detached", timeout=120_000)
        first.close()
        lone, lone_errors, _, _ = run_pages(context, url, 1, clicker=False)
        rates, shown, latencies, clicking = run_pages(context, url, n_pages, clicker=True)
    return {"pages": n_pages, "query": query, "lone_page_steps_per_s": round(lone[0], 1),
            "page_steps_per_s": [round(r, 1) for r in rates],
            "each_over_lone": [round(r / lone[0], 2) for r in rates] if lone[0] else None,
            "each_over_lone_while_a_page_clicks_step": [round(r / lone[0], 2) for r in clicking] if lone[0] else None,
            "exceptions_shown": lone_errors + shown, "step_click_p95_s": _p95(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--walks", default="1,8,32", help="numbers of concurrent walks (1 is the lone reference)")
    parser.add_argument("--solvers", default="constrained,penalty")
    parser.add_argument("--goals", default="sparsify")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch threads for the engine: the most the tuner tries (0: every core), or with "
                             "--no-tune the count used (0: half the cores)")
    parser.add_argument("--no-tune", action="store_true", help="no thread tuning: the engine's fixed count")
    parser.add_argument("--no-batching", action="store_true", help="also measure with batching off, for comparison")
    parser.add_argument("--pages", type=int, default=0, help="also run this many Chromium pages against one server")
    parser.add_argument("--port", type=int, default=8597)
    parser.add_argument("--page-query", default="goal=new-task&steps=1000000",
                        help="URL query of the walk the pages run")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--auto", action="store_true", help="the walks use the adaptive step size (--step-size auto)")
    parser.add_argument("--dataset", default="digits", help="the walks' dataset (e.g. digits-images for conv nets)")
    parser.add_argument("--model", default="mlp", help="the walks' model (lenet5: conv rows and the step guard)")
    args = parser.parse_args()
    walks = [int(w) for w in args.walks.split(",")]
    machine = {"machine": platform.node(), "cpus": torch.get_num_threads(), "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    print(json.dumps(machine), flush=True)
    results = []
    for goal in args.goals.split(","):
        for solver in args.solvers.split(","):
            lone = None
            for batching in ([True, False] if args.no_batching else [True]):
                for n in walks:
                    row = simulate(goal, solver, n, args.seconds, args.device, args.threads, batching, args.auto,
                                   args.dataset, args.model, tune=not args.no_tune)
                    if n == 1 and batching:
                        lone = row["total_steps_per_s"]
                    row["total_over_lone"] = round(row["total_steps_per_s"] / lone, 2) if lone else None
                    settings = EngineSettings(threads=args.threads, tune_threads=not args.no_tune)
                    row["engine_threads"] = settings.thread_candidates
                    results.append(row)
                    print(json.dumps(row), flush=True)
    if args.pages:
        row = pages(args.pages, args.seconds * 2, args.port, args.page_query)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
