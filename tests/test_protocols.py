"""The new-task protocols of method.md §5 beyond permuted and split: split-heads (task-incremental: each task is
scored on its own head's outputs, and the walk keeps task A's head alone, so task B's outputs move freely) and
MNIST → Fashion-MNIST (B's labels offset by 10, one head of 20)."""
import time

import pytest
import torch

from geodesic import batch as batch_module
from geodesic import step as step_module
from geodesic.baselines import continual_fine_tune
from geodesic.batch import WalkBatch, batch_key, why_not_batched
from geodesic.config import DataConfig, GoalConfig, RunConfig, TrainConfig, default_walk
from geodesic.data import load_dataset, task_pair
from geodesic.errors import DataError
from geodesic.experiment import build
from geodesic.measures import evaluate, scored_on
from geodesic.metric import PullbackMetric

FAST_TRAIN = TrainConfig(epochs=15)


def _config(new_task: str = "split-heads", solver: str = "constrained", seed: int = 0, **walk) -> RunConfig:
    return RunConfig(goal=GoalConfig(kind="new-task", new_task=new_task), train=FAST_TRAIN, seed=seed,
                     walk=default_walk("new-task", solver, **walk))


def test_split_heads_gives_each_task_its_own_outputs():
    data = load_dataset(DataConfig("digits"))
    a, b = task_pair(data, "split-heads", seed=0)
    assert (a.head, b.head) == ((0, 5), (5, 10))
    assert set(a.train.y.tolist()) == set(b.test.y.tolist()) == {0, 1, 2, 3, 4}
    # the examples of the class-incremental split, labels counted from the head's first class
    one_head_a, one_head_b = task_pair(data, "split", seed=0)
    assert one_head_a.head is None and one_head_b.head is None
    assert torch.equal(one_head_b.train.x, b.train.x) and torch.equal(one_head_b.train.y - 5, b.train.y)
    assert a.name != one_head_a.name  # the start networks (trained on one head, or on all ten outputs) cache apart
    logits = torch.arange(20.0).reshape(2, 10)
    assert torch.equal(b.scored(logits), logits[:, 5:]) and torch.equal(one_head_b.scored(logits), logits)


def test_a_split_needs_two_classes_per_task():
    moons = load_dataset(DataConfig("moons"))
    for protocol in ("split", "split-heads"):
        with pytest.raises(DataError, match="needs at least 4"):
            task_pair(moons, protocol, seed=0)


@pytest.fixture(scope="module")
def experiment():
    return build(_config(n_steps=1))


@pytest.mark.parametrize("kind", ["fisher", "logit"])
def test_the_kept_metric_is_that_of_task_a_head_alone(experiment, kind):
    fn = experiment.walker.model_fn
    assert fn.head == (0, 5) and experiment.goal.n_outputs == 5
    x = experiment.tasks["A"].train.x[:6]
    metric = PullbackMetric(fn, x, kind)
    factored = metric.jacobian_rows(experiment.start, allow_dense=False)
    assert factored is not None  # the MLP's factored rows, differentiated through the head's columns only
    dense = metric.jacobian(experiment.start)  # jacrev of the five outputs of A's head
    assert dense.shape[0] == 6 * 5
    torch.testing.assert_close(factored.gram(), dense @ dense.T, atol=1e-5, rtol=1e-4)
    whole = PullbackMetric(fn.with_head(None), x, kind).jacobian(experiment.start)
    assert whole.shape[0] == 6 * 10 and not torch.allclose((whole @ whole.T).trace(), (dense @ dense.T).trace())


def test_each_task_is_measured_on_its_own_head(experiment):
    walker, (a, b) = experiment.walker, (experiment.tasks["A"], experiment.tasks["B"])
    point = walker.record[0]
    for name, task in (("A", a), ("B", b)):
        loss, acc = evaluate(scored_on(walker.model_fn, task), walker.params, task.test.x, task.test.y)
        assert point.accuracy[name] == pytest.approx(acc, abs=1e-6)
        assert point.loss[name] == pytest.approx(loss, rel=1e-5)
    assert point.accuracy["A"] > 0.95  # trained on its own head
    assert point.accuracy["B"] < 0.5  # B's head was never trained: about chance among five


