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

On a GPU, for small models (graphs.wanted), a batch whose walks keep stepping together takes the *fused* step: the
same computation with no wait for the device in it (μ by a fixed number of Newton iterations, the guard's first
try and the measurements included), recorded once as a CUDA graph and replayed (graphs.py). What it cannot decide
(μ not converged, a value not finite, a step the guard halves) is finished the waiting way from the same draws.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.profiler import record_function

from . import graphs
from .errors import GeodesicError
from .guard import HALVINGS as GUARD_HALVINGS
from .guard import accepts, guard_inputs, guard_outputs
from .metric import PullbackMetric
from .params import Params, flush_subnormal
from .path import PathPoint
from .rows import DenseRows, conv_rows_fit, factored_layers, linear_layer_factors, rows_from_factors
from .step import coefficients_without_waiting, dense_jacobian_fits, trust_region_coefficients
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
    parts = _batch_key_parts(walker)
    return None if parts is None else tuple(parts.values())


def _batch_key_parts(walker: Walker) -> dict[str, object] | None:
    """What two walkers must share to be stepped as one batch, by name (WalkBatch's message names what differs)."""
    network, cfg, goal = walker.network, walker.config, walker.goal
    rows = rows_kind(walker)
    if network.has_batchnorm or rows == "cg":
        return None

    def shapes(tensors) -> tuple:
        flat = [t for item in tensors for t in (item.values() if isinstance(item, dict) else [item])]
        return tuple((tuple(t.shape), t.dtype) for t in flat)

    measured = walker.measure_inputs()
    weights = tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in walker.params.items())
    return {"drift probe": measured["drift_from"], "model": repr(network.module), "weights (shape, dtype, device)":
            weights, "solver": cfg.solver, "metric": cfg.metric, "probe size": cfg.probe_size,
            "batch size": cfg.batch_size, "step guard": cfg.step_guard, "rows": rows, "goal": goal.name,
            "outputs": goal.n_outputs, "target sparsity": getattr(goal, "target_sparsity", None),
            "input shape": tuple(goal.anchor_inputs.shape[1:]), "goal inputs": shapes(measured["extra"]),
            "distance inputs": shapes(measured["distance"]),
            "test sets": tuple((name, shapes(xy)) for name, xy in measured["tests"].items()),
            "heads": tuple(measured["heads"].items()),
            "drift inputs": shapes(measured["drift"])}


