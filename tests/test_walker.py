"""The walker: one step per call, recorded events, branching, divergence, and the Python API."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from geodesic import Sparsify, WalkConfig, Walker, from_tensors, network_from_module
from geodesic.config import GoalConfig, RunConfig, TrainConfig, default_walk
from geodesic.errors import ConfigError, WalkDiverged
from geodesic.experiment import build
from geodesic.params import flatten


@pytest.fixture(scope="module")
def experiment():
    config = RunConfig(goal=GoalConfig(kind="sparsify"), train=TrainConfig(epochs=10),
                       walk=default_walk("sparsify", "constrained", n_steps=50))
    return build(config)


def test_step_adds_exactly_one_point_with_every_field(experiment):
    walker = build(experiment.config).walker
    assert len(walker.record) == 1 and walker.record[0].event == "start"
    point = walker.step()
    assert len(walker.record) == 2 and point.step == 1
    assert 0 < point.step_norm <= walker.config.max_step_norm + 1e-6
    assert point.euclidean_length == pytest.approx(point.step_norm)
    assert point.functional_length == pytest.approx(math.sqrt(point.functional_step))
    assert -1 <= point.alignment <= 1 and point.drift >= 0
    assert set(point.accuracy) == {"A"} and "prune_now_accuracy/A" in point.extra
    row = walker.record.to_frame().iloc[-1]
    assert row["accuracy/A"] == point.accuracy["A"]


def test_changing_the_step_size_is_a_recorded_event(experiment):
    walker = build(experiment.config).walker
    walker.step()
    walker.set_step_size(0.02)
    point = walker.step()
    assert point.event == f"step size {experiment.config.walk.max_step_norm:g} -> 0.02" and point.step_size == 0.02
    assert point.step_norm <= 0.02 + 1e-7
    assert walker.step().event == ""
    with pytest.raises(ConfigError, match="max-step-norm"):
        walker.set_step_size(-1.0)
    assert walker.config.max_step_norm == 0.02  # a refused change keeps the walk as it was
    # changes tried between two steps are one change, from the ε of the last step; back where it was, none
    walker.set_step_size(1e9)
    walker.set_step_size(0.05)
    assert walker.step().event == "step size 0.02 -> 0.05"
    walker.set_step_size(0.3)
    walker.set_step_size(0.05)
    assert walker.step().event == ""
    # a change does not replace the branch's own event
    child = walker.branch(1)
    child.set_step_size(0.01)
    assert child.step().event == "branched from step 1, step size 0.05 -> 0.01"


def test_branch_starts_from_a_recorded_point_and_keeps_history(experiment):
    walker = build(experiment.config).walker
    for _ in walker.run(4):
        pass
    child = walker.branch(2, walker.config.__class__(**{**walker.config.__dict__, "max_step_norm": 0.05}))
    assert len(child.record) == 3
    torch.testing.assert_close(flatten(child.params), torch.as_tensor(walker.trace.row(2)))
    point = child.step()
    assert point.step == 3 and point.event == "branched from step 2"
    assert len(walker.record) == 5  # the parent is untouched
    with pytest.raises(ConfigError):
        walker.branch(99)
    # The two walks' points for one fit: the three they share once, then the parent's two and the child's one.
    from geodesic.path import distinct_rows

    rows = distinct_rows([(walker.trace, len(walker.record)), (child.trace, len(child.record))])
    assert len(rows) == 5 + 1
    torch.testing.assert_close(torch.as_tensor(rows[-1]), flatten(child.params))
    assert len(distinct_rows([(walker.trace, 2), (child.trace, 2)])) == 2


def test_non_finite_step_stops_the_walk_and_keeps_the_last_finite_point(experiment):
    walker = build(experiment.config).walker
    walker.step()
    before = {k: v.clone() for k, v in walker.params.items()}
    first = next(iter(walker.params))
    walker.params[first] = walker.params[first].clone()
    walker.params[first][0, 0] = float("nan")  # inject a NaN weight
    with pytest.raises(WalkDiverged, match="not finite"):
        walker.step()
    assert walker.is_done and len(walker.record) == 2
    assert all(torch.equal(before[k], walker.params[k]) for k in before if k != first)


def test_python_api_walks_your_own_module_and_tensors():
    """What the README shows a researcher: an nn.Module and tensors, no CLI, no config files."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long()
    data = from_tensors(x[:300], y[:300], x[300:], y[300:])
    module = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(module(data.train.x), data.train.y).backward()
        opt.step()
    net, params = network_from_module(module)
    goal = Sparsify.for_network(net, params, data, target_sparsity=0.5)
    walker = Walker(net, params, goal, WalkConfig(max_step_norm=0.1, goal_weight=0.003, restoring_weight=0.3),
                    tasks={"A": data})
    for _ in walker.run(300):
        pass
    assert walker.stop_reason == "goal reached"
    assert walker.record.last.sparsity >= 0.5
    assert walker.record.last.accuracy["A"] >= walker.record[0].accuracy["A"] - 0.05


