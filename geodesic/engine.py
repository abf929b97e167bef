"""One engine per server process: it owns all walking, so many sessions can walk at once.

A Streamlit server runs every browser session in its own thread. If each session stepped its own walk, their
torch work would race (forward-mode AD keeps process-global state, see autodiff.py) and fight over the cores,
and nobody would get faster with more hardware. Here a single worker thread does every step of every walk:

- Sessions hold a `WalkHandle` and ask (`run`, `pause`, `step_once`, `call`); they only read the walker's
  record, which the engine appends to. Nothing else touches torch for a walk.
- Walks share the engine's time, not its steps (`fair_share`): each walk is charged the seconds its steps take
  (a batch's split among its walks), and a round steps the walks whose charge is within `FAIR_QUANTUM` of the
  least. Walks that cost alike step in turn; beside a VGG walk of 350 ms a step, an MLP walk of 5 ms takes
  about 70 steps to its one instead of one (the MLP's page would otherwise crawl at the VGG's pace). A walk
  that starts, resumes or leaves slow motion is owed at most `FAIR_CREDIT` seconds by the running ones, so it
  does not take the engine for long. A walk's first step is charged no more than its second: the first carries
  one-off set-up (the engine's first PyTorch work, a new batch's functions), 0.2-0.4 s here, and charging it froze
  the first walk on a server for about 2 s while the walks opened after it caught up. Compatible walks step
  together as one `WalkBatch` (batch.py): same architecture, step rule, probe and batch shapes and device.
  A Step click or a `call` (a spectrum, a contour) is served between two batch steps, so it waits for at most
  one of them.
- A walk that diverges or runs out of memory stops with its own message (`handle.error`); the others go on.
  A page's running walk (`open(..., pause_unwatched=True)`) nobody has looked at for `idle_seconds` (its page
  was closed) is paused and its slot freed, and
  one that has taken its run's steps (`run(n_steps)`, by default the walk's own `n_steps`, as `geodesic run`
  takes) is paused there; `handle.notice` says why, and `run()` goes on.
- Limits (`EngineSettings`, from `geodesic-server.toml` or the environment): running walks in total and per
  session; over them, `run()` raises `CapacityError` with a message that says what to do.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import threading
import time
import tomllib
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import graphs
from .allocator import DEFAULT_KEEP_FREED_MB, keep_freed_memory
from .batch import WalkBatch, batch_key
from .errors import ConfigError, GeodesicError
from .path import PathPoint
from .walker import Walker

SWITCH_INTERVAL = float(os.environ.get("GEODESIC_SWITCH_INTERVAL", "0.0002"))  # seconds; see Engine._loop
FAIR_QUANTUM = 0.02  # seconds: walks charged within this of the least step in the same round (fair_share 'time')
FAIR_CREDIT = 0.5  # seconds: the most engine time a walk joining the running ones can be owed by them


class CapacityError(GeodesicError):
    """The server runs as many walks as it is set up to; this one was not started."""


@dataclass(frozen=True)
class EngineSettings:
    """How one server shares its engine. Each field can be set in the [engine] table of the file named by
    GEODESIC_SERVER_CONFIG (default ./geodesic-server.toml, if present) and by the environment variable
    GEODESIC_<FIELD> (upper case), which wins."""

    max_walks: int = 64  # running walks on this server at once, every session together
    max_walks_per_session: int = 8  # running walks one browser session may have at once
    threads: int = 0  # PyTorch's intra-op threads for the engine: the most it tries (0: every core) if tune_threads
    tune_threads: bool = True  # time each kind of step on 1, 2, 4, ... threads, keep the best (ThreadTuner)
    max_batch: int = 32  # most walks stepped as one batch
    batching: bool = True  # step compatible walks together (False: one at a time, for comparison)
    idle_seconds: float = 120.0  # a running walk that no page has read for this long is paused
    # the dashboard keeps a closed page's walks this long, for a reload of that browser tab to take them back (0: no)
    keep_closed_seconds: float = 300.0
    device: str = ""  # device for walks whose settings say 'auto' (empty: cuda, then mps, then cpu)
    keep_freed_mb: int = DEFAULT_KEEP_FREED_MB  # freed memory kept for the next steps (allocator.py); 0: malloc's own
    fair_share: str = "time"  # walks share the engine's seconds ('time') or take one step each per round ('steps')
    cuda_graphs: str = ""  # small models' steps as CUDA graphs on a GPU: auto, on or off (empty: graphs.MODE's)

    def __post_init__(self):
        if isinstance(self.keep_freed_mb, bool) or not isinstance(self.keep_freed_mb, int) or self.keep_freed_mb < 0:
            raise ConfigError(_env_name("keep_freed_mb"), self.keep_freed_mb,
                              "an integer >= 0 (megabytes; 0: malloc's own default)")
        for name in ("max_walks", "max_walks_per_session", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(_env_name(name), value, "an integer >= 1")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(_env_name("threads"), self.threads,
                              "an integer >= 0 (0: every core if tune_threads, else half of them)")
        if not isinstance(self.idle_seconds, (int, float)) or not self.idle_seconds > 0:
            raise ConfigError(_env_name("idle_seconds"), self.idle_seconds, "a number of seconds > 0")
        if isinstance(self.keep_closed_seconds, bool) or not isinstance(self.keep_closed_seconds, (int, float)) \
                or not self.keep_closed_seconds >= 0 or self.keep_closed_seconds == float("inf"):
            raise ConfigError(_env_name("keep_closed_seconds"), self.keep_closed_seconds,
                              "a number of seconds >= 0 (0: a reload starts afresh)")
        if self.device not in ("", "auto", "cpu", "cuda", "mps"):
            raise ConfigError(_env_name("device"), self.device, "auto, cpu, cuda or mps")
        if self.fair_share not in ("time", "steps"):
            raise ConfigError(_env_name("fair_share"), self.fair_share, "time or steps")
        if self.cuda_graphs not in ("", "auto", "on", "off"):
            raise ConfigError(_env_name("cuda_graphs"), self.cuda_graphs, "auto, on or off")

    @property
    def n_threads(self) -> int:
        """The engine's threads when they are not tuned, and the analysis threads' beside it."""
        return self.threads or max(1, (os.cpu_count() or 2) // 2)

    @property
    def thread_candidates(self) -> list[int]:
        """The thread counts the engine may use."""
        if not self.tune_threads:
            return [self.n_threads]
        return thread_candidates(self.threads or os.cpu_count() or 1)

    @classmethod
    def from_env(cls, environ: dict | None = None) -> EngineSettings:
        """Settings from the config file and the environment; a bad value raises ConfigError naming it."""
        env = os.environ if environ is None else environ
        values: dict = {}
        path = Path(env.get("GEODESIC_SERVER_CONFIG", "geodesic-server.toml"))
        if path.is_file():
            try:
                table = tomllib.loads(path.read_text()).get("engine", {})
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
                raise ConfigError("GEODESIC_SERVER_CONFIG", str(path),
                                  f"a TOML file with an [engine] table ({err})") from None
            unknown = set(table) - {f.name for f in fields(cls)}
            if unknown:
                raise ConfigError(f"{path} [engine]", sorted(unknown)[0], ", ".join(f.name for f in fields(cls)))
            values.update(table)
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, type(getattr(cls, f.name)))
        return cls(**values)


def _env_name(field_name: str) -> str:
    return "GEODESIC_" + ("TORCH_THREADS" if field_name == "threads" else field_name.upper())


def _parse(name: str, raw: str, kind: type):
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        return kind(raw)
    except ValueError:
        raise ConfigError(_env_name(name), raw, f"a {kind.__name__}") from None


class WalkHandle:
    """A session's hold on one walk in the engine. Every method returns at once except `step_once` and
    `call`, which wait for the engine (one batch step at most before their turn)."""

    def __init__(self, engine: Engine, walker: Walker, session: str, pause_unwatched: bool = False):
        self.engine, self.walker, self.session = engine, walker, session
        self.pause_unwatched = pause_unwatched  # a page's walk: paused after idle_seconds without a touch()
        self.error: str | None = None  # why the walk stopped against its will (diverged, out of memory)
        self.notice: str | None = None  # why the engine paused it (no page watching, its run's steps taken)
        self.paused_for: str | None = None  # the same in a word: "idle" or "steps"
        self._stop_at: tuple[int, int] | None = None  # (the walker's step count at which this run pauses, its steps)
        self.max_rate: float | None = None  # steps per second while running (None: as fast as the engine goes)
        self._running = False
        self._next_due = 0.0
        self.engine_seconds = 0.0  # the engine's time charged to this walk (its share of each batch step)
        self._first_step: tuple[int, float | None] | None = None  # (id of the walker, its first step's seconds)
        self.last_seen = time.monotonic()
        self.is_closed = False

    @property
    def is_running(self) -> bool:
        return self._running and not self.walker.is_done and not self.is_closed

    @property
    def steps_left(self) -> int | None:
        """The steps this run takes before it pauses by itself (None when it is not running)."""
        if not self.is_running or self._stop_at is None:
            return None
        return max(1, self._stop_at[0] - self.walker.n_steps)

    def touch(self) -> None:
        """The page has looked at this walk (keeps a running walk from being paused as idle)."""
        self.last_seen = time.monotonic()

    def run(self, n_steps: int | None = None) -> None:
        """Walk until paused, done, or `n_steps` steps from here (default: the walk's config n_steps, the most
        steps a run takes, as `geodesic run` takes them); press Run again to go on from there. A walk with no end
        of its own (new task) would otherwise walk for as long as its page stayed open, holding a share of a
        class's engine. Raises CapacityError when the server or this session is at its limit."""
        budget = self.walker.config.n_steps if n_steps is None else n_steps
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 1 \
                or not float(budget).is_integer():
            raise ConfigError("n-steps", budget, "a whole number >= 1")
        budget = int(budget)
        self.touch()
        self.engine._start(self, budget)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until this walk stops running: its goal reached, its run's steps taken, paused, or stopped by an
        error (`notice` and `error` say which). True once it has stopped; False if `timeout` seconds passed first.
        For scripts (`handle.run(); handle.wait()`); a page never waits, it draws what the engine has added."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_running:  # polled: the engine's thread signals nobody per step, and 20 ms is far below a run
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def pause(self, wait: bool = True) -> None:
        """Stop walking; returns once a step of this walk that is under way has landed (no point comes after),
        or at once with wait=False (no page is drawing the walk: a step under way may still land)."""
        self._running = False
        if wait:
            self.engine._wait_not_stepping(self)

    def set_rate(self, steps_per_second: float | None) -> None:
        """Slow motion: at most this many steps per second (None or 0: as fast as possible)."""
        with self.engine._cond:
            if self.max_rate and not steps_per_second:  # back to full speed: owed at most FAIR_CREDIT
                self.engine._rejoin(self)
            self.max_rate = steps_per_second or None

    def swap(self, walker: Walker) -> None:
        """Drive another walker (a branch, or a rebuilt walk); pauses first."""
        self.pause()
        self.notice = self.paused_for = None  # (it was about the walker before)
        self.engine._call_soon(lambda: setattr(self, "walker", walker)).result()

    def step_once(self, timeout: float = 60.0) -> PathPoint | None:
        """Exactly one step (pauses a running walk first); None if it failed (see `error`)."""
        self.pause()
        self.touch()
        return self.engine._call_soon(self._guarded_step).result(timeout)

    def call(self, fn: Callable, *args, timeout: float | None = None):
        """fn(*args) on the engine's thread, between two steps (analysis of this walk: spectra, contours)."""
        self.touch()
        return self.engine._call_soon(lambda: fn(*args)).result(timeout)

    def close(self, wait: bool = False) -> None:
        """Give the walk up (the page was closed or a new walk replaces it). wait: return, as pause does, only once
        a step of this walk under way has landed (a walk the page keeps showing: a fan's walks closed while their
        batch stepped took one more step after, a point the page had not drawn). Not by default: a close from a
        garbage collector's finalizer can run on a thread the step itself waits on (the eigh workers), and waiting
        there stalled the engine for the wait's whole timeout."""
        self.is_closed, self._running = True, False
        if wait:
            self.engine._wait_not_stepping(self)
        self.engine._forget(self)

    def _guarded_step(self) -> PathPoint | None:
        try:
            self.error = self.notice = self.paused_for = None
            return self.walker.step()
        except GeodesicError as err:
            self._stop(str(err))
            return None

    def _stop(self, message: str) -> None:
        self.error, self._running = message, False

    def _pause_because(self, why: str, message: str) -> None:
        self.paused_for, self.notice, self._running = why, message, False

    def _charge(self, seconds: float) -> float:
        """The engine time to charge for a step of `seconds` (the engine's thread). A walker's first step is
        charged at most FAIR_QUANTUM at once; its second step settles it at no more than the second's own cost, so
        the first step's set-up is not charged."""
        first = self._first_step
        if first is None or first[0] != id(self.walker):  # a new walker (Reset, a branch, a reload): a first step
            self._first_step = (id(self.walker), seconds)
            return min(seconds, FAIR_QUANTUM)
        if first[1] is not None:  # the second step
            self._first_step = (first[0], None)
            return seconds + max(min(first[1], seconds) - FAIR_QUANTUM, 0.0)
        return seconds


