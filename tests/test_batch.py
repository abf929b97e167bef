"""WalkBatch: K compatible walks stepped as one computation give the paths of K separate walkers."""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from geodesic import batch as batch_module
from geodesic import step as step_module
from geodesic.batch import WalkBatch, batch_key
from geodesic.config import GoalConfig, RunConfig, TrainConfig, default_walk
from geodesic.errors import WalkDiverged
from geodesic.experiment import build
from geodesic.step import secular_damping


def _config(goal: str, solver: str, seed: int = 0, **walk) -> RunConfig:
    return RunConfig(goal=GoalConfig(kind=goal), train=TrainConfig(epochs=5), seed=seed,
                     walk=default_walk(goal, solver, **walk))


def _walkers(configs):
    return [build(c).walker for c in configs]


@pytest.fixture(params=["waiting", "fused"])
def batch_way(request, monkeypatch):
    """Both ways a batch steps: the waiting one (the CPU's), and the fused one a CUDA graph records (graphs.py),
    here run as a plain function through the same static buffers and overwritten outputs. The fused step finds μ
    by Cholesky factorisations, as a GPU does; so do the separate walkers it is compared with."""
    if request.param == "fused":
        monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
        monkeypatch.setattr(batch_module, "FUSE_AFTER_STEPS", 0)
        monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", True)
        calls = []
        original = WalkBatch._step_fused
        monkeypatch.setattr(WalkBatch, "_step_fused", lambda self, *a: calls.append(original(self, *a)) or calls[-1])
        yield calls
    else:
        yield None


@pytest.mark.parametrize("goal", ["sparsify", "new-task", "connect"])
@pytest.mark.parametrize("solver", ["constrained", "penalty"])
def test_batched_walks_follow_the_paths_of_separate_walkers(goal, solver, batch_way):
    eps = default_walk(goal, solver).max_step_norm
    configs = [_config(goal, solver, 0), _config(goal, solver, 1), _config(goal, solver, 0, max_step_norm=eps / 2)]
    alone, together = _walkers(configs), _walkers(configs)
    assert len({batch_key(w) for w in together}) == 1
    batch = WalkBatch(together)
    for _ in range(6):
        expected = [w.step_waiting() for w in alone]
        got = batch.step()
        for a, b in zip(expected, got, strict=True):
            assert b.step == a.step and b.event == a.event
            assert b.accuracy == pytest.approx(a.accuracy, abs=1e-6)
            assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-6)
            assert b.functional_step == pytest.approx(a.functional_step, rel=1e-3, abs=1e-9)
            assert b.step_norm == pytest.approx(a.step_norm, rel=1e-4)
            assert b.goal_distance == pytest.approx(a.goal_distance, rel=1e-4)
            assert b.drift == pytest.approx(a.drift, rel=1e-3, abs=1e-8)  # ~1e-6 early on: float32 noise of logits
            assert b.sparsity == a.sparsity and b.extra == pytest.approx(a.extra, abs=1e-6)
    for a, b in zip(alone, together, strict=True):
        for k in a.params:
            torch.testing.assert_close(b.params[k], a.params[k], atol=1e-5, rtol=1e-4)
    assert together[2].record.last.step_size == eps / 2  # the walks kept their own ε
    if batch_way is not None:  # every step was taken the fused way (none fell back to the waiting one)
        assert len(batch_way) == 6 and all(r is not None for r in batch_way)


def test_a_fused_step_that_cannot_decide_is_taken_the_waiting_way(monkeypatch):
    """μ not solved within the fused step's Newton iterations: the step is taken again the waiting way from the
    same draws, and the paths stay those of separate walkers."""
    monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
    monkeypatch.setattr(batch_module, "FUSE_AFTER_STEPS", 0)
    monkeypatch.setattr(batch_module, "NEWTON_ITERATIONS", 1)
    monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", True)
    calls = []
    original = WalkBatch._step_fused
    monkeypatch.setattr(WalkBatch, "_step_fused", lambda self, *a: calls.append(original(self, *a)) or calls[-1])
    configs = [_config("sparsify", "constrained", s) for s in (0, 1)]
    alone, together = _walkers(configs), _walkers(configs)
    batch = WalkBatch(together)
    for _ in range(4):
        expected = [w.step_waiting() for w in alone]
        for a, b in zip(expected, batch.step(), strict=True):
            assert b.step == a.step and b.accuracy == pytest.approx(a.accuracy, abs=1e-6)
            assert b.step_norm == pytest.approx(a.step_norm, rel=1e-4)
    assert calls and all(r is None for r in calls)


