"""New task (continual learning): learn task B while keeping the start network's outputs on a memory
of task-A inputs. The metric and the anchor both live on that memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad

from ..data import Dataset
from ..errors import DataError
from ..measures import scored_on
from ..params import Params, scale
from .base import Batch, Goal, draw


class NewTask(Goal):
    name = "new-task"

    def __init__(self, *args, task_b: Dataset, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_b = task_b
        self._monitor = torch.arange(min(500, len(task_b.train)), device=task_b.train.y.device)

    @classmethod
    def _for_network(cls, model_fn, network, params, data, metric_kind, tolerance, task_b: Dataset,
                     memory_size: int = 500, seed: int = 0):
        from ..models import check_fits

        if not isinstance(task_b, Dataset):
            raise DataError(f"task_b: expected a Dataset (from_tensors(...)), got {type(task_b).__name__}")
        check_fits(network, params, task_b, role="task_b")
        memory = data.train.x[memory_indices(data, memory_size, seed).to(data.train.x.device)]
        return cls(model_fn, params, memory, {"A": data, "B": task_b}, metric_kind, tolerance, task_b=task_b)

    def sample(self, generator: torch.Generator, batch_size: int) -> Batch:
        batch = super().sample(generator, batch_size)
        batch.task_b = draw(generator, len(self.task_b.train), batch_size).to(self.task_b.train.y.device)
        return batch

    def task_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """h(w): mean task-B cross-entropy on the given examples."""
        return F.cross_entropy(scored_on(self.model_fn, self.task_b)(params, x), y)

    def direction_inputs(self, batch: Batch) -> tuple:
        split = self.task_b.train
        return split.x[batch.task_b], split.y[batch.task_b]

    def direction_value(self, params: Params, x: Tensor, y: Tensor) -> Params:
        return scale(grad(self.task_loss)(params, x, y), -1.0)

    def distance_inputs(self) -> tuple:
        """Task-B training loss on a fixed subset (a training split: the test split stays unseen)."""
        split = self.task_b.train
        return split.x[self._monitor], split.y[self._monitor]

    @torch.no_grad()
    def distance_value(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.task_loss(params, x, y)


def memory_indices(task_a: Dataset, memory_size: int, seed: int) -> Tensor:
    """A seeded, class-balanced memory of task-A training examples (at most memory_size of them)."""
    g = torch.Generator().manual_seed(20_000 + seed)
    labels = task_a.train.y.cpu()
    classes = labels.unique()
    per_class = max(memory_size // len(classes), 1)
    chosen = []
    for c in classes:
        members = (labels == c).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(chosen)[:memory_size]
