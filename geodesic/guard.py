"""The step guard (`WalkConfig.step_guard`, `--step-guard`): a step that costs the function too much is
shortened before it is taken.

The constrained step keeps the outputs on its probe (N inputs, 16 by default) and is free in every direction
the probe cannot see. For a conv net that freedom can move many other inputs' classes at once: a LeNet-5
sparsify walk on digits-images with the MLP's settings keeps ~97% test accuracy on most steps and drops to
78-82% on single steps near its target, recovering on the next (BENCHMARKS.md, "The step guard"). Those steps
show on the training inputs too (the share that keeps its class, measured on all of them after every step,
followed test accuracy with a correlation of 0.85 on that walk).

So, like a line search's acceptance test: the share of the goal's guard examples (the first GUARD_SIZE of the
inputs whose outputs the walk keeps, i.e. training inputs, never the test set) that keep their class is
measured where the step would land; if it is more than `step_guard` below its value before the step, the step
is halved and measured again, at most HALVINGS times (the last halving is taken whatever it measures: the
guard shortens steps, it never stops a walk). One forward pass on GUARD_SIZE inputs per try, on the walk's
device. The restoring pull, the metric and the goal are unchanged; only the step's length is.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .params import Params

HALVINGS = 5  # a guarded step is at least 1/32 of the step the rule proposed
GUARD_SIZE = 1024  # guard examples at most (a forward pass on them per try)


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


def kept_share(model_fn, params: Params, inputs: Tensor, classes: Tensor) -> Tensor:
    """The share of `inputs` on which the network at `params` gives `classes` (a 0-d tensor; vmap-able)."""
    with torch.no_grad():
        return (model_fn(params, inputs).argmax(-1) == classes).float().mean()