def why_not_batched(walkers: list[Walker]) -> str | None:
    """None when these walkers can be one batch; else what keeps them apart, in words."""
    for i, walker in enumerate(walkers):
        if batch_key(walker) is None:
            why = "a model with BatchNorm" if walker.network.has_batchnorm else "the CG solver"
            return f"walker {i} is always stepped alone ({why})"
    first = _batch_key_parts(walkers[0])
    for i, walker in enumerate(walkers[1:], start=1):
        if batch_key(walker) != batch_key(walkers[0]):
            parts = _batch_key_parts(walker)
            differ = [name for name in first if parts[name] != first[name]]
            shown = [f"{name} ({parts[name]!r} against {first[name]!r})" if len(repr(parts[name])) < 40 else name
                     for name in differ]
            return f"walker {i} differs from walker 0 in: {', '.join(shown)}"
    return None


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
        if not walkers:
            raise ValueError("WalkBatch needs at least one walker")
        firsts = {}
        for i, walker in enumerate(walkers):
            if id(walker) in firsts:  # it would be stepped twice a step, from the same weights
                raise ValueError(f"walker {i} is walker {firsts[id(walker)]} again: a walker can be in a batch once "
                                 f"(walker.branch(step) makes another from any of its points)")
            firsts[id(walker)] = i
        why = why_not_batched(walkers)
        if why is not None:
            raise ValueError(f"these walkers cannot be stepped as one batch: {why} (see batch.batch_key)")
        self.walkers = list(walkers)
        lead = self.walkers[0]
        self.goal, self.model_fn, self.config = lead.goal, lead.model_fn, lead.config
        self.rows_kind = rows_kind(lead)
        self._static: dict[tuple, object] = {}
        self.fused_failed = False  # its CUDA graph could not be recorded: this batch steps the waiting way
        self._uses: dict[tuple, int] = {}  # steps each membership asked for the fused step

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
        except (GeodesicError, torch.OutOfMemoryError, torch.linalg.LinAlgError):  # (one walk's metric gone
            if torch.cuda.is_available():                                          # ill-conditioned stopped all)
                torch.cuda.empty_cache()
        results: list[PathPoint | GeodesicError] = []  # walk by walk from the same draws: only the culprit stops
        for walker, state in zip(active, states, strict=True):
            walker.generator.set_state(state)
            try:
                results.append(walker.step_waiting())
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
        goal, cfg = self.goal, self.config
        with record_function("batch.draw"):
            draws = [w.draw() for w in walkers]
        if self._fused_wanted(walkers):
            results = self._step_fused(walkers, draws, t0)
            if results is not None:
                return results
        with record_function("batch.draw"):
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
                theta, functional = self._penalty(params, probes, v_goal, grad_restoring, radius, goal_weight,
                                                  per_walk)
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
        return self._commit(walkers, new_params, v_goal, known, measures, step_seconds, guard_after)

    def _commit(self, walkers: list[Walker], new_params: Params, v_goal: Params, known: list[dict],
                measures: list[dict], step_seconds: float, guard_after: Tensor | None
                ) -> list[PathPoint | GeodesicError]:
        """Each walker lands and records its point (its own `land` and `commit`, as a lone step)."""
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
                if "mu" in facts:
                    walker.__dict__["_last_mu"] = facts["mu"]  # the next fused step's Newton starts there
        return results

    # -- the fused step: one computation with no wait for the device, recorded as a CUDA graph ------------------
    def _fused_wanted(self, walkers: list[Walker]) -> bool:
        """Whether this step runs fused (graphs.py decides for the device; FUSED_ON_CPU runs it eagerly, for the
        tests). Not for dense Jacobian rows: they are the big models' way, where launches do not dominate."""
        if self.rows_kind == "dense" or self.fused_failed or not fused_applies(walkers[0].params):
            return False
        # A graph is recorded for one membership of the batch. Only one that steps together again and again is
        # worth it (slow-motion walks at different rates, or a walk catching up, make short-lived memberships).
        key = tuple(id(w) for w in walkers)
        self._uses[key] = self._uses.get(key, 0) + 1
        if len(self._uses) > 64:
            self._uses = {key: self._uses[key]}
        return self._uses[key] > FUSE_AFTER_STEPS

    def _fused_inputs(self, walkers: list[Walker], draws: list[tuple]) -> dict:
        """What changes from one step to the next, as tensors on the walks' device: the fused step's inputs."""
        probes = torch.stack([probe for _, probe in draws])
        device = probes.device
        configs = [w.step_config() for w in walkers]
        last_mu = [w.__dict__.get("_last_mu", math.inf) for w in walkers]
        numbers = torch.tensor([[w.radius() for w in walkers], [c.goal_weight for c in configs],
                                [w.restoring_weight for w in walkers], [w.step_size for w in walkers], last_mu],
                               dtype=torch.float64).to(device)
        return {"params": _stack([w.params for w in walkers]), "probes": probes,
                "direction": _stack([w.goal.direction_inputs(b) for w, (b, _) in zip(walkers, draws, strict=True)]),
                "restoring": _stack([w.goal.restoring_inputs(b) for w, (b, _) in zip(walkers, draws, strict=True)]),
                "numbers": dict(zip(("radius", "goal_weight", "restoring_weight", "max_step", "mu_start"), numbers,
                                    strict=True))}

    def _fused_fn(self, walkers: list[Walker], inputs: dict):
        """The fused step for this membership: a graphs.Captured on a GPU (recorded at its first use and kept
        with the tensors it reads), the plain function on the CPU; None when it cannot be recorded."""
        key = ("fused", *(id(w) for w in walkers))
        if key in self._static and not self._static[key][0].released:
            return self._static[key][0]
        static = self._static_inputs(walkers)
        guard = self._guard_static(walkers) if self.config.step_guard else None
        layout: list[str] = []
        fn = lambda inp: self._fused(walkers, inp, static, guard, layout)  # noqa: E731
        try:  # on the CPU (the tests) the same buffers and outputs, with a plain call in place of the replay
            fn = graphs.Captured(fn, inputs, record=next(iter(inputs["params"].values())).device.type == "cuda")
        except graphs.CaptureFailed as err:
            graphs.report_once(f"{err} ({self.goal.name}, {self.config.solver} rule)")
            self.fused_failed = True
            return None
        except graphs.NoRoom:  # every live graph is in use: this membership counts its steps again, then retries
            self._uses.pop(tuple(id(w) for w in walkers), None)
            return None
        self._static[key] = (fn, layout, static, guard)
        return fn

    def _fused(self, walkers: list[Walker], inp: dict, static: dict, guard: tuple | None, layout: list[str]) -> dict:
        """Everything a batch step computes on the device, with no wait for it: the rule's θ, where it lands, the
        guard's first try there, the measurements and the step's facts. The walks' numbers come back as one
        (K, n) float64 tensor whose columns `layout` names (filled on the first call)."""
        goal, cfg = self.goal, self.config
        params, probes, numbers = inp["params"], inp["probes"], dict(inp["numbers"])
        per_walk = lambda x: x.to(dtype=probes.dtype)  # noqa: E731 - already on the device
        v_goal = vmap(goal.direction_value)(params, *inp["direction"])
        grad_restoring, (_, kept) = vmap(grad_and_value(goal.restoring_value_and_kept, has_aux=True))(
            params, *inp["restoring"])
        if cfg.solver == "penalty":
            theta, functional = self._penalty(params, probes, v_goal, grad_restoring, numbers["radius"],
                                              numbers["goal_weight"], per_walk)
            numbers.update(mu=torch.full_like(numbers["radius"], math.nan), solved=torch.ones_like(kept, dtype=bool))
        else:
            theta, functional = self._constrained(walkers, params, probes, v_goal, grad_restoring, numbers["radius"],
                                                  numbers["goal_weight"], per_walk, numbers=numbers)
        new_params = flush_subnormal({k: params[k] + theta[k] for k in params})
        columns = {"solved": numbers["solved"], "mu": numbers["mu"], "kept": kept}
        after = None
        if guard is not None:
            (inputs, classes), outputs = guard, vmap(lambda p, x: guard_outputs(self.model_fn, p, x))
            after = outputs(new_params, inputs)
            columns["accepted"] = accepts(outputs(params, inputs), after, classes, cfg.step_guard)
        facts, new_flat = self._step_fact_values(params, new_params, theta, v_goal, functional)
        columns.update(facts)
        columns.update({f"measure:{k}": v for k, v in self._measure_values(walkers, new_params, static).items()})
        layout[:] = list(columns)
        return {"numbers": torch.stack([v.to(torch.float64) for v in columns.values()], 1), "theta": theta,
                "v_goal": v_goal, "new_params": new_params, "after": after, "new_flat": new_flat}

    def _step_fused(self, walkers: list[Walker], draws: list[tuple], t0: float
                    ) -> list[PathPoint | GeodesicError] | None:
        """The step through the fused computation; None when it cannot decide for every walk (a μ not solved in
        NEWTON_ITERATIONS, inputs not finite): then the batch steps the waiting way from the same draws."""
        with record_function("batch.fused"):
            inputs = self._fused_inputs(walkers, draws)
            if self.config.solver == "constrained":
                self._check_rows_fit(walkers, inputs["probes"])
            fn = self._fused_fn(walkers, inputs)
            if fn is None:
                return None
            try:
                out = fn(inputs)
                table = out["numbers"].tolist()  # the one wait for the device (the trace rows, if kept, come after)
            except graphs.Released:  # made room for another batch's graph since: recorded again next time
                return None
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:  # a replay that fails (a driver or library error) must not stop the walks
                graphs.report_once(f"replay failed: {graphs.describe(err)}")
                self.fused_failed = True
                return None
            layout = self._static[("fused", *(id(w) for w in walkers))][1]
        columns = {name: [row[j] for row in table] for j, name in enumerate(layout)}
        if not all(columns["solved"]):
            return None
        new_params = {k: v.clone() for k, v in out["new_params"].items()}  # the graph's outputs are overwritten
        v_goal = {k: v.clone() for k, v in out["v_goal"].items()}
        after = None if out["after"] is None else out["after"].clone()
        step_seconds = (time.perf_counter() - t0) / len(walkers)
        rows = out["new_flat"].detach().float().cpu().numpy() if walkers[0].trace.is_exact else None
        known = [{"finite": bool(columns["finite"][i]), "step_norm": float(columns["step_norm"][i]),
                  "alignment": float(columns["alignment"][i]), "functional_step": float(columns["functional_step"][i]),
                  "goal_norm": float(columns["goal_norm"][i]), "kept": float(columns["kept"][i]),
                  "trace_row": None if rows is None else rows[i].copy()} for i in range(len(walkers))]
        if self.config.solver == "constrained":
            for i, facts in enumerate(known):
                facts["mu"] = float(columns["mu"][i])
        measures = [measures_to_fields({name[len("measure:"):]: float(column[i]) for name, column in columns.items()
                                        if name.startswith("measure:")}) for i in range(len(walkers))]
        if "accepted" in columns and not all(columns["accepted"]):
            # Some step failed the guard's first try: halve those (the guard as the waiting step runs it) and
            # measure again where the walks now land.
            params = inputs["params"]  # the walks' points, stacked for this step
            theta = {k: v.clone() for k, v in out["theta"].items()}
            new_params, taken, after = self._guard(walkers, params, theta)
            for facts, share in zip(known, taken.tolist(), strict=True):
                facts["functional_step"] *= share ** 2
            refreshed = self._step_facts(walkers, params, new_params, theta, v_goal,
                                         torch.tensor([f["functional_step"] for f in known]))
            for facts, new in zip(known, refreshed, strict=True):
                facts.update({k: new[k] for k in ("finite", "step_norm", "alignment", "trace_row")})
            measures = self._measures(walkers, new_params)
        return self._commit(walkers, new_params, v_goal, known, measures, step_seconds, after)

    def _penalty(self, params, probes, v_goal, grad_restoring, radius, goal_weight, per_walk):
        """θ and θᵀgθ for K walks of the penalty step: u = ∇R − λ v_goal, θ = −ε u / ‖u‖ (penalty_step, vectorised)."""
        u = {k: grad_restoring[k] - _bcast(per_walk(goal_weight), v) * v for k, v in v_goal.items()}
        length = _batched_norm2(u).sqrt()
        factor = torch.where(length > 0, -radius.to(length.device) / length.clamp_min(1e-300), 0)
        theta = {k: _bcast(per_walk(factor), v) * v for k, v in u.items()}
        squared_norm = lambda p, x, t: PullbackMetric(self.model_fn, x, self.config.metric).squared_norm(t, p)  # noqa: E731
        return theta, vmap(squared_norm)(params, probes, theta)

    @staticmethod
    def _step_fact_values(params: Params, new_params: Params, theta: Params, v_goal: Params, functional: Tensor
                          ) -> tuple[dict[str, Tensor], Tensor]:
        """({finite, step_norm (‖Δw‖), alignment (cos(Δw, v_goal)), functional_step (θᵀgθ), goal_norm}, each (K,);
        the new points flat, (K, n)), on the device."""
        moved = {k: new_params[k] - params[k] for k in params}
        flat = lambda tree: torch.cat([v.flatten(1) for v in tree.values()], 1)  # noqa: E731
        new_flat, moved_flat, goal_flat = flat(new_params), flat(moved), flat(v_goal)
        finite = torch.isfinite(new_flat).all(1) & torch.isfinite(functional)
        moved_norm = moved_flat.double().norm(dim=1)
        goal_norm = goal_flat.double().norm(dim=1)
        dot = (moved_flat.double() * goal_flat.double()).sum(1)
        denom = moved_norm * goal_norm
        alignment = torch.where(denom > 0, dot / denom.clamp_min(1e-300), 0)
        values = {"finite": finite, "step_norm": moved_norm, "alignment": alignment,
                  "functional_step": functional.double(), "goal_norm": goal_norm}
        return values, new_flat

    def _step_facts(self, walkers: list[Walker], params: Params, new_params: Params, theta: Params,
                    v_goal: Params, functional: Tensor) -> list[dict]:
        """For each walk: whether its new point is finite, ‖Δw‖, cos(Δw, v_goal), θᵀgθ and its trace row."""
        values, new_flat = self._step_fact_values(params, new_params, theta, v_goal, functional)
        numbers = torch.stack([v.double() for v in values.values()], 1).cpu().tolist()
        rows = new_flat.detach().float().cpu().numpy() if walkers[0].trace.is_exact else None
        return [{"finite": bool(f), "step_norm": n, "alignment": a, "functional_step": fs, "goal_norm": gn,
                 "trace_row": None if rows is None else rows[i].copy()}
                for i, (f, n, a, fs, gn) in enumerate(numbers)]

    def _check_rows_fit(self, walkers: list[Walker], probes: Tensor) -> None:
        """Raise _NotBatchable when the Jacobian rows of the whole batch would not fit in memory."""
        network, n_walks = self.model_fn.network, len(walkers)
        n_rows = probes.shape[1] * self.goal.n_outputs
        if self.rows_kind == "factored":
            if not conv_rows_fit(network, walkers[0].params, n_walks * n_rows, probes.device, probes[0], n_walks):
                raise _NotBatchable("the conv layers' rows of the whole batch do not fit in memory")
        elif self.rows_kind == "dense":
            n_params = sum(t.numel() for t in walkers[0].params.values())
            if not dense_jacobian_fits(n_walks * n_rows, n_params, probes.device):
                raise _NotBatchable("the dense Jacobians of the whole batch do not fit in memory")

    def _constrained(self, walkers, params, probes, v_goal, grad_restoring, radius, goal_weight, per_walk,
                     numbers: dict | None = None):
        """θ and θᵀgθ for K walks of the constrained step (constrained_step, vectorised). numbers: the walks' ρ,
        ε and last μ as tensors on the device (`_fused_inputs`); then nothing here waits for the device (the
        CUDA graph's way), and whether each walk's μ was solved comes back as numbers['solved']."""
        goal, model_fn, cfg = self.goal, self.model_fn, self.config
        if numbers is None:
            restoring_weight = torch.tensor([w.restoring_weight for w in walkers], dtype=torch.float64)
            max_step = torch.tensor([w.step_size for w in walkers], dtype=torch.float64)
        else:
            restoring_weight, max_step = numbers["restoring_weight"], numbers["max_step"]
        if goal.is_point_target:  # normalise v_goal = target − w; the restoring pull fades near a fixed target
            distance = _batched_norm2(v_goal).sqrt()
            distance = distance if numbers is not None else distance.cpu()
            v_goal = {k: v / _bcast(per_walk(distance.clamp_min(1e-12)), v) for k, v in v_goal.items()}
            if goal.landing_steps:
                restoring_weight = restoring_weight * (distance / (goal.landing_steps * max_step)).clamp(max=1.0)
        v = {k: v_goal[k] - _bcast(per_walk(restoring_weight), g) * g for k, g in grad_restoring.items()}
        kind = cfg.metric
        metric_of = lambda x: PullbackMetric(model_fn, x, kind)
        if numbers is None:  # the fused step checks this before it runs (the check asks the device)
            self._check_rows_fit(walkers, probes)
        if self.rows_kind == "factored":
            layers = factored_layers(model_fn.network, walkers[0].params)

            def factors(p, x):
                found = linear_layer_factors(model_fn.network, model_fn.buffers, p, x,
                                             metric_of(x).whitening_of_network_outputs)
                if found is None:
                    raise _NotBatchable("the factored rows do not apply")
                return found[0], found[1]

            captured, deltas = vmap(factors)(params, probes)
            rows = lambda c, d: rows_from_factors(layers, c, d)
            row_args = (captured, deltas)
        else:
            blocks = vmap(lambda p, x: metric_of(x).jacobian_blocks(p))(params, probes)
            rows = lambda b: DenseRows(b)
            row_args = (blocks,)
        kernel = vmap(lambda *a: rows(*a).gram())(*row_args)
        jv = vmap(lambda *a: rows(*a[:-1]).matvec(a[-1]))(*row_args, v)
        if numbers is None:
            along_v, y, _, functional = trust_region_coefficients(kernel, jv, _batched_norm2(v), goal_weight, radius)
        else:
            along_v, y, mu, functional, solved = coefficients_without_waiting(
                kernel, jv, _batched_norm2(v), goal_weight, radius, numbers["mu_start"], NEWTON_ITERATIONS)
            numbers.update(mu=mu, solved=solved)
        back = vmap(lambda *a: rows(*a[:-1]).rmatvec(a[-1]))(*row_args, y.to(probes.dtype))
        half_beta = per_walk(goal_weight / 2)
        theta = {k: _bcast(per_walk(along_v), p) * p + _bcast(half_beta, p) * back[k].view_as(p) for k, p in v.items()}
        return theta, functional.to(probes.dtype)

    def _guard_static(self, walkers: list[Walker]) -> tuple[Tensor, Tensor]:
        """The guard's inputs and kept classes of every walk, stacked once per membership."""
        key = ("guard", *(id(w) for w in walkers))
        if key not in self._static:
            self._static[key] = _stack([guard_inputs(w.goal) for w in walkers])
        return self._static[key]

    def _guard(self, walkers: list[Walker], params: Params, theta: Params) -> tuple[Params, Tensor, Tensor]:
        """Walker.guard for K walks at once: (new params, the share of each θ taken (K,), each walk's guard
        log-probabilities where it lands (K, n, C)). The first try measures all K walks; each later one only the
        walks still failing, whose steps are halved while the others keep theirs."""
        inputs, classes = self._guard_static(walkers)
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
    def _measure_values(self, walkers: list[Walker], params: Params, static: dict) -> dict[str, Tensor]:
        """measure_values for each walk at its stacked `params`, vmapped: each measure as a (K,) tensor."""
        prunable = walkers[0].network.prunable
        measure = lambda p, inputs: measure_values(self.goal, self.model_fn, prunable, p, inputs)  # noqa: E731
        return vmap(measure, in_dims=(0, _in_dims(static)))(params, static)

    def _measures(self, walkers: list[Walker], params: Params) -> list[dict]:
        """Walker.measures for each walker, computed for all of them at once (the same measure_values, vmapped)."""
        values = self._measure_values(walkers, params, self._static_inputs(walkers))
        # one device-to-host copy for every measure of every walk (float64 holds each dtype's values exactly)
        columns = dict(zip(values, torch.stack([v.double() for v in values.values()]).tolist(), strict=True))
        return [measures_to_fields({k: column[i] for k, column in columns.items()}) for i in range(len(walkers))]


