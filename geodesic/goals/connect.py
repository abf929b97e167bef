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

    def direction(self, params: Params, batch: Batch) -> Params:
        return sub(self.end_params, params)  # v = w_B − w

    def restoring_loss(self, params: Params, batch: Batch) -> Tensor:
        index = batch.anchor
        return F.cross_entropy(self.model_fn(params, self.anchor_inputs[index]), self.labels[index], reduction="sum")

    @torch.no_grad()
    def distance(self, params: Params) -> float:
        return float(norm(sub(self.end_params, params)))

    def is_done(self, params: Params) -> bool:
        return self.distance(params) < self.tolerance

    def finish(self, params: Params) -> Params:
        return clone(self.end_params)  # snap exactly onto w_B
