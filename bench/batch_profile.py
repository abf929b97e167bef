"""Where a batched step's time goes: K walks of the default set-up stepped as one WalkBatch, on one device.

For each K and step rule: milliseconds per batch step, steps/s per walk and in total, and the lone walk
(Walker.step) beside it in the same run; with --profile, the top operators of one K by self CPU time and the
number of kernels launched per batch step (a GPU step of tiny matrices is bound by launches, not arithmetic).

Usage: python bench/batch_profile.py [--device cuda] [--walks 1,8,32] [--steps 20] [--profile 32] [--keep-freed-mb 0]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from geodesic import batch as batch_module  # noqa: E402
from geodesic import step as step_module  # noqa: E402
from geodesic.allocator import DEFAULT_KEEP_FREED_MB, keep_freed_memory  # noqa: E402
from geodesic.batch import WalkBatch  # noqa: E402
from geodesic.config import GoalConfig, RunConfig, default_walk  # noqa: E402
from geodesic.experiment import build  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(goal: str, solver: str, n_walks: int, n_steps: int, device: str, top: bool) -> dict:
    config = RunConfig(goal=GoalConfig(kind=goal), walk=default_walk(goal, solver, n_steps=100_000), device=device)
    start = build(config).walker
    walkers = [start.branch(0, seed=i) for i in range(n_walks)]
    step = (lambda: walkers[0].step()) if n_walks == 1 else WalkBatch(walkers).step
    for _ in range(3):
        step()
    _sync(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    _sync(device)
    ms = 1000 * (time.perf_counter() - t0) / n_steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n_steps
    row = {"goal": goal, "solver": solver, "walks": n_walks, "ms_per_batch_step": round(ms, 2),
           "steps_per_s_each": round(1000 / ms, 1), "steps_per_s_total": round(1000 * n_walks / ms, 1),
           "page_faults_per_batch_step": round(faults)}
    if top:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            _sync(device)
        events = prof.key_averages()
        kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                      and str(e.device_type).endswith("CUDA"))
        row["kernels_per_batch_step"] = kernels / 5
        print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--walks", default="1,8,32")
    parser.add_argument("--solvers", default="constrained,penalty")
    parser.add_argument("--goal", default="sparsify")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", type=int, default=0, help="profile the batch of this many walks")
    parser.add_argument("--fused", action="store_true", help="on the CPU, the fused step a GPU replays as a CUDA "
                        "graph (batch.FUSED_ON_CPU), run as a plain function")
    parser.add_argument("--keep-freed-mb", type=int, default=DEFAULT_KEEP_FREED_MB,
                        help="the engine's keep_freed_mb (geodesic/allocator.py); 0: malloc as it comes")
    args = parser.parse_args()
    if args.fused:
        batch_module.FUSED_ON_CPU = True
        step_module.CHOLESKY_ON_CPU = True
    print(json.dumps({"keep_freed_mb": args.keep_freed_mb, "in_force": keep_freed_memory(args.keep_freed_mb),
                      "threads": torch.get_num_threads()}), flush=True)
    for solver in args.solvers.split(","):
        for n in (int(w) for w in args.walks.split(",")):
            print(json.dumps(measure(args.goal, solver, n, args.steps, args.device, n == args.profile)), flush=True)


if __name__ == "__main__":
    main()
