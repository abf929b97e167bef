"""The one place that touches st.session_state: each browser session's walk, branches and view state.

Nothing here is global: two people on one server each get their own walks and runners.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field

import streamlit as st

from geodesic.config import RunConfig
from geodesic.experiment import Experiment
from geodesic.projection import PCABasis
from geodesic.runner import WalkRunner


@functools.cache  # once per server process: the environment does not change, and a bad value is said once
def torch_threads() -> int:
    """PyTorch's thread pool is shared by every session of this server. Half the cores by default
    (GEODESIC_TORCH_THREADS overrides): the walks here are small, and on a laptop or a 2-core machine the
    browser drawing the charts needs a core of its own (measured: bench/dashboard_speed.py, BENCHMARKS.md)."""
    default = max(1, (os.cpu_count() or 2) // 2)
    given = os.environ.get("GEODESIC_TORCH_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    if given:
        print(f"GEODESIC_TORCH_THREADS={given!r} is not a positive integer; using {default}", file=sys.stderr)
    return default


KEY = "geodesic"


@dataclass
class Branch:
    label: str
    walker: object  # geodesic.walker.Walker


@dataclass
class AppState:
    config: RunConfig | None = None  # settings of the walk on screen
    experiment: Experiment | None = None
    runner: WalkRunner | None = None
    branches: list[Branch] = field(default_factory=list)
    active: int = 0  # index into branches of the walk that steps
    baselines: dict = field(default_factory=dict)
    basis: PCABasis | None = None  # frozen PCA basis (refit on demand)
    umap: dict | None = None  # last UMAP result {"coords", "steps", "params"}
    spectrum: dict | None = None
    contour: dict | None = None
    errors: dict[str, str] = field(default_factory=dict)  # setting -> message shown next to its control
    notice: str = ""
    steps_per_refresh: int = 20

    @property
    def walker(self):
        return self.branches[self.active].walker if self.branches else None


def state() -> AppState:
    if KEY not in st.session_state:
        st.session_state[KEY] = AppState()
    return st.session_state[KEY]


def install(experiment: Experiment, baselines: dict) -> None:
    """Show a freshly built walk (the previous one's runner is closed)."""
    s = state()
    if s.runner is not None:
        s.runner.pause()
    s.config, s.experiment, s.baselines = experiment.config, experiment, baselines
    s.branches = [Branch("main", experiment.walker)]
    s.active = 0
    s.runner = WalkRunner(experiment.walker)
    s.basis = s.umap = s.spectrum = s.contour = None
    s.errors = {}


def add_branch(walker, label: str) -> None:
    s = state()
    s.branches.append(Branch(label, walker))
    s.active = len(s.branches) - 1
    s.runner.swap(walker)


def select_branch(index: int) -> None:
    s = state()
    if 0 <= index < len(s.branches) and index != s.active:
        s.active = index
        s.runner.swap(s.branches[index].walker)
