"""Each goal reaches its target on digits in seconds, with both step rules."""
import dataclasses

import pytest
import torch

from geodesic.config import DataConfig, GoalConfig, RunConfig, TrainConfig, default_walk
from geodesic.errors import ConfigError
from geodesic.experiment import build
from geodesic.measures import magnitude_prune, sparsity
from geodesic.params import norm, sub

FAST_TRAIN = TrainConfig(epochs=15)


def run_to_end(goal: str, solver: str, n_steps: int, **goal_kw):
    config = RunConfig(goal=GoalConfig(kind=goal, **goal_kw), walk=default_walk(goal, solver, n_steps=n_steps),
                       train=FAST_TRAIN, data=DataConfig("digits"))
    experiment = build(config)
    for _ in experiment.walker.run():
        pass
    return experiment


def test_magnitude_prune_is_global_and_exact():
    params = {"a.weight": torch.tensor([[0.1, -3.0], [0.2, 0.05]]), "b.weight": torch.tensor([1.0, -0.01, 2.0]),
              "b.bias": torch.tensor([0.001])}
    pruned = magnitude_prune(params, ("a.weight", "b.weight"), 0.5)  # 3.5 of 7 rounds up: 4 zeroed
    assert sparsity(pruned, ("a.weight", "b.weight")) == pytest.approx(4 / 7)
    assert pruned["a.weight"].tolist() == [[0.0, -3.0], [0.0, 0.0]]
    assert pruned["b.weight"].tolist() == [1.0, 0.0, 2.0]
    assert pruned["b.bias"].tolist() == params["b.bias"].tolist()  # biases are not pruned


@pytest.mark.parametrize("solver", ["constrained", "penalty"])
def test_sparsify_reaches_target_sparsity_keeping_accuracy(solver):
    experiment = run_to_end("sparsify", solver, n_steps=1500, target_sparsity=0.8)
    record = experiment.walker.record
    assert experiment.walker.stop_reason == "goal reached"
    assert record.last.sparsity >= 0.8
    assert record.last.event.endswith("projected")
    start = record[0].accuracy["A"]
    assert record.last.accuracy["A"] >= start - 0.03
    assert record[0].extra["prune_now_accuracy/A"] < record.last.accuracy["A"]


def test_connect_snaps_exactly_onto_the_second_network():
    experiment = run_to_end("connect", "constrained", n_steps=1500)
    walker = experiment.walker
    assert walker.stop_reason == "goal reached"
    assert float(norm(sub(walker.params, experiment.end))) == 0.0
    assert walker.record.last.event.endswith("snapped")
    assert all(p.accuracy["A"] > 0.85 for p in walker.record.points)


def test_new_task_learns_b_and_keeps_a():
    experiment = run_to_end("new-task", "constrained", n_steps=150, new_task="permuted")
    record = experiment.walker.record
    assert record[0].accuracy["B"] < 0.5  # a permuted task is new to the start network
    assert record.last.accuracy["B"] > 0.85
    assert record.last.accuracy["A"] > record[0].accuracy["A"] - 0.06


def test_new_task_split_protocol_has_disjoint_classes():
    config = RunConfig(goal=GoalConfig(kind="new-task", new_task="split"), train=FAST_TRAIN,
                       walk=dataclasses.replace(default_walk("new-task", "constrained"), n_steps=1))
    experiment = build(config)
    a, b = experiment.tasks["A"], experiment.tasks["B"]
    assert set(a.train.y.unique().tolist()) == {0, 1, 2, 3, 4}
    assert set(b.test.y.unique().tolist()) == {5, 6, 7, 8, 9}
    assert experiment.walker.record[0].accuracy["A"] > 0.9


def test_zero_goal_weight_keeps_the_constrained_walk_still():
    config = RunConfig(goal=GoalConfig(kind="sparsify"), train=FAST_TRAIN,
                       walk=default_walk("sparsify", "constrained", goal_weight=0.0, n_steps=3))
    experiment = build(config)
    start = {k: v.clone() for k, v in experiment.walker.params.items()}
    points = list(experiment.walker.run())
    assert all(p.step_norm == 0.0 for p in points)
    assert float(norm(sub(experiment.walker.params, start))) == 0.0


def test_pruning_never_falls_short_of_the_target():
    params = {"w": torch.arange(1.0, 25857.0)}
    assert sparsity(magnitude_prune(params, ("w",), 0.9), ("w",)) >= 0.9


def test_pruning_curve_is_magnitude_pruning_at_every_level_without_retraining():
    """analysis.pruning_curve ranks |w| once for all levels; it must prune exactly what magnitude_prune prunes
    (the goal's target and the one-shot baseline), ties and rounding included, at the current point and at a
    recorded step."""
    import numpy as np

    from geodesic import analysis
    from geodesic.measures import evaluate

    config = RunConfig(goal=GoalConfig(kind="sparsify", target_sparsity=0.98),
                       walk=default_walk("sparsify", "constrained", n_steps=5), train=FAST_TRAIN,
                       data=DataConfig("digits"))
    walker = build(config).walker
    start = {k: v.clone() for k, v in walker.params.items()}
    for _ in walker.run():
        pass
    levels = analysis.pruning_levels(0.98)
    assert levels[0] == 0 and levels[-1] == pytest.approx(0.98) and {0.9, 0.95, 0.96, 0.97} <= set(levels.tolist())
    assert 0.935 in analysis.pruning_levels(0.935).tolist() and analysis.pruning_levels(0.5)[-1] == pytest.approx(0.95)
    test = walker.tasks["A"].test
    for step, params in ((None, walker.params), (0, start)):
        curve = analysis.pruning_curve(walker, levels, step=step)
        expected = [evaluate(walker.model_fn, magnitude_prune(params, walker.goal.prunable, s), test.x, test.y)[1]
                    for s in levels]
        np.testing.assert_allclose(curve, expected, atol=1e-7)
    assert curve[0] > 0.9 and curve[-1] < curve[0]  # the start network loses accuracy at 98%
    # measured a slice at a time (a slow model must not hold the engine's thread): one level per advance(0), on a
    # copy of the point, so the walk may move on meanwhile
    sliced = analysis.PruningCurve(walker, levels)
    assert not sliced.advance(0) and len(sliced.values) == 1
    for _ in walker.run(3):
        pass
    while not sliced.advance(0):
        pass
    np.testing.assert_allclose(sliced.values, analysis.pruning_curve(walker, levels, step=5), atol=1e-7)
    assert sliced.step == 5 and walker.n_steps == 8
    with pytest.raises(ConfigError, match="pruning curve step: got 9"):
        analysis.pruning_curve(walker, levels, step=9)
