"""Baselines: barriers, weight matching (a permutation of the same network is undone exactly), EWC and the
benchmark's table shape."""
import dataclasses

import numpy as np
import pytest
import torch

from geodesic import baselines as bl
from geodesic.config import ModelConfig
from geodesic.data import from_tensors
from geodesic.models import build_network


def test_barrier_of_a_flat_and_a_bumped_curve():
    assert bl.barrier([0.1, 0.1, 0.1]) == pytest.approx(0.0)
    assert bl.barrier([0.1, 0.5, 0.3]) == pytest.approx(0.3)


def test_weight_matching_undoes_a_permutation_of_hidden_units():
    net = build_network(ModelConfig(hidden=(8, 6)), (5,), 3)
    a = net.init_params(0)
    b = {k: v.clone() for k, v in a.items()}
    gen = torch.Generator().manual_seed(1)
    p1, p2 = torch.randperm(8, generator=gen), torch.randperm(6, generator=gen)
    b["layers.1.weight"], b["layers.1.bias"] = a["layers.1.weight"][p1], a["layers.1.bias"][p1]
    b["layers.3.weight"], b["layers.3.bias"] = a["layers.3.weight"][p2][:, p1], a["layers.3.bias"][p2]
    b["layers.5.weight"] = a["layers.5.weight"][:, p2]
    x = torch.randn(4, 5)
    torch.testing.assert_close(net.apply(a, x), net.apply(b, x))  # same function, other weights
    names = [(k, k.replace("weight", "bias")) for k in net.prunable]
    aligned = bl.weight_matching(a, b, names)
    for k in a:
        torch.testing.assert_close(aligned[k], a[k])


def test_continual_baselines_and_bezier_run_and_report():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=gen)
    task_a = from_tensors(x[:150], (x[:150, 0] > 0).long(), x[150:], (x[150:, 0] > 0).long())
    task_b = from_tensors(x[:150], (x[:150, 1] > 0).long(), x[150:], (x[150:, 1] > 0).long())
    net = build_network(ModelConfig(hidden=(16,)), (4,), 2)
    params = net.init_params(0)
    for method in ("naive", "ewc", "replay", "joint"):
        out = bl.continual_fine_tune(net.apply, params, task_b, 5, 0, method, task_a=task_a,
                                     memory=torch.arange(20))
        assert out.keys() == params.keys() and not all(torch.equal(out[k], params[k]) for k in params)
    curve = bl.bezier_curve(net.apply, params, net.init_params(1), task_a, 5, 0)
    assert len(curve["alpha"]) == 21 and np.all((curve["accuracy"] >= 0) & (curve["accuracy"] <= 1))


def test_benchmark_table_has_the_promised_fields():
    from geodesic.bench import Result, aggregate, markdown

    rows = aggregate([[Result("c", "geodesic-constrained", {"A": 0.9}, {"A": 0.8}, 0.9, None, None, 100, 1.0)],
                      [Result("c", "geodesic-constrained", {"A": 0.8}, {"A": 0.7}, 0.9, None, None, 120, 2.0)]])
    row = rows[0]
    assert {"name", "method", "end_accuracy", "min_accuracy", "sparsity", "error_barrier", "budget",
            "wall_seconds"} <= set(row)
    assert row["end_accuracy"]["A"] == pytest.approx(0.85) and row["end_accuracy_range"]["A"]["min"] == 0.8
    assert "geodesic-constrained" in markdown(rows, [])


def test_walks_that_miss_their_goal_are_marked_in_the_table():
    from geodesic.bench import Result, aggregate, markdown

    rows = aggregate([[Result("c", "geodesic-constrained", {"A": 0.9}, {"A": 0.8}, 0.98, None, None, 100, 1.0,
                              reached_goal=reached)] for reached in (True, False, True)])
    assert rows[0]["goal_reached_seeds"] == 2
    assert "goal not reached in 1 of 3 seeds" in markdown(rows, [])
    baseline = aggregate([[Result("c", "masked-fine-tune", {"A": 0.9}, None, 0.98, None, None, 100, 1.0)]])
    assert baseline[0]["goal_reached_seeds"] is None and "not reached" not in markdown(baseline, [])


def test_an_unfinished_sparsify_walk_is_compared_at_its_projection(monkeypatch):
    import geodesic.bench as bench
    real = bench.default_walk
    monkeypatch.setattr(bench, "default_walk", lambda goal, solver, **kw: dataclasses.replace(
        real(goal, solver, **kw), n_steps=3))
    case = bench.Case("moons", "sparsify", data="moons", hidden=(8,), target_sparsity=0.8, penalty=False, epochs=5)
    walk = bench.run_case(case, seed=0)[0]
    assert walk.method == "geodesic-constrained" and walk.reached_goal is False
    assert 0.8 <= walk.sparsity < 0.85  # the projection (26 of 32 weights), not the dense last point