def test_a_long_path_keeps_its_weights_within_a_budget():
    """Every step's weights were kept (a digits walk grew by 11 MB a second). Past the budget, the trace keeps the
    last `recent` points and every stride-th older one, the stride doubling as the path grows."""
    import threading
    import time

    from geodesic.path import WeightTrace

    trace = WeightTrace(1000, max_mb=1000 * 4 * 80 / 2**20)  # room for 80 rows
    assert trace.max_rows == 80 and trace.recent == 20
    readers_saw, stop = [], threading.Event()

    def read():  # a page reading while the engine appends
        while not stop.is_set():
            indices, rows = trace.matrix()
            readers_saw.append(len(indices) == len(rows))
            time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(5000):
        trace.append({"w": torch.full((1000,), float(i))})
    stop.set()
    reader.join()
    assert all(readers_saw) and readers_saw
    kept = trace.kept()
    assert len(trace) == 5000 and len(kept) <= 80
    assert trace.stride > 1 and all(i in kept for i in range(0, 5000, trace.stride))
    assert all(i in kept for i in range(5000 - trace.recent, 5000))  # the recent steps, every one
    assert all(float(trace.row(i)[0]) == i for i in kept)  # the right weights under each index
    dropped = next(i for i in range(5000) if i not in kept)
    with pytest.raises(KeyError):
        trace.row(dropped)
    before, after = trace.nearest(dropped)
    assert before < dropped < after and before in kept and after in kept
    head = trace.head(before + 1)  # a branch's history: the rows up to there
    assert len(head) == before + 1 and head.kept() == [i for i in kept if i <= before]


def test_a_walk_branches_from_a_kept_step_exactly_and_names_the_kept_ones_otherwise(monkeypatch):
    import geodesic.path

    monkeypatch.setattr(geodesic.path, "TRACE_MB", 26_122 * 4 * 64 / 2**20)  # 64 rows of the digits MLP
    walker = build(RunConfig(goal=GoalConfig(kind="new-task"), train=TrainConfig(epochs=5),
                             walk=default_walk("new-task", "constrained"))).walker
    params = {}
    for point in walker.run(300):
        params[point.step] = flatten(walker.params).clone()
    kept = walker.trace.kept()
    assert len(kept) <= 64 and walker.trace.stride >= 8
    old = next(i for i in kept if 0 < i < 300 - walker.trace.recent)
    child = walker.branch(old)
    torch.testing.assert_close(flatten(child.params), params[old])  # exactly that step's weights
    assert child.trace.kept() == [i for i in kept if i <= old]
    gone = old + 1
    with pytest.raises(ConfigError, match=f"{old} or {old + walker.trace.stride}"):
        walker.branch(gone)
    recent = 300 - 3
    torch.testing.assert_close(flatten(walker.branch(recent).params), params[recent])


