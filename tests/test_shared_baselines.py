"""Baselines shared by the pages that open the same walk (a class at the teacher's link): computed once, each
page its own copy, stopped only when nobody wants them, errors to everyone and not kept. Exercised with threads
asking at once, as Streamlit's sessions do."""
from __future__ import annotations

import threading
import time

from geodesic import analysis
from geodesic.analysis import SharedResults, baselines_key
from geodesic.config import GoalConfig, RunConfig, WalkConfig
from geodesic.errors import Cancelled
from geodesic.experiment import build


def _ask_at_once(n: int, ask) -> tuple[list, list]:
    results, errors = [None] * n, [None] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = ask(i)
        except Exception as err:  # noqa: BLE001 - collected for the assertions
            errors[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return results, errors


def test_callers_asking_at_once_share_one_computation():
    shared, calls = SharedResults(), []

    def compute(should_stop):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough for every caller to arrive while it runs
        return {"value": 42}

    results, errors = _ask_at_once(8, lambda i: shared.get("k", compute))
    assert errors == [None] * 8
    assert len(calls) == 1 and shared.n_computed == 1
    assert all(r == {"value": 42} for r in results)
    assert shared.get("k", compute) == {"value": 42} and len(calls) == 1  # kept for later callers
    assert shared.get("other", compute) == {"value": 42} and len(calls) == 2  # another key: its own computation


def test_a_computation_stops_only_when_every_caller_stopped_wanting_it():
    shared = SharedResults()
    first_gone, started = threading.Event(), threading.Event()

    def compute(should_stop):
        started.set()
        for _ in range(40):
            if should_stop():
                raise Cancelled("stopped")
            time.sleep(0.02)
        return "done"

    out = {}

    def first():
        try:
            out["first"] = shared.get("k", compute, should_stop=first_gone.is_set)
        except Cancelled:
            out["first"] = "cancelled"

    t = threading.Thread(target=first)
    t.start()
    started.wait(5)
    second = threading.Thread(target=lambda: out.update(second=shared.get("k", compute, should_stop=lambda: False)))
    second.start()
    time.sleep(0.1)
    first_gone.set()  # the first page moved on; the second still waits: the computation goes on for it
    t.join(10)
    second.join(10)
    assert out["second"] == "done"
    assert out["first"] in ("done", "cancelled")

    # Nobody wants it any more: it stops, and every caller hears so; nothing is kept.
    gone = threading.Event()
    results, errors = _ask_at_once(3, lambda i: (time.sleep(0.05 * i), gone.set() if i == 2 else None,
                                                 shared.get("k2", compute, should_stop=gone.is_set)))
    assert all(isinstance(e, Cancelled) for e in errors), errors
    assert shared.get("k2", lambda stop: "again") == "again"


def test_an_error_reaches_every_caller_and_is_not_kept():
    shared, calls = SharedResults(), []

    def broken(should_stop):
        calls.append(1)
        time.sleep(0.2)
        raise RuntimeError("out of memory")

    _, errors = _ask_at_once(4, lambda i: shared.get("k", broken))
    assert all(isinstance(e, RuntimeError) and "out of memory" in str(e) for e in errors)
    assert len(calls) == 1
    assert shared.get("k", lambda stop: "fine") == "fine"


def test_only_the_newest_results_are_kept():
    shared = SharedResults(max_entries=2)
    for key in "abc":
        shared.get(key, lambda stop, key=key: key)
    calls = []
    assert shared.get("a", lambda stop: calls.append(1) or "a") == "a" and calls == [1]  # "a" was dropped
    assert shared.get("c", lambda stop: calls.append(1) or "c") == "c" and calls == [1]  # "c" was kept


def test_pages_opening_the_same_walk_share_its_baselines(monkeypatch):
    """Four sessions build the same walk and ask for its baselines at once: one computation, equal results, and
    each its own copy (a page that changed its copy would not change another's)."""
    monkeypatch.setattr(analysis, "_SHARED_BASELINES", SharedResults())
    calls = []
    real = analysis.goal_baselines_apart

    def counted(experiment, should_stop=None):
        calls.append(1)
        return real(experiment, should_stop=should_stop)

    monkeypatch.setattr(analysis, "goal_baselines_apart", counted)
    config = RunConfig(goal=GoalConfig(kind="new-task"))
    experiments = [build(config) for _ in range(4)]
    assert len({baselines_key(e) for e in experiments}) == 1
    results, errors = _ask_at_once(4, lambda i: analysis.shared_goal_baselines_apart(experiments[i]))
    assert errors == [None] * 4 and len(calls) == 1
    frames = [r["naive_fine_tune"] for r in results]
    assert all(f.equals(frames[0]) for f in frames) and frames[0] is not frames[1]
    frames[0].iloc[0, 0] = -1.0
    assert not frames[1].equals(frames[0])


def test_the_baselines_key_follows_what_they_depend_on():
    base = build(RunConfig())
    same = build(RunConfig().replace(walk=WalkConfig(max_step_norm=0.02)))  # ε does not change them
    assert baselines_key(base) == baselines_key(same)
    other_seed = build(RunConfig(seed=1))
    other_budget = build(RunConfig().replace(walk=WalkConfig(n_steps=500)))
    other_goal = build(RunConfig(goal=GoalConfig(kind="sparsify", target_sparsity=0.8)))
    keys = {baselines_key(e) for e in (base, other_seed, other_budget, other_goal)}
    assert len(keys) == 4
    moved = build(RunConfig())
    first = next(iter(moved.start))
    moved.start[first] = moved.start[first] + 1e-3  # e.g. a checkpoint the user loaded
    assert baselines_key(moved) != baselines_key(base)
