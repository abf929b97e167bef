"""What a server's memory does over a class: one walk left running, and walks opened, stepped and closed.

1. `--seconds S`: one new-task walk of the digits MLP (no end point) runs through the engine for S seconds; the
   process's resident memory above where it started is printed every `--every` seconds, with the steps taken.
   A walk keeps its path's weights within GEODESIC_TRACE_MB, so this should level off.
2. `--rounds R`: R rounds, each opening 4 walks (sparsify, new-task, connect in turn) from branches of cached
   starts, stepping them until each has 15 steps (as one batch where they can be), pausing and closing them;
   resident memory and the engine's cached batches every 20 rounds.

Usage: python bench/memory.py [--seconds 30] [--every 5] [--rounds 120]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geodesic.config import GoalConfig, RunConfig, default_walk  # noqa: E402
from geodesic.engine import Engine, EngineSettings  # noqa: E402
from geodesic.experiment import build  # noqa: E402


def resident_mb() -> float:
    """This process's resident memory (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _kept(trace) -> int:
    """Points whose weights the trace holds (a code before WeightTrace.kept() kept every point: measured against)."""
    return len(trace.kept()) if hasattr(trace, "kept") else len(trace.rows)


def long_walk(seconds: float, every: float) -> list[dict]:
    walker = build(RunConfig(goal=GoalConfig(kind="new-task"),
                             walk=default_walk("new-task", "constrained", n_steps=10**8))).walker
    engine = Engine(EngineSettings())
    handle = engine.open(walker, "long")
    start, t0, rows = resident_mb(), time.monotonic(), []
    handle.run()
    try:
        while time.monotonic() - t0 < seconds:
            time.sleep(every)
            handle.touch()
            rows.append({"seconds": round(time.monotonic() - t0, 1), "steps": walker.n_steps,
                         "resident_mb_above_start": round(resident_mb() - start),
                         "weights_kept": _kept(walker.trace), "stride": getattr(walker.trace, "stride", 1)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        handle.pause()
        engine.stop()
    return rows


def open_and_close(rounds: int) -> list[dict]:
    goals = ["sparsify", "new-task", "connect"]
    starts = {g: build(RunConfig(goal=GoalConfig(kind=g), walk=default_walk(g, "constrained"))).walker for g in goals}
    engine = Engine(EngineSettings(max_walks=64, max_walks_per_session=8))
    rows = [{"round": 0, "resident_mb": round(resident_mb())}]
    print(json.dumps(rows[-1]), flush=True)
    try:
        for r in range(1, rounds + 1):
            handles = [engine.open(starts[goals[(r + j) % 3]].branch(0, seed=10 * r + j), f"s{r}-{j}")
                       for j in range(4)]
            for h in handles:
                h.run()
            t0 = time.monotonic()
            while min(h.walker.n_steps for h in handles) < 15 and time.monotonic() - t0 < 30:
                time.sleep(0.02)
                for h in handles:
                    h.touch()
            for h in handles:
                h.pause()
                h.close()
            del handles
            if r % 20 == 0:
                gc.collect()
                rows.append({"round": r, "resident_mb": round(resident_mb()), "cached_batches": len(engine._batches)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the one walk runs (0: skip)")
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=120, help="rounds of 4 walks opened and closed (0: skip)")
    args = parser.parse_args()
    if args.seconds > 0:
        long_walk(args.seconds, args.every)
    if args.rounds > 0:
        open_and_close(args.rounds)


if __name__ == "__main__":
    main()