def test_the_table_checks_the_issue_targets_and_says_which_are_missed():
    from geodesic.bench import Result, aggregate, markdown, targets

    def walk(name, end, low, start=0.97, **kw):
        return Result(name, "geodesic-constrained", end, low, 0.9, kw.get("barrier"), None, 100, 1.0,
                      reached_goal=True, start_accuracy={"A": start})

    results = [walk("digits sparsify 90%", {"A": 0.968}, {"A": 0.956}),
               Result("digits sparsify 90%", "masked-fine-tune", {"A": 0.970}, None, 0.9, None, None, 100, 1.0),
               walk("digits sparsify 95%", {"A": 0.967}, {"A": 0.92}),
               walk("digits new-task permuted (domain-incremental)", {"A": 0.96, "B": 0.955}, {"A": 0.95, "B": 0.1}),
               Result("digits new-task permuted (domain-incremental)", "ewc-fine-tune", {"A": 0.5, "B": 0.96},
                      budget=100),
               walk("digits connect", {"A": 0.97}, {"A": 0.95}, barrier=0.0171)]
    cost = {"model": "mlp", "device_name": "cpu", "n_params": 1, "sgd_seconds": 1.0, "penalty_seconds": 1.6,
            "constrained_seconds": 3.0, "penalty_ratio": 1.6, "constrained_ratio": 3.0, "constrained_linear_solver":
            "kernel", "steps_per_second": {"sgd": 1.0, "penalty": 1.0, "constrained": 1.0}, "peak_memory_mb": None}
    rows = aggregate([results])
    checked = {t["target"]: t["met"] for t in targets(rows, [cost])}
    assert checked["sparsify 90%: walk end accuracy ≥ masked fine-tuning's (same budget)"] is False  # 96.8 < 97.0
    assert checked["sparsify 90%: lowest accuracy along the walk ≥ dense − 3"] is True
    assert checked["sparsify 95%: walk end accuracy ≥ dense − 2"] is True
    assert checked["new task, permuted: A above EWC's (same budget)"] is True
    assert checked["connect: error barrier ≤ 2 points"] is True
    assert checked["step cost, penalty ≤ 1.5× SGD (mlp, cpu)"] is False
    assert checked["step cost, constrained ≤ 4× SGD (mlp, cpu)"] is True
    table = markdown(rows, [cost])
    assert "| target (issues 4, 11, 12) | measured | met |" in table and "**no**" in table
    assert targets([], []) == []  # nothing run, nothing claimed


def test_a_fine_tuning_asked_to_stop_stops_at_once():
    """What lets a stopping server (or a page that moved on) drop the baselines it was computing."""
    from geodesic.errors import Cancelled
    from geodesic.models import NetworkFunction

    net = build_network(ModelConfig(hidden=(8,)), (4,), 3)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    data = from_tensors(x, y, x[:10], y[:10], n_classes=3)
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(Cancelled, match="step 3 of 1000"):
        bl.fine_tune(NetworkFunction(net, net.buffers), net.init_params(0), data, 1000, 0, should_stop=should_stop)
    asked.clear()  # joint training (the new task's upper bound on the dashboard) likewise
    with pytest.raises(Cancelled, match="joint fine-tuning stopped at step 3 of 1000"):
        bl.continual_fine_tune(NetworkFunction(net, net.buffers), net.init_params(0), data, 1000, 0, "joint",
                               task_a=data, should_stop=should_stop)


def test_step_cost_times_a_walks_whole_step_and_checks_it_only_where_a_graph_took_it():
    """stepcost.step_cost adds each rule's whole walk step against SGD (on a GPU through its CUDA graph); the
    benchmark's targets check that figure only where the graph was used."""
    from geodesic.bench import markdown, targets
    from geodesic.stepcost import step_cost

    cost = step_cost("mlp", (64,), 10, n_repeats=2, n_warmup=1)
    walk = cost["walk_step"]
    assert set(walk) == {"penalty", "constrained"}
    for rule in walk.values():
        assert rule["seconds"] > 0 and rule["ratio"] > 0 and rule["graphed"] is False  # no GPU here
        assert rule["steps_taken"] >= 2
    names = {t["target"] for t in targets([], [cost])}
    assert not any("CUDA graph" in n for n in names)
    graphed = dict(cost, walk_step={r: dict(v, graphed=True, ratio=1.2) for r, v in walk.items()})
    checked = {t["target"]: t["met"] for t in targets([], [graphed])}
    assert checked["a walk's constrained step, CUDA graph, with its measurements ≤ 4× SGD (mlp, cpu)"] is True
    assert "(1.2×; graph)" in markdown([], [graphed])
