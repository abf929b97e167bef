"""Connect: walk from network A to network B, trained separately, keeping every point accurate.

The two ends compute different functions, so the restoring loss is the task loss on labelled
training data (not the distance to A's outputs); the metric still shapes every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..params import Params, clone, norm, sub
from .base import Batch, Goal


class Connect(Goal):
    name = "connect"
    is_point_target = True
    landing_steps = 5

    def __init__(self, *args, end_params: Params, labels: Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.end_params = clone(end_params)
        self.labels = labels  # labels of anchor_inputs (task A's training split)

    @classmethod
    def _for_network(cls, model_fn, network, params, data, metric_kind, tolerance, **goal_kwargs):
        return cls(model_fn, params, data.train.x, {"A": data}, metric_kind, tolerance,
                   labels=data.train.y, **goal_kwargs)

    def direction_inputs(self, batch: Batch) -> tuple:
        return (self.end_params,)

    def direction_value(self, params: Params, end_params: Params) -> Params:
        return sub(end_params, params)  # v = w_B − w

    def restoring_inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return self.anchor_inputs[batch.anchor], self.labels[batch.anchor]

    def restoring_value(self, params: Params, inputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.model_fn(params, inputs), labels, reduction="sum")

    def restoring_value_and_kept(self, params: Params, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model_fn(params, inputs)
        return F.cross_entropy(out, labels, reduction="sum"), (out.argmax(-1) == labels).float().mean()

    def distance_inputs(self) -> tuple:
        return (self.end_params,)

    @torch.no_grad()
    def distance_value(self, params: Params, end_params: Params) -> Tensor:
        return norm(sub(end_params, params))

    def finish(self, params: Params) -> Params:
        return clone(self.end_params)  # snap exactly onto w_B