@pytest.mark.parametrize("solver", ["constrained", "penalty"])
def test_a_diverging_walk_stops_alone_and_the_others_go_on(solver, batch_way):
    configs = [_config("sparsify", solver, s) for s in (0, 1, 2)]
    walkers = _walkers(configs)
    batch = WalkBatch(walkers)
    batch.step()
    bad = walkers[1]
    bad.params = {k: v.clone() for k, v in bad.params.items()}
    next(iter(bad.params.values()))[0, 0] = math.nan  # a weight that is no longer finite
    results = batch.step()
    assert isinstance(results[1], WalkDiverged) and "diverged" in str(results[1])
    assert bad.is_done and bad.n_steps == 1  # kept its last finite point
    assert [r.step for r in (results[0], results[2])] == [2, 2]
    assert [r.step for r in batch.step()] == [3, 3]  # the batch goes on without the stopped walk
    assert walkers[0].n_steps == 3 and walkers[2].n_steps == 3 and bad.n_steps == 1


def test_a_walk_whose_step_cannot_be_solved_stops_alone_and_the_others_go_on(monkeypatch):
    """Seen in the app: a fan with ε = 1000 beside ε = 0.1, whose shared eigendecomposition failed (an
    ill-conditioned metric, torch's LinAlgError); the engine called it an internal error and stopped both."""
    from geodesic import walker as walker_module

    walkers = _walkers([_config("sparsify", "constrained", s) for s in (0, 1)])
    batch = WalkBatch(walkers)
    bad = walkers[0]

    def together_fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    rule = walker_module.STEP_RULES["constrained"]

    def fails_for_the_bad_one(params, *args):
        if params is bad.params:
            together_fails()
        return rule(params, *args)

    monkeypatch.setattr(WalkBatch, "_constrained", together_fails)
    monkeypatch.setitem(walker_module.STEP_RULES, "constrained", fails_for_the_bad_one)
    results = batch.step()
    assert isinstance(results[0], WalkDiverged) and "could not be solved (its metric is ill-conditioned)" in str(
        results[0])
    assert bad.is_done and bad.n_steps == 0 and "kept step 0" in bad.stop_reason
    assert results[1].step == 1 and walkers[1].n_steps == 1 and not walkers[1].is_done
    assert walkers[1].step().step == 2
    # a walk stepped alone whose solve fails says it the same way, and keeps its point
    lone = _walkers([_config("sparsify", "constrained", 3)])[0]
    monkeypatch.setitem(walker_module.STEP_RULES, "constrained", lambda *a: together_fails())
    with pytest.raises(WalkDiverged, match="could not be solved"):
        lone.step()
    assert lone.is_done and lone.n_steps == 0


def test_walks_that_cannot_share_a_computation_are_refused():
    a, b = _walkers([_config("sparsify", "constrained"), _config("sparsify", "penalty")])
    assert batch_key(a) != batch_key(b)
    with pytest.raises(ValueError, match=r"walker 1 differs from walker 0 in: solver \('penalty' against "
                                         r"'constrained'\)"):  # says what keeps them apart
        WalkBatch([a, b])
    c = _walkers([_config("sparsify", "constrained", linear_solver="cg")])[0]
    assert batch_key(c) is None  # the CG solver steps alone
    with pytest.raises(ValueError, match=r"walker 1 is always stepped alone \(the CG solver\)"):
        WalkBatch([a, c])


