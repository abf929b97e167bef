"""The engine: many sessions walking at once from many threads, batched, fair, each failing alone."""
import math
import os
import sys
import threading
import time

import pytest

from geodesic.config import GoalConfig, RunConfig, TrainConfig, default_walk
from geodesic.engine import CapacityError, Engine, EngineSettings, background_thread, on_a_passing_thread
from geodesic.errors import ConfigError
from geodesic.experiment import build


def _walker(goal="sparsify", solver="constrained", seed=0, **walk):
    return build(RunConfig(goal=GoalConfig(kind=goal), train=TrainConfig(epochs=5), seed=seed,
                           walk=default_walk(goal, solver, **walk))).walker


@pytest.fixture
def engine():
    eng = Engine(EngineSettings(threads=1))
    yield eng
    eng.stop()


def _wait(predicate, seconds=60.0):
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < seconds, "timed out"
        time.sleep(0.02)


def _sessions_at_once(n: int, session) -> list[str]:
    """session(i) on n threads at once, as Streamlit runs browser sessions; what went wrong in any of them (an
    exception, or the error its walk stopped with: session returns its handle, paused)."""
    errors = []

    def run(i):
        try:
            handle = session(i)
            handle.pause()
            if handle.error:
                errors.append(handle.error)
        except Exception as err:  # noqa: BLE001 - what the tests count
            errors.append(repr(err))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return errors