def test_a_bad_trace_budget_is_named_and_the_default_used(capsys):
    from geodesic.path import _trace_mb

    assert _trace_mb(None) == 128.0 and _trace_mb("") == 128.0 and _trace_mb("64") == 64.0
    for bad in ("abc", "-5", "0", "nan"):
        assert _trace_mb(bad) == 128.0
        assert f"GEODESIC_TRACE_MB={bad!r}" in capsys.readouterr().err


def test_python_api_learns_a_new_task_on_its_own_head():
    """Task-incremental learning from your own tensors: from_tensors(..., head=(lo, hi)) scores a task on its own
    output columns, as the split-heads protocol does (it had no way to say so: a second task's labels counted from 0
    were scored on the first task's outputs)."""
    from geodesic import NewTask

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=gen)
    task_a = from_tensors(x[:300], (x[:300, 0] > 0).long(), x[300:], (x[300:, 0] > 0).long(), head=(0, 2))
    task_b = from_tensors(x[:300], (x[:300, 1] > 0).long(), x[300:], (x[300:, 1] > 0).long(), head=(2, 4))
    assert task_a.n_classes == 2 and task_b.n_classes == 4 and task_b.head == (2, 4)
    module = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(200):  # task A on its head alone
        opt.zero_grad()
        nn.functional.cross_entropy(module(task_a.train.x)[:, :2], task_a.train.y).backward()
        opt.step()
    net, params = network_from_module(module)
    goal = NewTask.for_network(net, params, task_a, task_b=task_b, memory_size=100)
    walker = Walker(net, params, goal, WalkConfig(max_step_norm=0.1, goal_weight=0.01, restoring_weight=0.1),
                    tasks={"A": task_a, "B": task_b})
    for _ in walker.run(150):
        pass
    first, last = walker.record[0], walker.record.last
    assert first.accuracy["A"] > 0.9 and last.accuracy["A"] >= first.accuracy["A"] - 0.05  # A kept on its head
    assert last.accuracy["B"] > 0.85 > first.accuracy["B"] - 0.2  # B learnt on columns 2-3


@pytest.mark.parametrize("labels,kwargs,fragment", [
    ([0, 1, 2], {"head": (2, 4)}, "a head of 2 outputs (2..3) scores labels 0..1"),
    ([0, 1], {"head": (3, 3)}, "0 <= lo < hi"),
    ([0, 1], {"head": (2, 4), "n_classes": 3}, "needs at least 4 outputs"),
    ([0, 5], {"n_classes": 3}, "labels must be below n_classes 3"),
    ([-1, 1], {}, "labels must be integers from 0"),
    ([0.0, 0.5], {}, "the train labels must be whole numbers (class indices); found 0.5"),  # was read as class 0
])
def test_from_tensors_refuses_labels_its_outputs_cannot_score(labels, kwargs, fragment):
    from geodesic.errors import DataError

    y = torch.tensor(labels)
    with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        from_tensors(torch.zeros(len(y), 2), y, torch.zeros(len(y), 2), y, **kwargs)


