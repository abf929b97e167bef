"""The one place that touches st.session_state: each browser session's walk, branches and view state.

Each session's walks live in its own state; the walking itself is done by the server's one engine
(geodesic/engine.py), which every session reaches through its walk's handle.
"""
from __future__ import annotations

import functools
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import streamlit as st

from geodesic.config import RunConfig
from geodesic.engine import CapacityError, Engine, EngineSettings, WalkHandle, background_thread, shared_engine
from geodesic.errors import Cancelled, ConfigError
from geodesic.experiment import Experiment
from geodesic.projection import PCABasis
from geodesic.worker import shutdown_analysis_process


@functools.cache  # once per server process: the settings do not change, and a bad value is said once
def engine() -> Engine:
    """The server's engine, set up from geodesic-server.toml and the environment (README); a bad setting is
    reported on stderr and in `settings_problem()`, and the defaults are used."""
    try:
        settings = EngineSettings.from_env()
    except ConfigError as err:
        _PROBLEMS.append(f"{err}; the server uses its default engine settings")
        print(f"geodesic: {_PROBLEMS[-1]}", file=sys.stderr)
        settings = EngineSettings()
    return shared_engine(settings)


_PROBLEMS: list[str] = []
# Slow analysis a page shows when it is ready (the goal's baselines), beside the engine rather than on its
# thread, so nobody's walk waits for it. A thread of this pool waits for each (computed in the analysis process,
# geodesic/worker.py, or on the thread on its own copy of the network: goal_baselines_apart); waiting is cheap.
def _yield_to_the_engine() -> None:
    """A lower CPU priority for this analysis thread, so the walks go first, and no more PyTorch threads than
    the engine's (geodesic.engine.background_thread)."""
    background_thread(engine().settings)


_ANALYSIS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="geodesic-analysis", initializer=_yield_to_the_engine)


_SHUTTING_DOWN = threading.Event()


def _drop_queued_analysis() -> None:
    """At shutdown, stop the analysis nobody will see: Python joins a pool's threads only after they have run
    every queued job, so a server stopped while pages waited for baselines took minutes to exit (measured: a
    masked fine-tuning at the analysis threads' low priority on a busy machine). The running job is asked to
    stop (its should_stop), the queued ones are dropped."""
    _SHUTTING_DOWN.set()
    _ANALYSIS.shutdown(wait=False, cancel_futures=True)
    shutdown_analysis_process()


# Called before the interpreter joins the pool's threads (the hook concurrent.futures itself uses; later hooks run
# first). Private to threading, hence the guard: without it, shutdown is only slower.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_drop_queued_analysis)


def settings_problem() -> str | None:
    return _PROBLEMS[-1] if _PROBLEMS else None


def session_id() -> str:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else str(id(st.session_state))


KEY = "geodesic"


@dataclass
class Branch:
    label: str
    walker: object  # geodesic.walker.Walker
    # The steps it had when made, reloaded from the store or last saved: the steps past it are lost if it is closed.
    kept_at: int | None = None

    def __post_init__(self):
        if self.kept_at is None:
            self.kept_at = self.walker.n_steps

    @property
    def unsaved_steps(self) -> int:
        return self.walker.n_steps - self.kept_at


@dataclass
class AppState:
    config: RunConfig | None = None  # settings of the walk on screen
    experiment: Experiment | None = None
    runner: WalkHandle | None = None  # this session's hold on its walk in the engine
    branches: list[Branch] = field(default_factory=list)
    active: int = 0  # index into branches of the walk that steps
    baselines: dict = field(default_factory=dict)
    pending_baselines: Future | None = None  # computed on an analysis thread after the first paint
    stop_baselines: threading.Event | None = None  # set: that computation is no longer wanted
    basis: PCABasis | None = None  # frozen PCA basis (refit on demand)
    umap: dict | None = None  # last UMAP result {"coords", "steps", "params"}
    spectrum: list[dict] | None = None  # the metric spectra computed, {values, probe, step} each (Metric view)
    pruning: dict | None = None  # the Overview's pruning curves of a sparsify walk (explore._pruning_curves)
    contour: dict | None = None
    errors: dict[str, tuple] = field(default_factory=dict)  # control -> (message, what it was about): controls.error_at
    notice: str = ""
    speed: str = "as fast as possible"
    fan: list = field(default_factory=list)  # (branch index, WalkHandle) of the walks of a step-size fan
    fan_from: int | None = None  # the step the fan started from

    @property
    def walker(self):
        return self.branches[self.active].walker if self.branches else None


