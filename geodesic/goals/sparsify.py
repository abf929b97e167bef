"""Sparsify: walk toward the magnitude-pruned copy of the current weights (a moving target), keeping
the start network's outputs on the training inputs; project exactly once within tolerance."""
from __future__ import annotations

from ..measures import evaluate, magnitude_prune
from ..params import Params, norm, sub
from .base import Batch, Goal


class Sparsify(Goal):
    name = "sparsify"
    is_point_target = True

    def __init__(self, *args, prunable: tuple[str, ...], target_sparsity: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.prunable = prunable
        self.target_sparsity = target_sparsity

    @classmethod
    def _for_network(cls, model_fn, network, params, data, metric_kind, tolerance, **goal_kwargs):
        return cls(model_fn, params, data.train.x, {"A": data}, metric_kind, tolerance,
                   prunable=network.prunable, **goal_kwargs)

    def target(self, params: Params) -> Params:
        """w_sparse: the fraction s of smallest |w| among prunable weights set to zero, globally."""
        return magnitude_prune(params, self.prunable, self.target_sparsity)

    def direction(self, params: Params, batch: Batch) -> Params:
        return sub(self.target(params), params)  # v = w_sparse − w = −∇ ½‖w − w_sparse‖²

    def distance(self, params: Params) -> float:
        return float(norm(sub(self.target(params), params)))

    def is_done(self, params: Params) -> bool:
        return self.distance(params) < self.tolerance

    def finish(self, params: Params) -> Params:
        return self.target(params)

    def extra_measures(self, params: Params) -> dict[str, float]:
        """Test accuracy of the projection of w ("prune now"), per task."""
        pruned = self.target(params)
        return {f"prune_now_accuracy/{name}": evaluate(self.model_fn, pruned, task.test.x, task.test.y)[1]
                for name, task in self.tasks.items()}