def test_the_python_api_refuses_what_it_cannot_walk_saying_what_to_change():
    """Weights and data that do not fit each other used to fail steps later with PyTorch's own words ("Target 1 is
    out of bounds", "mat1 and mat2 must have the same dtype", a KeyError); a target sparsity of 2 was walked."""
    from geodesic import Connect, NewTask
    from geodesic.errors import CheckpointError, DataError

    torch.manual_seed(0)
    x = torch.randn(300, 10)
    y = (x[:, 0] > 0).long()
    data = from_tensors(x[:200], y[:200], x[200:], y[200:])
    net, params = network_from_module(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2)))

    def refused(error, words, make):
        with pytest.raises(error) as raised:
            make()
        assert all(w in str(raised.value) for w in words), str(raised.value)

    one_output = network_from_module(nn.Sequential(nn.Linear(10, 1)))
    refused(DataError, ["1 output", "needs 2", "labels 0..1"], lambda: Sparsify.for_network(*one_output, data,
                                                                                           target_sparsity=0.5))
    doubled = network_from_module(nn.Sequential(nn.Linear(10, 2)).double())
    refused(CheckpointError, ["torch.float64", "module.float()"],
            lambda: Sparsify.for_network(*doubled, data, target_sparsity=0.5))
    narrow = network_from_module(nn.Sequential(nn.Linear(7, 2)))
    refused(DataError, ["inputs of shape (10,)"], lambda: Sparsify.for_network(*narrow, data, target_sparsity=0.5))
    refused(ConfigError, ["target-sparsity", "2"], lambda: Sparsify.for_network(net, params, data, target_sparsity=2))
    refused(ConfigError, ["metric_kind"], lambda: Sparsify.for_network(net, params, data, metric_kind="l2",
                                                                       target_sparsity=0.5))
    _, wider = network_from_module(nn.Sequential(nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 2)))
    refused(CheckpointError, ["end_params", "'0.weight'", "(9, 10)", "(8, 10)"],
            lambda: Connect.for_network(net, params, data, end_params=wider))
    refused(CheckpointError, ["end_params", "missing"], lambda: Connect.for_network(net, params, data, end_params={}))
    four = torch.randint(0, 4, (300,))
    refused(DataError, ["task_b", "needs 4"], lambda: NewTask.for_network(
        net, params, data, task_b=from_tensors(x[:200], four[:200], x[200:], four[200:])))
    refused(ConfigError, ["memory-size"], lambda: NewTask.for_network(net, params, data, task_b=data, memory_size=0))
    goal = Sparsify.for_network(net, params, data, target_sparsity=0.5)
    refused(ConfigError, ["tasks", "'A'"], lambda: Walker(net, params, goal, WalkConfig(), tasks={"B": data}))
    refused(DataError, ["needs 4"], lambda: Walker(net, params, goal, WalkConfig(), tasks={
        "A": data, "C": from_tensors(x[:200], four[:200], x[200:], four[200:])}))
    refused(ConfigError, ["seed", "'a'"], lambda: Walker(net, params, goal, WalkConfig(), tasks=goal.tasks, seed="a"))
    walker = Walker(net, params, goal, WalkConfig(), tasks=goal.tasks, seed=np.int64(3))  # a seed read from a table
    assert walker.seed == 3 and type(walker.seed) is int
    refused(ConfigError, ["step", "99", "0..0"], lambda: walker.params_at(99))  # said a stride of a long path
    from geodesic import WalkBatch

    refused(ValueError, ["walker 1 is walker 0"], lambda: WalkBatch([walker, walker]))  # stepped twice a step
    # walked none without a word (a generator checks nothing until its first point is asked for)
    refused(ConfigError, ["n-steps", "-5", "a whole number >= 0"], lambda: walker.run(-5))
    refused(ConfigError, ["n-steps", "'10'"], lambda: walker.run("10"))
    assert list(walker.run(0)) == [] and len(walker.record) == 1
    # NaN weights or inputs: every loss NaN, the walk stopped at its first step as "diverged"
    broken = {k: v.clone() for k, v in params.items()}
    broken["0.weight"][0, 0] = float("nan")
    refused(CheckpointError, ["weights", "'0.weight'", "1 NaN or infinite value (of 80)"],
            lambda: Walker(net, broken, goal, WalkConfig(), tasks=goal.tasks))
    holes = x.clone()
    holes[3, 1] = float("inf")
    refused(DataError, ["the train inputs hold 1 NaN or infinite value"],
            lambda: from_tensors(holes[:200], y[:200], x[200:], y[200:]))
    # what fits still walks, and a Connect whose end weights are a state dict with "module." names is taken
    prefixed = {f"module.{k}": v + 0.1 for k, v in params.items()}
    goal = Connect.for_network(net, params, data, end_params=prefixed)
    walker = Walker(net, params, goal, WalkConfig(max_step_norm=0.05), tasks=goal.tasks)
    assert walker.step().step == 1
