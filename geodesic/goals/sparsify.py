"""Sparsify: walk toward the magnitude-pruned copy of the current weights (a moving target), keeping
the start network's outputs on the training inputs; project exactly once within tolerance."""
from __future__ import annotations

from torch import Tensor

from ..measures import accuracy, magnitude_prune
from ..params import Params, norm, sub
from .base import Goal


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

    def direction_value(self, params: Params) -> Params:
        return sub(self.target(params), params)  # v = w_sparse − w = −∇ ½‖w − w_sparse‖²

    def distance_value(self, params: Params) -> Tensor:
        return norm(sub(self.target(params), params))

    def finish(self, params: Params) -> Params:
        return self.target(params)

    def progress_value(self, params: Params, distance_inputs: tuple, extra_inputs: tuple
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        pruned = self.target(params)  # one global top-k for both
        return norm(sub(pruned, params)), self.extra_value(params, *extra_inputs, pruned=pruned)

    def extra_inputs(self) -> tuple:
        return tuple(t for task in self.tasks.values() for t in (task.test.x, task.test.y))

    def extra_value(self, params: Params, *test_sets: Tensor, pruned: Params | None = None) -> dict[str, Tensor]:
        """Test accuracy of the projection of w ("prune now"), per task (test_sets: x, y of each task in turn)."""
        pruned = self.target(params) if pruned is None else pruned
        return {f"prune_now_accuracy/{name}": accuracy(self.model_fn, pruned, test_sets[2 * i], test_sets[2 * i + 1])
                for i, name in enumerate(self.tasks)}