def state() -> AppState:
    if KEY not in st.session_state:
        st.session_state[KEY] = AppState()
    return st.session_state[KEY]


def install(experiment: Experiment, baselines=None) -> None:
    """Show a freshly built walk (the previous one's handle is closed, freeing its place in the engine).
    baselines: what the walk is compared with; a callable of the experiment runs on an analysis thread after the
    page is drawn (it must not touch the walk's own network: goal_baselines_apart), and its result is shown
    when ready (baselines_pending)."""
    s = state()
    if s.runner is not None:
        s.runner.close()
    close_fan()
    s.config, s.experiment = experiment.config, experiment
    s.branches = [Branch("main", experiment.walker)]
    s.active = 0
    s.runner = engine().open(experiment.walker, session_id(), pause_unwatched=True)
    if s.stop_baselines is not None:  # the page moved on: nobody will see the previous walk's baselines
        s.stop_baselines.set()
    s.baselines, s.pending_baselines, s.stop_baselines = {}, None, None
    s.notice = ""  # a message about the previous walk (its baselines failed) is not this walk's
    if callable(baselines):
        stop = s.stop_baselines = threading.Event()
        s.pending_baselines = _ANALYSIS.submit(baselines, experiment,
                                               lambda: stop.is_set() or _SHUTTING_DOWN.is_set())
    elif baselines:
        s.baselines = baselines
    weakref.finalize(s, s.runner.close)  # the session's state is dropped when its page is gone for good
    s.basis = s.umap = s.spectrum = s.contour = s.pruning = None
    s.errors = {}
    # What the live refresh compares with to see the walk or fan stop by itself: the new walk has neither running.
    # Left set, the first refresh "saw" the closed one stop and ran the page again in the middle of the run that
    # drew the new walk, and a toast sent in it (which runs were saved before closing) never showed.
    st.session_state["_was_running"] = st.session_state["_fan_was_running"] = False


def baselines_pending() -> bool:
    """Whether the baselines are still being computed (once they are, they are moved into `baselines`)."""
    s = state()
    future = s.pending_baselines
    if future is None:
        return False
    if not future.done():
        return True
    s.pending_baselines = None
    try:
        s.baselines = future.result()
    except Cancelled:  # the page moved on or the server is stopping: nothing to show
        pass
    except Exception as err:  # noqa: BLE001 - shown, and the walk goes on without them
        s.notice = f"The baselines could not be computed ({type(err).__name__}: {err})."
    return False


def launch_fan(walkers: list, labels: list[str], at_step: int) -> None:
    """Walk these branches side by side (each its own handle: the engine steps compatible ones as one batch);
    they join the charts as branches. Raises CapacityError (from the engine) when the session or server is full,
    after closing the ones it had opened."""
    s = state()
    close_fan()
    opened = []
    try:
        for walker, label in zip(walkers, labels, strict=True):
            s.branches.append(Branch(label, walker))
            handle = engine().open(walker, session_id(), pause_unwatched=True)
            opened.append((len(s.branches) - 1, handle))
            handle.run()
    except Exception:
        for _, handle in opened:
            handle.close()
        del s.branches[len(s.branches) - len(opened):]
        raise
    s.fan, s.fan_from = opened, at_step
    for _, handle in opened:
        weakref.finalize(s, handle.close)


def fan_running() -> bool:
    return any(handle.is_running for _, handle in state().fan)


def close_fan() -> None:
    """Stop the fan's walks (their branches stay on the charts)."""
    s = state()
    for _, handle in s.fan:
        handle.close(wait=True)  # its branch stays on the charts: no point lands after the page drew it
    s.fan, s.fan_from = [], None


def keep_from_fan(branch_index: int) -> None:
    """Make one walk of the fan the walk that steps (Step, Run) and stop the others; all stay as branches."""
    close_fan()
    select_branch(branch_index)


