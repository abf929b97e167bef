"""Records of a walk: one PathPoint per step (method.md §6), an append-only PathRecord, and the
weights along the path for projections and branching."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .params import Params, flatten


@dataclass(frozen=True)
class PathPoint:
    """Everything recorded at one point of a path. Step 0 is the start network."""

    step: int
    step_size: float  # ε in force for this step
    goal_weight: float  # β or λ in force for this step
    step_norm: float  # ‖θ‖
    functional_step: float  # θᵀgθ on the step's probe
    euclidean_length: float  # Σ‖θ‖ so far
    functional_length: float  # Σ√(θᵀgθ) so far
    drift: float  # mean D(f_w, f_w0) on a fixed held-out probe
    alignment: float  # cos(θ, v_goal)
    loss: dict[str, float]  # test cross-entropy per task
    accuracy: dict[str, float]  # test accuracy per task, in [0, 1]
    sparsity: float  # exact zeros among prunable weights
    goal_distance: float  # ‖w − target‖, or the new task's training loss
    step_seconds: float  # wall time of the step rule
    extra: dict[str, float] = field(default_factory=dict)  # goal-specific, e.g. prune_now_accuracy/A
    event: str = ""  # "start", "step size 0.1 -> 0.05", "projected", "snapped", "branched from 12", ...
    restoring_weight: float = float("nan")  # ρ in force for this step (constrained walk; the adaptive step moves it)

    def to_row(self) -> dict[str, float | int | str]:
        """A flat row: dicts become columns such as 'accuracy/A'."""
        row = {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, dict)}
        for name in ("loss", "accuracy"):
            row.update({f"{name}/{task}": value for task, value in getattr(self, name).items()})
        row.update(self.extra)
        return row

    @classmethod
    def from_row(cls, row: dict) -> PathPoint:
        plain = {f.name: row[f.name] for f in dataclasses.fields(cls) if f.name in row}
        grouped: dict[str, dict[str, float]] = {"loss": {}, "accuracy": {}, "extra": {}}
        for key, value in row.items():
            if "/" in key and not (isinstance(value, float) and np.isnan(value)):
                head, task = key.split("/", 1)
                target = grouped[head] if head in ("loss", "accuracy") else grouped["extra"]
                target[task if head in ("loss", "accuracy") else key] = float(value)
        plain["step"] = int(plain["step"])
        plain["event"] = plain.get("event") or ""
        return cls(**plain, **grouped)


# Memory for one walk's weights along its path. Every step's weights were kept: a digits MLP walk grew by 11 MB
# a second (108 KB a step at 100 steps/s), so a class of walks on one server would take tens of GB within the hour.
def _trace_mb(raw: str | None) -> float:
    """GEODESIC_TRACE_MB as a number of MB > 0; a bad value is named once on stderr and the default used."""
    if raw is None or raw == "":
        return 128.0
    try:
        value = float(raw)
        if value > 0 and math.isfinite(value):
            return value
    except ValueError:
        pass
    print(f"geodesic: GEODESIC_TRACE_MB={raw!r} is not a number of MB > 0; 128 is used", file=sys.stderr)
    return 128.0


TRACE_MB = _trace_mb(os.environ.get("GEODESIC_TRACE_MB"))


class WeightTrace:
    """The weights of recorded points, as float32 rows (for PCA/UMAP, the examples heat map and exact branching),
    within a memory budget (`max_mb`, default GEODESIC_TRACE_MB = 128 per walk).

    Every point is kept until the budget is full. Then a long path keeps the points whose index is a multiple of
    `stride` (a power of two, doubled whenever the budget fills again) and every point of the last `recent` ones,
    so a walk can always be rewound exactly to any recent step and to regularly spaced older ones. `kept()` lists
    them; `row(i)` raises KeyError for a point whose weights were let go.

    Models up to `max_dims` parameters are kept exactly. Larger ones keep a count sketch (each weight added with a
    random sign into one of `max_dims` buckets): inner products and distances between points are preserved in
    expectation, which is what a PCA of the path needs, but exact branching then needs a saved checkpoint.

    Appended by the engine's thread while pages read it: every access holds a lock.
    """

    def __init__(self, n_params: int, max_dims: int = 131_072, seed: int = 0, max_mb: float | None = None):
        self.n_params = n_params
        self.is_exact = n_params <= max_dims
        self.dims = n_params if self.is_exact else max_dims
        self.max_rows = max(64, int((TRACE_MB if max_mb is None else max_mb) * 2**20 // (4 * self.dims)))
        self.recent = self.max_rows // 4
        self.stride = 1
        self.n = 0  # points appended (kept or not)
        self._rows: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        if not self.is_exact:
            g = torch.Generator().manual_seed(seed)
            self._bucket = torch.randint(0, max_dims, (n_params,), generator=g)
            self._sign = torch.randint(0, 2, (n_params,), generator=g).float() * 2 - 1

    def __len__(self) -> int:
        return self.n

    def vector(self, params: Params) -> np.ndarray:
        flat = flatten(params).detach().float().cpu()
        if self.is_exact:
            return flat.numpy().copy()
        return torch.zeros(self.dims).index_add_(0, self._bucket, flat * self._sign).numpy()

    def append(self, params: Params, row: np.ndarray | None = None) -> None:
        """Record `params` as the next point (row: their exact float32 vector, when the caller has it already)."""
        row = self.vector(params) if row is None or not self.is_exact else row
        with self._lock:
            self._rows[self.n] = row
            self.n += 1
            self._thin()

    def _thin(self) -> None:
        leaving = self.n - 1 - self.recent  # the point that has just left the recent window
        if leaving > 0 and leaving % self.stride:
            self._rows.pop(leaving, None)
        while len(self._rows) > self.max_rows:  # once per doubling while walking; more after restore()
            self.stride *= 2
            old = self.n - self.recent
            for i in [i for i in self._rows if i < old and i % self.stride]:
                del self._rows[i]

    def kept(self, until: int | None = None) -> list[int]:
        """Indices of the points whose weights are kept (below `until`), in order."""
        with self._lock:
            return sorted(i for i in self._rows if until is None or i < until)

    def row(self, index: int) -> np.ndarray:
        with self._lock:
            return self._rows[index]

    def rows(self, indices: list[int]) -> np.ndarray:
        """The kept rows of these points, stacked (KeyError for one let go)."""
        with self._lock:
            return np.stack([self._rows[i] for i in indices]) if indices else np.zeros((0, self.dims), np.float32)

    def matrix(self, until: int | None = None) -> tuple[list[int], np.ndarray]:
        """(indices, rows) of every kept point below `until`."""
        with self._lock:
            indices = sorted(i for i in self._rows if until is None or i < until)
            rows = np.stack([self._rows[i] for i in indices]) if indices else np.zeros((0, self.dims), np.float32)
        return indices, rows

    def nearest(self, index: int) -> list[int]:
        """The kept points nearest `index` on either side (for a message naming where one can branch)."""
        kept = self.kept()
        before = [i for i in kept if i <= index][-1:]
        after = [i for i in kept if i > index][:1]
        return before + after

    def head(self, n_points: int) -> WeightTrace:
        """A copy holding the first `n_points` points (a branch's history: the rows are shared, never written)."""
        out = WeightTrace.__new__(WeightTrace)
        with self._lock:  # n, stride and the rows of one moment (the engine may be appending)
            out.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_rows", "_lock")})
            out._rows = {i: r for i, r in self._rows.items() if i < n_points}
        out.n, out._lock = min(n_points, out.n), threading.Lock()
        return out

    def restore(self, indices: list[int], rows: np.ndarray, n_points: int) -> None:
        """Put back rows read from a saved run (points `indices` of a path of `n_points`)."""
        with self._lock:
            self._rows = {int(i): r for i, r in zip(indices, rows, strict=True) if i < n_points}
            self.n = n_points
            spacing = np.diff(sorted(self._rows)) if len(self._rows) > 1 else np.ones(1)
            self.stride = max(1, int(spacing.max())) if len(spacing) else 1
            self.stride = 1 << (self.stride - 1).bit_length()  # a power of two, as _thin makes it
            self._thin()  # a run saved with a larger budget, or before paths were thinned


def distinct_rows(traces: list[tuple[WeightTrace, int]]) -> np.ndarray:
    """The kept rows of several walks' traces (each with the number of its points to read), every row once: a
    branch's history is its parent's rows, shared (WeightTrace.head), and counting them once per branch would
    weigh a fan's common stem K times in a fit (the path's PCA basis over every walk on the charts)."""
    seen: set[int] = set()
    rows = []
    for trace, until in traces:
        with trace._lock:  # the engine may be appending
            for i in sorted(trace._rows):
                row = trace._rows[i]
                if i < until and id(row) not in seen:
                    seen.add(id(row))
                    rows.append(row)
    dims = traces[0][0].dims if traces else 0
    return np.stack(rows) if rows else np.zeros((0, dims), np.float32)


class PathRecord:
    """Append-only list of PathPoints with a table view; saves to Parquet and loads back."""

    def __init__(self, points: list[PathPoint] | None = None):
        self.points: list[PathPoint] = list(points or [])
        self._frame: pd.DataFrame | None = None  # the table of the first len(self._frame) points, built once
        self._frame_lock = threading.Lock()
        self._lowest: dict[str, tuple[int, float]] = {}  # task -> (points looked at, lowest accuracy among them)

    def append(self, point: PathPoint) -> None:
        self.points.append(point)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> PathPoint:
        return self.points[i]

    @property
    def last(self) -> PathPoint:
        return self.points[-1]

    def to_frame(self) -> pd.DataFrame:
        """The table, one row per point (a copy: the caller may change it). Points are appended, never changed, so
        only the rows added since the last call are built: a page that reads the table of a running walk a few
        times a second no longer rebuilds it from every point (the cost grew with the path, and it held the GIL
        the engine needs: 32 sessions on one H200 server lost ~40% of their steps to it)."""
        with self._frame_lock:
            points = self.points[:]  # the engine may append meanwhile
            done = 0 if self._frame is None else len(self._frame)
            if done > len(points):  # never for an append-only list; rebuild rather than trust it
                self._frame, done = None, 0
            if done < len(points) or self._frame is None:
                new = pd.DataFrame([p.to_row() for p in points[done:]])
                self._frame = new if self._frame is None or done == 0 else pd.concat([self._frame, new],
                                                                                   ignore_index=True)
            return self._frame.copy()

    def min_accuracy(self) -> dict[str, float]:
        tasks = self.points[0].accuracy
        return {t: min(p.accuracy[t] for p in self.points) for t in tasks}

    def lowest_accuracy(self, task: str) -> float:
        """The lowest test accuracy of `task` along the path so far. Kept as the path grows, so a page that shows
        it on every refresh of a running walk looks only at the points added since (points are never changed)."""
        seen, value = self._lowest.get(task, (0, float("inf")))
        n = len(self.points)  # the engine may append meanwhile: the next call takes the rest
        for point in self.points[seen:n]:
            value = min(value, point.accuracy[task])
        self._lowest[task] = (n, value)
        return value

    def save(self, path: str | Path) -> None:
        """Write the table as Parquet atomically (a crash mid-write leaves the previous file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.to_frame().to_parquet(tmp, index=False)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> PathRecord:
        frame = pd.read_parquet(path)
        return cls([PathPoint.from_row(row) for row in frame.to_dict("records")])


def write_json(path: str | Path, payload: dict) -> None:
    """JSON written atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)
