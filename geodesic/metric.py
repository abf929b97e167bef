"""The pullback metric g(w) = (1/N) Σ_i J_iᵀ H_i J_i on a probe batch, never formed as a matrix.

J_i = ∂f(x_i; w)/∂w is the C×n Jacobian of the outputs for input i. H_i is the identity for the
*logit* metric and diag(p_i) − p_i p_iᵀ (p_i = softmax of the logits) for the output *Fisher* metric,
which ignores a shift of all logits. θᵀgθ ≈ how far the outputs move under a small step θ.

Everything is built from two products:
  metric_vector_product:  v → Jv (jvp, forward mode) → H(Jv) → Jᵀ(H Jv) (vjp, reverse mode)
  jacobian:               the N·C×n matrix L with g = LᵀL (per-sample Jacobians, whitened by H^½),
                          for exact solves and spectra when N·C is small.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jacrev, vjp, vmap

from .autodiff import jvp
from .measures import ModelFn
from .models import NetworkFunction
from .params import Params, dot, flatten, unflatten
from .rows import DenseRows, JacobianRows, linear_layer_rows


@dataclass
class PullbackMetric:
    """g = JᵀHJ/N for `model_fn` on the probe `inputs` (N inputs). `kind` is 'logit' or 'fisher'."""

    model_fn: ModelFn
    inputs: Tensor
    kind: str = "fisher"

    @property
    def n_probe(self) -> int:
        return len(self.inputs)

    def _output_weight(self, logits: Tensor, u: Tensor) -> Tensor:
        """H u per input: u for the logit metric, p∘u − p(pᵀu) for the Fisher metric."""
        if self.kind == "logit":
            return u
        p = F.softmax(logits.detach(), -1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def _forward(self, params: Params) -> Tensor:
        return self.model_fn(params, self.inputs)

    def output_change(self, tangent_vec: Params, base_point: Params) -> tuple[Tensor, Tensor]:
        """(logits at base_point, J·tangent_vec) with one jvp; both (N, C)."""
        return jvp(self._forward, (base_point,), (tangent_vec,))

    def metric_vector_product(self, tangent_vec: Params, base_point: Params) -> Params:
        """g·v without forming g: one jvp, the output weighting, one vjp."""
        logits, jv = self.output_change(tangent_vec, base_point)  # v → Jv            (N, C)
        hjv = self._output_weight(logits, jv) / self.n_probe        # Jv → H Jv / N     (N, C)
        _, pullback = vjp(self._forward, base_point)
        (gv,) = pullback(hjv)                                       # → Jᵀ H J v / N    (params)
        return gv

    def inner_product(self, tangent_vec_a: Params, tangent_vec_b: Params, base_point: Params) -> Tensor:
        """⟨a, b⟩_g = (1/N) Σ_i (J_i a)ᵀ H_i (J_i b): two jvps, no vjp."""
        logits, ja = self.output_change(tangent_vec_a, base_point)
        jb = ja if tangent_vec_b is tangent_vec_a else self.output_change(tangent_vec_b, base_point)[1]
        return (ja * self._output_weight(logits, jb)).sum() / self.n_probe

    def squared_norm(self, tangent_vec: Params, base_point: Params) -> Tensor:
        """θᵀgθ: the functional length² of a step."""
        return self.inner_product(tangent_vec, tangent_vec, base_point)

    def jacobian_blocks(self, base_point: Params) -> dict[str, Tensor]:
        """L split by parameter: {name: (N·C, numel)} with g = Σ_k L_kᵀ L_k summed over blocks.

        Row (i, c) is the c-th row of H_i^½ J_i / √N. For the Fisher metric H_i^½ = (I − s sᵀ) diag(s)
        with s = √p_i: (I − s sᵀ) is a projection because ‖s‖ = 1, so its square is H_i. The whitening is
        applied to the C outputs before differentiating (a fixed C×C map per input), so the large
        Jacobian is written once and never transformed.
        """
        n = self.n_probe
        whiten = self._whitening(base_point)
        c = whiten.shape[-1]

        def single(params: Params, x: Tensor, w: Tensor) -> Tensor:
            return w @ self.model_fn(params, x[None])[0]

        per_sample = vmap(jacrev(single), in_dims=(None, 0, 0))(base_point, self.inputs, whiten)
        return {k: per_sample[k].reshape(n * c, -1) for k in base_point}  # {k: (N·C, numel_k)}

    def _whitening(self, base_point: Params) -> Tensor:
        """(N, C, C): H_i^½ / √N for each probe input i."""
        with torch.no_grad():
            return self._whitening_from_logits(self._forward(base_point))

    def _whitening_from_logits(self, logits: Tensor) -> Tensor:
        n, c = logits.shape
        if self.kind == "fisher":
            s = F.softmax(logits, -1).sqrt()                                         # (N, C)
            whiten = (torch.diag_embed(s) - s[:, :, None] * (s * s)[:, None, :])     # (I − s sᵀ) diag(s), (N, C, C)
        else:
            whiten = torch.eye(c, dtype=logits.dtype, device=logits.device).expand(n, c, c)
        return whiten / n ** 0.5

    def whitening_of_network_outputs(self, logits: Tensor) -> Tensor:
        """(N, K, C): from all C outputs of the network to the K whitened outputs this metric measures: the
        whitening itself, or, for a NetworkFunction with a head, the whitening of those columns alone (the rest
        weighted 0). The factored rows (rows.py) differentiate the whole network's outputs through this map."""
        head = getattr(self.model_fn, "head", None)
        if head is None:
            return self._whitening_from_logits(logits)
        lo, hi = head
        whiten = self._whitening_from_logits(logits[:, lo:hi])
        return F.pad(whiten, (lo, logits.shape[-1] - hi))

    def jacobian_rows(self, base_point: Params, allow_dense: bool = True, size_rule: bool = True
                      ) -> JacobianRows | None:
        """L in the cheapest exact form: factored per layer for networks of Linear, Conv2d and eval-mode
        BatchNorm2d layers, dense blocks otherwise (None if those are not allowed). size_rule=False: the factored
        rows even where their conv part is bigger than `auto` would write out (the exact step was asked for)."""
        if isinstance(self.model_fn, NetworkFunction):
            rows = linear_layer_rows(self.model_fn.network, self.model_fn.buffers, base_point, self.inputs,
                                     self.whitening_of_network_outputs, size_rule)
            if rows is not None:
                return rows
        return DenseRows(self.jacobian_blocks(base_point)) if allow_dense else None

    def jacobian(self, base_point: Params) -> Tensor:
        """L (N·C × n, flattened in the key order of base_point) with g = LᵀL."""
        return torch.cat(list(self.jacobian_blocks(base_point).values()), dim=1)

    def spectrum(self, base_point: Params, n_eigenvalues: int = 50) -> np.ndarray:
        """The top eigenvalues of g, largest first.

        Exact from the small kernel L Lᵀ (same non-zero eigenvalues as g = LᵀL) when N·C ≤ 4096,
        otherwise by Lanczos (scipy's eigsh) on g·v products.
        """
        n_params = sum(v.numel() for v in base_point.values())
        n_rows = self.n_probe * self._forward(base_point).shape[-1]
        if n_rows <= 4096:
            kernel = self.jacobian_rows(base_point).gram().double()
            eigenvalues = torch.linalg.eigvalsh(kernel).flip(0).clamp_min(0).cpu().numpy()
            return eigenvalues[:n_eigenvalues]
        from scipy.sparse.linalg import LinearOperator, eigsh

        def matvec(v: np.ndarray) -> np.ndarray:
            tangent = unflatten(torch.as_tensor(v, dtype=torch.float32, device=self.inputs.device), base_point)
            return flatten(self.metric_vector_product(tangent, base_point)).double().cpu().numpy()

        op = LinearOperator((n_params, n_params), matvec=matvec, dtype=np.float64)
        k = min(n_eigenvalues, n_rows - 1, n_params - 2)
        return np.sort(eigsh(op, k=k, which="LM", return_eigenvectors=False))[::-1].clip(min=0)


def conjugate_gradient(matvec, rhs: Params, n_iters: int, tol: float = 1e-6) -> Params:
    """x ≈ A⁻¹ rhs for a symmetric positive definite A given only as `matvec` (Params → Params)."""
    x = {k: torch.zeros_like(v) for k, v in rhs.items()}
    r = dict(rhs)
    p = dict(rhs)
    rr = dot(r, r)
    rr0 = rr
    for _ in range(n_iters):
        if rr <= tol ** 2 * rr0:
            break
        ap = matvec(p)
        alpha = rr / dot(p, ap)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = dot(r, r)
        p = {k: r[k] + (rr_new / rr) * p[k] for k in p}
        rr = rr_new
    return x
