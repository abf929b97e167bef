"""What a walk is compared with: one-shot magnitude pruning, masked fine-tuning, naive fine-tuning,
the straight line between two networks, and the barrier numbers (method.md §5)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset
from .measures import ModelFn, evaluate, magnitude_prune
from .params import Params, clone


def barrier(values: Sequence[float]) -> float:
    """max_t v(t) − ½(v(start) + v(end)) for errors or losses along a path."""
    values = list(values)
    return float(max(values) - 0.5 * (values[0] + values[-1]))


def straight_line(model_fn: ModelFn, params_a: Params, params_b: Params, task: Dataset,
                  n_points: int = 21) -> dict[str, np.ndarray]:
    """Test loss and accuracy at (1 − α) w_A + α w_B on an even α grid (n_points ≥ 21 for barriers)."""
    alphas = np.linspace(0.0, 1.0, n_points)
    losses, accuracies = [], []
    for alpha in alphas:
        point = {k: (1 - alpha) * params_a[k] + alpha * params_b[k] for k in params_a}
        loss, acc = evaluate(model_fn, point, task.test.x, task.test.y)
        losses.append(loss)
        accuracies.append(acc)
    return {"alpha": alphas, "loss": np.array(losses), "accuracy": np.array(accuracies)}


def on_alpha_grid(positions: Sequence[float], values: Sequence[float], n_points: int = 21) -> np.ndarray:
    """`values` recorded at path positions in [0, 1], linearly interpolated onto an even α grid."""
    return np.interp(np.linspace(0.0, 1.0, n_points), np.asarray(positions), np.asarray(values))


def one_shot_prune(model_fn: ModelFn, params: Params, prunable: tuple[str, ...], target_sparsity: float,
                   task: Dataset) -> float:
    """Test accuracy of global magnitude pruning with no retraining."""
    return evaluate(model_fn, magnitude_prune(params, prunable, target_sparsity), task.test.x, task.test.y)[1]


def fine_tune(model_fn: ModelFn, params: Params, task: Dataset, n_steps: int, seed: int, lr: float = 1e-3,
              batch_size: int = 64, mask: dict[str, torch.Tensor] | None = None,
              eval_tasks: dict[str, Dataset] | None = None, eval_every: int = 0) -> tuple[Params, list[dict]]:
    """Adam on `task`'s training split for n_steps (one forward+backward each).

    mask: weights where mask is False stay exactly zero (masked fine-tuning after pruning).
    Returns the final params and, every `eval_every` steps, {step, accuracy/NAME...} on `eval_tasks`.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    x, y = task.train.x, task.train.y
    history = []

    def record(step: int) -> None:
        if eval_tasks and eval_every and step % eval_every == 0:
            row = {"step": step}
            for name, t in eval_tasks.items():
                row[f"accuracy/{name}"] = evaluate(model_fn, params, t.test.x, t.test.y)[1]
            history.append(row)

    record(0)
    order, cursor = torch.randperm(len(y), generator=g), 0
    for step in range(1, n_steps + 1):
        if cursor + batch_size > len(y):
            order, cursor = torch.randperm(len(y), generator=g), 0
        index = order[cursor:cursor + batch_size].to(y.device)
        cursor += batch_size
        loss = F.cross_entropy(model_fn(params, x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if mask is not None:
            with torch.no_grad():
                for k, m in mask.items():
                    params[k].mul_(m)
        record(step)
    return clone(params), history


def masked_fine_tune(model_fn: ModelFn, params: Params, prunable: tuple[str, ...], target_sparsity: float,
                     task: Dataset, n_steps: int, seed: int) -> tuple[Params, float]:
    """(params, test accuracy) of one-shot pruning followed by n_steps of masked fine-tuning."""
    pruned = magnitude_prune(params, prunable, target_sparsity)
    mask = {k: (pruned[k] != 0).float() for k in prunable}
    tuned, _ = fine_tune(model_fn, pruned, task, n_steps, seed, mask=mask)
    return tuned, evaluate(model_fn, tuned, task.test.x, task.test.y)[1]
