"""The small interface every goal implements. A goal says where the walk should go (v_goal = −∇h),
what pulls it back onto equivalent networks (the restoring loss R), where the metric is evaluated
(the probe), and when it has arrived. The step rules and the walker know nothing else about goals.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import Dataset
from ..measures import FUNCTION_DISTANCES, ModelFn
from ..params import Params


def _classes(target: Tensor) -> Tensor:
    """The class each row of `target` stands for: itself for labels, the largest entry for logits."""
    return target if target.dim() == 1 else target.argmax(-1)


def draw(generator: torch.Generator, n_available: int, n: int) -> Tensor:
    """n indices in [0, n_available), without replacement when possible."""
    if n >= n_available:
        return torch.randperm(n_available, generator=generator)
    return torch.randperm(n_available, generator=generator)[:n]


@dataclass
class Batch:
    """Indices drawn for one step: into the anchor inputs and, for new-task, into task B."""

    anchor: Tensor
    task_b: Tensor | None = None


class Goal:
    name: str = "goal"
    is_point_target: bool = False  # a weight vector to reach (the step shrinks near it, then snaps)
    landing_steps: int = 0  # constrained step: the restoring pull fades over this many steps from a fixed target

    def __init__(self, model_fn: ModelFn, anchor_params: Params, anchor_inputs: Tensor, tasks: dict[str, Dataset],
                 metric_kind: str, tolerance: float):
        self.model_fn = model_fn
        self.tasks = tasks
        self.anchor_inputs = anchor_inputs  # where the metric is evaluated and the function is kept
        self.function_distance = FUNCTION_DISTANCES[metric_kind]
        self.tolerance = tolerance
        with torch.no_grad():
            self.anchor_logits = model_fn(anchor_params, anchor_inputs)  # f(x; w0), frozen
        self.n_outputs = self.anchor_logits.shape[-1]

    @classmethod
    def for_network(cls, network, params: Params, data: Dataset, metric_kind: str = "fisher",
                    tolerance: float = 0.01, **goal_kwargs) -> Goal:
        """The goal for `network` starting at `params`, anchored on `data`'s training inputs (Python API).

        Settings are checked as the CLI checks them, and the network against `data` (models.check_fits): a
        mismatch is a ConfigError, DataError or CheckpointError saying what to change, raised here."""
        from ..config import METRICS, GoalConfig
        from ..errors import ConfigError
        from ..models import NetworkFunction, check_fits

        if metric_kind not in METRICS:
            raise ConfigError("metric_kind", metric_kind, ", ".join(METRICS))
        checked = {k: v for k, v in goal_kwargs.items() if k in ("target_sparsity", "memory_size")}
        GoalConfig(kind=cls.name, tolerance=tolerance, **checked)
        check_fits(network, params, data)
        model_fn = NetworkFunction(network, network.buffers, head=data.head)  # the function kept: data's
        return cls._for_network(model_fn, network, params, data, metric_kind, tolerance, **goal_kwargs)

    @classmethod
    def _for_network(cls, model_fn, network, params, data, metric_kind, tolerance, **goal_kwargs):
        return cls(model_fn, params, data.train.x, {"A": data}, metric_kind, tolerance, **goal_kwargs)

    # -- drawing data ------------------------------------------------------------------------------
    def sample(self, generator: torch.Generator, batch_size: int) -> Batch:
        return Batch(draw(generator, len(self.anchor_inputs), batch_size).to(self.anchor_inputs.device))

    def probe(self, generator: torch.Generator, n: int) -> Tensor:
        return self.anchor_inputs[draw(generator, len(self.anchor_inputs), n).to(self.anchor_inputs.device)]

    # -- what the step rules use ------------------------------------------------------------------------
    # Each quantity is split into the tensors this walk draws or holds (`*_inputs`, per walk) and a pure
    # function of the weights and those tensors (`*_value`: no Python numbers out, no in-place writes), so one
    # walk calls it directly and a batch of walks calls it under torch.func.vmap over stacked weights (batch.py).
    def direction(self, params: Params, batch: Batch) -> Params:
        """v_goal = −∇h(w): the direction the goal alone wants."""
        return self.direction_value(params, *self.direction_inputs(batch))

    def direction_inputs(self, batch: Batch) -> tuple:
        return ()

    def direction_value(self, params: Params, *inputs) -> Params:
        raise NotImplementedError

    def restoring_loss(self, params: Params, batch: Batch) -> Tensor:
        """R(w): Σ over the batch of D(f(x; w), f(x; w0)), the distance to the start network's outputs."""
        return self.restoring_value(params, *self.restoring_inputs(batch))

    def restoring_inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(inputs, what their outputs are compared with)."""
        return self.anchor_inputs[batch.anchor], self.anchor_logits[batch.anchor]

    def restoring_value(self, params: Params, inputs: Tensor, target: Tensor) -> Tensor:
        return self.function_distance(self.model_fn(params, inputs), target).sum()

    def restoring_value_and_kept(self, params: Params, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(R, the fraction of the batch on which the network still gives the class it is kept to: the start
        network's here, the label for connect). One forward pass for both; the adaptive step size reads the
        second (adaptive.py)."""
        out = self.model_fn(params, inputs)
        return self.function_distance(out, target).sum(), (out.argmax(-1) == _classes(target)).float().mean()

    # -- progress ---------------------------------------------------------------------------------------
    def distance(self, params: Params) -> float:
        """How far the goal still is (‖w − target‖, or the new task's loss)."""
        return float(self.distance_value(params, *self.distance_inputs()))

    def distance_inputs(self) -> tuple:
        return ()

    def distance_value(self, params: Params, *inputs) -> Tensor:
        raise NotImplementedError

    def is_done(self, params: Params) -> bool:
        return self.is_done_at(self.distance(params))

    def is_done_at(self, distance: float) -> bool:
        """Whether a point at this distance from the goal has arrived (never, for goals without a point target)."""
        return self.is_point_target and distance < self.tolerance

    def finish(self, params: Params) -> Params:
        """The point the walk ends on once done (projected or snapped); `params` by default."""
        return params

    def extra_measures(self, params: Params) -> dict[str, float]:
        """Goal-specific numbers recorded at every step (e.g. prune-now accuracy)."""
        return {k: float(v) for k, v in self.extra_value(params, *self.extra_inputs()).items()}

    def extra_inputs(self) -> tuple:
        return ()

    def progress_value(self, params: Params, distance_inputs: tuple, extra_inputs: tuple
                       ) -> tuple[Tensor, dict[str, Tensor]]:
        """(distance to the goal, the goal's own measures) of a point, in one call so that a goal can share
        work between the two (sparsify prunes once for both)."""
        return self.distance_value(params, *distance_inputs), self.extra_value(params, *extra_inputs)

    def extra_value(self, params: Params, *inputs) -> dict[str, Tensor]:
        return {}
