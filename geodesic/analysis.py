"""Plain arrays and tables about a walk, for the dashboard and notebooks (the app does no tensor math).

Each function takes engine objects and returns numpy arrays, pandas frames or plain numbers.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import pandas as pd
import torch

from .baselines import (
    continual_fine_tune,
    fine_tune,
    masked_fine_tune,
    one_shot_prune,
    straight_line,
    weight_matching,
)
from .errors import Cancelled, ConfigError
from .experiment import Experiment
from .measures import evaluate, scored_on, true_class_probability
from .metric import PullbackMetric
from .models import NetworkFunction, build_network, recompute_batchnorm
from .params import unflatten
from .projection import PCABasis
from .walker import Walker


def true_class_heatmap(walker: Walker, n_networks: int = 40, n_examples: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """(steps (r,), p(true class) (r, n_examples)): networks along the path × task-A test examples.

    Examples are ordered by the start network's confidence, so forgetting shows as a moving edge."""
    task = walker.tasks["A"].test
    x, y = task.x[:n_examples], task.y[:n_examples]
    kept = walker.trace.kept(until=len(walker.record))  # a long path keeps some points' weights only
    pick = np.unique(np.linspace(0, len(kept) - 1, min(n_networks, len(kept))).round().astype(int))
    rows = [kept[i] for i in pick]
    probs = np.stack([true_class_probability(walker.model_fn, walker.params_at(i), x, y).cpu().numpy() for i in rows])
    order = np.argsort(-probs[0], kind="stable")
    steps = np.array([walker.record[i].step for i in rows])
    return steps, probs[:, order]


def spectrum(walker: Walker, probe_size: int = 64, n_eigenvalues: int = 50, step: int | None = None) -> np.ndarray:
    """Top eigenvalues of g on a fixed probe (the first probe_size anchor inputs) at the current point, or at recorded
    point `step` (method.md §7: the spectrum at chosen points; ConfigError for a step whose weights a long path let
    go, see Walker.params_at). BatchNorm statistics are those of that point, recomputed as the walk does."""
    probe = walker.goal.anchor_inputs[:probe_size]
    params, model_fn = _network_at(walker, step, "spectrum step")
    return PullbackMetric(model_fn, probe, walker.config.metric).spectrum(params, n_eigenvalues)


def _network_at(walker: Walker, step: int | None, what: str) -> tuple:
    """(params, model_fn) of recorded point `step` (None: the current point), BatchNorm statistics recomputed for it
    as the walk does; ConfigError for a step outside the walk or one whose weights a long path let go."""
    if step is not None and not 0 <= step <= walker.n_steps:
        raise ConfigError(what, step, f"a step of this walk, 0 to {walker.n_steps}")
    if step is None or step == walker.n_steps:
        return walker.params, walker.model_fn
    params, model_fn = walker.params_at(step), walker.model_fn
    if walker.network.has_batchnorm and walker.bn_inputs is not None:
        buffers = recompute_batchnorm(walker.network, params, walker.bn_inputs)
        model_fn = NetworkFunction(walker.network, buffers, head=model_fn.head)
    return params, model_fn


def pruning_levels(target_sparsity: float) -> np.ndarray:
    """The sparsities a pruning curve is measured at: every 5% from 0 to 95%, every 1% beyond 95% up to the target,
    and the target itself."""
    top = max(0.95, target_sparsity)
    fine = np.arange(96, int(np.floor(100 * top + 1e-9)) + 1) / 100
    return np.unique(np.round(np.r_[np.arange(20) * 0.05, fine, target_sparsity], 6))


PRUNING_EXAMPLES = 2000  # test examples a pruning curve is measured on (the first ones)