def test_a_finished_walk_drops_out_of_the_batch(batch_way):
    fast = _config("connect", "constrained", 0, max_step_norm=5.0, goal_weight=100.0, restoring_weight=0.0)
    walkers = _walkers([fast, _config("connect", "constrained", 0)])
    batch = WalkBatch(walkers)
    for _ in range(40):
        batch.step()
        if walkers[0].is_done:
            break
    assert walkers[0].is_done and walkers[0].stop_reason == "goal reached"
    assert walkers[0].record.last.event.endswith("snapped") and not walkers[1].is_done
    n = walkers[1].n_steps
    assert len(batch.step()) == 1 and walkers[1].n_steps == n + 1


def test_secular_damping_solves_every_walk_at_once():
    gen = torch.Generator().manual_seed(0)
    lam = torch.rand(5, 7, generator=gen, dtype=torch.float64).numpy() + 0.01
    c2 = torch.rand(5, 7, generator=gen, dtype=torch.float64).numpy()
    perp2 = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64).numpy()
    half_beta = torch.tensor([0.5, 0.5, 1e-9, 0.0, 1e6], dtype=torch.float64).numpy()
    radius = torch.tensor([0.1, 1e3, 0.1, 0.1, 1e-12], dtype=torch.float64).numpy()
    mu = secular_damping(lam, c2, perp2, half_beta, radius)
    norm = lambda k, m: half_beta[k] * math.sqrt((c2[k] / (lam[k] + m) ** 2).sum() + perp2[k] / m**2)
    assert norm(0, mu[0]) == pytest.approx(radius[0], rel=1e-9)  # the bound is active
    assert mu[1] == 0  # in the row space and short enough: the pseudo-inverse step
    assert norm(2, mu[2]) == pytest.approx(radius[2], rel=1e-9)
    assert mu[3] == math.inf and mu[4] == math.inf  # β = 0; ε tiny against β‖v‖ (a plain gradient step)