@pytest.mark.parametrize("solver", ["constrained", "penalty"])
def test_a_task_incremental_walk_learns_b_and_keeps_a(solver):
    walker = build(_config(solver=solver, n_steps=150)).walker
    points = [walker.record[0], *walker.run()]
    assert points[0].accuracy["B"] < 0.5 and points[-1].accuracy["B"] > 0.85
    assert min(p.accuracy["A"] for p in points) > points[0].accuracy["A"] - 0.03


def test_naive_fine_tuning_on_its_own_head_forgets_less_than_on_one_head():
    """The scenarios differ as they should: with a head per task, fine-tuning on B alone cannot make A's inputs
    look like B's classes, so task A is forgotten less than with one shared head."""
    kept = {}
    for protocol in ("split", "split-heads"):
        ex = build(_config(protocol, n_steps=1))
        tuned = continual_fine_tune(ex.walker.model_fn, ex.start, ex.tasks["B"], 200, 0, "naive")
        task_a = ex.tasks["A"]
        kept[protocol] = evaluate(scored_on(ex.walker.model_fn, task_a), tuned, task_a.test.x, task_a.test.y)[1]
    assert kept["split"] < 0.5 < kept["split-heads"]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("solver", ["constrained", "penalty"])
def test_task_incremental_walks_batch_like_separate_walkers(solver, fused, monkeypatch):
    if fused:  # the step a CUDA graph records, run here as a plain function (as in test_batch.py)
        monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
        monkeypatch.setattr(batch_module, "FUSE_AFTER_STEPS", 0)
        monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", True)
    eps = default_walk("new-task", solver).max_step_norm
    configs = [_config(solver=solver), _config(solver=solver, seed=1), _config(solver=solver, max_step_norm=eps / 2)]
    alone, together = [build(c).walker for c in configs], [build(c).walker for c in configs]
    batch = WalkBatch(together)
    fused_steps = []
    original = WalkBatch._step_fused
    monkeypatch.setattr(WalkBatch, "_step_fused",
                        lambda self, *a: fused_steps.append(original(self, *a)) or fused_steps[-1])
    for _ in range(4):
        expected = [w.step_waiting() for w in alone]
        for a, b in zip(expected, batch.step(), strict=True):
            assert b.accuracy == pytest.approx(a.accuracy, abs=1e-6)
            assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-6)
            assert b.step_norm == pytest.approx(a.step_norm, rel=1e-4)
    for a, b in zip(alone, together, strict=True):
        for k in a.params:
            torch.testing.assert_close(b.params[k], a.params[k], atol=1e-5, rtol=1e-4)
    assert (len(fused_steps) == 4 and all(r is not None for r in fused_steps)) if fused else not fused_steps


def test_one_head_and_a_head_per_task_never_share_a_batch():
    walkers = [build(_config(p)).walker for p in ("split", "split-heads")]
    assert batch_key(walkers[0]) != batch_key(walkers[1])
    assert "outputs" in why_not_batched(walkers)


def test_a_run_summary_says_its_scenario():
    from geodesic.summary import summarize

    ex = build(_config(n_steps=2))
    list(ex.walker.run())
    assert summarize(ex, wall_seconds=1.0)["scenario"] == "task-incremental, a head per task"


# ---- MNIST → Fashion-MNIST ---------------------------------------------------------------------------------------

def _fashion_config(root, dataset="mnist-sample", solver="constrained", **walk) -> RunConfig:
    return RunConfig(goal=GoalConfig(kind="new-task", new_task="mnist-fashion"), train=TrainConfig(epochs=8),
                     data=DataConfig(dataset, root=root), walk=default_walk("new-task", solver, **walk))


@pytest.mark.parametrize("dataset", ["mnist-sample", "mnist-sample-images"])
def test_mnist_then_fashion_shares_one_head_of_twenty(fashion_root, dataset):
    config = DataConfig(dataset, root=fashion_root)
    mnist = load_dataset(config)
    a, b = task_pair(mnist, "mnist-fashion", seed=0, data=config)
    assert a.n_classes == b.n_classes == 20 and a.head is None and b.head is None
    assert set(a.train.y.tolist()) == set(range(10)) and set(b.test.y.tolist()) == set(range(10, 20))
    assert b.input_shape == a.input_shape == mnist.input_shape and len(b.train) == 600
    assert torch.equal(a.train.x, mnist.train.x) and a.name != mnist.name  # a 20-way start network caches apart


