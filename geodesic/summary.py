"""The numbers a finished (or paused) walk is judged by: summary.json's contents."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from .baselines import barrier, straight_line
from .config import SCENARIOS
from .experiment import Experiment
from .version import versions

LOST_POINTS = 5.0  # a walk whose accuracy fell more than this many points below its start did not keep the function
CONNECTED_POINTS = 2.0  # two networks count as connected by a path whose error barrier is below this (method.md §5)


def function_lost(start: float, lowest: float) -> bool:
    """Whether a walk whose test accuracy started at `start` and fell to `lowest` (fractions) lost what the network
    computed on the way, reached or not (the app and the CLI say so: e.g. ε = 1000 lands on one-shot pruning)."""
    return start - lowest > LOST_POINTS / 100


def outcome_rank(start: float, lowest: float, end: float, reached: bool, steps: int,
                 end_b: float | None = None) -> tuple:
    """The order in which walks are best (the larger the better): kept the function, then reached the goal, then
    for a new task the average end accuracy over both tasks (end_b: task B's; continual learning's usual measure, so
    a walk that kept A by not learning B is not the best), then the most accuracy kept along the path, then at the
    end, then the fewest steps. The sweep report's best cell and the dashboard's fan both rank by it."""
    average = 0.0 if end_b is None else (end + end_b) / 2
    return not function_lost(start, lowest), bool(reached), average, lowest, end, -steps


def connect_barriers(accuracy: Sequence[float], loss: Sequence[float], line: Mapping | None = None) -> dict:
    """A connect walk's error and loss barriers (accuracies as fractions along its path, start to end) and, given
    the straight line's 'accuracy' and 'loss' on its α grid, the line's: what summary.json holds, and what the
    dashboard shows under the walk against the straight line."""
    out = {"error_barrier": barrier([1 - a for a in accuracy]), "loss_barrier": barrier(loss)}
    if line is not None:
        out.update(linear_error_barrier=barrier([1 - a for a in line["accuracy"]]),
                   linear_loss_barrier=barrier(line["loss"]), linear_min_test_accuracy=float(min(line["accuracy"])))
    return out


def connected(error_barrier: float) -> bool:
    """Whether a path with this error barrier (a fraction) connects its two ends (method.md §5)."""
    return error_barrier < CONNECTED_POINTS / 100


def summarize(experiment: Experiment, wall_seconds: float, stop_at: int | None = None) -> dict:
    """start/end accuracy and sparsity, the lowest accuracy along the path, and for connect the
    error and loss barriers of the walk beside those of the straight line (21-point α grid). stop_at: the step
    the run was walking to (default: its walk's n_steps; a resumed run's is its own)."""
    cfg, walker = experiment.config, experiment.walker
    record = walker.record
    first, last = record[0], record.last

    def point(p) -> dict:
        return {"test_accuracy": dict(p.accuracy), "test_loss": dict(p.loss), "sparsity": p.sparsity,
                "zero_weights": walker.zeros_at(p),
                **({"prune_now_accuracy": {k.split("/", 1)[1]: v for k, v in p.extra.items()}} if p.extra else {})}

    summary = {
        "goal": cfg.goal.kind, "dataset": cfg.data.name, "model": cfg.model.name, "solver": cfg.walk.solver,
        "new_task": cfg.goal.new_task if cfg.goal.kind == "new-task" else None,
        "scenario": SCENARIOS[cfg.goal.new_task] if cfg.goal.kind == "new-task" else None,
        "target_sparsity": cfg.goal.target_sparsity if cfg.goal.kind == "sparsify" else None,
        "seed": cfg.seed, "device": str(experiment.device), "steps": last.step,
        "reached_goal": walker.stop_reason == "goal reached", "stop_reason": _stop_reason(walker, stop_at),
        "wall_seconds": wall_seconds, "step_seconds_mean": (
            sum(p.step_seconds for p in record.points[1:]) / max(len(record) - 1, 1)),
        "start": point(first), "end": point(last), "min_test_accuracy": record.min_accuracy(),
        "euclidean_length": last.euclidean_length, "functional_length": last.functional_length,
        "prunable_weights": walker.n_prunable,  # zeros and non-zeros, not latency: masks give no speed-up (method.md)
        "versions": versions(),  # which code and which PyTorch walked it (version.py)
    }
    if cfg.goal.kind == "connect":
        line = straight_line(walker.model_fn, experiment.start, experiment.end, experiment.tasks["A"], n_points=21)
        summary.update(connect_barriers([p.accuracy["A"] for p in record.points],
                                        [p.loss["A"] for p in record.points], line))
    return summary


def _stop_reason(walker, stop_at: int | None = None) -> str:
    """Why the walk ended: the walker's own reason (goal reached, diverged ...) or, for a walk that is not done,
    its step limit or that it was stopped before it (interrupted, paused and saved)."""
    if walker.stop_reason:
        return walker.stop_reason
    stop_at = walker.config.n_steps if stop_at is None else stop_at
    if walker.n_steps >= stop_at:
        return f"step limit ({stop_at} steps)"
    return f"stopped at step {walker.n_steps} of {stop_at}"
