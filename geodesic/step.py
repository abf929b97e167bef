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
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import WalkConfig
from .errors import WalkDiverged
from .metric import PullbackMetric, conjugate_gradient
from .params import Params, add, norm, scale, zeros_like
from .rows import DenseRows, JacobianRows, LinearLayerRows, dense_jacobian_fits  # noqa: F401 (re-exported)


@dataclass
class Step:
    """One step of a walk, before it is taken."""

    tangent_vec: Params  # θ
    goal_direction: Params  # v_goal: what the goal alone wants (for cos(θ, v))
    functional_step: float | None  # θᵀgθ on this step's probe (None: the rule did not need it)
    damping: float | None = None  # μ the constrained step used (None for the penalty walk)
    linear_solver: str | None = None  # how the constrained step was solved: kernel (factored), kernel or cg
    kept: float | None = None  # share of the step's batch given its kept class at the step's start (None: not known)


def trust_region_kernel(jac, v, goal_weight: float, radius: float):
    """(θ, μ, θᵀgθ) with θ = (β/2)(LᵀL + μI)⁻¹ v and ‖θ‖ = radius (μ = 0 if the pseudo-inverse step fits).

    jac: L, (m, n) with g = LᵀL and m ≪ n, as JacobianRows (then v and θ are Params) or as one tensor (v and
    θ flat). Only K = L Lᵀ, L v and Lᵀ y are used, so L need never be written out (rows.py). One walk is a
    batch of one for `trust_region_coefficients`, which a batch of walks (batch.py) calls directly.
    """
    if isinstance(jac, Tensor):  # one dense L and flat vectors
        theta, mu, functional = trust_region_kernel(DenseRows({"v": jac}), {"v": v}, goal_weight, radius)
        return theta["v"], mu, functional
    rows: JacobianRows = jac
    if goal_weight == 0:
        return zeros_like(v), math.inf, 0.0
    v_norm2 = sum(p.double().pow(2).sum() for p in v.values())
    dtype = next(iter(v.values())).dtype
    along_v, y, mu, functional = trust_region_coefficients(
        rows.gram()[None], rows.matvec(v)[None], v_norm2[None], torch.tensor([goal_weight], dtype=torch.float64),
        torch.tensor([radius], dtype=torch.float64))
    back = rows.rmatvec(y[0].to(dtype))
    half_beta = goal_weight / 2
    theta = {k: along_v[0].to(p) * p + half_beta * back[k].view_as(p) for k, p in v.items()}
    mu_value, functional_value = torch.stack([mu[0].double(), functional[0].double()]).tolist()
    return theta, mu_value, functional_value


# The CPU solves μ through the eigendecomposition (MKL's is fast there); True sends it the GPU's way (the tests).
CHOLESKY_ON_CPU = False

_EIGH_POOL: ThreadPoolExecutor | None = None
_EIGH_POOL_LOCK = threading.Lock()


def _eigh_pool() -> ThreadPoolExecutor:
    """Worker threads that each run LAPACK on one core (created once per process)."""
    global _EIGH_POOL
    with _EIGH_POOL_LOCK:
        if _EIGH_POOL is None:
            n = os.cpu_count() or 2
            caller_threads = torch.get_num_threads()
            ready = threading.Barrier(n + 1)

            def one_thread() -> None:
                torch.get_num_threads()  # the thread takes its default count now (PyTorch does this once per thread)
                torch.set_num_threads(1)  # so that this count stays its own
                ready.wait()

            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="geodesic-eigh")
            for _ in range(n):  # each waits for all the others: the pool starts all n threads now
                pool.submit(one_thread)
            ready.wait()
            torch.set_num_threads(caller_threads)  # set_num_threads also changed the default for new threads
            _EIGH_POOL = pool
        return _EIGH_POOL