class PruningCurve:
    """Task-A test accuracy of the network at `step` (None: the current point) magnitude-pruned, with no retraining,
    to each sparsity in `levels` (global over the prunable weights, as the sparsify goal prunes). A sparsify walk
    keeps its weights dense until it arrives, so its own accuracy against its exact zeros says little on the way;
    this curve shows what it has changed: how far the network can be pruned now before its accuracy falls (at the
    start, the one-shot pruning baseline's curve). On the first `max_examples` test examples.

    Made on the engine's thread, it keeps a copy of the point (the walk moves on) and is measured a few levels at a
    time (`advance`): a level costs a pass over the test examples, 0.5 s for ResNet-18 on digits-images and 2.4 s
    for VGG11 on the MNIST sample on a 2-core CPU, and the engine's thread, which every walk of a server shares, is
    never held for more than the time asked or one level."""

    def __init__(self, walker: Walker, levels: np.ndarray, step: int | None = None,
                 max_examples: int = PRUNING_EXAMPLES):
        self.prunable = getattr(walker.goal, "prunable", None) or walker.network.prunable
        if not self.prunable:
            raise ConfigError("model", "one with no prunable weights", "a model with Linear or Conv2d weights")
        params, model_fn = _network_at(walker, step, "pruning curve step")
        self.step = walker.n_steps if step is None else step
        self.levels = np.asarray(levels, dtype=float)
        self.values: list[float] = []
        self.seconds = 0.0  # spent measuring
        self._params = {k: v.detach().clone() for k, v in params.items()}
        task = walker.tasks["A"]
        self._scored = scored_on(model_fn, task)
        self._x, self._y = task.test.x[:max_examples], task.test.y[:max_examples]
        # One global ranking by |w| for every level: level s prunes the ceil(s·n) smallest, as measures.magnitude_prune
        # does (ties broken the same way within one ranking), without a top-k per level.
        flat = torch.cat([self._params[k].reshape(-1).abs() for k in self.prunable])
        self._rank = torch.empty_like(flat, dtype=torch.long)
        self._rank[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), device=flat.device)

    @property
    def done(self) -> bool:
        return len(self.values) == len(self.levels)

    def advance(self, seconds: float = math.inf) -> bool:
        """Measure the next levels until `seconds` have passed (at least one level); whether all are measured."""
        began = time.perf_counter()
        while not self.done:
            n = self._rank.numel()
            n_prune = min(int(np.ceil(float(self.levels[len(self.values)]) * n - 1e-9)), n)
            keep = (self._rank >= n_prune).to(self._params[self.prunable[0]].dtype)
            pruned, start = dict(self._params), 0
            for k in self.prunable:
                size = self._params[k].numel()
                pruned[k] = self._params[k] * keep[start:start + size].view_as(self._params[k])
                start += size
            self.values.append(evaluate(self._scored, pruned, self._x, self._y)[1])
            if time.perf_counter() - began >= seconds:
                break
        self.seconds += time.perf_counter() - began
        return self.done


def pruning_curve(walker: Walker, levels: np.ndarray, step: int | None = None,
                  max_examples: int = PRUNING_EXAMPLES) -> np.ndarray:
    """PruningCurve measured at once: the accuracy at each of `levels`."""
    curve = PruningCurve(walker, levels, step, max_examples)
    curve.advance()
    return np.asarray(curve.values)


def decision_grid(walker: Walker, resolution: int = 80, padding: float = 0.5) -> dict[str, np.ndarray]:
    """For 2-D inputs: p(class 1) on a grid covering the training data at the current point ("p") and at the start
    of the path ("p_start": what the walk was to keep; None where a long path let its weights go), plus the data."""
    train = walker.tasks["A"].train
    x = train.x.cpu().numpy()
    lo, hi = x.min(0) - padding, x.max(0) + padding
    xs, ys = np.linspace(lo[0], hi[0], resolution), np.linspace(lo[1], hi[1], resolution)
    grid = torch.as_tensor(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), dtype=torch.float32).to(train.x.device)

    def p_class_1(params) -> np.ndarray:
        with torch.no_grad():
            probs = torch.softmax(walker.model_fn(params, grid), -1)[:, 1]
        return probs.cpu().numpy().reshape(resolution, resolution)

    try:
        start = p_class_1(walker.params_at(0))
    except ConfigError:
        start = None
    return {"x": xs, "y": ys, "p": p_class_1(walker.params), "p_start": start, "points": x,
            "labels": train.y.cpu().numpy()}


def loss_on_plane(walker: Walker, basis: PCABasis, extent: np.ndarray, resolution: int = 15) -> dict[str, np.ndarray]:
    """Task-A test loss at points of the PCA plane (mean + a·pc1 + b·pc2), on a resolution² grid.

    This is the loss on that plane, not at the path's points (which lie off the plane by their residual)."""
    task = walker.tasks["A"].test
    a_values = np.linspace(extent[0], extent[1], resolution)
    b_values = np.linspace(extent[2], extent[3], resolution)
    device = next(iter(walker.params.values())).device
    mean = torch.as_tensor(basis.mean, dtype=torch.float32, device=device)
    pc1, pc2 = (torch.as_tensor(basis.components[i], dtype=torch.float32, device=device) for i in range(2))
    losses = np.zeros((resolution, resolution))
    for i, b in enumerate(b_values):
        for j, a in enumerate(a_values):
            point = unflatten(mean + float(a) * pc1 + float(b) * pc2, walker.params)
            losses[i, j] = evaluate(walker.model_fn, point, task.x, task.y)[0]
    return {"a": a_values, "b": b_values, "loss": losses}


