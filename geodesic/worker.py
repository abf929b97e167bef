"""The goal's baselines computed in a process of their own, beside a server's engine.

Why a process and not a thread: every torch op releases Python's GIL and takes it back, so a thread fine-tuning a
network beside the engine takes the GIL from the engine's thread after each of its ops, whatever its CPU priority
(a thread at a low priority can even hold the GIL while the OS keeps it waiting). Measured in Chromium on this
2-core machine (bench/dashboard_speed.py, the sparsify penalty walk, which the page opens and runs at once): the
walk played 220-224 steps/s while its page's baselines were computed on a thread beside it, 250 with no baselines,
with the server at the same 0.86-0.89 core in both: the baselines' work displaced the engine's instead of using the
idle core. In a process of their own at a lower priority they use what the walks leave.

The process is started once (spawned, not forked: the server has threads) and kept; jobs carry only what
goal_baselines needs (settings, weights, data: plain tensors on the CPU). A caller that stops wanting a result
(its page moved on) stops the job in the process; a process that dies (out of memory) is reported to the callers
of the jobs it had and replaced for the next ones.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch

from .config import RunConfig
from .errors import Cancelled, GeodesicError

_STOP_ALL = -1


@dataclass
class _Job:
    """What goal_baselines reads from an experiment, as plain CPU tensors (picklable)."""

    config: RunConfig
    device: str  # the experiment's own (its config may say "auto")
    input_shape: tuple[int, ...]
    n_classes: int
    start: dict
    end: dict | None
    buffers: dict
    tasks: dict

    @property
    def nbytes(self) -> int:
        tensors = [*self.start.values(), *(self.end or {}).values(), *self.buffers.values()]
        for task in self.tasks.values():
            tensors += [task.train.x, task.train.y, task.test.x, task.test.y]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def of(cls, experiment) -> _Job:
        def cpu(tensors):
            return None if tensors is None else {k: v.detach().cpu() for k, v in tensors.items()}

        tasks = {name: _task_on(task, torch.device("cpu")) for name, task in experiment.tasks.items()}
        network = experiment.network
        return cls(experiment.config, str(experiment.device), tuple(network.input_shape), network.n_classes,
                   cpu(experiment.start), cpu(experiment.end), cpu(experiment.walker.buffers), tasks)


def _task_on(task, device: torch.device):
    from dataclasses import replace

    def split_on(split):
        return replace(split, x=split.x.to(device), y=split.y.to(device))

    return replace(task, train=split_on(task.train), test=split_on(task.test))


@dataclass
class _JobExperiment:
    """The parts of an Experiment that goal_baselines uses, rebuilt in the worker process."""

    config: RunConfig
    tasks: dict
    start: dict
    end: dict | None
    network: object
    walker: None = None


# In the worker process: the id of the job its parent wants stopped (or _STOP_ALL), shared with the parent.
_STOP: multiprocessing.Value | None = None


def _worker_init(stop, threads: int, niceness: int) -> None:
    global _STOP
    _STOP = stop
    try:
        os.nice(niceness)  # the whole process: the server's engine goes first
    except (AttributeError, OSError):
        pass
    torch.set_num_threads(threads)
    from . import _quiet  # noqa: F401  (the same warnings filtered as in the server)


def _ready() -> bool:
    from . import analysis  # noqa: F401  (imports torch.optim, scikit-learn: before the first job, not in it)

    return True


def _run(job_id: int, job: _Job) -> dict:
    from .analysis import goal_baselines
    from .models import NetworkFunction, build_network

    device = torch.device(job.device)
    network = build_network(job.config.model, job.input_shape, job.n_classes).to(device)

    def on_device(tensors):
        return None if tensors is None else {k: v.to(device) for k, v in tensors.items()}

    experiment = _JobExperiment(job.config, {n: _task_on(t, device) for n, t in job.tasks.items()},
                                on_device(job.start), on_device(job.end), network)
    model_fn = NetworkFunction(network, on_device(job.buffers))
    return goal_baselines(experiment, model_fn=model_fn,
                          should_stop=lambda: _STOP is not None and _STOP.value in (job_id, _STOP_ALL))


class AnalysisProcess:
    """One worker process for the goal's baselines (started on first use, or by `start()`); thread-safe."""

    def __init__(self, threads: int = 1, niceness: int = 10, max_bytes: int = 256 * 2**20):
        self.threads, self.niceness, self.max_bytes = threads, niceness, max_bytes
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Value("q", 0)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._ids = itertools.count(1)

    def start(self) -> Future:
        """Start the process now (it imports PyTorch: a few seconds); a future that is done when it is ready."""
        return self._executor().submit(_ready)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._stop.value = 0
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=self._context, initializer=_worker_init,
                                                 initargs=(self._stop, self.threads, self.niceness))
            return self._pool

    def goal_baselines(self, experiment, should_stop: Callable[[], bool] | None = None) -> dict:
        """analysis.goal_baselines of `experiment`, computed in the worker process (the experiment's own network
        is not touched). should_stop is asked every 0.1 s; True stops the job and raises Cancelled. Data and
        weights over `max_bytes` (a large torchvision set) are not copied to the process: the baselines are then
        computed on the calling thread (analysis.goal_baselines_apart), as before the process existed."""
        job = _Job.of(experiment)
        if job.nbytes > self.max_bytes:
            from .analysis import goal_baselines_apart

            return goal_baselines_apart(experiment, should_stop=should_stop)
        job_id = next(self._ids)
        pool = self._executor()
        try:
            future = pool.submit(_run, job_id, job)
        except BrokenProcessPool:
            pool = self._replace(pool)
            future = pool.submit(_run, job_id, job)
        while True:
            try:
                return future.result(timeout=0.1)
            except TimeoutError:
                if should_stop is not None and should_stop():
                    if not future.cancel():  # running: the worker stops it at its next fine-tuning step
                        self._stop.value = job_id
                    raise Cancelled("no longer wanted") from None
            except BrokenProcessPool as err:
                self._replace(pool)
                raise GeodesicError("the process computing the baselines stopped (out of memory?); the walk is "
                                    "not affected, and the next walk's baselines start a new one") from err

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)
        return self._executor()

    def shutdown(self) -> None:
        """Stop the running job and the process, dropping queued jobs (a server stopping)."""
        self._stop.value = _STOP_ALL
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_PROCESS: AnalysisProcess | None = None
_PROCESS_LOCK = threading.Lock()


def analysis_process() -> AnalysisProcess:
    """The process's one AnalysisProcess (created on first use)."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None:
            _PROCESS = AnalysisProcess()
        return _PROCESS


def shared_goal_baselines_in_process(experiment, should_stop: Callable[[], bool] | None = None) -> dict:
    """What the dashboard shows beside a walk: the goal's baselines computed in the analysis process, once for
    all the pages that open the same walk (analysis.SharedResults); each caller gets its own copy."""
    from .analysis import shared_goal_baselines_apart

    return shared_goal_baselines_apart(experiment, should_stop, compute=analysis_process().goal_baselines)


def shutdown_analysis_process() -> None:
    """Stop the analysis process if one was started (a server stopping); nothing otherwise."""
    with _PROCESS_LOCK:
        process = _PROCESS
    if process is not None:
        process.shutdown()
