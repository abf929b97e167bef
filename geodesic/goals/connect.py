"""Connect: walk from network A to network B, trained separately, keeping every point accurate.

The two ends compute different functions, so the restoring loss is the task loss on labelled
training data (not the distance to A's outputs); the metric still shapes every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError
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
    def _for_network(cls, model_fn, network, params, data, metric_kind, tolerance, end_params: Params,
                     **goal_kwargs):
        from ..checkpoint import match_params

        if not isinstance(end_params, dict):
            raise CheckpointError(f"end_params: expected a dict of tensors like the start's, "
                                  f"got {type(end_params).__name__}")
        end_params, _ = match_params(end_params, params, "end_params")  # names the first missing or misshapen
        return cls(model_fn, params, data.train.x, {"A": data}, metric_kind, tolerance,
                   labels=data.train.y, end_params=end_params, **goal_kwargs)

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
