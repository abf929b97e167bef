"""What a walk is compared with: one-shot magnitude pruning, masked fine-tuning, naive fine-tuning,
the straight line between two networks, and the barrier numbers (method.md §5)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset
from .errors import Cancelled
from .measures import ModelFn, evaluate, magnitude_prune, scored_on
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
        loss, acc = evaluate(scored_on(model_fn, task), point, task.test.x, task.test.y)
        losses.append(loss)
        accuracies.append(acc)
    return {"alpha": alphas, "loss": np.array(losses), "accuracy": np.array(accuracies)}


def one_shot_prune(model_fn: ModelFn, params: Params, prunable: tuple[str, ...], target_sparsity: float,
                   task: Dataset) -> float:
    """Test accuracy of global magnitude pruning with no retraining."""
    return evaluate(scored_on(model_fn, task), magnitude_prune(params, prunable, target_sparsity), task.test.x,
                    task.test.y)[1]


def fine_tune(model_fn: ModelFn, params: Params, task: Dataset, n_steps: int, seed: int, lr: float = 1e-3,
              batch_size: int = 64, mask: dict[str, torch.Tensor] | None = None,
              eval_tasks: dict[str, Dataset] | None = None, eval_every: int = 0,
              should_stop: Callable[[], bool] | None = None) -> tuple[Params, list[dict]]:
    """Adam on `task`'s training split for n_steps (one forward+backward each).

    mask: weights where mask is False stay exactly zero (masked fine-tuning after pruning).
    should_stop: asked before every step; True raises Cancelled (a server shutting down, a page that moved on).
    Returns the final params and, every `eval_every` steps, {step, accuracy/NAME...} on `eval_tasks`.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    x, y = task.train.x, task.train.y
    task_fn = scored_on(model_fn, task)
    history = []

    def record(step: int) -> None:
        if eval_tasks and eval_every and step % eval_every == 0:
            row = {"step": step}
            for name, t in eval_tasks.items():
                row[f"accuracy/{name}"] = evaluate(scored_on(model_fn, t), params, t.test.x, t.test.y)[1]
            history.append(row)

    record(0)
    order, cursor = torch.randperm(len(y), generator=g), 0
    for step in range(1, n_steps + 1):
        if should_stop is not None and should_stop():
            raise Cancelled(f"fine-tuning stopped at step {step - 1} of {n_steps}")
        if cursor + batch_size > len(y):
            order, cursor = torch.randperm(len(y), generator=g), 0
        index = order[cursor:cursor + batch_size].to(y.device)
        cursor += batch_size
        loss = F.cross_entropy(task_fn(params, x[index]), y[index])
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
                     task: Dataset, n_steps: int, seed: int,
                     should_stop: Callable[[], bool] | None = None) -> tuple[Params, float]:
    """(params, test accuracy) of one-shot pruning followed by n_steps of masked fine-tuning."""
    pruned = magnitude_prune(params, prunable, target_sparsity)
    mask = {k: (pruned[k] != 0).float() for k in prunable}
    tuned, _ = fine_tune(model_fn, pruned, task, n_steps, seed, mask=mask, should_stop=should_stop)
    return tuned, evaluate(scored_on(model_fn, task), tuned, task.test.x, task.test.y)[1]


