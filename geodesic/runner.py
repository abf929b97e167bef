"""Drives a walker on a background thread for an interactive front end.

The front end grants steps (`grant(n)` on every refresh); the thread takes them as fast as it can and
stops when the grant is used up, the walk is paused, the goal is reached or a step fails. So a paused or
abandoned page stops costing compute after at most one refresh's worth of steps, and each user's walk
lives in its own runner (nothing here is global).
"""
from __future__ import annotations

import threading

from .errors import WalkDiverged
from .walker import Walker


class WalkRunner:
    def __init__(self, walker: Walker):
        self.walker = walker
        self.lock = threading.Lock()  # held while a step runs; take it to read or swap the walker safely
        self._allowance = 0
        self._wake = threading.Condition()
        self._paused = True
        self._closed = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="geodesic-walk", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return not self._paused and not self.walker.is_done

    def step_once(self):
        """Exactly one step, now, on the caller's thread (pauses a running walk first)."""
        self.pause()
        with self.lock:
            return self._guarded_step()

    def run(self) -> None:
        self.error = None
        with self._wake:
            self._paused = False
            self._wake.notify()

    def pause(self) -> None:
        with self._wake:
            self._paused = True
            self._allowance = 0

    def grant(self, n_steps: int) -> None:
        """Allow up to n_steps more steps (called once per refresh while running)."""
        with self._wake:
            if not self._paused:
                self._allowance = min(self._allowance + n_steps, 2 * n_steps)
                self._wake.notify()

    def swap(self, walker: Walker) -> None:
        """Drive another walker (a branch, or a rebuilt walk); pauses first."""
        self.pause()
        with self.lock:
            self.walker = walker

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._paused = True
            self._wake.notify()

    def _guarded_step(self):
        try:
            return self.walker.step()
        except WalkDiverged as err:
            self.error = str(err)
            self._paused = True
            return None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (self._paused or self._allowance <= 0 or self.walker.is_done):
                    self._wake.wait()
                if self._closed:
                    return
                self._allowance -= 1
            with self.lock:
                self._guarded_step()
                if self.walker.is_done:
                    self._paused = True