def add_branch(walker, label: str) -> None:
    s = state()
    s.branches.append(Branch(label, walker))
    s.active = len(s.branches) - 1
    s.runner.swap(walker)


def unsaved() -> list[Branch]:
    """The walks on screen with steps taken since they were made, reloaded or saved: closing them (a new walk,
    Reset, a run reloaded or started from uploaded weights) would lose those steps."""
    return [b for b in state().branches if b.unsaved_steps]


def select_branch(index: int) -> None:
    s = state()
    for i, handle in list(s.fan):  # a walk is driven by one handle only: a fan walk chosen here leaves the fan
        if i == index:
            handle.close()
            s.fan.remove((i, handle))
    if 0 <= index < len(s.branches) and index != s.active:
        s.active = index
        s.runner.swap(s.branches[index].walker)


# -- a reload of a browser tab keeps its walk ------------------------------------------------------------------
# A reload is a new Streamlit session with an empty st.session_state: the walk on screen, its branches and its
# fan were lost with the old one (a student's F5, a laptop woken up). Each tab has a token (app/tab.py); the
# session that knows it registers its AppState under it here, and a later session of the same tab, once the
# page that held it is gone, takes that AppState back. A closed page's state is kept `keep_closed_seconds`
# (EngineSettings), then dropped, which closes its walks (the finalizers in install and launch_fan).
@dataclass
class _Kept:
    state: AppState
    session: str  # the session that shows it
    views: dict  # its views' own controls as last drawn (explore.VIEW_KEYS): the view on show comes back too
    gone_since: float | None = None  # monotonic time its page was first found closed
    resume: list = field(default_factory=list)  # (handle, steps its run had left) paused while the page was closed


_KEPT: dict[str, _Kept] = {}
_KEPT_LOCK = threading.Lock()
# A walk running when its page closed is paused this long after (a reload is back within a few seconds, and a
# network blip reconnects the same page), so it does not hold a share of a class's engine until idle_seconds (two
# minutes by default); the page that takes it back resumes it where its run was.
CLOSED_PAUSE_SECONDS = 10.0
CLOSED_CHECK_SECONDS = 2.0  # how often closed pages are looked for


def _page_open(session: str) -> bool:
    """Whether a browser page is connected to this Streamlit session (False outside a server: AppTest)."""
    from streamlit.runtime import Runtime

    return Runtime.exists() and Runtime.instance().is_active_session(session)


def _forget_closed_pages(keep: float) -> None:
    """Drop the states whose page has been closed for longer than `keep` seconds, and pause the running walks of
    pages closed for CLOSED_PAUSE_SECONDS, noting each in its state's `resume` (call with _KEPT_LOCK held, so a
    page that comes back meanwhile finds them either running or noted)."""
    now = time.monotonic()
    for token, kept in list(_KEPT.items()):
        if _page_open(kept.session):
            kept.gone_since = None
            continue
        if kept.gone_since is None:
            kept.gone_since = now
        elif now - kept.gone_since > keep:
            del _KEPT[token]
        elif now - kept.gone_since > CLOSED_PAUSE_SECONDS:
            for handle in _handles(kept.state):
                left = handle.steps_left
                if left is not None:
                    kept.resume.append((handle, left))
                    handle.pause(wait=False)  # no page draws it: nothing to wait for (and the lock is held)


def _handles(s: AppState) -> list[WalkHandle]:
    return [h for h in [s.runner, *(h for _, h in s.fan)] if h is not None]


def _resume(kept: _Kept) -> None:
    """Run again, for the steps their run had left, the walks paused while the page was closed."""
    resume, kept.resume = kept.resume, []
    for handle, left in resume:
        if not handle.is_closed and not handle.is_running and not handle.walker.is_done:
            try:
                handle.run(left)
            except CapacityError as err:  # the server filled up meanwhile: the page says so, the walk waits
                handle.notice = f"Paused while its page was closed; {err}."


@functools.cache
def _start_forgetting(keep: float) -> None:
    """Once per process: a thread that drops closed pages' states even when no page runs to do it."""
    def forget() -> None:
        while not _SHUTTING_DOWN.wait(CLOSED_CHECK_SECONDS):
            with _KEPT_LOCK:
                _forget_closed_pages(keep)

    threading.Thread(target=forget, name="geodesic-kept-tabs", daemon=True).start()