def gradual_magnitude_prune(model_fn: ModelFn, params: Params, prunable: tuple[str, ...], target_sparsity: float,
                            task: Dataset, n_steps: int, seed: int, n_updates: int = 10,
                            batch_size: int = 64) -> tuple[Params, float]:
    """Gradual magnitude pruning (Zhu & Gupta): fine-tune while the sparsity rises on a cubic schedule,
    s_k = s (1 − (1 − k/K)³), re-pruning globally at K evenly spaced points and for the last quarter of
    the budget at full sparsity. Returns (params, test accuracy)."""
    ramp = max(int(0.75 * n_steps), 1)
    chunk = max(ramp // n_updates, 1)
    current = params
    for k in range(1, n_updates + 1):
        s_k = target_sparsity * (1 - (1 - k / n_updates) ** 3)
        current = magnitude_prune(current, prunable, s_k)
        mask = {name: (current[name] != 0).float() for name in prunable}
        current, _ = fine_tune(model_fn, current, task, chunk, seed + k, mask=mask, batch_size=batch_size)
    current = magnitude_prune(current, prunable, target_sparsity)
    mask = {name: (current[name] != 0).float() for name in prunable}
    current, _ = fine_tune(model_fn, current, task, max(n_steps - n_updates * chunk, 1), seed, mask=mask,
                           batch_size=batch_size)
    return current, evaluate(scored_on(model_fn, task), current, task.test.x, task.test.y)[1]


def diagonal_fisher(model_fn: ModelFn, params: Params, x: torch.Tensor, n_samples: int = 500) -> Params:
    """Diagonal empirical Fisher E[(∂ log p(y|x)/∂w)²] with y drawn from the model (EWC's importance)."""
    from torch.func import grad, vmap

    def log_prob(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(model_fn(p, xi[None]), -1)[0].gather(0, yi[None])[0]  # no data-dependent indexing

    x = x[:n_samples]
    with torch.no_grad():
        y = torch.distributions.Categorical(logits=model_fn(params, x)).sample()
    grads = vmap(grad(log_prob), in_dims=(None, 0, 0))(params, x, y)
    return {k: g.pow(2).mean(0) for k, g in grads.items()}


def continual_fine_tune(model_fn: ModelFn, params: Params, task_b: Dataset, n_steps: int, seed: int,
                        method: str, task_a: Dataset | None = None, memory: torch.Tensor | None = None,
                        ewc_weight: float = 1e5, lr: float = 1e-3, batch_size: int = 64,
                        should_stop: Callable[[], bool] | None = None) -> Params:
    """Continual-learning baselines from w_A, all with Adam and the same number of optimiser steps:

    naive: cross-entropy on task B; ewc: + (λ/2) Σ F_i (w_i − w_A,i)² with a diagonal Fisher on task A;
    replay: every batch mixes task-B examples with the memory's task-A examples (same memory as the walk);
    joint: batches from task A and task B together (the upper bound: all of task A stays available).
    should_stop: asked before every step; True raises Cancelled.
    """
    anchor = clone(params)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    fisher = diagonal_fisher(scored_on(model_fn, task_a), anchor, task_a.train.x) if method == "ewc" else None
    fn_a, fn_b = (scored_on(model_fn, task_a) if task_a is not None else None), scored_on(model_fn, task_b)
    if method == "replay":
        old_x, old_y = task_a.train.x[memory], task_a.train.y[memory]
    elif method == "joint":
        old_x, old_y = task_a.train.x, task_a.train.y
    for step in range(n_steps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"{method} fine-tuning stopped at step {step} of {n_steps}")
        index = torch.randint(0, len(task_b.train), (batch_size,), generator=g).to(task_b.train.y.device)
        x, y = task_b.train.x[index], task_b.train.y[index]
        loss = F.cross_entropy(fn_b(params, x), y)
        if method in ("replay", "joint"):  # the mean over both halves, each task on its own head's outputs
            old = torch.randint(0, len(old_y), (batch_size,), generator=g).to(old_y.device)
            loss = 0.5 * (loss + F.cross_entropy(fn_a(params, old_x[old]), old_y[old]))
        if fisher is not None:
            loss = loss + 0.5 * ewc_weight * sum((fisher[k] * (params[k] - anchor[k]) ** 2).sum() for k in params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return clone(params)


def weight_matching(params_a: Params, params_b: Params, layer_names: list[tuple[str, str]]) -> Params:
    """B's hidden units permuted to line up with A's (an MLP's Linear layers, in order): for each hidden
    layer, the permutation maximising Σ ⟨W_A[i], W_B[π(i)]⟩ over the unit's incoming and outgoing weights,
    solved by the Hungarian method and iterated a few times (Ainsworth et al.'s weight matching).

    layer_names: (weight, bias) names of the Linear layers from input to output."""
    from scipy.optimize import linear_sum_assignment

    out = clone(params_b)
    n_hidden = len(layer_names) - 1
    perms: list[torch.Tensor] = []
    for i in range(n_hidden):  # first pass, input to output, on incoming weights (exact for a permuted copy)
        w_in, b_in = layer_names[i]
        b_in_w = params_b[w_in] if i == 0 else params_b[w_in][:, perms[i - 1]]
        similarity = params_a[w_in] @ b_in_w.T + torch.outer(params_a[b_in], params_b[b_in])
        perms.append(torch.as_tensor(linear_sum_assignment(similarity.detach().cpu().numpy(), maximize=True)[1]))
    for _ in range(10):
        changed = False
        for i in range(n_hidden):
            w_in, b_in = layer_names[i]
            w_out = layer_names[i + 1][0]
            prev = perms[i - 1] if i > 0 else None
            b_in_w = params_b[w_in] if prev is None else params_b[w_in][:, prev]
            nxt = perms[i + 1] if i + 1 < n_hidden else None
            b_out_w = params_b[w_out] if nxt is None else params_b[w_out][nxt]
            similarity = (params_a[w_in] @ b_in_w.T + torch.outer(params_a[b_in], params_b[b_in])
                          + params_a[w_out].T @ b_out_w)
            _, col = linear_sum_assignment(similarity.detach().cpu().numpy(), maximize=True)
            col = torch.as_tensor(col)
            if not torch.equal(col, perms[i]):
                perms[i], changed = col, True
        if not changed:
            break
    for i in range(n_hidden + 1):
        w, b = layer_names[i]
        weight = params_b[w]
        if i < n_hidden:
            weight = weight[perms[i]]
            out[b] = params_b[b][perms[i]]
        if i > 0:
            weight = weight[:, perms[i - 1]]
        out[w] = weight
    return out


def bezier_curve(model_fn: ModelFn, params_a: Params, params_b: Params, task: Dataset, n_steps: int, seed: int,
                 lr: float = 1e-3, batch_size: int = 64, n_points: int = 21) -> dict[str, np.ndarray]:
    """A trained quadratic Bézier curve φ(t) = (1−t)² w_A + 2t(1−t) θ + t² w_B (Garipov et al.): θ starts
    at the midpoint and minimises the loss at a random t per batch. Returns test loss/accuracy on an α grid."""
    theta = {k: (0.5 * (params_a[k] + params_b[k])).detach().clone().requires_grad_(True) for k in params_a}
    optimizer = torch.optim.Adam(theta.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def point(t: float, control: Params) -> Params:
        return {k: (1 - t) ** 2 * params_a[k] + 2 * t * (1 - t) * control[k] + t**2 * params_b[k] for k in control}

    for _ in range(n_steps):
        t = float(torch.rand(1, generator=g))
        index = torch.randint(0, len(task.train), (batch_size,), generator=g).to(task.train.y.device)
        loss = F.cross_entropy(scored_on(model_fn, task)(point(t, theta), task.train.x[index]), task.train.y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    control = clone(theta)
    alphas = np.linspace(0, 1, n_points)
    results = [evaluate(scored_on(model_fn, task), point(float(a), control), task.test.x, task.test.y) for a in alphas]
    return {"alpha": alphas, "loss": np.array([r[0] for r in results]), "accuracy": np.array([r[1] for r in results])}
