"""Where one constrained step's time goes, phase by phase, on one model and device (issue 12).

Phases, each timed alone after a device sync (median of --repeats): the plain SGD step (the reference), the goal
and restoring gradients, L's rows (the probe's pull-backs), K = L Lᵀ, the trust-region coefficients (μ), Lᵀ y,
L θ (θᵀgθ), and the whole step as the walker runs it. With --profile, the top operators of the whole step by
device time and by CPU time.

--conv-form written/patches makes every conv layer take that form (default: each layer's cheaper one); --solve
eigh/cholesky picks how μ is found (default: Cholesky on a GPU, the eigendecomposition on the CPU); --fit-any lifts
the memory rule that sends big conv nets to CG on the CPU, so the exact step can be profiled there too (and
adds the CG step beside it).

Usage: python bench/step_profile.py [--model vgg11] [--device cuda] [--repeats 10] [--profile]
       [--conv-form written|patches] [--solve eigh|cholesky] [--fit-any] [--shape 1,8,8]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from geodesic import rows as rows_module  # noqa: E402
from geodesic import step as step_module  # noqa: E402
from geodesic.config import ModelConfig, WalkConfig  # noqa: E402
from geodesic.data import from_tensors  # noqa: E402
from geodesic.experiment import resolve_device  # noqa: E402
from geodesic.goals import Sparsify  # noqa: E402
from geodesic.metric import PullbackMetric  # noqa: E402
from geodesic.models import build_network  # noqa: E402
from geodesic.params import add  # noqa: E402
from geodesic.step import _goal_and_restoring, constrained_step, trust_region_coefficients  # noqa: E402

SHAPES = {"mlp": (64,), "lenet5": (1, 28, 28)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--probe-size", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--conv-form", choices=["written", "patches"])
    parser.add_argument("--solve", choices=["eigh", "cholesky"])
    parser.add_argument("--fit-any", action="store_true")
    parser.add_argument("--shape", help="input shape, comma-separated (default: 64 for the MLP, 1,28,28 for "
                        "LeNet-5, 3,32,32 for the others)")
    args = parser.parse_args()
    rows_module.FORCE_CONV_FORM = args.conv_form
    if args.solve == "cholesky":
        step_module.CHOLESKY_ON_CPU = True
    elif args.solve == "eigh":
        step_module._coefficients_by_cholesky = lambda *a: None
    if args.fit_any:
        rows_module.dense_jacobian_fits = lambda *a: True
    dev = resolve_device(args.device)
    shape = tuple(int(d) for d in args.shape.split(",")) if args.shape else SHAPES.get(args.model, (3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *shape, generator=gen).to(dev)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(dev)
    net = build_network(ModelConfig(name=args.model), shape, 10).to(dev)
    params = {k: v.to(dev) for k, v in net.init_params(0).items()}
    data = from_tensors(x.cpu(), y.cpu(), x.cpu()[:10], y.cpu()[:10], n_classes=10).to(dev)
    goal = Sparsify.for_network(net, params, data, target_sparsity=0.9)
    batch = goal.sample(torch.Generator().manual_seed(0), args.batch_size)
    probe = x[:args.probe_size]
    model_fn = goal.model_fn
    config = WalkConfig(solver="constrained", probe_size=args.probe_size, batch_size=args.batch_size,
                        goal_weight=0.003, restoring_weight=0.3, linear_solver="kernel" if args.fit_any else "auto")
    moved = {k: v + 1e-3 * torch.randn_like(v) for k, v in params.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.SGD(leaves.values(), lr=1e-3)

    def sgd():
        loss = F.cross_entropy(model_fn(leaves, x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    metric = PullbackMetric(model_fn, probe, config.metric)
    v_goal, grad_r, _ = _goal_and_restoring(moved, goal, batch, config.restoring_weight)
    v = add(v_goal, grad_r, alpha=-0.3)
    rows = metric.jacobian_rows(moved)
    kernel = rows.gram()
    jv = rows.matvec(v)
    v2 = sum(p.double().pow(2).sum() for p in v.values())[None]
    beta, eps = torch.tensor([0.003], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)
    _, coef_y, _, _ = trust_region_coefficients(kernel[None], jv[None], v2, beta, eps)
    yy = coef_y[0].to(kernel.dtype)
    phases = {
        "sgd step (reference)": sgd,
        "goal + restoring gradients": lambda: _goal_and_restoring(moved, goal, batch, config.restoring_weight),
        "L's rows (probe pull-backs)": lambda: metric.jacobian_rows(moved),
        "K = L Lᵀ": rows.gram,
        "L v": lambda: rows.matvec(v),
        "coefficients (μ)": lambda: trust_region_coefficients(kernel[None], jv[None], v2, beta, eps),
        "Lᵀ y": lambda: rows.rmatvec(yy),
        "whole constrained step": lambda: constrained_step(moved, goal, batch, probe, config, 0.1, model_fn),
    }
    if args.fit_any:  # the exact step against the one CG would take in its place
        cg = dataclasses.replace(config, linear_solver="cg")
        phases["whole step, CG instead"] = lambda: constrained_step(moved, goal, batch, probe, cg, 0.1, model_fn)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = {k: [] for k in phases}
    for _ in range(2):
        for fn in phases.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in phases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    forms = sorted({type(layer).__name__ for layer in getattr(rows, "layers", [])})
    print(f"{args.model} {'x'.join(map(str, shape))} on {dev} ({type(rows).__name__} {forms}, {rows.n_rows} rows, "
          f"{sum(p.numel() for p in params.values()):,} params), median ms of {args.repeats}:")
    sgd_ms = 1000 * statistics.median(times["sgd step (reference)"])
    for name, t in times.items():
        ms = 1000 * statistics.median(t)
        print(f"  {name:32s} {ms:9.2f} ms  {ms / sgd_ms:6.2f}x SGD")
    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                phases["whole constrained step"]()
            sync()
        events = prof.key_averages()
        if dev.type == "cuda":
            print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