# Doubling the engine's threads must make a step at least this much faster. The cores it takes are shared with
# the pages' own work and, on a laptop, with the browsers: on 2 cores, with the fastest count kept whatever its
# gain, a lone default walk in Chromium fell from 0.82-0.85 to 0.55-0.57 of its headless speed and the server
# took 1.05 cores instead of 0.8, while 8 batched walks gain 1.3-1.9x from a second thread (bench/
# dashboard_speed.py, bench/load.py, BENCHMARKS.md).
MIN_SPEEDUP_PER_DOUBLING = 1.2


class ThreadTuner:
    """PyTorch's thread count for each kind of step the engine takes, chosen by timing it (as cuDNN's benchmark
    mode picks a convolution algorithm): each candidate count is tried for a few steps, the fastest that pays for its
    cores kept (MIN_SPEEDUP_PER_DOUBLING), and the choice timed again after `retune_seconds`, since the load changes
    as pages come and go (by time, not by steps: a fast walk would otherwise spend its slow trials every few
    seconds).

    Why: no one count is right. Measured through the engine on this 2-core machine (bench/load.py, BENCHMARKS.md):
    a lone walk of the default MLP, a chain of tiny ops, steps at 152 steps/s on one thread and 85 on two; a lone
    LeNet-5 walk on 28×28 images at 2.2 on one and 4.6 on two. A kind of step is its batch key (same model, rule,
    shapes, device) and the number of walks in the batch, rounded up to a power of two. Eight trials a count (the
    median kept): with four, 8 sparsify penalty walks on 2 cores kept the slower count in one run of three.
    """

    def __init__(self, candidates: list[int], trials: int = 8, retune_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, first_retune_seconds: float = 5.0):
        self.candidates = sorted(set(candidates))
        self.trials, self.retune_seconds, self.clock = trials, retune_seconds, clock
        # A kind's first choice is timed while its sessions are still opening their walks (threads starting, first
        # reads): in one run of three it kept the slower count for 8 penalty walks. So it is timed once more soon.
        self.first_retune_seconds = min(first_retune_seconds, retune_seconds)
        self._times: dict = {}  # kind -> {threads: [seconds per step]}
        self._chosen: dict = {}  # kind -> (threads, when chosen, seconds until it is timed again)
        self._settled: set = set()  # kinds chosen at least once

    @staticmethod
    def kind(key, n_walks: int) -> tuple:
        return key, 1 << max(n_walks - 1, 0).bit_length()

    def choose(self, kind) -> int:
        if len(self.candidates) == 1:
            return self.candidates[0]
        chosen = self._chosen.get(kind)
        if chosen is not None:
            threads, since, keep = chosen
            if self.clock() - since < keep:
                return threads
            del self._chosen[kind]
            self._times.pop(kind, None)
        if kind not in self._times and len(self._times) >= 256:  # a long-lived server that saw many set-ups
            self._times.clear()
            self._chosen.clear()
            self._settled.clear()
        times = self._times.setdefault(kind, {t: [] for t in self.candidates})
        # The first step of a kind pays for its set-up (a new batch's functions): timed, then dropped.
        return min(self.candidates, key=lambda t: len(times[t]))

    def record(self, kind, threads: int, seconds: float) -> None:
        times = self._times.get(kind)
        if times is None or threads not in times or kind in self._chosen:  # timed only while on trial: a step
            return  # after the choice would choose again, restart the clock, and the choice would never be timed again
        times[threads].append(seconds)
        if all(len(v) >= self.trials + 1 for v in times.values()):
            median = {t: sorted(v[1:])[len(v[1:]) // 2] for t, v in times.items()}
            best = self.candidates[0]
            for t in self.candidates[1:]:  # more threads only where they pay for the cores they take
                if median[t] * MIN_SPEEDUP_PER_DOUBLING ** math.log2(t / best) <= median[best]:
                    best = t
            keep = self.retune_seconds if kind in self._settled else self.first_retune_seconds
            self._settled.add(kind)
            self._chosen[kind] = (best, self.clock(), keep)

    def chosen(self) -> dict:
        """{kind: threads} decided so far (for benchmarks and tests)."""
        return {kind: threads for kind, (threads, _, _) in list(self._chosen.items())}


def thread_candidates(most: int) -> list[int]:
    """1, 2, 4, ... up to `most`, and `most` itself."""
    counts, t = {most}, 1
    while t < most:
        counts.add(t)
        t *= 2
    return sorted(counts)


class Engine:
    """Owns all walking in this process (see the module's docstring). `open(walker, session)` gives a handle."""

    def __init__(self, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self._cond = threading.Condition()
        self._handles: list[WalkHandle] = []
        self._jobs: deque[tuple[Callable, Future]] = deque()
        self._batches: dict[tuple, WalkBatch] = {}
        self._round_robin = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._stepping: set[int] = set()  # ids of the handles whose step is under way
        self.n_steps = 0  # steps taken since start, all walks together
        self.n_errors = 0  # walks stopped by an error
        self.tuner = ThreadTuner(self.settings.thread_candidates)

    # -- what sessions call ------------------------------------------------------------------------------------
    def open(self, walker: Walker, session: str = "", pause_unwatched: bool = False) -> WalkHandle:
        """A handle on `walker` for `session` (whose limits it counts against). pause_unwatched: a page's walk, paused
        once no page has looked at it (`touch`) for `idle_seconds`; a script's walk (the default) runs its steps
        whoever watches (it was paused after two minutes, as an abandoned page's is)."""
        handle = WalkHandle(self, walker, session, pause_unwatched)
        with self._cond:
            self._handles.append(handle)
        return handle

    def running(self, session: str | None = None) -> int:
        return sum(1 for h in list(self._handles) if h.is_running and (session is None or h.session == session))

    def stop(self) -> None:
        """End the worker thread (tests, and a server shutting down); pending calls fail."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _start(self, handle: WalkHandle, budget: int) -> None:
        s = self.settings
        with self._cond:
            if handle.is_running:
                return
            if handle.is_closed:
                raise CapacityError("this walk was closed; start a new one")
            if self.running(handle.session) >= s.max_walks_per_session:
                raise CapacityError(f"this session already runs {s.max_walks_per_session} walks, its limit "
                                    "(GEODESIC_MAX_WALKS_PER_SESSION): pause one first")
            if self.running() >= s.max_walks:
                raise CapacityError(f"the server runs {s.max_walks} walks, its limit (GEODESIC_MAX_WALKS): try "
                                    "again when one pauses or finishes, or ask whoever runs the server to raise it")
            handle.error, handle.notice, handle.paused_for, handle._running = None, None, None, True
            handle._next_due = 0.0
            handle._stop_at = (handle.walker.n_steps + budget, budget)
            self._rejoin(handle)
            self._ensure_thread()
            self._cond.notify_all()

    def _rejoin(self, handle: WalkHandle) -> None:
        """A walk that starts, resumes or leaves slow motion is owed at most FAIR_CREDIT seconds by the running
        walks (it would otherwise take the engine until its charge caught up with theirs). Called under _cond."""
        others = [h.engine_seconds for h in self._handles if h is not handle and h.is_running]
        if others:
            handle.engine_seconds = max(handle.engine_seconds, min(others) - FAIR_CREDIT)

    def _call_soon(self, fn: Callable) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopped:
                future.set_exception(RuntimeError("the engine has stopped"))
                return future
            self._jobs.append((fn, future))
            self._ensure_thread()
            self._cond.notify_all()
        return future

    def _wait_not_stepping(self, handle: WalkHandle, timeout: float = 30.0) -> None:
        if threading.current_thread() is self._thread:
            return
        with self._cond:
            self._cond.wait_for(lambda: id(handle) not in self._stepping, timeout=timeout)

    def _forget(self, handle: WalkHandle) -> None:
        with self._cond:
            if handle in self._handles:
                self._handles.remove(handle)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="geodesic-engine", daemon=True)
            self._thread.start()

    # -- the worker ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if torch.get_num_threads() != self.settings.n_threads:  # until the tuner picks a count per kind of step
            torch.set_num_threads(self.settings.n_threads)
        # Every torch op releases the GIL and takes it back. While a page's thread runs Python (building charts),
        # taking it back waits for that thread to be told to drop it, by default after 5 ms: a step of a few
        # hundred small ops then took seconds (measured in Chromium: 4.3 steps/s, a Step click 18 s at p95).
        # A shorter interval bounds that wait per op (bench/load.py --pages, BENCHMARKS.md).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        # A batch's megabyte-sized tensors are reused from the heap instead of being mapped and faulted in anew at
        # every step (allocator.py: 8 penalty walks, 21 -> 17 ms a batch step on this project's 2-core machine).
        keep_freed_memory(self.settings.keep_freed_mb)
        if self.settings.cuda_graphs:  # the server's file (GEODESIC_CUDA_GRAPHS is graphs.MODE's own default)
            graphs.MODE = self.settings.cuda_graphs
        while True:
            with self._cond:
                while not self._stopped and not self._jobs and not self._due():
                    self._cond.wait(timeout=self._wait_seconds())
                if self._stopped:
                    for _, future in self._jobs:
                        future.set_exception(RuntimeError("the engine has stopped"))
                    return
            self._run_jobs()
            self._round()

    def _run_jobs(self) -> None:
        """The calls queued now, not those queued while they run: pages that each make a call at every refresh
        (a pruning curve measured a slice at a time) kept the queue from ever being empty, and no walk stepped
        until they stopped."""
        with self._cond:
            n = len(self._jobs)
        for _ in range(n):
            with self._cond:
                if not self._jobs:
                    return
                fn, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # noqa: BLE001 - handed to the caller, who raises it
                    future.set_exception(err)

    def _due(self) -> list[WalkHandle]:
        now = time.monotonic()
        idle = self.settings.idle_seconds
        due = []
        for h in self._handles:
            if h.is_running and h.pause_unwatched and now - h.last_seen > idle:
                h._pause_because("idle", f"Paused after {idle:g} s without a page watching it; press Run to go on.")
            elif h.is_running and now >= h._next_due:
                due.append(h)
        return due

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        waits = [h._next_due - now for h in self._handles if h.is_running]
        return min([1.0, *[max(w, 0.001) for w in waits]])

    def _round(self) -> None:
        """The due walks furthest behind in engine time (every due walk, with fair_share 'steps') take one step:
        compatible ones as one batch, groups in turn, calls served between."""
        with self._cond:
            due = self._due()
            live = {id(h.walker) for h in self._handles}
        self._drop_dead_batches(live)
        if due and self.settings.fair_share == "time":
            least = min(h.engine_seconds for h in due)
            due = [h for h in due if h.engine_seconds <= least + FAIR_QUANTUM]
        groups: dict[object, list[WalkHandle]] = {}
        for h in due:
            key = batch_key(h.walker) if self.settings.batching else None
            groups.setdefault(("alone", id(h)) if key is None else key, []).append(h)
        chunks = [g[i:i + self.settings.max_batch] for g in groups.values()
                  for i in range(0, len(g), self.settings.max_batch)]
        offset = next(self._round_robin) % max(len(chunks), 1)  # no group is always first
        for chunk in chunks[offset:] + chunks[:offset]:
            self._step(chunk)
            self._run_jobs()

    def _drop_dead_batches(self, live: set[int]) -> None:
        """Forget the batches of walkers no session holds any more (closed, reset, replaced): a batch keeps its
        walkers, and with them each one's path and weights. Measured before (120 rounds of 4 walks opened, stepped
        and closed): the process grew from 0.67 to 1.18 GB until the cache of 65 batches was cleared. The
        engine's thread only; a live walker's id cannot be reused, so a key of live ids is never stale."""
        dead = [key for key in self._batches if not all(i in live for i in key)]
        for key in dead:
            del self._batches[key]

    @staticmethod
    def _kind_key(walker: Walker):
        """What makes two steps the same work for the thread tuner: the batch key, or for a walk never batched
        its model, rule and device."""
        key = batch_key(walker)
        if key is None:
            first = next(iter(walker.params.values()))
            key = ("unbatched", type(walker.network.module).__name__, sum(p.numel() for p in walker.params.values()),
                   walker.config.solver, walker.config.linear_solver, str(first.device))
        return key

    def _step(self, handles: list[WalkHandle]) -> None:
        with self._cond:
            handles = [h for h in handles if h.is_running]  # paused or closed since the round began
            self._stepping = {id(h) for h in handles}
        if not handles:
            return
        try:
            self._step_handles(handles)
        finally:
            with self._cond:
                self._stepping = set()
                self._cond.notify_all()

    def _step_handles(self, handles: list[WalkHandle]) -> None:
        kind = self.tuner.kind(self._kind_key(handles[0].walker), len(handles))
        threads = self.tuner.choose(kind)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            if len(handles) == 1:
                try:
                    results = [handles[0].walker.step()]
                except GeodesicError as err:
                    results = [err]
            else:
                walkers = [h.walker for h in handles]
                key = tuple(id(w) for w in walkers)
                if key not in self._batches:
                    if len(self._batches) > 64:
                        self._batches.clear()
                    self._batches[key] = WalkBatch(walkers)
                results = self._batches[key].step()  # one per walker: running walkers are never done
        except Exception as err:  # a bug, not a user's mistake: stop these walks with a message, keep serving
            traceback.print_exc(file=sys.stderr)
            results = [GeodesicError(f"internal error while stepping ({type(err).__name__}: {err}); "
                                     "the walk is kept at its last point") for _ in handles]
        seconds = (time.perf_counter() - t0) / len(handles)
        self.tuner.record(kind, threads, seconds)
        now = time.monotonic()
        for handle, result in zip(handles, results, strict=True):
            handle.engine_seconds += handle._charge(seconds)
            if isinstance(result, BaseException):
                handle._stop(str(result))
                self.n_errors += 1
            else:
                self.n_steps += 1
                stop_at = handle._stop_at
                if stop_at is not None and handle.walker.n_steps >= stop_at[0] and not handle.walker.is_done:
                    handle._pause_because("steps", f"Paused at step {handle.walker.n_steps}: this run took its "
                                                   f"{stop_at[1]} steps (most steps per run); press Run to go on.")
            if handle.max_rate:
                handle._next_due = now + 1.0 / handle.max_rate


_SHARED: Engine | None = None
_SHARED_LOCK = threading.Lock()


def shared_engine(settings: EngineSettings | None = None) -> Engine:
    """The process's engine (created on first use with `settings`, or EngineSettings.from_env())."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = Engine(settings or EngineSettings.from_env())
        return _SHARED


def background_thread(settings: EngineSettings, niceness: int = 10) -> None:
    """Set up the calling thread for analysis beside the engine (a pool's initializer): a lower CPU priority
    (Linux: nice is per thread), and PyTorch's threads as many as the engine's (`settings.n_threads`).

    Why the threads: MKL's thread count is per thread, and a new thread that calls a matrix product before PyTorch
    has set its count uses all the cores, with OpenMP workers that spin between calls. Measured in the server on
    2 cores (gdb, per-thread CPU): the new-task baselines' thread took 0.33 core and its spinning OpenMP worker
    another 0.33 while a walk ran, so the engine's thread got 0.78 of a core.
    """
    if sys.platform == "linux":  # elsewhere a thread's id is not a process id setpriority accepts
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        except OSError:  # not allowed: run at the normal priority
            pass
    if settings.n_threads:
        torch.set_num_threads(settings.n_threads)  # this thread's OpenMP and MKL counts (and the default: the same)


def on_a_passing_thread(fn: Callable[[], object]) -> object:
    """fn()'s result, computed on a thread that ends with it (its exception re-raised here).

    For PyTorch work done once by a thread that lives on, such as a server's warm-up on its main thread. GNU
    OpenMP keeps a team of workers for every thread that has run a parallel op, until that thread ends, and when
    its workers outnumber the cores, every team, the engine's included, stops spinning between ops (libgomp's
    throttled spin count) and sleeps instead. Measured on 2 cores (`bench/load.py`, BENCHMARKS.md): with the main
    thread's team alive, the engine's 2-thread batches ran no faster than on 1 thread; with it gone, 8 constrained
    walks on 2 threads stepped 2.2× a lone walk.
    """
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except BaseException as err:  # noqa: BLE001 - handed back to the caller below
            result.append((False, err))

    thread = threading.Thread(target=run, name="geodesic-passing")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