def test_mnist_then_fashion_says_what_it_needs(fashion_root, tmp_path):
    digits = DataConfig("digits")
    with pytest.raises(DataError, match="starts from MNIST: choose the dataset mnist, mnist-sample"):
        task_pair(load_dataset(digits), "mnist-fashion", seed=0, data=digits)
    for root in (None, str(tmp_path)):
        config = DataConfig("mnist-sample", root=root)
        with pytest.raises(DataError, match="task B is Fashion-MNIST, read from the data folder: fashion-mnist"):
            task_pair(load_dataset(config), "mnist-fashion", seed=0, data=config)


def test_a_walk_from_mnist_learns_fashion_and_keeps_the_digits(fashion_root):
    experiment = build(_fashion_config(fashion_root, n_steps=80))
    assert experiment.network.n_classes == 20 and experiment.goal.n_outputs == 20
    points = [experiment.walker.record[0], *experiment.walker.run()]
    assert points[0].accuracy["A"] > 0.85 and points[0].accuracy["B"] == 0.0  # classes 10-19 never trained
    assert points[-1].accuracy["B"] > 0.8
    assert min(p.accuracy["A"] for p in points) > points[0].accuracy["A"] - 0.05
    assert experiment.walker.record.last.step == 80


def test_sessions_of_every_protocol_walk_at_once_through_one_engine():
    """A class on one server: sessions on their own threads, each running its walk through one engine, task-
    incremental walks beside class- and domain-incremental ones (the engine batches the compatible ones). Each
    walk's path is the one it takes alone."""
    import threading

    from geodesic.engine import Engine, EngineSettings

    configs = [_config("split-heads"), _config("split-heads", seed=1), _config("split"), _config("permuted"),
               _config("split-heads", solver="penalty")]
    walkers, lone = [build(c).walker for c in configs], [build(c).walker for c in configs]
    engine = Engine(EngineSettings(threads=1))
    errors = []

    def session(i):
        try:
            handle = engine.open(walkers[i], session=f"s{i}")
            handle.run(8)
            t0 = time.monotonic()
            while handle.is_running and time.monotonic() - t0 < 120:
                handle.touch()
                handle.walker.record.to_frame()  # what the page reads while the engine appends
                time.sleep(0.05)
            if handle.error:
                errors.append(handle.error)
        except Exception as err:  # noqa: BLE001 - what the test counts
            errors.append(repr(err))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(walkers))]
    try:
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        engine.stop()
    assert errors == [] and [w.n_steps for w in walkers] == [8] * len(walkers)
    for together, alone in zip(walkers, lone, strict=True):
        for _ in range(8):
            alone.step()
        for a, b in zip(alone.record.points, together.record.points, strict=True):
            assert b.accuracy == pytest.approx(a.accuracy, abs=1e-5) and b.loss == pytest.approx(a.loss, rel=1e-4)
        for k in alone.params:
            torch.testing.assert_close(together.params[k], alone.params[k], atol=1e-5, rtol=1e-4)


def test_a_saved_task_incremental_run_lists_its_protocol_and_reloads_with_its_heads(tmp_path):
    from geodesic.store import list_runs, reload_run, save_run
    from geodesic.summary import summarize

    ex = build(_config(n_steps=4))
    list(ex.walker.run())
    save_run(ex, tmp_path, "task-il", summarize(ex, wall_seconds=0.0))
    sparse = build(RunConfig(goal=GoalConfig(kind="sparsify"), train=FAST_TRAIN,
                             walk=default_walk("sparsify", "constrained", n_steps=1)))
    save_run(sparse, tmp_path, "sparse", summarize(sparse, wall_seconds=0.0))
    assert {r["name"]: r["protocol"] for r in list_runs(tmp_path)} == {"task-il": "split-heads", "sparse": None}
    again, left_out = reload_run(tmp_path / "task-il")
    assert left_out is None and again.walker.model_fn.head == (0, 5) and again.tasks["B"].head == (5, 10)
    assert again.walker.record.last.accuracy == ex.walker.record.last.accuracy
    point = again.walker.step()  # and it walks on from there, on its own heads
    assert point.step == 5 and point.accuracy["B"] > 0.2
