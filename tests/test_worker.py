"""The baselines' process (geodesic/worker.py): the same results as in the server's own process, stopped when
nobody wants them, a dead process reported and replaced, many sessions asking at once."""
from __future__ import annotations

import threading
import time

import pytest

from geodesic import analysis, worker
from geodesic.analysis import SharedResults
from geodesic.config import GoalConfig, RunConfig
from geodesic.errors import Cancelled, GeodesicError
from geodesic.experiment import build


@pytest.fixture(scope="module")
def process():
    p = worker.AnalysisProcess()
    p.start().result(timeout=120)
    yield p
    p.shutdown()


@pytest.mark.parametrize("where", ["process", "thread"])
@pytest.mark.parametrize("kind", ["sparsify", "new-task", "connect"])
def test_the_baselines_apart_equal_the_walks_own(process, kind, where):
    """Computed in the analysis process, or on a thread with a copy of the network (the fallback for large
    data), the baselines are those of the walk's own network."""
    experiment = build(RunConfig(goal=GoalConfig(kind=kind)))
    got = (process.goal_baselines(experiment) if where == "process"
           else analysis.goal_baselines_apart(experiment))
    expected = analysis.goal_baselines(experiment)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if hasattr(value, "to_numpy"):
            assert got[name].to_numpy() == pytest.approx(value.to_numpy(), abs=1e-5)
        else:
            assert got[name] == pytest.approx(value, abs=1e-6)


def test_a_job_nobody_wants_stops_and_the_next_one_runs(process):
    experiment = build(RunConfig(goal=GoalConfig(kind="sparsify")))
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        process.goal_baselines(experiment, should_stop=lambda: time.monotonic() - t0 > 0.2)
    assert time.monotonic() - t0 < 5
    got = process.goal_baselines(build(RunConfig(goal=GoalConfig(kind="connect"))))
    assert len(got["straight_line"]) == 21


def test_a_process_that_dies_is_reported_and_replaced():
    p = worker.AnalysisProcess()
    try:
        p.start().result(timeout=120)
        experiment = build(RunConfig(goal=GoalConfig(kind="sparsify")))
        result = {}

        def ask():
            try:
                result["value"] = p.goal_baselines(experiment)
            except Exception as err:  # noqa: BLE001 - checked below
                result["error"] = err

        t = threading.Thread(target=ask)
        t.start()
        t0 = time.monotonic()  # kill as soon as the job is handed over (queued or running: both must be reported)
        while not (p._pool is not None and p._pool._pending_work_items) and time.monotonic() - t0 < 30:
            time.sleep(0.005)
        for proc in list(p._pool._processes.values()):  # what the OS does to a process out of memory
            proc.kill()
        t.join(60)
        assert isinstance(result.get("error"), GeodesicError), result
        assert "stopped" in str(result["error"])
        again = p.goal_baselines(build(RunConfig(goal=GoalConfig(kind="connect"))))
        assert len(again["straight_line"]) == 21
    finally:
        p.shutdown()


def test_sessions_asking_at_once_share_one_job(process, monkeypatch):
    shared = SharedResults()
    monkeypatch.setattr(analysis, "_SHARED_BASELINES", shared)
    monkeypatch.setattr(worker, "_PROCESS", process)
    experiments = [build(RunConfig(goal=GoalConfig(kind="new-task"))) for _ in range(4)]
    results, start = [None] * 4, threading.Barrier(4)

    def session(i):
        start.wait()
        results[i] = worker.shared_goal_baselines_in_process(experiments[i])

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert shared.n_computed == 1
    assert all(r is not None and r["naive_fine_tune"].equals(results[0]["naive_fine_tune"]) for r in results)


def test_data_too_large_to_copy_is_worked_on_the_calling_thread():
    """Over max_bytes (a large torchvision set) nothing is sent to the process: the baselines are computed here."""
    p = worker.AnalysisProcess(max_bytes=1)
    experiment = build(RunConfig(goal=GoalConfig(kind="connect")))
    got = p.goal_baselines(experiment)
    assert len(got["straight_line"]) == 21
    assert p._pool is None  # no process was started for it
