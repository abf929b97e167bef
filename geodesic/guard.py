"""The step guard (`WalkConfig.step_guard`, `--step-guard`): a step that costs the function too much is
shortened before it is taken.

The constrained step keeps the outputs on its probe (N inputs, 16 by default) and is free in every direction
the probe cannot see. For a conv net that freedom can move many other inputs' classes at once: a LeNet-5
sparsify walk on digits-images with the MLP's settings keeps ~97% test accuracy on most steps and drops to
78-82% on single steps near its target, recovering on the next (BENCHMARKS.md, "The step guard"). Those steps
show on the training inputs too (the share that keeps its class, measured on all of them after every step,
followed test accuracy with a correlation of 0.85 on that walk).

So, like a line search's acceptance test, two things are measured where the step would land, on the goal's guard
examples (the first GUARD_SIZE of the inputs whose outputs the walk keeps, i.e. training inputs, never the test
set): the share that keep their class, which may fall by at most `step_guard`; and how far their predicted
distributions moved, the mean KL(p(x; w) ‖ p(x; w + θ)), which may be at most KL_BUDGET nats a step (the step
is built to move the outputs on its probe little; this checks that it did so on a thousand other inputs). While
either fails the step is halved and measured again, at most HALVINGS times (the last halving is taken whatever
it measures: the guard shortens steps, it never stops a walk). One forward pass on GUARD_SIZE inputs per try,
on the walk's device. The restoring pull, the metric and the goal are unchanged; only the step's length is.

Measured on LeNet-5, digits-images, sparsify 90%, seeds 0-2 (BENCHMARKS.md, "The step guard"): the kept share
alone left seed 0's lowest point one test example under start − 3; with the KL budget every seed's lowest point
and end are within the targets.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .params import Params

HALVINGS = 5  # a guarded step is at least 1/32 of the step the rule proposed
GUARD_SIZE = 1024  # guard examples at most (a forward pass on them per try)
KL_BUDGET = 0.01  # nats: the mean KL divergence one step may cause on the guard examples


def guard_inputs(goal) -> tuple[Tensor, Tensor]:
    """(inputs, the class each is kept to) for `goal`'s guard: its first GUARD_SIZE anchor inputs (training
    inputs in a fixed random order) with the classes its restoring loss keeps (the start network's, or the
    labels for connect). Cached on the goal."""
    cached = goal.__dict__.get("_guard_inputs")
    if cached is None:
        from .goals.base import Batch, _classes

        n = min(GUARD_SIZE, len(goal.anchor_inputs))
        inputs, target = goal.restoring_inputs(Batch(torch.arange(n, device=goal.anchor_inputs.device)))
        cached = goal.__dict__["_guard_inputs"] = (inputs, _classes(target))
    return cached


def guard_outputs(model_fn, params: Params, inputs: Tensor) -> Tensor:
    """log p(x; params) on the guard inputs, (n, C) (vmap-able)."""
    with torch.no_grad():
        return torch.log_softmax(model_fn(params, inputs), -1)


def kept_and_moved(before: Tensor, after: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """(the share of inputs whose class is `classes` at `after`, the mean KL(before ‖ after)) from log-probabilities
    (..., n, C); leading dimensions are walks."""
    kept = (after.argmax(-1) == classes).float().mean(-1)
    return kept, (before.exp() * (before - after)).sum(-1).mean(-1)


def accepts(before: Tensor, after: Tensor, classes: Tensor, limit: float) -> Tensor:
    """Whether a step from `before` to `after` (log-probabilities on the guard inputs) passes the guard (bool,
    one per walk): the kept share falls by at most `limit` and the mean KL is within KL_BUDGET. In float64, so a
    walk alone and in a batch decide alike."""
    kept_before = (before.argmax(-1) == classes).double().mean(-1)
    kept_after, moved = kept_and_moved(before.double(), after.double(), classes)
    return (kept_after >= kept_before - limit) & (moved <= KL_BUDGET)
