"""Goals behind one interface (base.Goal): sparsify, new task, connect."""
from .base import Batch, Goal
from .connect import Connect
from .new_task import NewTask, memory_indices
from .sparsify import Sparsify

__all__ = ["Batch", "Goal", "Sparsify", "NewTask", "Connect", "memory_indices"]
