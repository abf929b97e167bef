"""The two step rules. Each maps (params, goal, batch) to a step θ and what it cost the function.

*constrained* (method.md §3): θ* = argmin_θ θᵀgθ − β⟨θ, v⟩ subject to ‖θ‖ ≤ ε, with
    v = v_goal − ρ ∇R(w)      (R: the goal's restoring loss, which pulls the walk back onto the
                               set of equivalent networks; v_goal normalised for point targets)
    θ* = (β/2)(g + μI)⁻¹ v    with μ ≥ 0 such that ‖θ*‖ = ε.
  Solved exactly through the N·C×N·C kernel (linear_solver='kernel') or by conjugate gradients on
  g·v products with a fixed damping μ and a rescale to length ε (linear_solver='cg').

*penalty* (method.md §4, the authors' functionally invariant path):
    u = ∇R(w) − λ v_goal,   θ = −ε u / ‖u‖
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from .config import WalkConfig
from .errors import WalkDiverged
from .metric import PullbackMetric, conjugate_gradient
from .params import Params, add, norm, scale, zeros_like
from .rows import DenseRows, JacobianRows, LinearLayerRows


@dataclass
class Step:
    """One step of a walk, before it is taken."""

    tangent_vec: Params  # θ
    goal_direction: Params  # v_goal: what the goal alone wants (for cos(θ, v))
    functional_step: float | None  # θᵀgθ on this step's probe (None: the rule did not need it)
    damping: float | None = None  # μ the constrained step used (None for the penalty walk)
    linear_solver: str | None = None  # how the constrained step was solved: kernel (factored), kernel or cg


def dense_jacobian_fits(n_rows: int, n_params: int, device: torch.device) -> bool:
    """Whether `linear_solver='auto'` may write L out densely (n_rows × n_params floats).

    On a GPU when L and as much again for computing it take at most half the free memory: measured on an H100,
    the exact solve through the dense L beat 10 CG iterations 2–3.5× on VGG11 and ResNet-18 (BENCHMARKS.md).
    On the CPU only while L is small (≤ 5e7 entries, 200 MB): there CG's few products are cheaper."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 2 * 4 * n_rows * n_params <= 0.5 * free
    return n_rows * n_params <= 5e7


def trust_region_kernel(jac, v, goal_weight: float, radius: float):
    """(θ, μ) with θ = (β/2)(LᵀL + μI)⁻¹ v and ‖θ‖ = radius (μ = 0 if the pseudo-inverse step fits).

    jac: L, (m, n) with g = LᵀL and m ≪ n, as JacobianRows (then v and θ are Params) or as one tensor (v and
    θ flat). Only K = L Lᵀ, L v and Lᵀ y are used, so L need never be written out (rows.py). Works in the
    m-dimensional row space of L: with K = U Λ Uᵀ, the eigenvectors of g with non-zero eigenvalues
    are V = Lᵀ U Λ^-½, so v = V c + v_⊥ with c = Λ^-½ Uᵀ L v, and
        θ(μ) = (β/2) [ v/μ + V diag(1/(Λ+μ) − 1/μ) c ],
        ‖θ(μ)‖² = (β/2)² [ Σ c²/(λ+μ)² + ‖v_⊥‖²/μ² ],   decreasing in μ (solved for by Brent's method).
    """
    if isinstance(jac, Tensor):  # one dense L and flat vectors
        theta, mu = trust_region_kernel(DenseRows({"v": jac}), {"v": v}, goal_weight, radius)
        return theta["v"], mu
    rows: JacobianRows = jac
    if goal_weight == 0:
        return zeros_like(v), math.inf
    half_beta = goal_weight / 2
    # K and L v come in the weights' dtype, so K is only known to about m·eps(dtype)·λ_max: eigenvalues below
    # that are noise and their directions are treated as the null space of g (the numerical rank, as in
    # numpy's matrix_rank). The eigendecomposition runs in that dtype too (in float32 it takes half the
    # time of float64, measured on the digits MLP); the secular equation for μ is solved in float64.
    kernel = rows.gram()
    jv = rows.matvec(v)
    v_norm2 = float(sum(p.double().pow(2).sum() for p in v.values()))
    if not (torch.isfinite(kernel).all() and torch.isfinite(jv).all() and math.isfinite(v_norm2)):
        raise WalkDiverged("the metric or the goal direction is not finite")
    # A small eigenproblem is latency-bound on a GPU (cuSOLVER launches many tiny kernels): solve it on the CPU.
    device = kernel.device
    small = device.type != "cpu" and len(kernel) <= 512
    lam, u = torch.linalg.eigh(kernel.cpu() if small else kernel)
    if small:
        lam, u = lam.to(device), u.to(device)
    keep = lam > lam.max().clamp_min(torch.finfo(lam.dtype).tiny) * len(lam) * torch.finfo(lam.dtype).eps
    lam, u = lam[keep].double(), u[:, keep]
    c = (u.T @ jv).double() / lam.sqrt()
    perp2 = max(v_norm2 - float(c.pow(2).sum()), 0.0)
    lam_np, c2 = lam.cpu().numpy(), c.pow(2).cpu().numpy()

    def excess(log_mu: float) -> float:
        mu = math.exp(log_mu)
        return half_beta**2 * (np.sum(c2 / (lam_np + mu) ** 2) + perp2 / mu**2) - radius**2

    def assemble(coef: Tensor, mu: float) -> tuple[Params, float]:
        dtype = next(iter(v.values())).dtype
        back = rows.rmatvec(u @ (coef / lam.sqrt()).to(dtype))  # θ = (β/2)(v/μ + Lᵀ y)
        theta = {k: half_beta * ((p / mu if mu > 0 else 0 * p) + back[k].view_as(p)) for k, p in v.items()}
        return theta, mu

    min_norm2 = half_beta**2 * np.sum(c2 / lam_np**2) if perp2 <= 1e-12 * max(float(c2.sum()), 1e-30) else math.inf
    if min_norm2 <= radius**2:  # v lies in the row space and the pseudo-inverse step fits: μ = 0
        return assemble(c / lam, 0.0)
    lo, hi = math.log(1e-12), math.log(1e12)
    if excess(hi) > 0:  # ε is tiny against β‖v‖: a plain gradient step of length ε
        return scale(v, radius / math.sqrt(v_norm2)), math.inf
    mu = math.exp(brentq(excess, lo, hi, xtol=1e-10))
    return assemble((1 / (lam + mu) - 1 / mu) * c, mu)