def keep_tab(token: str | None, views: dict) -> str | None:
    """Register this session's state under its tab's token, or take back the state a reload of the tab left.
    Returns "restored" (this session now shows the tab's earlier walk; its own, if any, is closed), "renew" (the
    token is held by another open page: a duplicated tab, which needs a token of its own) or None."""
    keep = engine().settings.keep_closed_seconds
    if token is None or not keep:
        return None
    from streamlit.runtime import Runtime

    if not Runtime.exists():  # AppTest: no pages to come back to
        return None
    me = session_id()
    with _KEPT_LOCK:
        kept = _KEPT.get(token)
        if kept is not None and kept.session == me:  # every run: what a reload should bring back
            kept.views = dict(views)
            if kept.resume:  # the page came back to the same session (a network blip) after its walks paused
                _resume(kept)
            return None
        _start_forgetting(keep)
        _forget_closed_pages(keep)
        kept = _KEPT.get(token)
        if kept is None:
            _KEPT[token] = _Kept(state(), me, dict(views))
            return None
        if _page_open(kept.session):
            return "renew"
        kept.session, kept.gone_since = me, None  # an open page's walks are never paused by _forget_closed_pages
    _adopt(kept.state, me, kept.views)
    _resume(kept)
    return "restored"


def _adopt(restored: AppState, me: str, views: dict) -> None:
    """Show `restored` in this session: the walk this session had built meanwhile is closed, and the restored
    walks' handles count against this session's limits from now on."""
    current = st.session_state.get(KEY)
    if current is not None and current is not restored:
        for _, handle in current.fan:
            handle.close()
        if current.runner is not None:
            current.runner.close()
        if current.stop_baselines is not None:
            current.stop_baselines.set()
    for handle in _handles(restored):
        handle.session = me
        handle.touch()
    st.session_state[KEY] = restored
    for key, value in views.items():
        st.session_state[key] = value


TAB_WAIT_SECONDS = 3.0  # the most a new session waits for its page to say which tab it is (about a second)


def waiting_for_tab() -> bool:
    """Whether a new session should wait for its tab's token before building a walk: while some closed page's
    walk is kept, this session may be that page reloaded, and a walk built now would be thrown away a moment
    later (shown at step 0 first). Never more than TAB_WAIT_SECONDS: a page whose scripts do not report goes on."""
    ss = st.session_state
    if ss.get("_tab") is not None or state().experiment is not None or not engine().settings.keep_closed_seconds:
        return False
    if time.monotonic() - ss.get("_tab_first_run", 0.0) > TAB_WAIT_SECONDS:
        return False
    from streamlit.runtime import Runtime

    if not Runtime.exists():
        return False
    with _KEPT_LOCK:
        return any(not _page_open(kept.session) for kept in _KEPT.values())


def follow_tab(view_keys: tuple[str, ...]) -> None:
    """On every run, before any control is drawn: learn this tab's token, and after a reload take back the walk
    the tab showed (with a toast saying so)."""
    from app import tab

    ss = st.session_state
    stale = ss.setdefault("_tab_stale", set())  # tokens this session gave up (a duplicated tab's)
    token = tab.token(ss.get("_tab"), renew=next(iter(stale), None))
    if token is None and "_tab_first_run" not in ss:
        ss["_tab_first_run"] = time.monotonic()
    if token is None or token in stale:
        return
    views = {k: ss[k] for k in view_keys if k in ss}
    if token == ss.get("_tab"):
        keep_tab(token, views)  # the view on show now, for a later reload
        return
    outcome = keep_tab(token, views)
    if outcome == "renew":
        stale.clear()
        stale.add(token)
        st.rerun()  # the page makes a token of its own, and reports it
    ss["_tab"] = token
    if outcome == "restored":
        s = state()
        walker = s.walker
        keep = engine().settings.keep_closed_seconds
        within = f"{keep / 60:g} min" if keep >= 60 else f"{keep:g} s"
        st.toast(f"Your walk is back, at step {walker.n_steps if walker else 0}: a tab reloaded or reopened within "
                 f"{within} of closing gets its walk back.", icon=":material/history:")
