"""The walker: owns the weights, the goal and the randomness of one walk.

`step()` does one bounded unit of work (one step of the chosen rule plus its measurements) and
returns the PathPoint it recorded; `run(n)` yields points until n steps are done or the goal is
reached. Settings are frozen: changing the step size is an explicit `set_step_size`, recorded on the
next point, and `branch(k)` starts a new walker from step k with any settings.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from .adaptive import TrustRegion, holds_goal_weight
from .config import WalkConfig, check_seed
from .data import Dataset
from .errors import ConfigError, OutOfMemory, WalkDiverged
from .goals import Goal
from .guard import HALVINGS as GUARD_HALVINGS
from .guard import accepts, guard_inputs, guard_outputs
from .measures import logits_of, loss_and_accuracy
from .metric import PullbackMetric
from .models import Network, NetworkFunction, check_fits, recompute_batchnorm
from .params import Params, add, clone, dot, flush_subnormal, is_finite, norm, scale, unflatten
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
        if not isinstance(tasks, dict) or not isinstance(tasks.get("A"), Dataset):
            raise ConfigError("tasks", type(tasks).__name__ if not isinstance(tasks, dict) else sorted(tasks),
                              "a dict of Datasets with the start network's task under 'A' (goal.tasks has it)")
        if _record:  # a branch (_record=False) goes on from a walker that was checked when it was built
            for task in tasks.values():
                check_fits(network, start, task)
        seed = check_seed(int(seed) if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) else seed)
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
        self.step_size = config.max_step_norm  # ε in force: config's, or the adaptive rule's latest
        self.trust = trust_region_for(config, goal)
        self._pending_event = ""
        self._pending_step_size_from: float | None = None  # ε before the changes made since the last step
        self._euclidean_length = 0.0
        self._functional_length = 0.0
        probe = drift_probe if drift_probe is not None else tasks["A"].test.x[:256]
        self._drift_probe = probe
        with torch.no_grad():
            self._drift_anchor = self.model_fn(start, probe)
        if _record:
            self._append(self._point(step=0, step_norm=0.0, functional_step=0.0, alignment=0.0, step_seconds=0.0,
                                     event="start", **self.measures(self.params)))

    # -- the model as a pure function of params (the walker's own BatchNorm statistics) -------------------
    @property
    def model_fn(self) -> NetworkFunction:
        """The function the walk keeps: task A's outputs (its own head's, when it has one)."""
        return NetworkFunction(self.network, self.buffers, head=self.tasks["A"].head)

    @property
    def goal_weight(self) -> float:
        """β or λ in force for the next step (λ grows by goal_weight_growth per step in the penalty walk, except at
        the steps where the adaptive step held it)."""
        cfg = self.config
        growth = cfg.goal_weight_growth if cfg.solver == "penalty" else 1.0
        held = self.trust.held if self.trust is not None and self.trust.adapt_goal_weight else 0
        return cfg.goal_weight * growth ** (self.n_steps - held)

    @property
    def restoring_weight(self) -> float:
        """ρ in force for the next step (the adaptive step may relax it; the penalty walk has none)."""
        if self.config.solver != "constrained":
            return math.nan
        return self.config.restoring_weight * (self.trust.pull if self.trust is not None else 1.0)

    @property
    def n_steps(self) -> int:
        return self.record.last.step if self.record.points else 0

    @property
    def n_prunable(self) -> int:
        """How many weights sparsity counts over (Linear and Conv weights: `network.prunable`)."""
        return sum(self.params[k].numel() for k in self.network.prunable)

    def zeros_at(self, point: PathPoint) -> int:
        """Exact zeros among the prunable weights at a recorded point (its sparsity × n_prunable, exactly)."""
        return round(point.sparsity * self.n_prunable)

    # -- walking -----------------------------------------------------------------------------------------
    def step(self) -> PathPoint:
        """Take one step; returns the recorded point. Raises WalkDiverged (keeping the last finite
        point) if the step is not finite; after the goal is reached it returns the last point.

        A small model on a GPU steps as a batch of one (batch.py), whose step a CUDA graph replays (graphs.py):
        the same step, without a launch from Python for each of its few hundred kernels."""
        if self.is_done:
            return self.record.last
        alone = self._batch_of_one()
        if alone is not None and not alone.fused_failed:
            result = alone.step()[0]
            if isinstance(result, BaseException):
                raise result
            return result
        return self.step_waiting()

    def _batch_of_one(self):
        """A WalkBatch of this walker alone when its steps should be fused and replayed (graphs.wanted); None
        otherwise (the CPU, big models, BatchNorm, the CG solver)."""
        from .batch import WalkBatch, batch_key, fused_applies

        if not fused_applies(self.params):
            return None
        key = batch_key(self)
        cached = self.__dict__.get("_alone")
        if cached is not None and cached[0] == key:
            return cached[1]
        batch = None if key is None else WalkBatch([self])
        if batch is not None and batch.rows_kind == "dense":  # the big models' rows: not fused (batch.py)
            batch = None
        self.__dict__["_alone"] = (key, batch)
        return batch

    def step_waiting(self) -> PathPoint:
        """`step` as every walk took it before graphs: each stage asks the device for what it needs (a batch
        retries a walk this way when their shared step fails)."""
        if self.is_done:
            return self.record.last
        t0 = time.perf_counter()
        batch, probe = self.draw()
        cfg = self.step_config()
        try:
            step = STEP_RULES[cfg.solver](self.params, self.goal, batch, probe, cfg, self.radius(), self.model_fn)
            functional_step = step.functional_step
            if functional_step is None:  # measured (one jvp on the step's probe), not part of the rule's cost
                metric = PullbackMetric(self.model_fn, probe, cfg.metric)
                functional_step = float(metric.squared_norm(step.tangent_vec, self.params))
            new_params, taken, guarded = self.guard(step.tangent_vec)
            functional_step *= taken ** 2  # θᵀgθ is quadratic in θ
            step_seconds = time.perf_counter() - t0
        except WalkDiverged:
            self.fail_diverged()
        except torch.linalg.LinAlgError as err:  # the step's solve failed (a metric gone ill-conditioned, as with
            self.fail_unsolvable(err)           # ε = 1000): this walk stops at its last point, the others go on
        except torch.OutOfMemoryError as err:  # nothing was changed: the walk stays at its last point
            self.fail_out_of_memory(err)
        measures = None
        if self.goal.is_point_target and not self.network.has_batchnorm:
            # Measured before landing, as WalkBatch does: the goal's distance comes with the measures (for
            # sparsify one global top-k and one wait for the device fewer); re-measured if the walk lands elsewhere.
            measures = self.measures(new_params)
        landed, event = self.land(new_params, functional_step, None if measures is None else measures["goal_distance"])
        if landed is not new_params:
            measures = None
        point = self.commit(landed, event, step.goal_direction, functional_step, step_seconds, measures=measures,
                            kept=step.kept)
        self.remember_guard(new_params, guarded)
        return point

    def guard(self, theta: Params) -> tuple[Params, float, Tensor | None]:
        """(where the step lands, the share of the proposed step θ taken, the guard examples' log-probabilities
        there): θ halved while the step fails the guard (guard.py: the kept share falls by more than
        config.step_guard, or the outputs move by more than KL_BUDGET); (w + θ, 1, None) when the guard is off."""
        limit = self.config.step_guard
        if not limit:
            return flush_subnormal(add(self.params, theta)), 1.0, None
        inputs, classes = guard_inputs(self.goal)
        before = self._guard_before(inputs)
        taken = 1.0
        for tries in range(GUARD_HALVINGS + 1):
            new_params = flush_subnormal(add(self.params, theta if taken == 1.0 else scale(theta, taken)))
            after = guard_outputs(self.model_fn, new_params, inputs)
            if tries == GUARD_HALVINGS or bool(accepts(before, after, classes, limit)):
                break
            taken /= 2
        return new_params, taken, after

    def _guard_before(self, inputs: Tensor) -> Tensor:
        """The guard examples' log-probabilities at the current point (remembered from the step that led here)."""
        remembered = self.__dict__.get("_guard_state")
        if remembered is not None and remembered[0] is self.params:
            return remembered[1]
        return guard_outputs(self.model_fn, self.params, inputs)

    def remember_guard(self, stepped: Params, outputs: Tensor | None) -> None:
        """Keep the guard's measurement at the point just committed, when it is that point (not projected or
        snapped, and no BatchNorm statistics recomputed under it)."""
        if outputs is not None and self.params is stepped and not self.network.has_batchnorm:
            self._guard_state = (self.params, outputs)

    # The stages of a step, shared with WalkBatch (batch.py), which runs the rule and the measurements of
    # many walkers as one computation and hands each walker its own results.
    def draw(self) -> tuple:
        """(batch, probe) for the next step, from this walk's own generator."""
        return self.goal.sample(self.generator, self.config.batch_size), self.goal.probe(self.generator,
                                                                                         self.config.probe_size)

    def radius(self) -> float:
        """ε, or less near a point target (never overshoot it; the distance was measured at the last point)."""
        if self.goal.is_point_target:
            return min(self.step_size, self.record.last.goal_distance)
        return self.step_size

    def step_config(self) -> WalkConfig:
        """The config in force for the next step (the penalty walk's λ grows per step; an adaptive ε moves)."""
        cfg = self.config
        if cfg.solver == "penalty" and cfg.goal_weight_growth != 1.0:
            cfg = dataclasses.replace(cfg, goal_weight=self.goal_weight)
        if self.step_size != cfg.max_step_norm:
            cfg = dataclasses.replace(cfg, max_step_norm=self.step_size)
        if self.trust is not None and self.trust.pull != 1.0:
            cfg = dataclasses.replace(cfg, restoring_weight=self.config.restoring_weight * self.trust.pull)
        return cfg

    def fail_diverged(self):
        self.is_done, self.stop_reason = True, f"step {self.n_steps + 1} was not finite; kept step {self.n_steps}"
        raise WalkDiverged(f"the walk diverged: {self.stop_reason}. Try a smaller step size (ε) or goal weight.")

    def fail_unsolvable(self, err: Exception):
        self.is_done = True
        self.stop_reason = f"step {self.n_steps + 1} could not be solved (its metric is ill-conditioned); kept step " \
                           f"{self.n_steps}"
        raise WalkDiverged(f"the walk diverged: {self.stop_reason}. Try a smaller step size (ε) or goal weight."
                           ) from err

    def fail_out_of_memory(self, err: Exception):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cfg = self.config
        raise OutOfMemory(f"out of memory at step {self.n_steps + 1} (probe {cfg.probe_size}, batch "
                          f"{cfg.batch_size}); the walk is kept at step {self.n_steps}. Try a smaller "
                          "--probe-size or --batch-size, or the cg linear solver.") from err

    def land(self, new_params: Params, functional_step: float, distance: float | None = None,
             finite: bool | None = None) -> tuple[Params, str]:
        """(the point the step lands on, its event): projected or snapped once the goal is reached.
        distance, finite: the goal's distance at new_params and whether they are finite, when the caller knows."""
        if finite is None:
            finite = is_finite(new_params)
        if not (finite and math.isfinite(functional_step)):
            self.fail_diverged()
        event, self._pending_event = self._pending_event, ""
        if self._pending_step_size_from is not None:
            if self._pending_step_size_from != self.step_size:  # (set back to where it was: nothing happened)
                event = ", ".join(filter(None, [event, f"step size {self._pending_step_size_from:g} -> "
                                                       f"{self.step_size:g}"]))
            self._pending_step_size_from = None
        if self.goal.is_done(new_params) if distance is None else self.goal.is_done_at(distance):
            new_params = self.goal.finish(new_params)
            self.is_done, self.stop_reason = True, "goal reached"
            event = ", ".join(filter(None, [event, "projected" if self.goal.name == "sparsify" else "snapped"]))
        return new_params, event

    def commit(self, new_params: Params, event: str, goal_direction: Params, functional_step: float,
               step_seconds: float, measures: dict | None = None, facts: dict | None = None,
               kept: float | None = None) -> PathPoint:
        """Move to `new_params` and record the point. measures: what `measures(new_params)` returns; facts: the
        step's 'step_norm', 'alignment' with the goal and 'trace_row' (WalkBatch works these out for all its
        walks at once, with the 'kept' share of the batch), when known; kept: that share, for the adaptive step."""
        if facts is None:
            moved = {k: new_params[k] - self.params[k] for k in new_params}  # the step actually taken
            # cos(θ, v_goal) (0 for a zero vector) and the norms, from one answer of the device
            moved_norm, goal_norm = norm(moved), norm(goal_direction)
            step_norm, denom, inner, goal_norm = torch.stack(
                [moved_norm, moved_norm * goal_norm, dot(moved, goal_direction), goal_norm]).tolist()
            facts = {"step_norm": step_norm, "alignment": inner / denom if denom > 0 else 0.0, "trace_row": None}
            if self.trust is not None and not self.goal.is_point_target:
                facts["goal_norm"] = goal_norm
        radius = self.radius()  # what this step was allowed (the record still ends at the step's start)
        step_norm = facts["step_norm"]
        self._euclidean_length += step_norm
        self._functional_length += math.sqrt(max(functional_step, 0.0))
        self.params = new_params
        if self.network.has_batchnorm and self.bn_inputs is not None:
            self.buffers.update(recompute_batchnorm(self.network, self.params, self.bn_inputs))
            measures = None  # the statistics changed under any measurement made before
        if measures is None:
            measures = self.measures(new_params)
        point = self._point(step=self.n_steps + 1, step_norm=step_norm, functional_step=functional_step,
                            alignment=facts["alignment"], step_seconds=step_seconds, event=event, **measures)
        if not all(math.isfinite(v) for v in point.loss.values()):
            self.is_done, self.stop_reason = True, f"loss at step {point.step} is not finite"
        self._append(point, facts["trace_row"])
        if self.trust is not None and not self.is_done:
            before = self.record[len(self.record) - 2]
            kept = facts.get("kept", kept)
            self.step_size = self.trust.next_step_size(
                self.step_size, radius, distance_before=before.goal_distance, distance_after=point.goal_distance,
                step_norm=step_norm, alignment=facts["alignment"], goal_norm=facts.get("goal_norm"),
                point_target=self.goal.is_point_target, kept=kept, functional_step=functional_step,
                probe_size=self.config.probe_size)
        return point

    def run(self, n_steps: int | None = None) -> Iterator[PathPoint]:
        """Yield up to n_steps new points (default: the config's n_steps), stopping at the goal. A count that is not
        a whole number >= 0 is refused here (ConfigError), not when the first point is asked for (-5 walked none,
        without a word)."""
        budget = self.config.n_steps if n_steps is None else n_steps
        if not isinstance(budget, numbers.Integral) or isinstance(budget, bool) or budget < 0:
            raise ConfigError("n-steps", budget, "a whole number >= 0")
        return self._run(int(budget))

    def _run(self, budget: int) -> Iterator[PathPoint]:
        for _ in range(budget):
            if self.is_done:
                return
            yield self.step()

    # -- explicit, recorded changes ---------------------------------------------------------------------------
    def set_step_size(self, max_step_norm: float) -> None:
        """Change ε from the next step on; the change is recorded as an event on that step. With the adaptive
        step size, ε goes on adapting from the new value, within bounds around it."""
        old = self.step_size
        self.config = dataclasses.replace(self.config, max_step_norm=max_step_norm)  # validates
        self.step_size = max_step_norm
        if self.trust is not None:
            held = self.trust.held  # λ goes on from where it is: it is not ε's to reset
            self.trust = trust_region_for(self.config, self.goal)
            self.trust.held = held
        # Recorded on the next step, from the ε of the last step taken: changes tried in between (1e9, then 0.05)
        # are one change (0.2 -> 0.05), and they no longer replace an event waiting there ("branched from step k").
        if old != max_step_norm and self._pending_step_size_from is None:
            self._pending_step_size_from = old

    def branch(self, at_step: int, config: WalkConfig | None = None, seed: int | None = None) -> Walker:
        """A new walker that starts at point `at_step` of this path (its history up to there is kept)."""
        if not 0 <= at_step < len(self.record):
            raise ConfigError("branch step", at_step, f"0..{len(self.record) - 1}")
        if not self.trace.is_exact:
            raise ConfigError("branch step", at_step, "a saved checkpoint (this model is too large to keep "
                              "every point's weights)")
        if seed is not None:
            check_seed(seed)
        params = self.params_at(at_step)
        child = Walker(self.network, params, self.goal, config or self.config, self.tasks,
                       seed=self.seed + 1 if seed is None else seed, buffers=self.buffers, bn_inputs=self.bn_inputs,
                       n_eval=self.n_eval, drift_probe=self._drift_probe, _record=False)
        child._drift_anchor = self._drift_anchor
        child.record = PathRecord(self.record.points[: at_step + 1])
        child.trace = self.trace.head(at_step + 1)
        base = self.record[at_step]
        child._euclidean_length, child._functional_length = base.euclidean_length, base.functional_length
        child._pending_event = f"branched from step {at_step}"
        if child.trust is not None and config is None:  # the same settings: go on from that point's ε
            child.step_size = base.step_size
        if child.trust is not None and child.trust.adapt_goal_weight:
            # λ goes on from the λ of that point (the steps held before it, from the λ it recorded)
            cfg = self.config
            grown = math.log(base.goal_weight / cfg.goal_weight) / math.log(cfg.goal_weight_growth) \
                if cfg.solver == "penalty" and cfg.goal_weight_growth != 1.0 else at_step - 1
            child.trust.held = min(max(0, at_step - 1 - round(grown)), at_step)
        return child

    def params_at(self, index: int) -> Params:
        """The weights of recorded point `index` (exact traces only; ConfigError naming the nearest points whose
        weights a long path kept, for one it let go: see WeightTrace). A model too large for an exact trace keeps only
        a sketch of each point: ConfigError then too (the sketch's rows are not weights)."""
        if not self.trace.is_exact:
            raise ConfigError("step", index, f"the current point ({self.n_steps}) only: this model's "
                              f"{self.trace.n_params:,} weights are too many to keep for every point of its path (it "
                              "keeps a sketch of them for the projections; a saved run holds its checkpoints)")
        if not 0 <= index < len(self.record):
            raise ConfigError("step", index, f"0..{len(self.record) - 1}, the points of this path")
        try:
            row = self.trace.row(index)
        except KeyError:
            near = " or ".join(str(i) for i in self.trace.nearest(index))
            raise ConfigError("branch step", index, f"{near}: beyond its last {self.trace.recent} steps this path "
                              f"keeps the weights of one step in {self.trace.stride} only (GEODESIC_TRACE_MB)"
                              ) from None
        device = next(iter(self.params.values())).device
        return unflatten(torch.as_tensor(row).to(device), self.params)

    # -- measuring -----------------------------------------------------------------------------------------
    def measure_inputs(self) -> dict:
        """The fixed tensors every measurement reads: each task's test split, the drift probe and its anchor, and
        the goal's own inputs (WalkBatch stacks these once for all its walkers)."""
        tests = {name: (task.test.x[: self.n_eval], task.test.y[: self.n_eval]) for name, task in self.tasks.items()}
        # The default drift probe is the first test inputs of task A: their logits come with the test pass.
        drift_from = next((name for name, (x, _) in tests.items() if _is_prefix(self._drift_probe, x)), None)
        drift = (self._drift_anchor,) if drift_from else (self._drift_probe, self._drift_anchor)
        heads = {name: task.head for name, task in self.tasks.items()}
        return {"tests": tests, "heads": heads, "drift": drift, "drift_from": drift_from,
                "distance": self.goal.distance_inputs(), "extra": self.goal.extra_inputs()}

    def measures(self, params: Params) -> dict:
        """What is recorded about a point besides its step: loss and accuracy per task, drift, sparsity, distance
        to the goal and the goal's own numbers."""
        values = measure_values(self.goal, self.model_fn, self.network.prunable, params, self.measure_inputs())
        device = next(iter(params.values())).device
        # one answer from the device for every measure (float() of each would wait for it once per value)
        flat = torch.stack([torch.as_tensor(v, device=device).double() for v in values.values()]).tolist()
        return measures_to_fields(dict(zip(values, flat, strict=True)))

    def _point(self, **fields) -> PathPoint:
        return PathPoint(step_size=self.step_size, goal_weight=self.goal_weight, restoring_weight=self.restoring_weight,
                         euclidean_length=self._euclidean_length, functional_length=self._functional_length, **fields)

    def _append(self, point: PathPoint, trace_row=None) -> None:
        # Weights first: a reader on another thread (the dashboard, while the engine walks) that reads the
        # record and then the trace always finds a weight row for every point it read.
        self.trace.append(self.params, trace_row)
        self.record.append(point)


