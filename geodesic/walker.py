"""The walker: owns the weights, the goal and the randomness of one walk.

`step()` does one bounded unit of work (one step of the chosen rule plus its measurements) and
returns the PathPoint it recorded; `run(n)` yields points until n steps are done or the goal is
reached. Settings are frozen: changing the step size is an explicit `set_step_size`, recorded on the
next point, and `branch(k)` starts a new walker from step k with any settings.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator

import torch

from .config import WalkConfig
from .data import Dataset
from .errors import ConfigError, OutOfMemory, WalkDiverged
from .goals import Goal
from .measures import evaluate, sparsity
from .metric import PullbackMetric
from .models import Network, NetworkFunction, recompute_batchnorm
from .params import Params, add, clone, cosine, flush_subnormal, is_finite, norm, unflatten
from .path import PathPoint, PathRecord, WeightTrace
from .step import STEP_RULES


class Walker:
    """One walk from `start` under `goal` with the step rule of `config`.

    tasks: the test splits measured at every point, by name ("A", and "B" for a new task).
    bn_inputs: training inputs used to recompute BatchNorm statistics before each measurement.
    n_eval: measure on the first n_eval test examples of each task (None: all of them).
    """

    def __init__(self, network: Network, start: Params, goal: Goal, config: WalkConfig, tasks: dict[str, Dataset],
                 seed: int = 0, buffers: dict | None = None, bn_inputs: torch.Tensor | None = None,
                 n_eval: int | None = None, drift_probe: torch.Tensor | None = None, _record: bool = True):
        self.network, self.goal, self.config, self.tasks, self.seed = network, goal, config, tasks, seed
        self.params = clone(start)
        # BatchNorm statistics, shared with the goal's model_fn (the same dict, updated in place).
        self.buffers = dict(network.buffers) if buffers is None else buffers
        self.bn_inputs = bn_inputs
        self.n_eval = n_eval
        self.generator = torch.Generator().manual_seed(seed)
        self.record = PathRecord()
        self.trace = WeightTrace(sum(v.numel() for v in start.values()), seed=seed)
        self.is_done = False
        self.stop_reason = ""
        self._pending_event = ""
        self._euclidean_length = 0.0
        self._functional_length = 0.0
        probe = drift_probe if drift_probe is not None else tasks["A"].test.x[:256]
        self._drift_probe = probe
        with torch.no_grad():
            self._drift_anchor = self.model_fn(start, probe)
        if _record:
            self._append(self._measure(self.params, step=0, step_norm=0.0, functional_step=0.0, alignment=0.0,
                                       step_seconds=0.0, event="start"))

    # -- the model as a pure function of params (the walker's own BatchNorm statistics) -------------------
    @property
    def model_fn(self) -> NetworkFunction:
        return NetworkFunction(self.network, self.buffers)

    @property
    def goal_weight(self) -> float:
        """β or λ in force for the next step (λ grows by goal_weight_growth per step in the penalty walk)."""
        cfg = self.config
        growth = cfg.goal_weight_growth if cfg.solver == "penalty" else 1.0
        return cfg.goal_weight * growth ** self.n_steps

    @property
    def n_steps(self) -> int:
        return self.record.last.step if self.record.points else 0

    # -- walking -----------------------------------------------------------------------------------------
    def step(self) -> PathPoint:
        """Take one step; returns the recorded point. Raises WalkDiverged (keeping the last finite
        point) if the step is not finite; after the goal is reached it returns the last point."""
        if self.is_done:
            return self.record.last
        cfg = self.config
        t0 = time.perf_counter()
        batch = self.goal.sample(self.generator, cfg.batch_size)
        probe = self.goal.probe(self.generator, cfg.probe_size)
        radius = cfg.max_step_norm
        if self.goal.is_point_target:  # never overshoot a point target
            radius = min(radius, self.goal.distance(self.params))
        try:
            if cfg.solver == "penalty" and cfg.goal_weight_growth != 1.0:
                cfg = dataclasses.replace(cfg, goal_weight=self.goal_weight)
            step = STEP_RULES[cfg.solver](self.params, self.goal, batch, probe, cfg, radius, self.model_fn)
            new_params = flush_subnormal(add(self.params, step.tangent_vec))
            step_seconds = time.perf_counter() - t0
            functional_step = step.functional_step
            if functional_step is None:  # measured (one jvp on the step's probe), not part of the rule's cost
                metric = PullbackMetric(self.model_fn, probe, cfg.metric)
                functional_step = float(metric.squared_norm(step.tangent_vec, self.params))
            diverged = not (is_finite(new_params) and math.isfinite(functional_step))
        except WalkDiverged:
            diverged, step_seconds = True, time.perf_counter() - t0
        except torch.OutOfMemoryError as err:  # nothing was changed: the walk stays at its last point
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfMemory(f"out of memory at step {self.n_steps + 1} (probe {cfg.probe_size}, batch "
                              f"{cfg.batch_size}); the walk is kept at step {self.n_steps}. Try a smaller "
                              "--probe-size or --batch-size, or the cg linear solver.") from err
        if diverged:
            self.is_done, self.stop_reason = True, f"step {self.n_steps + 1} was not finite; kept step {self.n_steps}"
            raise WalkDiverged(f"the walk diverged: {self.stop_reason}. Try a smaller step size (ε) "
                               "or goal weight.")
        event, self._pending_event = self._pending_event, ""
        if self.goal.is_done(new_params):
            new_params = self.goal.finish(new_params)
            self.is_done, self.stop_reason = True, "goal reached"
            event = ", ".join(filter(None, [event, "projected" if self.goal.name == "sparsify" else "snapped"]))
        moved = {k: new_params[k] - self.params[k] for k in new_params}  # the step actually taken
        step_norm = float(norm(moved))
        self._euclidean_length += step_norm
        self._functional_length += math.sqrt(max(functional_step, 0.0))
        self.params = new_params
        if self.network.has_batchnorm and self.bn_inputs is not None:
            self.buffers.update(recompute_batchnorm(self.network, self.params, self.bn_inputs))
        point = self._measure(new_params, step=self.n_steps + 1, step_norm=step_norm,
                              functional_step=functional_step, alignment=cosine(moved, step.goal_direction),
                              step_seconds=step_seconds, event=event)
        if not all(math.isfinite(v) for v in point.loss.values()):
            self.is_done, self.stop_reason = True, f"loss at step {point.step} is not finite"
        self._append(point)
        return point

    def run(self, n_steps: int | None = None) -> Iterator[PathPoint]:
        """Yield up to n_steps new points (default: the config's n_steps), stopping at the goal."""
        for _ in range(self.config.n_steps if n_steps is None else n_steps):
            if self.is_done:
                return
            yield self.step()

    # -- explicit, recorded changes ---------------------------------------------------------------------------
    def set_step_size(self, max_step_norm: float) -> None:
        """Change ε from the next step on; the change is recorded as an event on that step."""
        old = self.config.max_step_norm
        self.config = dataclasses.replace(self.config, max_step_norm=max_step_norm)  # validates
        if old != max_step_norm:
            self._pending_event = f"step size {old:g} -> {max_step_norm:g}"

    def branch(self, at_step: int, config: WalkConfig | None = None, seed: int | None = None) -> Walker:
        """A new walker that starts at point `at_step` of this path (its history up to there is kept)."""
        if not 0 <= at_step < len(self.record):
            raise ConfigError("branch step", at_step, f"0..{len(self.record) - 1}")
        if not self.trace.is_exact:
            raise ConfigError("branch step", at_step, "a saved checkpoint (this model is too large to keep "
                              "every point's weights)")
        params = self.params_at(at_step)
        child = Walker(self.network, params, self.goal, config or self.config, self.tasks,
                       seed=self.seed + 1 if seed is None else seed, buffers=self.buffers, bn_inputs=self.bn_inputs,
                       n_eval=self.n_eval, drift_probe=self._drift_probe, _record=False)
        child._drift_anchor = self._drift_anchor
        child.record = PathRecord(self.record.points[: at_step + 1])
        child.trace.rows = list(self.trace.rows[: at_step + 1])
        base = self.record[at_step]
        child._euclidean_length, child._functional_length = base.euclidean_length, base.functional_length
        child._pending_event = f"branched from step {at_step}"
        return child

    def params_at(self, index: int) -> Params:
        """The weights of recorded point `index` (exact traces only)."""
        device = next(iter(self.params.values())).device
        return unflatten(torch.as_tensor(self.trace.rows[index]).to(device), self.params)

    # -- measuring -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _measure(self, params: Params, *, step: int, step_norm: float, functional_step: float, alignment: float,
                 step_seconds: float, event: str) -> PathPoint:
        losses, accuracies = {}, {}
        for name, task in self.tasks.items():
            x, y = task.test.x[: self.n_eval], task.test.y[: self.n_eval]
            losses[name], accuracies[name] = evaluate(self.model_fn, params, x, y)
        logits = self.model_fn(params, self._drift_probe)
        drift = float(self.goal.function_distance(logits, self._drift_anchor).mean())
        return PathPoint(
            step=step, step_size=self.config.max_step_norm, goal_weight=self.goal_weight, step_norm=step_norm,
            functional_step=functional_step,
            euclidean_length=self._euclidean_length, functional_length=self._functional_length, drift=drift,
            alignment=alignment, loss=losses, accuracy=accuracies,
            sparsity=sparsity(params, self.network.prunable), goal_distance=self.goal.distance(params),
            step_seconds=step_seconds, extra=self.goal.extra_measures(params), event=event)

    def _append(self, point: PathPoint) -> None:
        self.record.append(point)
        self.trace.append(self.params)
