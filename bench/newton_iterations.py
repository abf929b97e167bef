"""How many Newton iterations the fused step's μ solve needs (batch.NEWTON_ITERATIONS): along the digits default
walk of each goal (constrained rule, μ the GPU's way, by Cholesky factorisations), every step's trust-region
problem is solved again by `step.coefficients_without_waiting` with N iterations, from the walk's last μ (warm, as
the fused step does) and from the bracket's top (cold), and counted as solved when it converged and agrees with
the waiting solve (μ to 1e-9, y to 1e-6).

Usage: python bench/newton_iterations.py [--iterations 3,4,5,6] [--steps 300]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from geodesic import step as step_module  # noqa: E402
from geodesic.config import GoalConfig, RunConfig, default_walk  # noqa: E402
from geodesic.experiment import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", default="3,4,5,6")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    counts = [int(n) for n in args.iterations.split(",")]
    step_module.CHOLESKY_ON_CPU = True
    solves = []
    waiting = step_module.trust_region_coefficients

    def recorded(*a):
        out = waiting(*a)
        solves.append(([t.clone() for t in a], out))
        return out

    step_module.trust_region_coefficients = recorded
    for goal in ("sparsify", "new-task", "connect"):
        solves.clear()
        walker = build(RunConfig(goal=GoalConfig(kind=goal), walk=default_walk(goal, "constrained"))).walker
        for _ in range(args.steps):
            if walker.is_done:
                break
            walker.step()
        for start in ("warm", "cold"):
            solved = dict.fromkeys(counts, 0)
            last = None
            for inputs, (_, y, mu, _) in solves:
                mu_start = last if start == "warm" and last is not None else torch.full_like(mu, float("inf"))
                for n in counts:
                    _, y_n, mu_n, _, ok = step_module.coefficients_without_waiting(*inputs, mu_start=mu_start,
                                                                                    iterations=n)
                    solved[n] += bool(ok.all()) and torch.allclose(mu_n, mu, rtol=1e-9) and torch.allclose(
                        y_n, y, rtol=1e-6, atol=1e-12)
                last = mu
            print(f"{goal:9s} {start}: " + ", ".join(f"{n} iterations {solved[n]}/{len(solves)}" for n in counts),
                  flush=True)


if __name__ == "__main__":
    main()