def trust_region_for(config: WalkConfig, goal: Goal) -> TrustRegion | None:
    """The adaptive step's state for a new walk (None unless config.adaptive_step). The restoring pull is relaxed
    only where there is one (the constrained rule) and a point to arrive at (sparsify, connect): a new task has
    no end the pull keeps it from, only task A to forget."""
    if not config.adaptive_step:
        return None
    return TrustRegion(initial=config.max_step_norm, tolerance=config.kept_tolerance,
                       relax_pull=config.solver == "constrained" and goal.is_point_target,
                       adapt_goal_weight=holds_goal_weight(config.solver, config.goal_weight_growth))


@torch.no_grad()
def measure_values(goal: Goal, model_fn: NetworkFunction, prunable: tuple[str, ...], params: Params,
                   inputs: dict) -> dict[str, Tensor]:
    """Every measure of a point as 0-d tensors keyed 'loss/A', 'accuracy/A', 'drift', 'sparsity',
    'goal_distance', 'extra:NAME'. Pure (no Python numbers out): WalkBatch runs it under vmap for many walks."""
    values, drift_logits = {}, None
    anchor = inputs["drift"][-1]
    for name, (x, y) in inputs["tests"].items():  # each task on its own head's outputs (data.Dataset.head)
        logits = logits_of(model_fn.with_head(inputs["heads"][name]), params, x)
        values[f"loss/{name}"], values[f"accuracy/{name}"] = loss_and_accuracy(logits, y)
        if name == inputs["drift_from"] and inputs["heads"][name] == model_fn.head:
            drift_logits = logits[: len(anchor)]
    if drift_logits is None:
        drift_logits = model_fn(params, inputs["drift"][0])
    values["drift"] = goal.function_distance(drift_logits, anchor).mean()
    total = sum(params[k].numel() for k in prunable)
    n_zero = sum((params[k] == 0).sum() for k in prunable)
    values["sparsity"] = n_zero / total if total else torch.zeros(())
    values["goal_distance"], extra = goal.progress_value(params, inputs["distance"], inputs["extra"])
    values.update({f"extra:{k}": v for k, v in extra.items()})
    return values


def measures_to_fields(values: dict[str, float]) -> dict:
    """measure_values' flat floats as PathPoint fields."""
    grouped: dict[str, dict[str, float]] = {"loss": {}, "accuracy": {}, "extra": {}}
    for key, value in values.items():
        if key.startswith(("loss/", "accuracy/")):
            head, task = key.split("/", 1)
            grouped[head][task] = value
        elif key.startswith("extra:"):
            grouped["extra"][key[len("extra:"):]] = value
    return dict(**grouped, drift=values["drift"], sparsity=values["sparsity"], goal_distance=values["goal_distance"])


def _is_prefix(probe: Tensor, x: Tensor) -> bool:
    """Whether `probe` is the first rows of `x` (the same storage, as the default drift probe is)."""
    return len(probe) <= len(x) and probe.data_ptr() == x.data_ptr() and probe.stride() == x.stride()