def _goal_and_restoring(params: Params, goal, batch, restoring_weight: float) -> tuple[Params, Params]:
    v_goal = goal.direction(params, batch)
    if restoring_weight == 0:
        return v_goal, zeros_like(params)
    # Plain autograd, not torch.func.grad: the same gradient with less dispatch overhead (0.42 against
    # 0.67 ms per call on the digits MLP, which is most of a penalty step there).
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(goal.restoring_loss(leaves, batch), list(leaves.values()), allow_unused=True)
    return v_goal, {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(params.items(), grads, strict=True)}


def constrained_step(params: Params, goal, batch, probe: Tensor, config: WalkConfig, radius: float,
                     model_fn) -> Step:
    """The paper's step: metric-aware, length `radius` (ε, or less near a point target)."""
    metric = PullbackMetric(model_fn, probe, config.metric)
    v_goal, grad_restoring = _goal_and_restoring(params, goal, batch, config.restoring_weight)
    restoring_weight = config.restoring_weight
    if goal.is_point_target:
        distance = float(norm(v_goal))  # v_goal = target − w
        v_goal = scale(v_goal, 1 / max(distance, 1e-12))
        # Landing on a fixed target: within goal.landing_steps steps of it the restoring pull fades linearly
        # to zero. Otherwise its batch noise keeps the walk circling at a fixed distance (measured: connect
        # stalled at ‖w − w_B‖ ≈ 0.2 for 800 steps); every landing step is still a recorded, measured step.
        # (Sparsify's target moves with w and needs the pull to the end: it does not fade.)
        if goal.landing_steps:
            restoring_weight *= min(1.0, distance / (goal.landing_steps * config.max_step_norm))
    v = add(v_goal, grad_restoring, alpha=-restoring_weight)
    n_params = sum(t.numel() for t in params.values())
    n_rows = len(probe) * goal.n_outputs
    rows = None
    if config.linear_solver == "kernel" or (config.linear_solver == "auto" and n_rows <= 2048):
        dense_ok = config.linear_solver == "kernel" or dense_jacobian_fits(n_rows, n_params, probe.device)
        rows = metric.jacobian_rows(params, allow_dense=dense_ok)  # None: only a dense L would do, too big
    if rows is not None:
        theta, mu = trust_region_kernel(rows, v, config.goal_weight, radius)
        solver = "kernel (factored)" if isinstance(rows, LinearLayerRows) else "kernel"
        return Step(theta, v_goal, float(rows.matvec(theta).pow(2).sum()), mu, solver)
    mu = config.damping
    x = conjugate_gradient(lambda t: add(metric.metric_vector_product(t, params), t, alpha=mu), v, config.cg_iters)
    theta = scale(x, config.goal_weight / 2)
    length = float(norm(theta))
    if length > radius:
        theta = scale(theta, radius / length)
    return Step(theta, v_goal, float(metric.squared_norm(theta, params)), mu, "cg")


def penalty_step(params: Params, goal, batch, probe: Tensor, config: WalkConfig, radius: float,
                 model_fn) -> Step:
    """The authors' walk: a normalised gradient step on R(w) + λ h(w), length `radius`."""
    v_goal, grad_restoring = _goal_and_restoring(params, goal, batch, 1.0)
    u = add(grad_restoring, v_goal, alpha=-config.goal_weight)
    length = float(norm(u))
    theta = zeros_like(params) if length == 0 else scale(u, -radius / length)
    return Step(theta, v_goal, None, None)  # θᵀgθ is not part of this rule: the walker measures it


STEP_RULES = {"constrained": constrained_step, "penalty": penalty_step}
