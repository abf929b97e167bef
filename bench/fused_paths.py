"""The fused step (what a CUDA graph replays on a GPU, batch.py) against the waiting step, whole walks: the digits
default walk of each goal, constrained rule, μ the GPU's way (Cholesky) both times, on this CPU; prints steps, end
and lowest accuracy, distance to the goal, sparsity, wall time, and how many steps were fused or fell back.

Usage: python bench/fused_paths.py [--steps 600] [--solver constrained]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geodesic import batch as batch_module  # noqa: E402
from geodesic import step as step_module  # noqa: E402
from geodesic.batch import WalkBatch  # noqa: E402
from geodesic.config import GoalConfig, RunConfig, default_walk  # noqa: E402
from geodesic.experiment import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--solver", default="constrained")
    args = parser.parse_args()
    step_module.CHOLESKY_ON_CPU = True
    taken: collections.Counter = collections.Counter()
    fused_step = WalkBatch._step_fused

    def counted(self, *a):
        result = fused_step(self, *a)
        taken["fused" if result is not None else "fell back"] += 1
        return result

    WalkBatch._step_fused = counted
    for goal in ("sparsify", "new-task", "connect"):
        for fused in (False, True):
            batch_module.FUSED_ON_CPU = fused
            taken.clear()
            walker = build(RunConfig(goal=GoalConfig(kind=goal),
                                     walk=default_walk(goal, args.solver, n_steps=args.steps))).walker
            t0 = time.perf_counter()
            for _ in range(args.steps):
                if walker.is_done:
                    break
                walker.step()
            accuracy = [p.accuracy["A"] for p in walker.record.points]
            last = walker.record.last
            way = "fused" if fused else "waiting"
            print(f"{goal:9s} {way:7s} steps {walker.n_steps}, end {100 * accuracy[-1]:.2f}%, lowest "
                  f"{100 * min(accuracy):.2f}%, distance {last.goal_distance:.4f}, sparsity {last.sparsity:.4f}, "
                  f"{time.perf_counter() - t0:.1f} s, {dict(taken) or 'no fused step'}", flush=True)


if __name__ == "__main__":
    main()