def test_batched_eigh_off_the_main_thread_gives_the_same_answer_whatever_the_split():
    import threading

    from geodesic.step import batched_eigh

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 40, 50, generator=gen)
    kernels = a @ a.mT
    expected_lam, _ = torch.linalg.eigh(kernels.double())
    got = {}

    def on_a_thread(threads: int, key: str):
        torch.set_num_threads(threads)  # the number of chunks
        got[key] = batched_eigh(kernels)
        got[key + "/one"] = batched_eigh(kernels[3:4])

    for threads, key in ((2, "split"), (1, "whole")):
        thread = threading.Thread(target=on_a_thread, args=(threads, key))
        thread.start()
        thread.join()
    torch.set_num_threads(torch.get_num_threads())  # the threads' set_num_threads also set the default for new threads
    lam, u = got["split"]
    torch.testing.assert_close(lam.double(), expected_lam, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(u @ torch.diag_embed(lam) @ u.mT, kernels, rtol=1e-4, atol=1e-3)
    assert torch.equal(got["whole"][0], lam) and torch.equal(got["whole"][1], u)
    assert torch.equal(got["whole/one"][0], lam[3:4]) and torch.equal(got["split/one"][1], u[3:4])
    main_lam, _ = batched_eigh(kernels)  # in place on the main thread
    torch.testing.assert_close(main_lam, lam, rtol=1e-5, atol=1e-4)


def _lenet5(seed: int, **walk) -> RunConfig:
    from geodesic.config import DataConfig, ModelConfig

    return RunConfig(goal=GoalConfig(kind="sparsify"), data=DataConfig("digits-images"),
                     model=ModelConfig(name="lenet5"), train=TrainConfig(epochs=1), seed=seed,
                     walk=default_walk("sparsify", "constrained", model="lenet5", **walk))


def test_conv_nets_batch_with_their_factored_rows(batch_way):
    """LeNet-5 on the digits images: the conv rows are built under vmap for the whole batch, as for one walk."""
    from geodesic.batch import rows_kind

    alone, together = _walkers([_lenet5(0), _lenet5(1)]), _walkers([_lenet5(0), _lenet5(1)])
    assert rows_kind(together[0]) == "factored"
    batch = WalkBatch(together)
    for _ in range(3):
        for a, b in zip([w.step_waiting() for w in alone], batch.step(), strict=True):
            assert b.goal_distance == pytest.approx(a.goal_distance, rel=1e-4)
            assert b.functional_step == pytest.approx(a.functional_step, rel=1e-2, abs=1e-9)
            assert b.accuracy == pytest.approx(a.accuracy, abs=1e-6)


@pytest.mark.parametrize("goal", ["sparsify", "new-task", "connect"])
def test_a_lone_walker_steps_fused_where_graphs_are_wanted(goal, monkeypatch):
    """Walker.step takes the fused step of a batch of one where a CUDA graph would replay it (here forced on
    the CPU), and walks the path the waiting step walks."""
    monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", True)
    waiting, fused = _walkers([_config(goal, "constrained")]), _walkers([_config(goal, "constrained")])
    for _ in range(5):
        waiting[0].step()
    monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
    monkeypatch.setattr(batch_module, "FUSE_AFTER_STEPS", 0)
    calls = []
    original = WalkBatch._step_fused
    monkeypatch.setattr(WalkBatch, "_step_fused", lambda self, *a: calls.append(original(self, *a)) or calls[-1])
    for _ in range(5):
        fused[0].step()
    assert len(calls) == 5 and all(r is not None for r in calls)
    for a, b in zip(waiting[0].record.points, fused[0].record.points, strict=True):
        assert b.step == a.step and b.accuracy == pytest.approx(a.accuracy, abs=1e-6)
        assert b.step_norm == pytest.approx(a.step_norm, rel=1e-4)
        assert b.functional_step == pytest.approx(a.functional_step, rel=1e-3, abs=1e-9)
    for k in waiting[0].params:
        torch.testing.assert_close(fused[0].params[k], waiting[0].params[k], atol=1e-5, rtol=1e-4)


class _NoHostTraffic(TorchFunctionMode):
    """Fails on anything a CUDA graph cannot hold: a read of a value on the host (it waits for the device) or a
    tensor made from host data inside the computation (a copy from memory the replay would not see again)."""

    WAITS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__index__, torch.Tensor.cpu, torch.tensor,
             torch.as_tensor}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.WAITS:
            raise AssertionError(f"the fused step calls {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("goal", ["sparsify", "new-task", "connect"])
@pytest.mark.parametrize("solver", ["constrained", "penalty"])
def test_the_fused_step_never_asks_the_host(goal, solver, monkeypatch):
    monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
    monkeypatch.setattr(batch_module, "FUSE_AFTER_STEPS", 0)
    monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", True)
    walkers = _walkers([_config(goal, solver, s) for s in (0, 1)])
    batch = WalkBatch(walkers)
    batch.step()  # builds the fused step for these walkers (on a GPU: records its graph)
    _, _, static, guard = batch._static[("fused", *(id(w) for w in walkers))]
    inputs = batch._fused_inputs(walkers, [w.draw() for w in walkers])
    layout: list[str] = []
    with _NoHostTraffic():
        out = batch._fused(walkers, inputs, static, guard, layout)
    assert out["numbers"].shape == (2, len(layout)) and "solved" in layout and "measure:accuracy/A" in layout


def test_only_a_membership_that_steps_together_again_and_again_is_fused(monkeypatch):
    """The first FUSE_AFTER_STEPS steps of each membership are taken the waiting way (a graph is recorded only for
    a batch that keeps its walks); when a walk drops out, the new membership starts counting again."""
    monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
    monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", True)
    calls = []
    original = WalkBatch._step_fused
    monkeypatch.setattr(WalkBatch, "_step_fused", lambda self, *a: calls.append(len(a[0])) or original(self, *a))
    walkers = _walkers([_config("sparsify", "constrained", s) for s in (0, 1)])
    batch = WalkBatch(walkers)
    for _ in range(5):
        batch.step()
    assert calls == [2, 2]  # steps 4 and 5
    walkers[1].is_done = True  # (as if it had arrived)
    for _ in range(4):
        batch.step()
    assert calls == [2, 2, 1]


def test_fused_steps_that_the_guard_halves_are_finished_like_waiting_ones(monkeypatch):
    """LeNet-5 with a long step, so that the step guard halves some steps: the fused step hands those walks to the
    guard's halvings (only they are halved) and measures them again; the paths are the waiting step's."""
    monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
    monkeypatch.setattr(batch_module, "FUSE_AFTER_STEPS", 0)
    monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", True)
    halved = []
    guard = WalkBatch._guard
    monkeypatch.setattr(WalkBatch, "_guard", lambda self, *a: halved.append(1) or guard(self, *a))
    configs = [_lenet5(s, max_step_norm=4.0) for s in (0, 1)]
    assert configs[0].walk.step_guard > 0
    alone, together = _walkers(configs), _walkers(configs)
    batch = WalkBatch(together)
    for _ in range(4):
        for a, b in zip([w.step_waiting() for w in alone], batch.step(), strict=True):
            assert b.step_norm == pytest.approx(a.step_norm, rel=1e-3)  # the same halvings
            assert b.accuracy == pytest.approx(a.accuracy, abs=1e-6)
            assert b.functional_step == pytest.approx(a.functional_step, rel=1e-2, abs=1e-9)
    assert halved  # some step did fail the guard's first try
    assert any(a.step_norm < 4.0 * 0.99 for a in alone[0].record.points[1:])


def test_a_batch_steps_the_waiting_way_while_every_graph_is_in_use(monkeypatch):
    """graphs.NoRoom (MAX_LIVE graphs live and in use): the batch steps the waiting way and counts its steps again
    before it tries to record; a graph released to make room is recorded again."""
    from geodesic import graphs

    monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
    monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", True)
    real = graphs.Captured
    refusals = [1]

    def captured(*args, **kwargs):
        if refusals:
            refusals.pop()
            raise graphs.NoRoom("all in use")
        return real(*args, **kwargs)

    monkeypatch.setattr(graphs, "Captured", captured)
    calls = []
    original = WalkBatch._step_fused
    monkeypatch.setattr(WalkBatch, "_step_fused", lambda self, *a: calls.append(original(self, *a)) or calls[-1])
    batch = WalkBatch(_walkers([_config("sparsify", "constrained", s) for s in (0, 1)]))
    for _ in range(9):
        batch.step()
    assert calls[0] is None and all(r is not None for r in calls[1:])  # refused at step 4, recorded at step 8
    assert len(calls) == 3 and not batch.fused_failed
    key = ("fused", *(id(w) for w in batch.walkers))
    batch._static[key][0].release()
    batch.step()
    assert calls[-1] is not None and not batch._static[key][0].released  # recorded again


def test_a_fused_step_that_fails_when_replayed_leaves_the_walks_stepping_the_waiting_way(monkeypatch, capsys):
    """A replay that raises (a driver or library error on a GPU) is reported once, and the batch goes on the
    waiting way: no walk stops."""
    from geodesic import graphs

    monkeypatch.setattr(batch_module, "FUSED_ON_CPU", True)
    monkeypatch.setattr(batch_module, "FUSE_AFTER_STEPS", 0)
    monkeypatch.setattr(graphs, "_REPORTED", set())
    monkeypatch.setattr(graphs.Captured, "__call__", lambda self, inputs: (_ for _ in ()).throw(
        RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm")))
    walkers = _walkers([_config("sparsify", "constrained", s) for s in (0, 1)])
    batch = WalkBatch(walkers)
    for _ in range(3):
        assert [r.step for r in batch.step()] == [walkers[0].n_steps] * 2
    assert batch.fused_failed and walkers[0].n_steps == 3 and not walkers[0].is_done
    assert capsys.readouterr().err.count("replay failed: RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED") == 1