def test_threads_stepping_walks_at_once_do_not_crash():
    """Eight threads each stepping its own walk (what every browser session did before the engine): forward-mode
    AD used to fail here ('no level exists' / 'invalid index', 7 of 8 threads in 5 s)."""
    walkers = [_walker(solver=s, seed=i % 2) for i, s in enumerate(["penalty", "constrained"] * 4)]
    errors, steps = [], [0] * len(walkers)

    def walk(i):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 and not walkers[i].is_done:
            try:
                walkers[i].step()
                steps[i] += 1
            except Exception as err:  # noqa: BLE001 - what the test counts
                errors.append(repr(err))
                return

    threads = [threading.Thread(target=walk, args=(i,)) for i in range(len(walkers))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and min(steps) > 0


def test_sessions_walk_at_once_through_one_engine(engine):
    """Eight sessions, each on its own thread as Streamlit runs them: Run, read the points as a page refresh
    does, Step clicks while others run; every goal and both rules; no error, every walk advanced."""
    kinds = [(g, s) for g in ("sparsify", "new-task", "connect") for s in ("constrained", "penalty")]
    kinds += [("sparsify", "constrained")] * 2
    walkers = [_walker(g, s) for g, s in kinds]
    points = [0] * len(walkers)

    def session(i):
        handle = engine.open(walkers[i], session=f"s{i}")
        if i % 4 == 3:  # a user clicking Step repeatedly
            for _ in range(5):
                assert handle.step_once() is not None, handle.error
        handle.run()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4:
            handle.touch()
            frame = handle.walker.record.to_frame()  # what the page reads while the engine appends
            points[i] = len(frame)
            time.sleep(0.1)
        return handle

    assert _sessions_at_once(len(walkers), session) == []
    assert all(w.n_steps > 1 for w in walkers), [w.n_steps for w in walkers]
    assert engine.n_errors == 0


def test_pages_measuring_pruning_curves_while_their_walks_run_at_once(engine):
    """Six sessions on their own threads, as the sparsify Overview does: each runs its walk and, between reads,
    makes a pruning curve of its current point on the engine's thread and advances it a slice at a time. No error,
    every walk advanced, and each curve is that of the point it was made at (a copy: the walk moved on). The engine
    used to serve calls until none was queued: six pages calling back to back kept every walk at step 1."""
    import numpy as np

    from geodesic.analysis import PruningCurve, pruning_curve, pruning_levels

    walkers = [_walker(seed=i % 2, n_steps=5000) for i in range(6)]
    levels = pruning_levels(0.9)
    curves = [[] for _ in walkers]
    barrier = threading.Barrier(len(walkers))

    def session(i):
        handle = engine.open(walkers[i], session=f"s{i}")
        handle.run()
        barrier.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4:
            handle.touch()
            curve = handle.call(PruningCurve, walkers[i], levels)
            while not handle.call(curve.advance, 0.0):  # one level per call: a slow model's slices
                pass
            curves[i].append(curve)
        return handle

    assert _sessions_at_once(len(walkers), session) == [] and engine.n_errors == 0
    assert all(len(c) >= 2 for c in curves), [len(c) for c in curves]
    for walker, made in zip(walkers, curves, strict=True):
        steps = [c.step for c in made]
        assert walker.n_steps > steps[0] and steps[-1] > steps[0], steps  # the walk ran while its curves were made
        for curve in (made[0], made[-1]):
            np.testing.assert_allclose(curve.values, pruning_curve(walker, levels, step=curve.step), atol=1e-7)


def test_every_running_walk_gets_steps_in_turn():
    """fair_share 'steps': two batchable walks, a penalty walk and a CG walk (never batched), equal steps per
    round."""
    engine = Engine(EngineSettings(threads=1, fair_share="steps"))
    try:
        walkers = [_walker(seed=0), _walker(seed=1), _walker(solver="penalty"), _walker(linear_solver="cg")]
        handles = [engine.open(w, "class") for w in walkers]
        for h in handles:
            h.run()
        _wait(lambda: min(w.n_steps for w in walkers) >= 10)
        for h in handles:
            h.pause()
        counts = [w.n_steps for w in walkers]
        assert max(counts) - min(counts) <= 2, counts
    finally:
        engine.stop()


class _SlowWalker:
    """A walker whose every step also takes `seconds` of the engine's time (a big model's step, in a test)."""

    def __init__(self, walker, seconds):
        self._walker, self._seconds = walker, seconds

    def step(self):
        time.sleep(self._seconds)
        return self._walker.step()

    def __getattr__(self, name):
        return getattr(self._walker, name)


def test_walks_share_the_engines_time_not_its_steps(engine):
    """Beside a walk whose steps take 0.2 s, a light walk takes many steps to its one, and both get about half
    of the engine's time; a walk started later is owed at most FAIR_CREDIT."""
    from geodesic.engine import FAIR_CREDIT

    heavy_walker = _SlowWalker(_walker(linear_solver="cg"), 0.2)  # CG: never batched with the light walk
    light_walker = _walker("new-task", seed=1, n_steps=10**6)  # no end point, no pause: it walks the whole time
    heavy, light = engine.open(heavy_walker, "a"), engine.open(light_walker, "b")
    heavy.run()
    light.run()
    _wait(lambda: heavy_walker.n_steps >= 5)
    for h in (heavy, light):
        h.pause()
    assert light_walker.n_steps >= 5 * heavy_walker.n_steps, (light_walker.n_steps, heavy_walker.n_steps)
    share = light.engine_seconds / (light.engine_seconds + heavy.engine_seconds)
    assert 0.3 < share < 0.7, share
    # a third walk started now is owed at most FAIR_CREDIT of the others' time, not all of it: the others go on
    late_walker = _walker("new-task", seed=2, n_steps=10**6)
    late = engine.open(late_walker, "c")
    heavy.run()
    light.run()
    late.run()
    assert late.engine_seconds >= min(heavy.engine_seconds, light.engine_seconds) - FAIR_CREDIT - 1e-9
    light_steps = light_walker.n_steps
    _wait(lambda: heavy_walker.n_steps >= 8)
    for h in (heavy, light, late):
        h.pause()
    assert light_walker.n_steps > light_steps + 20 and late_walker.n_steps > 20
    # leaving slow motion: owed at most FAIR_CREDIT by the running walks too
    heavy.run()
    light.run()
    late.set_rate(1.0)
    late.engine_seconds = 0.0  # as if it had stepped slowly for a long time
    late.set_rate(None)
    assert late.engine_seconds >= min(heavy.engine_seconds, light.engine_seconds) - FAIR_CREDIT - 0.3
    assert late.engine_seconds > 0
    heavy.pause()
    light.pause()


class _SlowFirstStep(_SlowWalker):
    """A walker whose first step alone also takes `seconds` (the one-off set-up of a first step)."""

    def step(self):
        if self._walker.n_steps == 0:
            time.sleep(self._seconds)
        return self._walker.step()


def test_a_first_steps_set_up_is_not_charged_so_the_first_walk_does_not_freeze():
    """The first walk on a server paid its first step's set-up (0.2-0.4 s measured) and then stood still until
    every walk opened after it had been charged as much. A first step is charged no more than the second."""
    from geodesic.engine import FAIR_QUANTUM

    engine = Engine(EngineSettings(threads=1, batching=False))  # three walks alike, each stepped on its own
    try:
        first_walker = _SlowFirstStep(_walker("new-task", n_steps=10**6), 0.6)
        others = [_walker("new-task", seed=s, n_steps=10**6) for s in (1, 2)]
        first = engine.open(first_walker, "a")
        handles = [engine.open(w, f"s{i}") for i, w in enumerate(others)]
        first.run()
        _wait(lambda: first_walker.n_steps >= 1, seconds=5.0)
        for h in handles:
            h.run()
        _wait(lambda: all(w.n_steps >= 40 for w in others))
        first_steps = first_walker.n_steps
        for h in (first, *handles):
            h.pause()
    finally:
        engine.stop()
    # Charged its 0.6 s set-up, it would stand still while the others took 0.6 s of steps (about 80 each here).
    assert first_steps >= 30, (first_steps, [w.n_steps for w in others])
    assert first.engine_seconds < min(h.engine_seconds for h in handles) + 0.1  # the set-up is not on its account

    # A walk whose every step is long is still charged all of them: the second step settles the first.
    handle = Engine().open(_walker(), "b")
    assert handle._charge(0.5) == FAIR_QUANTUM
    assert handle._charge(0.5) == pytest.approx(1.0 - FAIR_QUANTUM)  # both steps charged in full by now
    assert handle._charge(0.5) == 0.5
    handle.walker = _walker(seed=3)  # a new walker in the same handle (Reset): its first step again
    assert handle._charge(0.3) == FAIR_QUANTUM and handle._charge(0.01) == 0.01


def test_closed_walks_are_not_kept_alive_by_their_batch(engine):
    """A batch holds its walkers (paths, weights): once their sessions close or reset them, the engine lets them go.
    Before, they stayed until 65 batches had piled up (a server grew by half a gigabyte in 120 rounds of 4 walks)."""
    import gc
    import weakref

    start = _walker()
    walkers = [start.branch(0, seed=s) for s in (1, 2)]
    refs = [weakref.ref(w) for w in walkers]
    handles = [engine.open(w, f"s{i}") for i, w in enumerate(walkers)]
    for h in handles:
        h.run()
    _wait(lambda: all(w.n_steps >= 3 for w in walkers))
    assert any(id(walkers[0]) in key for key in engine._batches)  # they were stepped as a batch
    for h in handles:
        h.pause()
        h.close()
    reset = engine.open(start.branch(0, seed=3), "s0")  # the first session's Reset: a new walk
    reset.run()
    _wait(lambda: reset.walker.n_steps >= 2)  # the engine has gone round since the others closed
    reset.pause()
    walkers.clear()
    handles.clear()
    del h
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_fair_share_setting_is_checked():
    with pytest.raises(ConfigError, match="GEODESIC_FAIR_SHARE"):
        EngineSettings(fair_share="random")
    assert EngineSettings.from_env({"GEODESIC_FAIR_SHARE": "steps"}).fair_share == "steps"


def test_cuda_graphs_setting_is_checked_and_reaches_the_steps(monkeypatch):
    from geodesic import graphs

    with pytest.raises(ConfigError, match="GEODESIC_CUDA_GRAPHS"):
        EngineSettings(cuda_graphs="sometimes")
    settings = EngineSettings.from_env({"GEODESIC_CUDA_GRAPHS": "off"})
    assert settings.cuda_graphs == "off"
    monkeypatch.setattr(graphs, "MODE", "auto")
    engine = Engine(settings)
    try:
        handle = engine.open(_walker(), "s")
        handle.step_once()  # the engine's thread has started and applied its settings
        assert graphs.MODE == "off"
    finally:
        engine.stop()


def test_step_once_takes_exactly_one_step_while_others_run(engine):
    busy = [engine.open(_walker(seed=s), "other") for s in range(4)]
    for h in busy:
        h.run()
    mine = engine.open(_walker(solver="penalty"), "me")
    for n in range(1, 4):
        point = mine.step_once()
        assert point.step == n and mine.walker.n_steps == n
    for h in busy:
        h.pause()


def test_a_diverging_walk_stops_only_its_own_session(engine):
    walkers = [_walker(seed=s) for s in range(3)]
    handles = [engine.open(w, f"s{i}") for i, w in enumerate(walkers)]
    for h in handles:
        h.run()
    _wait(lambda: walkers[1].n_steps >= 2)
    bad = walkers[1]
    params = {k: v.clone() for k, v in bad.params.items()}
    next(iter(params.values()))[0, 0] = math.nan
    handles[1].call(setattr, bad, "params", params)  # between two steps, on the engine's thread
    _wait(lambda: handles[1].error is not None)
    assert "diverged" in handles[1].error and not handles[1].is_running
    n_before = [walkers[0].n_steps, walkers[2].n_steps]
    _wait(lambda: walkers[0].n_steps > n_before[0] + 3 and walkers[2].n_steps > n_before[1] + 3)
    assert handles[0].error is None and handles[2].error is None


def test_limits_say_what_to_do(engine):
    eng = Engine(EngineSettings(threads=1, max_walks=2, max_walks_per_session=1))
    try:
        a, b, c = (eng.open(_walker(seed=s), session) for s, session in ((0, "x"), (1, "x"), (2, "y")))
        a.run()
        with pytest.raises(CapacityError, match="this session already runs 1 walks"):
            b.run()
        c.run()
        d = eng.open(_walker(seed=3), "z")
        with pytest.raises(CapacityError, match="GEODESIC_MAX_WALKS"):
            d.run()
        a.close()  # a closed page frees its walk's slot
        assert eng.running() == 1
        d.run()
        assert eng.running() == 2
    finally:
        eng.stop()


def test_an_unwatched_walk_is_paused_and_frees_its_slot():
    eng = Engine(EngineSettings(threads=1, idle_seconds=0.5))
    try:
        handle = eng.open(_walker(), "gone", pause_unwatched=True)  # as a page opens its walks
        handle.run()
        _wait(lambda: not handle.is_running, seconds=30)
        # a pause, not a failure: said in handle.notice, and Run goes on
        assert "without a page watching" in handle.notice and handle.error is None and eng.running() == 0
        assert handle.paused_for == "idle"
    finally:
        eng.stop()


def test_a_script_walk_runs_its_steps_unwatched_and_wait_returns_when_it_stops():
    """From Python a walk was paused as a closed page's after idle_seconds (two minutes by default): a script's
    long walk stopped half-way, and nothing waited for it but a hand-written polling loop."""
    eng = Engine(EngineSettings(threads=1, idle_seconds=0.3))
    try:
        handle = eng.open(_walker(solver="penalty"))
        handle.set_rate(20.0)  # 40 steps take about 2 s, well past idle_seconds
        handle.run(40)
        assert handle.wait(timeout=0.05) is False and handle.is_running  # still walking
        assert handle.wait(timeout=120) is True
        assert handle.walker.n_steps == 40 and handle.paused_for == "steps" and handle.error is None
        assert handle.wait() is True  # not running: at once
    finally:
        eng.stop()


def test_slow_motion_keeps_to_its_rate(engine):
    handle = engine.open(_walker(solver="penalty"), "teacher")
    handle.set_rate(5.0)
    handle.run()
    time.sleep(2.0)
    handle.pause()
    assert 5 <= handle.walker.n_steps <= 13  # ≈ 10 steps in 2 s at 5 steps/s


def test_settings_from_the_environment_and_a_file(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("[engine]\nmax_walks = 40\nmax_batch = 8\n")
    settings = EngineSettings.from_env({"GEODESIC_SERVER_CONFIG": str(path), "GEODESIC_MAX_WALKS": "12",
                                        "GEODESIC_BATCHING": "false"})
    assert (settings.max_walks, settings.max_batch, settings.batching) == (12, 8, False)
    with pytest.raises(ConfigError, match="GEODESIC_MAX_WALKS_PER_SESSION"):
        EngineSettings.from_env({"GEODESIC_MAX_WALKS_PER_SESSION": "many"})
    with pytest.raises(ConfigError, match="GEODESIC_TORCH_THREADS"):
        EngineSettings.from_env({"GEODESIC_TORCH_THREADS": "-2"})
    assert EngineSettings.from_env({"GEODESIC_KEEP_FREED_MB": "0"}).keep_freed_mb == 0
    with pytest.raises(ConfigError, match="GEODESIC_KEEP_FREED_MB"):
        EngineSettings.from_env({"GEODESIC_KEEP_FREED_MB": "-1"})
    assert EngineSettings.from_env({"GEODESIC_KEEP_CLOSED_SECONDS": "0"}).keep_closed_seconds == 0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(ConfigError, match="GEODESIC_KEEP_CLOSED_SECONDS"):
            EngineSettings.from_env({"GEODESIC_KEEP_CLOSED_SECONDS": bad})
    path.write_text("[engine]\nmax_walkz = 3\n")
    with pytest.raises(ConfigError, match="max_walkz"):
        EngineSettings.from_env({"GEODESIC_SERVER_CONFIG": str(path)})


def test_baselines_computed_beside_a_walk_leave_its_path_alone():
    """What the dashboard does after the first paint: the goal's baselines on an analysis thread while the engine
    walks the same experiment (on a copy of the network: functional_call swaps a module's parameters)."""
    from geodesic import analysis

    alone = build(RunConfig()).walker
    expected = [alone.step() for _ in range(15)]
    experiment = build(RunConfig())
    reference = analysis.goal_baselines(build(RunConfig()))
    engine = Engine(EngineSettings(threads=1))
    handle = engine.open(experiment.walker)
    got = {}
    worker = threading.Thread(target=lambda: got.update(analysis.goal_baselines_apart(experiment)))
    handle.run()
    worker.start()
    worker.join(timeout=120)
    t0 = time.monotonic()
    while experiment.walker.n_steps < 15:
        assert time.monotonic() - t0 < 60 and not handle.error, handle.error
        time.sleep(0.01)
    handle.pause()
    engine.stop()
    # The same baselines as on the walk's own network, and the walk's own path, up to the float noise of other
    # thread counts (the engine steps on one PyTorch thread here; a test example may flip: 1/360).
    assert got["one_shot_accuracy"] == pytest.approx(reference["one_shot_accuracy"], abs=0.006)
    assert got["masked_fine_tune_accuracy"] == pytest.approx(reference["masked_fine_tune_accuracy"], abs=0.006)
    for a, b in zip(expected, experiment.walker.record.points[1:16], strict=True):
        assert b.accuracy == pytest.approx(a.accuracy, abs=0.006) and b.loss == pytest.approx(a.loss, rel=1e-3)


def test_an_analysis_thread_yields_to_the_engine_and_uses_its_thread_count():
    """The app's analysis threads (baselines beside a walk) run at a lower priority and with the engine's
    PyTorch thread count, whatever the default was when the thread started."""
    import torch

    seen = {}

    def analysis() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        background_thread(EngineSettings(threads=1), niceness=5)
        seen["niceness"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        seen["threads"] = torch.get_num_threads()
        torch.randn(256, 256) @ torch.randn(256, 256)  # a product on this thread works as usual

    previous = torch.get_num_threads()
    try:
        thread = threading.Thread(target=analysis)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(previous)
    assert seen["threads"] == 1
    assert seen["niceness"] == 5 or sys.platform != "linux"


def test_the_thread_tuner_times_every_count_and_keeps_the_fastest():
    from geodesic.engine import ThreadTuner, thread_candidates

    assert thread_candidates(1) == [1] and thread_candidates(2) == [1, 2]
    assert thread_candidates(16) == [1, 2, 4, 8, 16] and thread_candidates(6) == [1, 2, 4, 6]
    now = [0.0]
    tuner = ThreadTuner([1, 2, 4], trials=3, retune_seconds=60.0, clock=lambda: now[0], first_retune_seconds=0.0)
    cost = {1: 0.010, 2: 0.004, 4: 0.006}  # seconds per step on each count
    kind = tuner.kind("mlp", 8)
    assert kind == ("mlp", 8) and tuner.kind("mlp", 5) == ("mlp", 8) and tuner.kind("mlp", 1) == ("mlp", 1)
    tried = []
    for _ in range(12):
        threads = tuner.choose(kind)
        tried.append(threads)
        # The first step on each count pays a set-up cost that must not decide.
        tuner.record(kind, threads, cost[threads] + (1.0 if tried.count(threads) == 1 and threads == 2 else 0.0))
    assert sorted(set(tried)) == [1, 2, 4] and all(tried.count(t) == 4 for t in (1, 2, 4))
    assert tuner.chosen() == {kind: 2}
    # The first choice is provisional (here after 0 s): timed again at once, then kept for a minute.
    assert tuner.choose(kind) in (1, 2, 4) and kind not in tuner.chosen()
    for _ in range(12):
        threads = tuner.choose(kind)
        tuner.record(kind, threads, cost[threads])
    assert tuner.chosen() == {kind: 2}
    now[0] = 59.0
    assert [tuner.choose(kind) for _ in range(10)] == [2] * 10
    for _ in range(10):  # steps on the chosen count do not postpone the next timing
        tuner.record(kind, 2, cost[2])
    now[0] = 61.0
    assert tuner.choose(kind) in (1, 2, 4) and kind not in tuner.chosen()  # timed again after a minute
    assert ThreadTuner([3]).choose(kind) == 3
    # A second thread that makes a step only a little faster is not worth the core it takes from the pages.
    frugal = ThreadTuner([1, 2], trials=2, clock=lambda: now[0])
    for _ in range(6):
        threads = frugal.choose(kind)
        frugal.record(kind, threads, {1: 0.010, 2: 0.009}[threads])
    assert frugal.chosen() == {kind: 1}
    later = ThreadTuner([1, 2], trials=1, clock=lambda: now[0])  # by default the first choice lasts 5 s
    for _ in range(4):
        threads = later.choose(kind)
        later.record(kind, threads, cost[threads])
    now[0] += 4.9
    assert later.chosen() == {kind: 2} and later.choose(kind) == 2
    now[0] += 0.2
    later.choose(kind)
    assert kind not in later.chosen()


def test_an_engine_that_tunes_its_threads_walks_the_same_path():
    """The tuner changes how many threads step a walk, not where it goes (up to float noise)."""
    import torch

    previous = torch.get_num_threads()
    try:
        alone = build(RunConfig()).walker
        expected = [alone.step() for _ in range(20)]
        walker = build(RunConfig()).walker
        engine = Engine(EngineSettings(threads=2))
        assert engine.settings.thread_candidates == [1, 2]
        handle = engine.open(walker)
        handle.run()
        t0 = time.monotonic()
        while walker.n_steps < 20 and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        handle.pause()
        engine.stop()
        assert walker.n_steps >= 20 and not handle.error
        assert set(engine.tuner.chosen().values()) <= {1, 2} and len(engine.tuner.chosen()) == 1
        for a, b in zip(expected, walker.record.points[1:21], strict=True):
            assert b.accuracy == pytest.approx(a.accuracy, abs=0.006) and b.loss == pytest.approx(a.loss, rel=1e-3)
        fixed = EngineSettings(threads=3, tune_threads=False)
        assert fixed.thread_candidates == [3]
    finally:
        torch.set_num_threads(previous)


def test_work_on_a_passing_thread_returns_its_result_and_its_error():
    seen = []
    assert on_a_passing_thread(lambda: seen.append(threading.current_thread()) or 42) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()  # ended, and its OpenMP team with it

    def fails():
        raise ConfigError("x", 1, "2")

    with pytest.raises(ConfigError, match="x"):
        on_a_passing_thread(fails)


def test_a_run_pauses_after_its_steps_and_run_goes_on(engine):
    """A new-task walk has no end of its own: a run takes the walk's n_steps (as `geodesic run` does) and pauses
    there, saying why; Run goes on for as many again. Before, it walked for as long as its page was open."""
    walker = _walker(goal="new-task", n_steps=7)
    handle = engine.open(walker, "student")
    handle.run()
    _wait(lambda: not handle.is_running)
    assert walker.n_steps == 7 and not walker.is_done and handle.error is None
    assert "Paused at step 7" in handle.notice and "7 steps" in handle.notice and handle.paused_for == "steps"
    time.sleep(0.2)
    assert walker.n_steps == 7  # paused means no more steps
    handle.run(n_steps=3)  # a run of its own length (the Python API)
    assert handle.notice is None
    _wait(lambda: not handle.is_running)
    assert walker.n_steps == 10 and "Paused at step 10" in handle.notice
    handle.step_once()  # a step clears what the pause said
    assert walker.n_steps == 11 and handle.notice is None and handle.paused_for is None
    with pytest.raises(ConfigError, match="n-steps"):
        handle.run(n_steps=0)
    assert not handle.is_running and walker.n_steps == 11


def test_runs_of_many_sessions_pause_each_at_its_own_step_count(engine):
    """Sessions on threads of their own start runs of different lengths at once (batched together): each walk
    pauses exactly at its own count, and one walk's pause does not stop the others."""
    start = _walker(goal="new-task")
    walkers = [start.branch(0, seed=i) for i in range(4)]
    handles = [engine.open(w, f"s{i}") for i, w in enumerate(walkers)]
    lengths = [3, 6, 9, 12]
    threads = [threading.Thread(target=h.run, args=(n,)) for h, n in zip(handles, lengths, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _wait(lambda: not any(h.is_running for h in handles))
    assert [w.n_steps for w in walkers] == lengths
    assert all(h.error is None and f"step {n}:" in h.notice for h, n in zip(handles, lengths, strict=True))


def test_a_closed_walk_takes_no_step_after_close_returns(engine):
    """Stop the fan closes its walks while the engine is stepping them as one batch: a step under way then landed
    after close had returned, one point more than the page had drawn (and than its Path view had fitted)."""
    start = _walker()
    late = []
    for round_ in range(12):
        walkers = [start.branch(0, seed=round_ * 4 + i) for i in range(4)]
        handles = [engine.open(w, "fan") for w in walkers]
        for h in handles:
            h.run(n_steps=10_000)
        _wait(lambda walkers=walkers: min(w.n_steps for w in walkers) >= 2)
        time.sleep(0.003 * round_)  # close at different moments of a step
        for h in handles:
            h.close(wait=True)
        closed_at = [w.n_steps for w in walkers]
        time.sleep(0.15)
        late.append([w.n_steps - n for w, n in zip(walkers, closed_at, strict=True)])
        assert not engine.running("fan")
    assert all(d == 0 for row in late for d in row), late


def test_a_close_from_a_thread_the_step_waits_on_returns_at_once(engine):
    """A session's state dropped by the garbage collector closes its walk from whichever thread collected it, e.g.
    an eigh worker that the engine's step is waiting for: a close that waited for that step stalled both for its
    whole 30 s timeout (a browser test's fan never appeared)."""
    walker = _walker()
    handle = engine.open(walker, "gone")
    took, real_step = [], walker.step

    def step():
        t0 = time.monotonic()
        closer = threading.Thread(target=handle.close)  # a thread this step waits for, closing its walk
        closer.start()
        closer.join(timeout=10)
        took.append(time.monotonic() - t0)
        return real_step()

    walker.step = step
    handle.run()
    _wait(lambda: took)
    assert took[0] < 2 and handle.is_closed


def test_steps_left_says_how_far_a_run_goes_and_a_pause_without_waiting_stops_it(engine):
    """What a reloaded tab resumes a walk with, after the walk paused while its page was closed (app/session.py)."""
    handle = engine.open(_walker(goal="new-task"), "closed page")
    assert handle.steps_left is None
    handle.set_rate(20.0)
    handle.run(400)
    _wait(lambda: handle.walker.n_steps >= 3, seconds=30)
    left = handle.steps_left
    assert 400 - handle.walker.n_steps - 1 <= left <= 400 - 3
    handle.pause(wait=False)  # returns at once; at most the step under way lands
    time.sleep(0.5)
    n = handle.walker.n_steps
    time.sleep(0.5)
    assert not handle.is_running and handle.steps_left is None and handle.walker.n_steps == n
    handle.run(left)
    _wait(lambda: handle.walker.n_steps > n, seconds=30)
    assert handle.steps_left <= left
    handle.pause()
