"""Step cost: one step of each rule divided by one plain SGD step on the same batch, model and device,
measured in the same run (ratios are robust to a busy machine; absolute times are not)."""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from . import graphs
from .config import ModelConfig, WalkConfig
from .data import from_tensors
from .experiment import resolve_device
from .goals import Sparsify
from .models import build_network
from .step import STEP_RULES
from .walker import Walker


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_cost(model: str = "mlp", input_shape: tuple[int, ...] = (64,), n_classes: int = 10, batch_size: int = 200,
              probe_size: int = 16, device: str = "cpu", n_repeats: int = 20, seed: int = 0,
              n_warmup: int = 3, linear_solver: str = "auto") -> dict:
    """Median seconds of an SGD step and of each step rule (sparsify goal, random inputs), and their ratios.

    All three use the same batch of `batch_size` inputs; the metric's probe is `probe_size` of them."""
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_shape, generator=gen).to(dev)
    y = torch.randint(0, n_classes, (batch_size,), generator=gen).to(dev)
    net = build_network(ModelConfig(name=model), input_shape, n_classes).to(dev)
    params = {k: v.to(dev) for k, v in net.init_params(seed).items()}
    data = from_tensors(x.cpu(), y.cpu(), x.cpu()[:10], y.cpu()[:10], n_classes=n_classes).to(dev)
    goal = Sparsify.for_network(net, params, data, target_sparsity=0.9)
    batch = goal.sample(torch.Generator().manual_seed(seed), batch_size)
    probe = x[:probe_size]
    model_fn = goal.model_fn

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.SGD(leaves.values(), lr=1e-3)

    def sgd() -> None:
        loss = F.cross_entropy(model_fn(leaves, x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    configs = {"penalty": WalkConfig(solver="penalty", probe_size=probe_size, batch_size=batch_size),
               "constrained": WalkConfig(solver="constrained", probe_size=probe_size, batch_size=batch_size,
                                         goal_weight=0.003, restoring_weight=0.3, linear_solver=linear_solver)}
    moved = {k: v + 1e-3 * torch.randn_like(v) for k, v in params.items()}  # off the anchor: restoring term active

    def rule(name: str):
        return lambda: STEP_RULES[name](moved, goal, batch, probe, configs[name], 0.1, model_fn)

    fns = {"sgd": sgd, "penalty": rule("penalty"), "constrained": rule("constrained")}
    times: dict[str, list[float]] = {k: [] for k in fns}
    peak = {}
    for _ in range(n_warmup):  # warm-up (allocator, kernels, dispatch caches)
        for fn in fns.values():
            fn()
    for _ in range(n_repeats):
        for name, fn in fns.items():  # interleaved, so drift in machine load hits every rule alike
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
            if dev.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
    median = {k: statistics.median(v) for k, v in times.items()}
    # A walk's whole step: on a GPU (graphs or not), and for the small models on the CPU (the big ones' walk
    # steps take seconds there and add nothing the rule's time does not say)
    small = sum(v.numel() for v in params.values()) <= graphs.AUTO_MAX_PARAMS
    walk = _walk_step_cost(net, params, goal, data, configs, sgd, dev, n_warmup, n_repeats) \
        if dev.type == "cuda" or small else None
    n_params = sum(v.numel() for v in params.values())
    # the solver the constrained step chose (auto: by size, free memory and model)
    linear_solver = STEP_RULES["constrained"](moved, goal, batch, probe, configs["constrained"], 0.1,
                                              model_fn).linear_solver
    return {
        "model": model, "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else "cpu", "n_params": n_params, "batch_size": batch_size, "probe_size": probe_size,
        "constrained_linear_solver": linear_solver,
        "sgd_seconds": median["sgd"], "penalty_seconds": median["penalty"],
        "constrained_seconds": median["constrained"],
        "penalty_ratio": median["penalty"] / median["sgd"], "constrained_ratio": median["constrained"] / median["sgd"],
        "steps_per_second": {k: 1 / v for k, v in median.items()},
        "peak_memory_mb": {k: v / 2**20 for k, v in peak.items()} or None,
        "walk_step": walk,
    }


def _walk_step_cost(net, params, goal, data, configs: dict, sgd, dev: torch.device, n_warmup: int,
                    n_repeats: int) -> dict:
    """Each rule's whole step as a walk takes it (Walker.step: the draw, the rule, the measurements of the new
    point, the record), against SGD steps interleaved with it; on a GPU a small model's walk replays its step as
    a CUDA graph (graphs.py), which 'graphed' reports. {rule: {seconds, ratio, graphed}}."""
    from .batch import FUSE_AFTER_STEPS

    out = {}
    n_warmup += FUSE_AFTER_STEPS + 1  # past the step that records the graph
    for name, config in configs.items():
        walker = Walker(net, params, goal, dataclasses.replace(config, n_steps=10**9), {"A": data})
        times: dict[str, list[float]] = {"sgd": [], "walk": []}
        for i in range(n_warmup + n_repeats):
            for kind, fn in (("sgd", sgd), ("walk", walker.step)):
                _sync(dev)
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                if i >= n_warmup:
                    times[kind].append(time.perf_counter() - t0)
        alone = walker._batch_of_one()
        seconds = statistics.median(times["walk"])
        out[name] = {"seconds": seconds, "ratio": seconds / statistics.median(times["sgd"]),
                     "graphed": alone is not None and not alone.fused_failed, "steps_taken": walker.n_steps}
    return out