def batched_eigh(kernel: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh of a stack of small symmetric matrices (..., m, m); off any thread but the main one, on
    worker threads that each use one core.

    Why: MKL's eigh with several OpenMP threads is slow on any thread but the main one (measured on 2 cores: one
    160×160 kernel 5.1 ms on a second thread, 0.65 ms on the main thread, 0.85 ms on a thread held to one core;
    32 of them 131 ms, 18 ms, 24 ms). The engine steps walks on its own thread, so there the matrices go to the
    single-core workers, and a batch (many walks) is split over up to torch.get_num_threads() of them (the
    caller's share of the cores; eigh releases the GIL). Each worker solves its matrices one by one with the same
    single-threaded routine, so a walk's path does not depend on the split. The main thread (the CLI) solves in
    place, as before: creating the workers calls torch.set_num_threads, which also fixes MKL's thread count for
    the process (the server's engine sets its threads anyway).
    """
    if kernel.device.type != "cpu" or threading.current_thread() is threading.main_thread():
        return torch.linalg.eigh(kernel)
    n_batch = kernel.shape[0] if kernel.dim() == 3 else 1
    chunks = max(1, min(n_batch, torch.get_num_threads()))
    parts = list(_eigh_pool().map(torch.linalg.eigh, kernel.chunk(chunks) if kernel.dim() == 3 else [kernel]))
    return torch.cat([lam for lam, _ in parts]), torch.cat([u for _, u in parts])


def trust_region_coefficients(kernel: Tensor, jv: Tensor, v_norm2: Tensor, goal_weight: Tensor, radius: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For K walks at once: (a, y, μ, θᵀgθ) such that θ_k = a_k v_k + (β_k/2) L_kᵀ y_k solves walk k's step.

    kernel: K = L Lᵀ, (K, m, m); jv: L v, (K, m); v_norm2: ‖v‖², (K,); goal_weight β and radius ε: (K,).
    Works in the m-dimensional row space of L: with K = U Λ Uᵀ, the eigenvectors of g with non-zero
    eigenvalues are V = Lᵀ U Λ^-½, so v = V c + v_⊥ with c = Λ^-½ Uᵀ L v, and
        θ(μ) = (β/2) [ v/μ + V diag(1/(Λ+μ) − 1/μ) c ],
        ‖θ(μ)‖² = (β/2)² [ Σ c²/(λ+μ)² + ‖v_⊥‖²/μ² ],   decreasing in μ (`secular_damping` solves for μ).
    μ = 0: the pseudo-inverse step fits (a = 0); μ = inf: ε is tiny against β‖v‖ and θ is the plain gradient
    step of length ε (a = ε/‖v‖, y = 0), or β = 0 and θ = 0. θᵀgθ = ‖L θ‖² with L θ = a L v + (β/2) K y, from
    these m-vectors: no further product with L.

    On a GPU the eigendecomposition is left out (`_coefficients_by_cholesky`) unless μ falls to the noise floor
    of K, where only the eigendecomposition's rank cut-off tells signal from noise.
    """
    finite = torch.stack([torch.isfinite(t).all().to(kernel.device) for t in (kernel, jv, v_norm2)]).all()
    if not bool(finite):  # one wait for the device, not three
        raise WalkDiverged("the metric or the goal direction is not finite")
    device = kernel.device
    half_beta = goal_weight.double().to(device) / 2
    by_cholesky = device.type != "cpu" or CHOLESKY_ON_CPU
    found = _coefficients_by_cholesky(kernel, jv, v_norm2, half_beta, radius) if by_cholesky else None
    along_v, y, mu_t = found if found is not None else _coefficients_by_eigh(kernel, jv, v_norm2, half_beta, radius)
    moved = along_v[:, None] * jv.double() + half_beta[:, None] * (kernel.double() @ y[..., None]).squeeze(-1)
    return along_v, y, mu_t, moved.pow(2).sum(-1)


def _coefficients_by_eigh(kernel: Tensor, jv: Tensor, v_norm2: Tensor, half_beta: Tensor, radius: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(a, y, μ) through the eigendecomposition of K and `secular_damping` (the CPU's way, and the fallback)."""
    # K and L v come in the weights' dtype, so K is only known to about m·eps(dtype)·λ_max: eigenvalues below
    # that are noise and their directions are treated as the null space of g (the numerical rank, as in
    # numpy's matrix_rank). The eigendecomposition runs in that dtype too (in float32 it takes half the
    # time of float64, measured on the digits MLP); the secular equation for μ is solved in float64.
    # A small eigenproblem is latency-bound on a GPU (cuSOLVER launches many tiny kernels): solve it on the CPU.
    device = kernel.device
    small = device.type != "cpu" and kernel.shape[-1] <= 512
    lam, u = batched_eigh(kernel.cpu() if small else kernel)
    if small:
        lam, u = lam.to(device), u.to(device)
    m = lam.shape[-1]
    keep = lam > lam.amax(-1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny) * m * torch.finfo(lam.dtype).eps
    lam = torch.where(keep, lam, 1).double()  # dropped directions: any positive λ, with c = 0 below
    c = torch.where(keep, (u.mT @ jv[..., None]).squeeze(-1).double() / lam.sqrt(), 0)
    v_norm2 = v_norm2.double().to(device)
    perp2 = (v_norm2 - c.pow(2).sum(-1)).clamp_min(0)
    mu = secular_damping(lam.cpu().numpy(), c.pow(2).cpu().numpy(), perp2.cpu().numpy(), half_beta.cpu().numpy(),
                         radius.double().numpy())
    mu_t = torch.as_tensor(mu, device=device)
    finite = torch.isfinite(mu_t)
    positive = finite & (mu_t > 0)
    safe_mu = torch.where(positive, mu_t, 1.0)[:, None]
    coef = torch.where(positive[:, None], 1 / (lam + safe_mu) - 1 / safe_mu, c.new_ones(()) / lam) * c
    coef = torch.where(finite[:, None], coef, 0)
    y = (u.double() @ (coef / lam.sqrt())[..., None]).squeeze(-1)
    gradient_step = (~finite) & (half_beta > 0)
    along_v = torch.where(positive, half_beta / safe_mu[:, 0], 0)
    along_v = torch.where(gradient_step, radius.to(device) / v_norm2.sqrt().clamp_min(1e-300), along_v)
    return along_v, y, mu_t


def _coefficients_by_cholesky(kernel: Tensor, jv: Tensor, v_norm2: Tensor, half_beta: Tensor, radius: Tensor,
                              hi_cap: float = 1e12) -> tuple[Tensor, Tensor, Tensor] | None:
    """(a, y, μ) as `_coefficients_by_eigh` gives them, from Cholesky factorisations of K + μI only; None when some
    walk's μ lies at or below K's noise floor (then only the eigendecomposition's rank cut-off will do).

    Why: on a GPU an eigendecomposition of a stack of 160×160 kernels is latency-bound (cuSOLVER's took longer
    than the CPU's, and the CPU's means a round trip; BENCHMARKS.md, H200), while a batched Cholesky takes about
    0.2 ms. By Woodbury, (LᵀL + μI)⁻¹ = (I − Lᵀ(K + μI)⁻¹L)/μ, so with w = L v and z = (K + μI)⁻¹ w
        θ(μ) = (β/2μ)(v − Lᵀz),   ‖θ‖² = (β/2)² (‖v‖² − wᵀz − μ zᵀz)/μ²,
        d‖θ‖²/dμ = (β/2)² (2 zᵀ(K + μI)⁻¹z/μ − 2(‖v‖² − wᵀz − μ zᵀz)/μ³),
    and μ comes from the same safeguarded Newton iteration as `secular_damping` (φ = 1/‖θ‖ − 1/ε), vectorised
    over walks on the device, in float64. Then a = β/(2μ) and y = −z/μ.
    """
    device, m = kernel.device, kernel.shape[-1]
    k64, w, v2 = kernel.double(), jv.double(), v_norm2.double().to(device)
    r = radius.double().to(device)
    hb = half_beta
    # The eigh path's rank cut-off is m·eps(dtype)·λ_max; ‖K‖_F ≥ λ_max puts this floor at or above it.
    floor = (m * torch.finfo(kernel.dtype).eps * torch.linalg.matrix_norm(k64)).clamp_min(1e-300)
    moving = hb > 0
    # ‖θ(μ)‖ ≤ (β/2)‖v‖/μ, so μ* ≤ (β/2)‖v‖/ε: the bracket's top and the starting point.
    top = hb * v2.sqrt() / r
    hi = torch.minimum(torch.maximum(top, floor), torch.full_like(top, hi_cap))
    n2_floor, _, _, ok_floor = _secular_at(k64, w, v2, hb, floor)
    capped = moving & (top > hi_cap)
    at_floor = moving & (~ok_floor | (n2_floor <= r**2))  # μ* at or under the noise floor
    any_capped, any_at_floor = torch.stack([capped.any(), at_floor.any()]).tolist()  # one wait for the device
    gradient_step = torch.zeros_like(moving)
    if any_capped:  # where even μ = hi_cap leaves the step too long, the plain gradient step
        gradient_step = capped & (_secular_at(k64, w, v2, hb, hi)[0] > r**2)
    todo = moving & ~gradient_step
    if any_at_floor and bool((todo & at_floor).any()):
        return None
    mu, z, unsolved = _secular_newton(k64, w, v2, hb, r, todo, floor, hi, hi.clone(), iterations=None)
    if unsolved is None:
        return None
    return _trust_region_result(mu, z, moving & ~gradient_step, gradient_step, hb, r, v2)


def coefficients_without_waiting(kernel: Tensor, jv: Tensor, v_norm2: Tensor, goal_weight: Tensor, radius: Tensor,
                                 mu_start: Tensor, iterations: int = 5, hi_cap: float = 1e12
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`trust_region_coefficients` with no wait for the device anywhere, so that a CUDA graph can hold it
    (graphs.py): (a, y, μ, θᵀgθ, solved), all tensors, solved (K,) telling each walk's answer good.

    The Newton iteration of `_coefficients_by_cholesky` runs a fixed number of times from `mu_start` (the
    walk's μ at its last step: the trust region moves little from one step to the next, so a few iterations
    reach the same tolerance), and what would have needed a decision on the host is reported instead: a walk
    is not solved when its inputs are not finite, its μ did not converge, or it lies at the noise floor or past
    hi_cap (the rank cut-off or the plain gradient step). The caller then takes that step the waiting way.
    """
    device, m = kernel.device, kernel.shape[-1]
    k64, w, v2 = kernel.double(), jv.double(), v_norm2.double()
    r, hb = radius.double(), goal_weight.double() / 2
    finite = torch.isfinite(k64).flatten(1).all(1) & torch.isfinite(w).all(1) & torch.isfinite(v2)
    floor = (m * torch.finfo(kernel.dtype).eps * torch.linalg.matrix_norm(k64)).clamp_min(1e-300)
    moving = hb > 0
    top = hb * v2.sqrt() / r
    hi = torch.minimum(torch.maximum(top, floor), torch.full_like(top, hi_cap))
    start = mu_start.double().to(device)
    start = torch.where(torch.isfinite(start) & (start > floor) & (start < hi), start, hi)
    mu, z, unsolved = _secular_newton(k64, w, v2, hb, r, moving, floor, hi, start, iterations=iterations)
    along_v, y, mu = _trust_region_result(mu, z, moving, torch.zeros_like(moving), hb, r, v2)
    solved = finite & ~unsolved & ~(moving & (top > hi_cap))
    moved = along_v[:, None] * w + hb[:, None] * (k64 @ y[..., None]).squeeze(-1)
    return along_v, y, mu, moved.pow(2).sum(-1), solved


def _secular_at(k64: Tensor, w: Tensor, v2: Tensor, hb: Tensor, mu: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(‖θ(μ)‖², its derivative in μ, z = (K + μI)⁻¹ w, whether K + μI factored) for each walk (K,).

    With K + μI = C Cᵀ: a = C⁻¹w, z = C⁻ᵀa, b = C⁻¹z, so wᵀz = ‖a‖² and zᵀ(K + μI)⁻¹z = ‖b‖²: three triangular
    solves (cuBLAS's, which a CUDA graph can hold; `cholesky_solve` may go to MAGMA on a GPU)."""
    eye = torch.eye(k64.shape[-1], dtype=k64.dtype, device=k64.device)
    chol, info = torch.linalg.cholesky_ex(k64 + mu[:, None, None] * eye)
    a = torch.linalg.solve_triangular(chol, w[..., None], upper=False)
    z = torch.linalg.solve_triangular(chol.mT, a, upper=True)
    b = torch.linalg.solve_triangular(chol, z, upper=False)
    z = z[..., 0]
    rest = (v2 - a.pow(2).sum((-2, -1)) - mu * (z * z).sum(-1)).clamp_min(0)  # ‖v − Lᵀz‖²
    n2 = hb**2 * rest / mu**2
    dn2 = hb**2 * (2 * b.pow(2).sum((-2, -1)) / mu - 2 * rest / mu**3)
    return n2, dn2, z, info == 0


def _secular_newton(k64: Tensor, w: Tensor, v2: Tensor, hb: Tensor, r: Tensor, todo: Tensor, lo: Tensor, hi: Tensor,
                    mu: Tensor, iterations: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Safeguarded Newton on φ(μ) = 1/‖θ(μ)‖ − 1/ε inside [lo, hi] for the walks in `todo`: (μ, z at μ, the walks
    left unsolved). iterations=None: until every walk converges, asking the device after each iteration (None
    for the unsolved after 100); a number: exactly that many iterations, no wait for the device."""
    z_final = torch.zeros_like(w)
    for _ in range(100 if iterations is None else iterations):
        n2, dn2, z, ok = _secular_at(k64, w, v2, hb, mu)
        too_long = ~ok | (n2 > r**2)  # μ too small
        lo, hi = torch.where(todo & too_long, mu, lo), torch.where(todo & ~too_long, mu, hi)
        n = n2.sqrt()
        newton = mu - (1 / n - 1 / r) / (-0.5 * dn2 / n**3)
        inside = ok & torch.isfinite(newton) & (newton > lo) & (newton < hi)
        step = torch.where(inside, newton, (lo * hi).sqrt())
        done = todo & ok & (((n - r).abs() <= 1e-12 * r) | (hi <= lo * (1 + 1e-12)))
        z_final = torch.where(done[:, None], z, z_final)
        todo = todo & ~done
        if iterations is None and not bool(todo.any()):
            return mu, z_final, todo
        mu = torch.where(todo, step, mu)
    return mu, z_final, (todo if iterations is not None else None)


def _trust_region_result(mu: Tensor, z: Tensor, solved: Tensor, gradient_step: Tensor, hb: Tensor, r: Tensor,
                         v2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a, y, μ) from the solved μ and z = (K + μI)⁻¹ L v: a = β/(2μ), y = −z/μ; a = ε/‖v‖ and y = 0 for the plain
    gradient step; μ = inf where there is no μ (β = 0 or the gradient step)."""
    safe_mu = torch.where(solved, mu, 1.0)
    mu = torch.where(solved, mu, torch.inf)
    along_v = torch.where(solved, hb / safe_mu, 0)
    along_v = torch.where(gradient_step, r / v2.sqrt().clamp_min(1e-300), along_v)
    y = torch.where(solved[:, None], -z / safe_mu[:, None], 0)
    return along_v, y, mu


def secular_damping(lam: np.ndarray, c2: np.ndarray, perp2: np.ndarray, half_beta: np.ndarray,
                    radius: np.ndarray, lo: float = 1e-12, hi: float = 1e12) -> np.ndarray:
    """μ_k ≥ 0 with ‖θ_k(μ)‖ = ε_k for every walk k at once (lam, c2: (K, m); the rest (K,)), float64.

    0 when the pseudo-inverse step already fits, inf when even μ = hi leaves the step too long (then the
    plain gradient step is taken) or β = 0. Safeguarded Newton on φ(μ) = 1/‖θ(μ)‖ − 1/ε (Moré and
    Sorensen's choice: φ is nearly linear in μ, so a few iterations reach machine precision), falling back
    to bisection in log μ whenever a Newton step leaves the bracket; vectorised over walks, so K walks cost
    about one (scipy's brentq, used before, takes one walk at a time).
    """
    def norm2(mu):  # ‖θ(μ)‖² and its derivative in μ, (K,) each
        d = lam + mu[:, None]
        n2 = half_beta**2 * ((c2 / d**2).sum(-1) + perp2 / mu**2)
        dn2 = -2 * half_beta**2 * ((c2 / d**3).sum(-1) + perp2 / mu**3)
        return n2, dn2

    r2 = radius**2
    result = np.full(len(lam), np.nan)
    result[half_beta == 0] = np.inf
    in_row_space = perp2 <= 1e-12 * np.maximum(c2.sum(-1), 1e-30)
    min_norm2 = np.where(in_row_space, half_beta**2 * (c2 / lam**2).sum(-1), np.inf)
    result[np.isnan(result) & (min_norm2 <= r2)] = 0.0
    lo_v, hi_v = np.full(len(lam), lo), np.full(len(lam), hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        result[np.isnan(result) & (norm2(hi_v)[0] > r2)] = np.inf
    todo = np.isnan(result)
    # ‖θ(μ)‖ ≤ (β/2)‖v‖/μ, so μ* ≤ (β/2)‖v‖/ε: a bracket and the starting point.
    v_norm = np.sqrt(c2.sum(-1) + perp2)
    hi_v = np.clip(np.where(todo, half_beta * v_norm / radius, hi), lo, hi)
    mu = hi_v.copy()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(100):
            if not todo.any():
                break
            n2, dn2 = norm2(mu)
            too_long = n2 > r2  # μ too small
            lo_v, hi_v = np.where(todo & too_long, mu, lo_v), np.where(todo & ~too_long, mu, hi_v)
            n = np.sqrt(n2)
            phi, dphi = 1 / n - 1 / radius, -0.5 * dn2 / n**3
            newton = mu - phi / dphi
            inside = np.isfinite(newton) & (newton > lo_v) & (newton < hi_v)
            step = np.where(inside, newton, np.sqrt(lo_v * hi_v))
            done = todo & ((np.abs(n - radius) <= 1e-12 * radius) | (hi_v <= lo_v * (1 + 1e-12)))
            todo &= ~done
            mu = np.where(todo, step, mu)
    result[np.isnan(result)] = mu[np.isnan(result)]
    return result


def _goal_and_restoring(params: Params, goal, batch, restoring_weight: float) -> tuple[Params, Params, float | None]:
    """(v_goal, ∇R, the fraction of the batch that keeps its class) at params; the last is None when R is not
    computed (its weight is 0)."""
    v_goal = goal.direction(params, batch)
    if restoring_weight == 0:
        return v_goal, zeros_like(params), None
    # Plain autograd, not torch.func.grad: the same gradient with less dispatch overhead (0.42 against
    # 0.67 ms per call on the digits MLP, which is most of a penalty step there).
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        if hasattr(goal, "restoring_value_and_kept"):  # the engine's goals (goals/base.py)
            loss, kept = goal.restoring_value_and_kept(leaves, *goal.restoring_inputs(batch))
        else:  # any object with restoring_loss(params, batch) will do as a goal (the Python API)
            loss, kept = goal.restoring_loss(leaves, batch), None
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grad_r = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(params.items(), grads, strict=True)}
    return v_goal, grad_r, None if kept is None else float(kept)


def constrained_step(params: Params, goal, batch, probe: Tensor, config: WalkConfig, radius: float,
                     model_fn) -> Step:
    """The paper's step: metric-aware, length `radius` (ε, or less near a point target)."""
    metric = PullbackMetric(model_fn, probe, config.metric)
    v_goal, grad_restoring, kept = _goal_and_restoring(params, goal, batch, config.restoring_weight)
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
        # None: only a dense L would do, and it is too big. Asked for the exact step (kernel), the factored rows
        # are taken whatever their size: the dense L, the alternative, holds far more (5.9 GB against 0.6 GB for
        # VGG11's conv rows on 32×32 inputs, BENCHMARKS.md).
        rows = metric.jacobian_rows(params, allow_dense=dense_ok, size_rule=config.linear_solver != "kernel")
    if rows is not None:
        theta, mu, functional = trust_region_kernel(rows, v, config.goal_weight, radius)
        solver = "kernel (factored)" if isinstance(rows, LinearLayerRows) else "kernel"
        return Step(theta, v_goal, functional, mu, solver, kept)
    mu = config.damping
    x = conjugate_gradient(lambda t: add(metric.metric_vector_product(t, params), t, alpha=mu), v, config.cg_iters)
    theta = scale(x, config.goal_weight / 2)
    length = float(norm(theta))
    if length > radius:
        theta = scale(theta, radius / length)
    return Step(theta, v_goal, float(metric.squared_norm(theta, params)), mu, "cg", kept)


def penalty_step(params: Params, goal, batch, probe: Tensor, config: WalkConfig, radius: float,
                 model_fn) -> Step:
    """The authors' walk: a normalised gradient step on R(w) + λ h(w), length `radius`."""
    v_goal, grad_restoring, kept = _goal_and_restoring(params, goal, batch, 1.0)
    u = add(grad_restoring, v_goal, alpha=-config.goal_weight)
    length = float(norm(u))
    theta = zeros_like(params) if length == 0 else scale(u, -radius / length)
    return Step(theta, v_goal, None, None, kept=kept)  # θᵀgθ is not part of this rule: the walker measures it


STEP_RULES = {"constrained": constrained_step, "penalty": penalty_step}
