"""Start networks: trained by the engine from a seed, cached on disk by their settings."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import match_params, read_tensors, save_weights
from .config import ModelConfig, TrainConfig
from .data import Dataset
from .models import Network
from .params import Params, clone

CACHE_VERSION = 1


def cache_dir() -> Path:
    """$GEODESIC_CACHE, else ~/.cache/geodesic."""
    return Path(os.environ.get("GEODESIC_CACHE", Path.home() / ".cache" / "geodesic"))


def train(network: Network, params: Params, dataset: Dataset, config: TrainConfig, seed: int,
          progress: Callable[[float], None] | None = None) -> tuple[Params, dict]:
    """(trained params, BatchNorm buffers): Adam on cross-entropy, batches shuffled by `seed`."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.clone() for k, v in network.buffers.items()}
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)
    g = torch.Generator().manual_seed(seed)
    x, y = dataset.train.x, dataset.train.y
    network.module.train()
    reported = time.monotonic()
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(y), generator=g).to(y.device)
            for start in range(0, len(y), config.batch_size):
                index = order[start:start + config.batch_size]
                loss = F.cross_entropy(dataset.scored(network.apply(params, x[index], buffers)), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # within an epoch too, at most once a second: a ResNet-18's epoch takes most of a minute on a CPU
                if progress and time.monotonic() - reported > 1.0 and start + config.batch_size < len(y):
                    progress((epoch + (start + config.batch_size) / len(y)) / config.epochs)
                    reported = time.monotonic()
            if progress:
                progress((epoch + 1) / config.epochs)
                reported = time.monotonic()
    finally:
        network.module.eval()
    return clone(params), buffers


class PhaseClock:
    """What a build is doing ("training start network (seed 0)") and, once a phase has run a few seconds, about how
    long it has left, from its fraction done: a ResNet-18's start network trains for minutes on a laptop's CPU behind
    a bar that said nothing of how long (the dashboard's and the CLI's)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock, self.what, self.since, self.first = clock, None, 0.0, 0.0

    def text(self, what: str, fraction: float) -> str:
        now = self.clock()
        if what != self.what:  # from the fraction seen first: a page that joins a training under way sees it late
            self.what, self.since, self.first = what, now, fraction
        elapsed, done = now - self.since, fraction - self.first
        if elapsed <= 5 or done < 0.02 or fraction >= 1:
            return what
        left = elapsed * (1 - fraction) / done
        left_text = f"{max(left, 1):.0f} s" if left < 90 else f"{left / 60:.0f} min"
        cached = " (trained once, then cached for every walk that uses it)" if what.startswith("training") else ""
        return f"{what}: about {left_text} left{cached}"


def _cache_key(dataset_key: dict, model: ModelConfig, config: TrainConfig, seed: int) -> str:
    payload = {"data": dataset_key, "model": dataclasses.asdict(model), "train": dataclasses.asdict(config),
               "seed": seed, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def start_network(network: Network, dataset: Dataset, dataset_key: dict, model: ModelConfig, config: TrainConfig,
                  seed: int, progress: Callable[[float], None] | None = None) -> tuple[Params, dict]:
    """Trained (params, buffers) for these settings: read from the cache, or trained and cached.

    `dataset_key` identifies the data (config and task) so that different tasks never share an entry.
    """
    path = cache_dir() / f"start-{_cache_key(dataset_key, model, config, seed)}.safetensors"
    init = network.init_params(seed)
    device = next(iter(init.values())).device

    def cached() -> tuple[Params, dict] | None:
        if path.is_file():
            try:
                params, buffers = match_params(read_tensors(path), init, str(path), network.buffers)
                return {k: v.to(device) for k, v in params.items()}, buffers
            except Exception:
                path.unlink(missing_ok=True)  # a corrupt cache entry is retrained, never trusted
        return None

    found = cached()
    if found is not None:
        return found
    # A class opening the teacher's link asks for the same start network from many sessions at once: one trains
    # it, the others wait and read it from the cache (training the same network 30 times over would take the
    # server's cores for 30 times as long). Across processes the atomic write keeps the file whole.
    # The sessions that wait are shown the training's progress (their bar stood still at 0 for minutes).
    lock = _training_lock(path)
    while not lock.acquire(timeout=0.5):
        if progress:
            progress(_TRAINING_PROGRESS.get(path, 0.0))
    try:
        found = cached()
        if found is not None:
            return found

        def report(fraction: float) -> None:
            _TRAINING_PROGRESS[path] = fraction
            if progress:
                progress(fraction)

        params, buffers = train(network, init, dataset, config, seed, report)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(params, path, buffers)
    finally:
        _TRAINING_PROGRESS.pop(path, None)
        lock.release()
    return params, buffers


_TRAINING_LOCKS: dict[Path, threading.Lock] = {}
_TRAINING_PROGRESS: dict[Path, float] = {}  # fraction done of each start network being trained in this process
_TRAINING_LOCKS_GUARD = threading.Lock()


def _training_lock(path: Path) -> threading.Lock:
    """One lock per cache entry, for the life of the process (a few bytes per start network ever asked for)."""
    with _TRAINING_LOCKS_GUARD:
        return _TRAINING_LOCKS.setdefault(path, threading.Lock())
