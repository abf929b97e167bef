"""What a point of a path is worth: loss, accuracy, sparsity, and distances between functions.

("metric" in this project means only the pullback metric g; see metric.py.)
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .params import Params

ModelFn = Callable[[Params, Tensor], Tensor]  # (params, inputs) -> logits (n, C)


def scored_on(model_fn: ModelFn, task) -> ModelFn:
    """`model_fn` as `task` (a data.Dataset) is scored: on its own head's output columns when it has one, else on
    all of them. A NetworkFunction changes its head (it may hold another task's); a plain callable is sliced."""
    from .models import NetworkFunction

    if isinstance(model_fn, NetworkFunction):
        return model_fn.with_head(task.head)
    if task.head is None:
        return model_fn
    lo, hi = task.head
    return lambda params, x: model_fn(params, x)[..., lo:hi]


def bhattacharyya(logits: Tensor, anchor_logits: Tensor) -> Tensor:
    """D_B(p, q) = -log Σ_c sqrt(p_c q_c) per input (shape (n,)); ≈ θᵀFθ/8 to second order."""
    log_bc = torch.logsumexp(0.5 * (F.log_softmax(logits, -1) + F.log_softmax(anchor_logits, -1)), dim=-1)
    return -log_bc


def squared_logit_distance(logits: Tensor, anchor_logits: Tensor) -> Tensor:
    """½‖f(x; w) − f(x; w0)‖² per input: the distance whose Hessian is the logit metric."""
    return 0.5 * (logits - anchor_logits).pow(2).sum(-1)


FUNCTION_DISTANCES = {"fisher": bhattacharyya, "logit": squared_logit_distance}


def evaluate(model_fn: ModelFn, params: Params, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) of `params` on (x, y)."""
    loss, acc = loss_and_accuracy(logits_of(model_fn, params, x, batch_size), y)
    return float(loss), float(acc)


@torch.no_grad()
def logits_of(model_fn: ModelFn, params: Params, x: Tensor, batch_size: int = 1024) -> Tensor:
    """f(x; params) in chunks of batch_size, (n, C) (pure: also runs under vmap)."""
    return torch.cat([model_fn(params, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def loss_and_accuracy(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, accuracy) as 0-d tensors."""
    n = max(len(y), 1)
    return F.cross_entropy(logits, y, reduction="sum") / n, (logits.argmax(-1) == y).sum() / n


def accuracy(model_fn: ModelFn, params: Params, x: Tensor, y: Tensor, batch_size: int = 1024) -> Tensor:
    """Accuracy of `params` on (x, y) as a 0-d tensor (pure: also runs under vmap over stacked params)."""
    with torch.no_grad():
        correct = [(model_fn(params, x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum()
                   for i in range(0, len(y), batch_size)]
        return torch.stack(correct).sum() / max(len(y), 1)


@torch.no_grad()
def true_class_probability(model_fn: ModelFn, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """p(true class) per example: one row of the per-example heat map."""
    return F.softmax(model_fn(params, x), -1).gather(1, y[:, None]).squeeze(1)


def count_zeros(params: Params, names: tuple[str, ...]) -> tuple[int, int]:
    """(exact zeros, total) among the named tensors."""
    n_zero = sum(int((params[k] == 0).sum()) for k in names)
    return n_zero, sum(params[k].numel() for k in names)


def sparsity(params: Params, names: tuple[str, ...]) -> float:
    """Fraction of exact zeros among the prunable weights."""
    n_zero, total = count_zeros(params, names)
    return n_zero / total if total else 0.0


def magnitude_prune(params: Params, names: tuple[str, ...], target_sparsity: float) -> Params:
    """A copy of `params` with the fraction `target_sparsity` of smallest-|w| weights among `names`
    set to zero, ranked globally over all of them (the sparsify goal's moving target)."""
    flat = torch.cat([params[k].reshape(-1).abs() for k in names])
    # Round up: the sparsity reached is never below the target (0.9 of 25,856 weights is 23,270.4 → 23,271).
    n_prune = min(math.ceil(target_sparsity * flat.numel() - 1e-9), flat.numel())
    out = dict(params)
    if n_prune == 0:
        return out
    # Keep exactly the n − k largest by index (not by threshold), so ties cannot prune more or fewer than asked.
    # An out-of-place scatter, not an indexed write, so that this also runs under vmap (batch.py).
    keep = torch.zeros_like(flat).scatter(0, torch.topk(flat, flat.numel() - n_prune, sorted=False).indices, 1.0)
    start = 0
    for k in names:
        n = params[k].numel()
        out[k] = params[k] * keep[start:start + n].view_as(params[k])
        start += n
    return out
