"""WalkBatch: K walkers that share a computation, stepped as one.

Walks with the same architecture, step rule, probe and batch shapes, goal and device (the normal case in a
class that opened the teacher's link, or a fan of step sizes) differ only in their weights, their data draws
and a few numbers (ε, β/λ, ρ). Their weights are stacked on a new leading dimension and every piece of a step
runs once for all of them under `torch.func.vmap` over the functional model: the goal's direction and
restoring gradient, the factored (or dense) Jacobian rows, the kernels K = L Lᵀ (one batched `eigh`), the
trust-region μ of every walk at once (`secular_damping`), and the measurements. Each walker keeps owning its
own state: it draws its batch and probe from its own generator, lands (projects or snaps) and records its own
point through the same `Walker` stages a lone step uses, so K batched walks give the paths of K separate
walkers (tests/test_batch.py). A step that fails for the batch as a whole (a non-finite kernel, out of
memory) is retried walk by walk from the same draws, so only the walk at fault stops.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.profiler import record_function

from .errors import GeodesicError
from .guard import HALVINGS as GUARD_HALVINGS
from .guard import accepts, guard_inputs, guard_outputs
from .metric import PullbackMetric
from .params import Params, flush_subnormal
from .path import PathPoint
from .rows import DenseRows, conv_rows_fit, factored_layers, linear_layer_factors, rows_from_factors
from .step import dense_jacobian_fits, trust_region_coefficients
from .walker import Walker, measure_values, measures_to_fields


def batch_key(walker: Walker) -> tuple | None:
    """Walkers with equal keys can be stepped as one batch; None: this walker is always stepped alone
    (BatchNorm statistics are per walk, and the CG solver is not batched)."""
    cached = walker.__dict__.get("_batch_key")
    if cached is not None and cached[0] is walker.config:  # the config changes only by replacement (set_step_size)
        return cached[1]
    key = _batch_key(walker)
    walker.__dict__["_batch_key"] = (walker.config, key)
    return key


def _batch_key(walker: Walker) -> tuple | None:
    network, cfg, goal = walker.network, walker.config, walker.goal
    rows = rows_kind(walker)
    if network.has_batchnorm or rows == "cg":
        return None

    def shapes(tensors) -> tuple:
        flat = [t for item in tensors for t in (item.values() if isinstance(item, dict) else [item])]
        return tuple((tuple(t.shape), t.dtype) for t in flat)

    measured = walker.measure_inputs()
    weights = tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in walker.params.items())
    return (measured["drift_from"], repr(network.module), weights,
            cfg.solver, cfg.metric, cfg.probe_size, cfg.batch_size, cfg.step_guard, rows, goal.name, goal.n_outputs,
            getattr(goal, "target_sparsity", None), tuple(goal.anchor_inputs.shape[1:]),
            shapes(measured["extra"]), shapes(measured["distance"]),
            tuple((name, shapes(xy)) for name, xy in measured["tests"].items()), shapes(measured["drift"]))


def rows_kind(walker: Walker) -> str | None:
    """How a batch takes this walker's constrained step: 'factored' or 'dense' Jacobian rows, or 'cg' (not
    batched); None for the penalty walk. The same choice as constrained_step makes for one walk."""
    cfg = walker.config
    if cfg.solver != "constrained":
        return None
    n_rows = cfg.probe_size * walker.goal.n_outputs
    if cfg.linear_solver == "cg" or (cfg.linear_solver == "auto" and n_rows > 2048):
        return "cg"
    if factored_layers(walker.network, walker.params) is None:
        return "dense"
    # The factored rows are checked once per network against a jvp (rows.py) before any batch relies on them.
    probe = walker.goal.anchor_inputs[: cfg.probe_size]
    rows = PullbackMetric(walker.model_fn, probe, cfg.metric).jacobian_rows(walker.params, allow_dense=False,
                                                                           size_rule=cfg.linear_solver != "kernel")
    return "factored" if rows is not None else "dense"


def _stack(trees: list) -> object:
    """Stack a list of equal pytrees (tensors in dicts and tuples) on a new leading dimension; other leaves
    (names, None) are equal across the batch (they are part of batch_key) and kept as they are."""
    first = trees[0]
    if isinstance(first, Tensor):
        return torch.stack(trees)
    if isinstance(first, dict):
        return {k: _stack([t[k] for t in trees]) for k in first}
    if isinstance(first, tuple):
        return tuple(_stack([t[i] for t in trees]) for i in range(len(first)))
    return first


def _in_dims(tree: object) -> object:
    """vmap's in_dims for a stacked tree: 0 for tensors, None for the shared leaves."""
    if isinstance(tree, Tensor):
        return 0
    if isinstance(tree, dict):
        return {k: _in_dims(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_in_dims(v) for v in tree)
    return None


def _batched_norm2(tree: Params) -> Tensor:
    """‖x_k‖² for each walk k of stacked Params, (K,)."""
    return sum(v.double().pow(2).flatten(1).sum(1) for v in tree.values())


class WalkBatch:
    """K compatible walkers (equal `batch_key`) stepped as one computation; `step()` advances each by one."""

    def __init__(self, walkers: list[Walker]):
        keys = {batch_key(w) for w in walkers}
        if len(keys) != 1 or None in keys:
            raise ValueError("WalkBatch needs walkers with one and the same batch_key (see batch.batch_key)")
        self.walkers = list(walkers)
        lead = self.walkers[0]
        self.goal, self.model_fn, self.config = lead.goal, lead.model_fn, lead.config
        self.rows_kind = rows_kind(lead)
        self._static: dict[tuple, object] = {}

    def __len__(self) -> int:
        return len(self.walkers)

    def step(self) -> list[PathPoint | GeodesicError]:
        """One step of every walker that is not done: its new point, or the error that stopped it."""
        active = [w for w in self.walkers if not w.is_done]
        if not active:
            return []
        states = [w.generator.get_state() for w in active]
        try:
            return self._step_together(active)
        except (GeodesicError, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results: list[PathPoint | GeodesicError] = []  # walk by walk from the same draws: only the culprit stops
        for walker, state in zip(active, states, strict=True):
            walker.generator.set_state(state)
            try:
                results.append(walker.step())
            except GeodesicError as err:
                results.append(err)
        return results

    # -- the batched step ----------------------------------------------------------------------------------
    def _static_inputs(self, walkers: list[Walker]) -> dict:
        """Per-walk tensors that never change (test splits, drift probes, goal inputs), stacked once per membership."""
        key = tuple(id(w) for w in walkers)
        if key not in self._static:
            self._static.clear()
            self._static[key] = _stack([w.measure_inputs() for w in walkers])
        return self._static[key]

    def _step_together(self, walkers: list[Walker]) -> list[PathPoint | GeodesicError]:
        # The named ranges show up in torch.profiler (bench/batch_profile.py --profile K).
        t0 = time.perf_counter()
        goal, model_fn, cfg = self.goal, self.model_fn, self.config
        with record_function("batch.draw"):
            draws = [w.draw() for w in walkers]
            params = _stack([w.params for w in walkers])
            probes = torch.stack([probe for _, probe in draws])
            configs = [w.step_config() for w in walkers]
            device = probes.device
            radius = torch.tensor([w.radius() for w in walkers], dtype=torch.float64)
            goal_weight = torch.tensor([c.goal_weight for c in configs], dtype=torch.float64)

        # v_goal and ∇R for every walk (the goal's own pure functions, vmapped over walks)
        with record_function("batch.direction"):
            v_goal = vmap(goal.direction_value)(params, *_stack([w.goal.direction_inputs(b) for w, (b, _) in
                                                                 zip(walkers, draws, strict=True)]))
            restoring_in = _stack([w.goal.restoring_inputs(b) for w, (b, _) in zip(walkers, draws, strict=True)])
            grad_restoring, (_, kept) = vmap(grad_and_value(goal.restoring_value_and_kept, has_aux=True))(
                params, *restoring_in)

        def per_walk(x: Tensor) -> Tensor:  # (K,) -> broadcastable against stacked params of any shape
            return x.to(device=device, dtype=probes.dtype)

        with record_function("batch.solve"):
            if cfg.solver == "penalty":
                # u = ∇R − λ v_goal,  θ = −ε u / ‖u‖   (penalty_step, for K walks)
                u = {k: grad_restoring[k] - _bcast(per_walk(goal_weight), v) * v for k, v in v_goal.items()}
                length = _batched_norm2(u).sqrt()
                factor = torch.where(length > 0, -radius.to(device) / length.clamp_min(1e-300), 0)
                theta = {k: _bcast(per_walk(factor), v) * v for k, v in u.items()}
                squared_norm = lambda p, x, t: PullbackMetric(model_fn, x, cfg.metric).squared_norm(t, p)
                functional = vmap(squared_norm)(params, probes, theta)
            else:
                theta, functional = self._constrained(walkers, params, probes, v_goal, grad_restoring, radius,
                                                      goal_weight, per_walk)
            guard_after = None
            if cfg.step_guard:
                new_params, taken, guard_after = self._guard(walkers, params, theta)
                functional = functional * taken.to(functional) ** 2  # θᵀgθ is quadratic in θ
            else:
                new_params = flush_subnormal({k: params[k] + theta[k] for k in params})
        step_seconds = (time.perf_counter() - t0) / len(walkers)  # the batch's time, shared by its walks

        # Measure every walk where its step lands, all at once, and what each walker would work out about its
        # own step (finite? its length, its alignment with the goal, its trace row) likewise: one computation
        # and one copy to the host for the batch instead of a few small ones per walk (on a GPU each is a
        # kernel launch or a wait). A walk that reaches its goal here is projected or snapped by its walker,
        # which then measures the new point itself; a walk whose step is not finite stops alone.
        with record_function("batch.measure"):
            measures = self._measures(walkers, new_params)
            known = self._step_facts(walkers, params, new_params, theta, v_goal, functional)
            for facts, k in zip(known, kept.cpu().tolist(), strict=True):
                facts["kept"] = k  # for the adaptive step size
        results: list[PathPoint | GeodesicError] = []
        with record_function("batch.commit"):
            for i, walker in enumerate(walkers):
                stepped = {k: v[i] for k, v in new_params.items()}
                facts = known[i]
                try:
                    landed, event = walker.land(stepped, facts["functional_step"], measures[i]["goal_distance"],
                                                finite=facts["finite"])
                except GeodesicError as err:
                    results.append(err)
                    continue
                direction = {k: v[i] for k, v in v_goal.items()}
                kept = landed is stepped
                results.append(walker.commit(landed, event, direction, facts["functional_step"], step_seconds,
                                             measures[i] if kept else None, facts if kept else None))
                if guard_after is not None:
                    walker.remember_guard(stepped, guard_after[i])
        return results

    def _step_facts(self, walkers: list[Walker], params: Params, new_params: Params, theta: Params,
                    v_goal: Params, functional: Tensor) -> list[dict]:
        """For each walk: whether its new point is finite, ‖Δw‖, cos(Δw, v_goal), θᵀgθ and its trace row."""
        moved = {k: new_params[k] - params[k] for k in params}
        flat = lambda tree: torch.cat([v.flatten(1) for v in tree.values()], 1)
        new_flat, moved_flat, goal_flat = flat(new_params), flat(moved), flat(v_goal)
        finite = torch.isfinite(new_flat).all(1) & torch.isfinite(functional)
        moved_norm = moved_flat.double().norm(dim=1)
        goal_norm = goal_flat.double().norm(dim=1)
        dot = (moved_flat.double() * goal_flat.double()).sum(1)
        denom = moved_norm * goal_norm
        alignment = torch.where(denom > 0, dot / denom.clamp_min(1e-300), 0)
        numbers = torch.stack([finite.double(), moved_norm, alignment, functional.double(), goal_norm], 1)
        numbers = numbers.cpu().tolist()
        rows = new_flat.detach().float().cpu().numpy() if walkers[0].trace.is_exact else None
        return [{"finite": bool(f), "step_norm": n, "alignment": a, "functional_step": fs, "goal_norm": gn,
                 "trace_row": None if rows is None else rows[i].copy()}
                for i, (f, n, a, fs, gn) in enumerate(numbers)]

    def _constrained(self, walkers, params, probes, v_goal, grad_restoring, radius, goal_weight, per_walk):
        """θ and θᵀgθ for K walks of the constrained step (constrained_step, vectorised)."""
        goal, model_fn, cfg = self.goal, self.model_fn, self.config
        restoring_weight = torch.tensor([w.restoring_weight for w in walkers], dtype=torch.float64)
        if goal.is_point_target:  # normalise v_goal = target − w; the restoring pull fades near a fixed target
            distance = _batched_norm2(v_goal).sqrt().cpu()
            v_goal = {k: v / _bcast(per_walk(distance.clamp_min(1e-12)), v) for k, v in v_goal.items()}
            if goal.landing_steps:
                max_step = torch.tensor([w.step_size for w in walkers], dtype=torch.float64)
                restoring_weight = restoring_weight * (distance / (goal.landing_steps * max_step)).clamp(max=1.0)
        v = {k: v_goal[k] - _bcast(per_walk(restoring_weight), g) * g for k, g in grad_restoring.items()}
        kind = cfg.metric
        metric_of = lambda x: PullbackMetric(model_fn, x, kind)
        n_rows = probes.shape[1] * goal.n_outputs
        n_params = sum(t[0].numel() for t in params.values())
        if self.rows_kind == "factored":
            layers = factored_layers(model_fn.network, walkers[0].params)
            if not conv_rows_fit(model_fn.network, walkers[0].params, len(walkers) * n_rows, probes.device,
                                 probes[0], len(walkers)):
                raise _NotBatchable("the conv layers' rows of the whole batch do not fit in memory")

            def factors(p, x):
                found = linear_layer_factors(model_fn.network, model_fn.buffers, p, x,
                                             metric_of(x)._whitening_from_logits)
                if found is None:
                    raise _NotBatchable("the factored rows do not apply")
                return found[0], found[1]

            captured, deltas = vmap(factors)(params, probes)
            rows = lambda c, d: rows_from_factors(layers, c, d)
            row_args = (captured, deltas)
        else:
            if not dense_jacobian_fits(len(walkers) * n_rows, n_params, probes.device):
                raise _NotBatchable("the dense Jacobians of the whole batch do not fit in memory")
            blocks = vmap(lambda p, x: metric_of(x).jacobian_blocks(p))(params, probes)
            rows = lambda b: DenseRows(b)
            row_args = (blocks,)
        kernel = vmap(lambda *a: rows(*a).gram())(*row_args)
        jv = vmap(lambda *a: rows(*a[:-1]).matvec(a[-1]))(*row_args, v)
        along_v, y, _, functional = trust_region_coefficients(kernel, jv, _batched_norm2(v), goal_weight, radius)
        back = vmap(lambda *a: rows(*a[:-1]).rmatvec(a[-1]))(*row_args, y.to(probes.dtype))
        half_beta = per_walk(goal_weight / 2)
        theta = {k: _bcast(per_walk(along_v), p) * p + _bcast(half_beta, p) * back[k].view_as(p) for k, p in v.items()}
        return theta, functional.to(probes.dtype)

    def _guard(self, walkers: list[Walker], params: Params, theta: Params) -> tuple[Params, Tensor, Tensor]:
        """Walker.guard for K walks at once: (new params, the share of each θ taken (K,), each walk's guard
        log-probabilities where it lands (K, n, C)). The first try measures all K walks; each later one only the
        walks still failing, whose steps are halved while the others keep theirs."""
        key = ("guard", *(id(w) for w in walkers))
        if key not in self._static:
            self._static[key] = _stack([guard_inputs(w.goal) for w in walkers])
        inputs, classes = self._static[key]
        if classes.device.type == "cuda" or VMAP_GUARD_ON_CPU:  # one vmapped pass for all walks: fewer launches
            outputs = vmap(lambda p, x: guard_outputs(self.model_fn, p, x))
        else:
            # Walk by walk on the CPU: a vmapped conv net runs grouped convolutions and max-pooling over
            # K·1,024 inputs at a third of the speed of K plain passes (LeNet-5, 8 walks: 13 against 4 ms a walk).
            def outputs(p, x):
                return torch.stack([guard_outputs(self.model_fn, {k: v[i] for k, v in p.items()}, x[i])
                                    for i in range(len(x))])
        remembered = [w.__dict__.get("_guard_state") for w in walkers]
        if all(r is not None and r[0] is w.params for r, w in zip(remembered, walkers, strict=True)):
            before = torch.stack([r[1] for r in remembered])
        else:
            before = outputs(params, inputs)
        limit = self.config.step_guard
        dtype = next(iter(theta.values())).dtype
        taken = torch.ones(len(walkers), dtype=torch.float64)
        new_params = flush_subnormal({k: params[k] + theta[k] for k in params})
        after = outputs(new_params, inputs)
        for _ in range(GUARD_HALVINGS):
            failing = (~accepts(before, after, classes, limit)).nonzero().flatten()
            if not len(failing):
                break
            # Only the walks still failing are halved and measured again (a try costs a forward pass per walk).
            taken[failing.cpu()] /= 2
            at = failing
            factor = taken[at.cpu()].to(device=classes.device, dtype=dtype)
            retried = flush_subnormal({k: params[k][at] + _bcast(factor, t[at]) * t[at] for k, t in theta.items()})
            after = after.index_copy(0, at, outputs(retried, inputs[at]))
            new_params = {k: v.index_copy(0, at, retried[k]) for k, v in new_params.items()}
        return new_params, taken, after

    # -- measuring ---------------------------------------------------------------------------------------------
    def _measures(self, walkers: list[Walker], params: Params) -> list[dict]:
        """Walker.measures for each walker, computed for all of them at once (the same measure_values, vmapped)."""
        static = self._static_inputs(walkers)
        prunable = walkers[0].network.prunable
        measure = lambda p, inputs: measure_values(self.goal, self.model_fn, prunable, p, inputs)
        values = vmap(measure, in_dims=(0, _in_dims(static)))(params, static)
        # one device-to-host copy for every measure of every walk (float64 holds each dtype's values exactly)
        columns = dict(zip(values, torch.stack([v.double() for v in values.values()]).tolist(), strict=True))
        return [measures_to_fields({k: column[i] for k, column in columns.items()}) for i in range(len(walkers))]


VMAP_GUARD_ON_CPU = False  # the guard's vmapped pass on the CPU as well (tests check it against walk by walk)


class _NotBatchable(GeodesicError):
    """This batch cannot take its step together (it is then taken walk by walk)."""


def _bcast(per_walk: Tensor, like: Tensor) -> Tensor:
    """(K,) -> (K, 1, ..., 1) against a stacked tensor `like` of shape (K, ...)."""
    return per_walk.view(-1, *([1] * (like.dim() - 1)))