# The fused step's Newton iterations for μ, from the walk's last μ: on the digits defaults (three goals, 296-300
# steps each; bench/newton_iterations.py), 5 solved every step to the waiting loop's tolerance, 4 solved 81-97%
# (from the bracket's top: 22-85% and 97-100%). A walk not solved sends the batch's step the waiting way.
NEWTON_ITERATIONS = 5
FUSE_AFTER_STEPS = 3  # a membership's first steps are taken the waiting way; the fourth records its graph
FUSED_ON_CPU = False  # the tests: the fused step on the CPU, run as a plain function (graphs are CUDA only)
VMAP_GUARD_ON_CPU = False  # the guard's vmapped pass on the CPU as well (tests check it against walk by walk)


def fused_applies(params: Params) -> bool:
    """Whether steps of a model with these weights take the fused way: graphs.wanted for the device and size (a
    GPU, small models), or FUSED_ON_CPU on the CPU (the tests). Walker.step and WalkBatch both ask here."""
    device = next(iter(params.values())).device
    n_params = sum(v.numel() for v in params.values())
    return (FUSED_ON_CPU and device.type == "cpu") or graphs.wanted(device, n_params)


class _NotBatchable(GeodesicError):
    """This batch cannot take its step together (it is then taken walk by walk)."""


def _bcast(per_walk: Tensor, like: Tensor) -> Tensor:
    """(K,) -> (K, 1, ..., 1) against a stacked tensor `like` of shape (K, ...)."""
    return per_walk.view(-1, *([1] * (like.dim() - 1)))

