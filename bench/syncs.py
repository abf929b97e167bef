"""How many times one walker step waits for the device: every float(), bool(), .item(), .tolist() or .numpy() of
a tensor, counted on this machine's CPU (on a GPU each is a wait for the queued kernels), by source line.

The constrained step is solved the GPU's way (μ by Cholesky, step.CHOLESKY_ON_CPU), so the count is the GPU's.

With --walks K > 1 it counts one batch step of K such walks (WalkBatch, as the engine steps them).

With --fused it counts the fused step (what a CUDA graph replays, graphs.py) instead of the waiting one.

Usage: python bench/syncs.py [--goal sparsify] [--solver constrained] [--steps 5] [--walks 8] [--fused]
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from geodesic import batch as batch_module  # noqa: E402
from geodesic import step as step_module  # noqa: E402
from geodesic.batch import WalkBatch  # noqa: E402
from geodesic.config import GoalConfig, RunConfig, default_walk  # noqa: E402
from geodesic.experiment import build  # noqa: E402

WAITS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__index__}


class CountWaits(TorchFunctionMode):
    """Waits by source line; and every torch call from Python (about one kernel launch each on a GPU), split into
    those inside the fused step (which a CUDA graph replays with one launch) and the rest."""

    def __init__(self):
        super().__init__()
        self.by_line: collections.Counter = collections.Counter()
        self.calls = {"outside": 0, "in the fused step": 0}
        self.in_fused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls["in the fused step" if self.in_fused else "outside"] += 1
        if func in WAITS:
            frames = [f for f in traceback.extract_stack()[:-1] if "/geodesic/" in f.filename]
            if frames:
                f = frames[-1]
                self.by_line[f"{f.filename.split('/')[-1]}:{f.lineno}  {(f.line or '')[:80]}"] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goal", default="sparsify")
    parser.add_argument("--solver", default="constrained")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--walks", type=int, default=1)
    parser.add_argument("--fused", action="store_true",
                        help="the fused step a CUDA graph replays on a GPU (batch.py), here run as a plain function")
    args = parser.parse_args()
    step_module.CHOLESKY_ON_CPU = True
    batch_module.FUSED_ON_CPU = args.fused
    walker = build(RunConfig(goal=GoalConfig(kind=args.goal),
                             walk=default_walk(args.goal, args.solver, n_steps=10**6))).walker
    step = walker.step
    if args.walks > 1:
        step = WalkBatch([walker.branch(0, seed=i) for i in range(args.walks)]).step
    for _ in range(3):
        step()
    counter = CountWaits()
    fused = WalkBatch._fused

    def counted(self, *a):
        counter.in_fused += 1
        try:
            return fused(self, *a)
        finally:
            counter.in_fused -= 1

    WalkBatch._fused = counted
    with counter:
        for _ in range(args.steps):
            step()
    total = sum(counter.by_line.values()) / args.steps
    what = "walker step" if args.walks == 1 else f"batch step of {args.walks} walks"
    print(f"{args.goal} {args.solver}: {total:.1f} waits per {what}; torch calls from Python "
          + ", ".join(f"{k} {v / args.steps:.0f}" for k, v in counter.calls.items()))
    for line, n in counter.by_line.most_common():
        print(f"  {n / args.steps:5.1f}  {line}")


if __name__ == "__main__":
    main()
