"""Drives a walker for an interactive front end, a bounded slice of work at a time.

Each live refresh of the page calls `advance(n_steps, max_seconds)`: up to n steps, stopping early when
the time slice is used up, the goal is reached or a step fails. Rendering then runs with the CPU to
itself. (A background thread was tried first: on 2 cores the walk and the page's rendering fought over
the GIL and the cores and the page played 4-13 steps/s; slices play about twice as fast.) A paused or
closed page costs nothing, and each user's walk lives in its own runner (nothing here is global).
"""
from __future__ import annotations

import time

import torch

from .errors import OutOfMemory, WalkDiverged
from .path import PathPoint
from .walker import Walker


def set_threads(n: int) -> None:
    """Size PyTorch's intra-op thread pool (process-wide: every runner in this process shares it)."""
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


class WalkRunner:
    def __init__(self, walker: Walker):
        self.walker = walker
        self._running = False
        self.error: str | None = None

    @property
    def is_running(self) -> bool:
        return self._running and not self.walker.is_done

    def run(self) -> None:
        self.error = None
        self._running = True

    def pause(self) -> None:
        self._running = False

    def swap(self, walker: Walker) -> None:
        """Drive another walker (a branch, or a rebuilt walk); pauses first."""
        self.pause()
        self.walker = walker

    def step_once(self) -> PathPoint | None:
        """Exactly one step (pauses a running walk first)."""
        self.pause()
        return self._guarded_step()

    def advance(self, n_steps: int, max_seconds: float) -> int:
        """While running: up to n_steps steps within about max_seconds; returns how many were taken."""
        taken, t0 = 0, time.perf_counter()
        while self.is_running and taken < n_steps and (taken == 0 or time.perf_counter() - t0 < max_seconds):
            if self._guarded_step() is None:
                break
            taken += 1
        return taken

    def _guarded_step(self) -> PathPoint | None:
        try:
            return self.walker.step()
        except (WalkDiverged, OutOfMemory) as err:
            self.error = str(err)
            self._running = False
            return None