def goal_baselines(experiment: Experiment, budget_steps: int | None = None,
                   model_fn: NetworkFunction | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """What the walk is compared with on the dashboard, at a matched number of forward+backward passes.

    sparsify: one-shot pruning and masked fine-tuning (accuracy numbers); new-task: naive fine-tuning
    on task B (a per-step table of accuracy on every task) and joint training on A and B, the upper bound (accuracy
    on every task at the end); connect: the straight line on a 21-point α grid, and
    for an MLP the straight line to B with its hidden units permuted to line up with A's (weight matching: the same
    function as B, and the fair extra baseline of method.md §5).
    model_fn: the network to use (default the walk's own). should_stop: asked as the fine-tuning goes; True
    raises errors.Cancelled.
    """
    cfg, walker = experiment.config, experiment.walker
    walker = _WithModel(model_fn) if model_fn is not None else walker
    budget = budget_steps or cfg.walk.n_steps
    task_a = experiment.tasks["A"]
    if cfg.goal.kind == "sparsify":
        s = cfg.goal.target_sparsity
        _, tuned = masked_fine_tune(walker.model_fn, experiment.start, experiment.network.prunable, s, task_a,
                                    n_steps=min(budget, 500), seed=cfg.seed, should_stop=should_stop)
        return {"one_shot_accuracy": one_shot_prune(walker.model_fn, experiment.start, experiment.network.prunable,
                                                    s, task_a),
                "masked_fine_tune_accuracy": tuned, "masked_fine_tune_steps": min(budget, 500)}
    if cfg.goal.kind == "new-task":
        n = min(budget, 600)
        _, history = fine_tune(walker.model_fn, experiment.start, experiment.tasks["B"], n, cfg.seed,
                               eval_tasks=experiment.tasks, eval_every=max(n // 30, 1), should_stop=should_stop)
        # the upper bound (method.md §5): the same optimiser steps on batches of task B and all of task A together
        joint = continual_fine_tune(walker.model_fn, experiment.start, experiment.tasks["B"], n, cfg.seed, "joint",
                                    task_a=task_a, should_stop=should_stop)
        return {"naive_fine_tune": pd.DataFrame(history), "joint_training_steps": n,
                "joint_training": {name: evaluate(scored_on(walker.model_fn, t), joint, t.test.x, t.test.y)[1]
                                   for name, t in experiment.tasks.items()}}
    line = straight_line(walker.model_fn, experiment.start, experiment.end, task_a, n_points=21)
    out = {"straight_line": pd.DataFrame(line)}
    if cfg.model.name == "mlp":  # weight matching lines up an MLP's hidden units (baselines.weight_matching)
        layers = [(k, k.replace("weight", "bias")) for k in experiment.network.prunable]
        matched = weight_matching(experiment.start, experiment.end, layers)
        out["matched_line"] = pd.DataFrame(straight_line(walker.model_fn, experiment.start, matched, task_a,
                                                         n_points=21))
    return out


class _WithModel:
    def __init__(self, model_fn: NetworkFunction):
        self.model_fn = model_fn


def goal_baselines_apart(experiment: Experiment, should_stop: Callable[[], bool] | None = None) -> dict:
    """goal_baselines on a private copy of the network, so it can run on a thread of its own while the engine
    walks this experiment: torch.func.functional_call swaps a module's parameters while it runs, so two threads
    must never call one module at once (the engine's thread owns the walk's). The copy is built anew from the
    walk's settings, not deep-copied from the module: reading that module while the engine's thread has swapped
    its parameters for torch.func wrappers fails ("Cannot access storage of TensorWrapper", seen in a CI run).
    The module's own parameters are never used (weights are passed in), only its structure."""
    net = experiment.network
    network = build_network(experiment.config.model, net.input_shape, net.n_classes).to(experiment.device)
    return goal_baselines(experiment, model_fn=NetworkFunction(network, dict(experiment.walker.buffers)),
                          should_stop=should_stop)


class SharedResults:
    """Results that many callers ask for with the same inputs, computed once per process and shared.

    Why: a class opens the teacher's link, so every page asks for the same baselines (the same start network,
    goal and data); on a 2-core laptop serving 30 pages that was 30 × ~1.2 s of CPU taken from the walks.
    Callers asking while the result is being computed wait for that computation instead of starting their own.
    compute(should_stop) is asked to stop only when every caller waiting for it has stopped wanting it; a
    stopped computation is started again for a caller that still wants it. Errors reach every waiting caller
    and are not kept. The most recent `max_entries` results are kept; callers must not change them
    (shared_goal_baselines_apart hands out copies). Safe to call from any number of threads.
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._done: OrderedDict = OrderedDict()
        self._running: dict = {}  # key -> (Future, [the waiting callers' should_stop])
        self.n_computed = 0

    def get(self, key, compute: Callable[[Callable[[], bool]], object],
            should_stop: Callable[[], bool] | None = None):
        wants_it_no_more = should_stop or (lambda: False)
        while True:
            with self._lock:
                if key in self._done:
                    self._done.move_to_end(key)
                    return self._done[key]
                mine = key not in self._running
                if mine:
                    self._running[key] = (Future(), [])
                future, stops = self._running[key]
                stops.append(wants_it_no_more)
            if mine:
                return self._compute(key, compute, future, stops)
            while not future.done():
                if wants_it_no_more():
                    raise Cancelled("no longer wanted")
                try:
                    future.result(timeout=0.1)
                except (TimeoutError, Cancelled):
                    continue
                except Exception:  # noqa: BLE001 - raised below, from the future itself
                    break
            if not isinstance(future.exception(), Cancelled):
                return future.result()
            if wants_it_no_more():  # everybody had stopped wanting it, this caller too
                raise Cancelled("no longer wanted")

    def _compute(self, key, compute, future: Future, stops: list):
        def nobody_wants_it() -> bool:
            with self._lock:
                waiting = list(stops)
            return all(stop() for stop in waiting)

        try:
            result = compute(nobody_wants_it)
        except BaseException as err:
            with self._lock:
                del self._running[key]
            future.set_exception(err)
            raise
        with self._lock:
            del self._running[key]
            self._done[key] = result
            self.n_computed += 1
            while len(self._done) > self.max_entries:
                self._done.popitem(last=False)
        future.set_result(result)
        return result


def baselines_key(experiment: Experiment) -> str:
    """What goal_baselines depends on, as a digest: the settings (of the walk, only its length: the budget), the
    start (and end) weights and buffers, and the tasks' data. Two experiments with the same key get the same
    baselines."""
    settings = experiment.config.to_dict()
    settings["walk"] = {"n_steps": experiment.config.walk.n_steps}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    tensors = {f"start.{k}": v for k, v in experiment.start.items()}
    tensors.update({f"end.{k}": v for k, v in (experiment.end or {}).items()})
    tensors.update({f"buffer.{k}": v for k, v in experiment.buffers.items()})
    for name, task in experiment.tasks.items():
        for split in ("train", "test"):
            part = getattr(task, split)
            tensors.update({f"{name}.{split}.x": part.x, f"{name}.{split}.y": part.y})
    for name in sorted(tensors):
        value = tensors[name].detach()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_SHARED_BASELINES = SharedResults()


def shared_goal_baselines_apart(experiment: Experiment, should_stop: Callable[[], bool] | None = None,
                                compute: Callable[..., dict] | None = None) -> dict:
    """goal_baselines_apart (or `compute(experiment, should_stop)`, e.g. worker.AnalysisProcess.goal_baselines),
    computed once per process for the same inputs (baselines_key) however many sessions ask at once; each caller
    gets its own copy."""
    compute = compute or goal_baselines_apart
    result = _SHARED_BASELINES.get(baselines_key(experiment),
                                   lambda stop: compute(experiment, should_stop=stop), should_stop)
    return copy.deepcopy(result)


def weights_bytes(walker: Walker) -> bytes:
    """The current weights as a .safetensors file's bytes (loads with safetensors.torch.load)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in walker.params.items()})


def table_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    """The per-step table as CSV or Parquet bytes."""
    if fmt == "csv":
        return frame.to_csv(index=False).encode()
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def path_position(frame: pd.DataFrame) -> np.ndarray:
    """α ∈ [0, 1] of each point: cumulative Euclidean length over the total."""
    length = frame["euclidean_length"].to_numpy()
    return length / length[-1] if len(length) and length[-1] > 0 else np.zeros(len(length))
