"""From settings to a ready walker: data, tasks, network, trained start network(s), goal.

This is the one place that turns a RunConfig into objects; the CLI, the app and the benchmark all
call `build`. Researchers with their own network and tensors build a Walker directly (README).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoint import match_params
from .config import RunConfig
from .data import Dataset, load_dataset, task_pair
from .errors import ConfigError
from .goals import Connect, Goal, NewTask, Sparsify, memory_indices
from .models import Network, NetworkFunction, build_network
from .params import Params
from .training import start_network
from .walker import Walker

Progress = Callable[[str, float], None]  # (what is happening, fraction done)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; an unavailable device is an error."""
    from .errors import ConfigError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "auto or cpu (no CUDA GPU is visible to PyTorch here)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", name, "auto or cpu (Apple's MPS is not available here)")
    return torch.device(name)


@dataclass
class Experiment:
    config: RunConfig
    device: torch.device
    network: Network
    tasks: dict[str, Dataset]  # "A" (the start network's task) and, for new-task, "B"
    start: Params
    end: Params | None  # connect: network B
    goal: Goal
    walker: Walker
    buffers: dict  # BatchNorm statistics shared by the goal and the walker


def check_probe(config: RunConfig, task_a: Dataset) -> None:
    """The probe is drawn from the inputs the walk keeps the function on (task A's training set; for a new task,
    its memory of task A), without replacement: a larger probe was quietly cut to all of them while the settings
    showed the larger number. Refused (ConfigError) before a network is trained; a sweep checks every cell so."""
    if config.goal.kind == "new-task":
        pool, where = len(memory_indices(task_a, config.goal.memory_size, config.seed)), "the memory of task A"
    else:
        pool, where = len(task_a.train), f"{config.data.name}'s training set"
    if config.walk.probe_size > pool:
        raise ConfigError("probe-size", config.walk.probe_size,
                          f"at most {pool:,} (the inputs of {where}, which the probe is drawn from)")


def _tasks(config: RunConfig, device: torch.device) -> dict[str, Dataset]:
    """The walk's tasks on `device` ("A", and "B" for a new task), its probe checked against them."""
    dataset = load_dataset(config.data)
    if config.goal.kind == "new-task":
        task_a, task_b = task_pair(dataset, config.goal.new_task, config.seed, config.data)
        tasks = {"A": task_a.to(device), "B": task_b.to(device)}
    else:
        tasks = {"A": dataset.to(device)}
    check_probe(config, tasks["A"])
    return tasks


def preflight(config: RunConfig, start_tensors: dict | None = None, start_source: str = "start weights") -> None:
    """Refuse what `build` would refuse before it trains anything (a device not here, data missing or unreadable, a
    probe larger than its inputs, start weights that do not fit the model) without training: ConfigError,
    DataError or CheckpointError. The app asks it before it asks to close the walks on screen for a new walk, so
    that a setting it then refuses has not cost a question."""
    resolve_device(config.device)
    tasks = _tasks(config, torch.device("cpu"))
    if start_tensors is not None:
        network = build_network(config.model, tasks["A"].input_shape, tasks["A"].n_classes)
        match_params(start_tensors, network.init_params(config.seed), start_source, network.buffers)


def build(config: RunConfig, progress: Progress | None = None, start_tensors: dict | None = None,
          start_source: str = "start weights") -> Experiment:
    """Everything a walk needs. Start networks come from the cache or are trained (reported to `progress`).

    `start_tensors`: weights to start from instead of a trained network (read with checkpoint.read_tensors,
    e.g. --init, an upload, a saved run); they are checked against the model before anything is trained,
    and a mismatch raises CheckpointError naming `start_source` and the first bad tensor.
    """
    report = progress or (lambda what, frac: None)
    device = resolve_device(config.device)
    report("loading data", 0.0)
    tasks = _tasks(config, device)
    goal_cfg = config.goal
    network = build_network(config.model, tasks["A"].input_shape, tasks["A"].n_classes).to(device)
    data_key = {**dataclasses.asdict(config.data), "task": tasks["A"].name}
    data_key.pop("root"), data_key.pop("download")

    def trained(seed: int, label: str) -> tuple[Params, dict]:
        return start_network(network, tasks["A"], data_key, config.model, config.train, seed,
                             progress=lambda frac: report(f"training {label} (seed {seed})", frac))

    buffers = dict(network.buffers)
    start = None
    if start_tensors is not None:
        device_init = {k: v.to(device) for k, v in network.init_params(config.seed).items()}
        start, start_buffers = match_params(start_tensors, device_init, start_source, network.buffers)
        buffers.update(start_buffers)
    if start is None:
        start, start_buffers = trained(config.seed, "start network")
        buffers.update(start_buffers)
    end = None

    model_fn = NetworkFunction(network, buffers, head=tasks["A"].head)  # the function the walk keeps: task A's

    train_a = tasks["A"].train
    common = dict(metric_kind=config.walk.metric, tolerance=goal_cfg.tolerance, tasks=tasks)
    if goal_cfg.kind == "sparsify":
        goal: Goal = Sparsify(model_fn, start, train_a.x, prunable=network.prunable,
                              target_sparsity=goal_cfg.target_sparsity, **common)
    elif goal_cfg.kind == "new-task":
        memory = train_a.x[memory_indices(tasks["A"], goal_cfg.memory_size, config.seed).to(device)]
        goal = NewTask(model_fn, start, memory, task_b=tasks["B"], **common)
    else:
        end, _ = trained(config.seed + 1, "second network")
        goal = Connect(model_fn, start, train_a.x, end_params=end, labels=train_a.y, **common)
    report("ready", 1.0)
    walker = Walker(network, start, goal, config.walk, tasks, seed=config.seed, buffers=buffers,
                    bn_inputs=train_a.x[:1024] if network.has_batchnorm else None)
    return Experiment(config, device, network, tasks, start, end, goal, walker, buffers)
