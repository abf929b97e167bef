"""The GPU path: the same steps on CUDA as on the CPU, and a whole walk there. Skipped without a GPU; run by
bench/gpu_check.sh on a machine that has one (figures in BENCHMARKS.md)."""
import dataclasses

import pytest
import torch

from geodesic.checkpoint import read_tensors, save_weights
from geodesic.config import ModelConfig, RunConfig, WalkConfig, default_walk
from geodesic.data import from_tensors
from geodesic.experiment import build
from geodesic.goals import Sparsify
from geodesic.models import build_network
from geodesic.step import constrained_step, penalty_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _setup(model: str, shape: tuple[int, ...], device: str):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, *shape, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    net = build_network(ModelConfig(name=model), shape, 10).to(torch.device(device))
    params = {k: v.to(device) for k, v in net.init_params(0).items()}
    data = from_tensors(x, y, x[:8], y[:8], n_classes=10).to(torch.device(device))
    goal = Sparsify.for_network(net, params, data, target_sparsity=0.9)
    batch = goal.sample(torch.Generator().manual_seed(0), 64)
    moved = {k: v + 1e-2 * torch.randn(v.shape, generator=gen).to(device) for k, v in params.items()}
    return goal, batch, moved, x[:8].to(device)


def test_init_params_are_the_same_on_cuda_and_the_cpu():
    net = build_network(ModelConfig(name="mlp"), (64,), 10)
    cpu = net.init_params(3)
    cuda = net.to(torch.device("cuda")).init_params(3)
    for k, v in cpu.items():
        assert cuda[k].device.type == "cuda"
        assert torch.equal(cuda[k].cpu(), v)


@pytest.mark.parametrize("solver,linear_solver",
                         [("constrained", "kernel"), ("constrained", "cg"), ("penalty", "auto")])
def test_a_step_on_cuda_matches_the_cpu(solver, linear_solver):
    torch.backends.cuda.matmul.allow_tf32 = False
    config = WalkConfig(solver=solver, linear_solver=linear_solver, probe_size=8, batch_size=64, goal_weight=0.003,
                        restoring_weight=0.3)
    rule = {"constrained": constrained_step, "penalty": penalty_step}[solver]
    steps = {}
    for device in ("cpu", "cuda"):
        goal, batch, moved, probe = _setup("mlp", (64,), device)
        steps[device] = rule(moved, goal, batch, probe, config, 0.1, goal.model_fn)
    for k, v in steps["cpu"].tangent_vec.items():
        assert steps["cuda"].tangent_vec[k].device.type == "cuda"
        torch.testing.assert_close(steps["cuda"].tangent_vec[k].cpu(), v, rtol=1e-3, atol=1e-5)  # entries ~1e-3


def test_vgg11_steps_run_on_cuda_within_the_step_size():
    goal, batch, moved, probe = _setup("vgg11", (3, 32, 32), "cuda")
    for solver in ("constrained", "penalty"):
        config = WalkConfig(solver=solver, probe_size=8, batch_size=64, goal_weight=0.003, restoring_weight=0.3)
        rule = {"constrained": constrained_step, "penalty": penalty_step}[solver]
        theta = rule(moved, goal, batch, probe, config, 0.1, goal.model_fn).tangent_vec
        length = float(sum(v.pow(2).sum() for v in theta.values()).sqrt())
        assert 0 < length <= 0.1 * (1 + 1e-4)
        assert all(bool(torch.isfinite(v).all()) for v in theta.values())


def test_a_walk_on_cuda_keeps_accuracy_and_its_weights_load_on_the_cpu(tmp_path):
    config = RunConfig(device="cuda")
    config = dataclasses.replace(config, walk=default_walk("sparsify", "constrained", n_steps=40))
    experiment = build(config)
    walker = experiment.walker
    assert next(iter(walker.params.values())).device.type == "cuda"
    for _ in range(40):
        walker.step()
    record = walker.record
    start, last = record.points[0], record.last
    assert last.step == 40 or walker.is_done
    assert last.goal_distance < 0.7 * start.goal_distance  # on its way to the sparse target
    assert last.accuracy["A"] >= start.accuracy["A"] - 0.03
    # the Overview's pruning curve, on the GPU's weights (a lone walk there steps through CUDA graphs' buffers):
    # the goal's own magnitude pruning, level by level
    from geodesic.analysis import PruningCurve, pruning_levels
    from geodesic.measures import evaluate, magnitude_prune

    levels = pruning_levels(0.9)
    curve = PruningCurve(walker, levels)
    if not walker.is_done:
        walker.step()  # the walk moves on; the curve is of the point it was made at
    while not curve.advance(0):
        pass
    test = walker.tasks["A"].test
    at_40 = walker.params_at(curve.step)
    for level, value in zip(levels, curve.values, strict=True):
        pruned = magnitude_prune(at_40, walker.goal.prunable, level)
        assert value == pytest.approx(evaluate(walker.model_fn, pruned, test.x, test.y)[1], abs=1e-6)
    save_weights(walker.params, tmp_path / "w.safetensors")
    loaded = read_tensors(tmp_path / "w.safetensors")
    for k, v in walker.params.items():
        assert loaded[k].device.type == "cpu"
        torch.testing.assert_close(loaded[k], v.cpu())


def _batched_and_alone(configs: list, n_steps: int = 5, accuracy_tolerance: float = 2e-3):
    """(separate walkers, batched walkers) of `configs`, after n_steps; each batched point checked against its
    separate twin (step number, accuracy, distance, step length)."""
    from geodesic.batch import WalkBatch

    alone, together = [build(c).walker for c in configs], [build(c).walker for c in configs]
    batch = WalkBatch(together)
    for _ in range(n_steps):
        expected = [w.step_waiting() for w in alone]  # without a CUDA graph: the batch's graph is checked against it
        for a, b in zip(expected, batch.step(), strict=True):
            assert b.step == a.step
            assert b.accuracy == pytest.approx(a.accuracy, abs=accuracy_tolerance)
            assert b.goal_distance == pytest.approx(a.goal_distance, rel=1e-3)
            assert b.step_norm == pytest.approx(a.step_norm, rel=1e-3)  # a guarded step: the same halvings
    return alone, together


@pytest.mark.parametrize("solver", ["constrained", "penalty"])
def test_a_batch_of_walks_on_cuda_follows_the_separate_walks(solver):
    torch.backends.cuda.matmul.allow_tf32 = False
    configs = [dataclasses.replace(RunConfig(device="cuda", seed=s), walk=default_walk("sparsify", solver))
               for s in (0, 1, 2)]
    alone, together = _batched_and_alone(configs)
    for a, b in zip(alone, together, strict=True):
        for k in a.params:
            assert b.params[k].device.type == "cuda"
            torch.testing.assert_close(b.params[k], a.params[k], atol=1e-4, rtol=1e-3)


def test_guarded_lenet5_walks_on_cuda_batch_like_separate_walks():
    """The step guard's vmapped pass (batch.py, on CUDA) against each walk's own guard, on the conv path."""
    from geodesic.config import DataConfig, GoalConfig, TrainConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    configs = [RunConfig(goal=GoalConfig(kind="sparsify"), data=DataConfig(name="digits-images"),
                         model=ModelConfig(name="lenet5"), train=TrainConfig(epochs=5), device="cuda", seed=s,
                         walk=default_walk("sparsify", "constrained", model="lenet5", max_step_norm=1.0))
               for s in (0, 1)]
    assert configs[0].walk.step_guard > 0
    _batched_and_alone(configs, accuracy_tolerance=3e-3)  # one test example of 360 may flip on a GPU


def test_the_trust_region_solve_on_cuda_needs_no_eigendecomposition_and_matches_the_cpu(monkeypatch):
    """On the GPU μ comes from Cholesky factorisations of K + μI; the answer equals the CPU's eigendecomposition."""
    import geodesic.step as step_module
    from tests.test_step import _problems

    _, _, kernel, jv, v2, beta, radius = _problems()
    cpu = step_module.trust_region_coefficients(kernel, jv, v2, beta, radius)

    def no_eigh(*args):
        raise AssertionError("the GPU path decomposed K")

    monkeypatch.setattr(step_module, "batched_eigh", no_eigh)
    cuda = step_module.trust_region_coefficients(kernel.cuda(), jv.cuda(), v2.cuda(), beta, radius)
    for got, want in zip(cuda, cpu, strict=True):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, rtol=1e-8, atol=1e-12)


def test_conv_rows_in_the_patch_form_on_cuda_match_the_dense_jacobian(monkeypatch):
    from torch import nn

    from geodesic import rows as rows_module
    from geodesic.metric import PullbackMetric
    from geodesic.models import NetworkFunction, network_from_module
    from tests.test_rows import _assert_same_rows

    monkeypatch.setattr(rows_module, "FORCE_CONV_FORM", "patches")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 3, stride=2), nn.Tanh(),
                           nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 3)).double().cuda()
    net, params = network_from_module(module, (3, 12, 12), 3)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64, device="cuda")
    metric = PullbackMetric(NetworkFunction(net, net.buffers), x, "fisher")
    rows = metric.jacobian_rows(params)
    assert [type(layer).__name__ for layer in rows.layers] == ["_PatchConvLayer", "_PatchConvLayer", "_Layer"]
    _assert_same_rows(rows, rows_module.DenseRows(metric.jacobian_blocks(params)), params)


def test_vgg11_constrained_step_on_cuda_equals_the_step_through_written_out_rows(monkeypatch):
    """The default VGG11 step on a GPU (deep convolutions as patches, μ by Cholesky) against every conv row
    written out and μ through the eigendecomposition: the same step, to float32's rounding of K."""
    assert_same_step_both_ways(monkeypatch, "vgg11", (3, 32, 32), "cuda")


def assert_same_step_both_ways(monkeypatch, model, shape, device):
    from geodesic import rows as rows_module
    from geodesic import step as step_module

    torch.backends.cuda.matmul.allow_tf32 = False
    goal, batch, moved, probe = _setup(model, shape, device)
    config = WalkConfig(solver="constrained", probe_size=8, batch_size=64, goal_weight=0.003, restoring_weight=0.3,
                        linear_solver="kernel")
    steps = []
    for form, cholesky in ((None, True), ("written", False)):
        monkeypatch.setattr(rows_module, "FORCE_CONV_FORM", form)
        monkeypatch.setattr(step_module, "CHOLESKY_ON_CPU", cholesky)
        if not cholesky:
            monkeypatch.setattr(step_module, "_coefficients_by_cholesky", lambda *args: None)
        rows = step_module.PullbackMetric(goal.model_fn, probe, config.metric).jacobian_rows(moved)
        steps.append((constrained_step(moved, goal, batch, probe, config, 0.1, goal.model_fn),
                      {type(layer).__name__ for layer in rows.layers}))
    (fast, fast_kinds), (slow, slow_kinds) = steps
    assert fast.linear_solver == slow.linear_solver == "kernel (factored)"
    assert "_PatchConvLayer" in fast_kinds and "_PatchConvLayer" not in slow_kinds
    diff = sum(float((fast.tangent_vec[k] - v).pow(2).sum()) for k, v in slow.tangent_vec.items()) ** 0.5
    assert diff <= 1e-3 * sum(float(v.pow(2).sum()) for v in slow.tangent_vec.values()) ** 0.5
    assert fast.damping == pytest.approx(slow.damping, rel=1e-3)


def test_a_cuda_graph_replays_the_trust_region_solve():
    """The fused step's μ solve (Cholesky factorisations, a fixed number of Newton iterations) recorded as a
    CUDA graph gives what the same function gives run directly, for new inputs copied into its buffers."""
    from geodesic import graphs
    from geodesic.step import coefficients_without_waiting

    gen = torch.Generator().manual_seed(0)

    def inputs():
        rows = torch.randn(3, 40, 500, generator=gen)
        v = torch.randn(3, 500, generator=gen)
        return {"kernel": (rows @ rows.mT).cuda(), "jv": (rows @ v[..., None])[..., 0].cuda(),
                "v2": v.pow(2).sum(-1).double().cuda(), "beta": torch.full((3,), 0.3, dtype=torch.float64).cuda(),
                "radius": torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64).cuda(),
                "mu": torch.full((3,), float("inf"), dtype=torch.float64).cuda()}

    def solve(x):
        return coefficients_without_waiting(x["kernel"], x["jv"], x["v2"], x["beta"], x["radius"], x["mu"], 8)

    first = inputs()
    captured = graphs.Captured(solve, first)
    for x in (first, inputs()):
        expected = solve(x)
        got = [t.clone() for t in captured(x)]
        assert bool(got[-1].all()) and bool(expected[-1].all())
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("goal", ["sparsify", "new-task", "connect"])
def test_a_lone_walk_on_cuda_replays_its_step_as_a_graph(goal):
    """A small model's walk on a GPU steps through a recorded CUDA graph (graphs.py: 'auto'), and walks the
    path its waiting twin walks."""
    from geodesic.config import GoalConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    config = RunConfig(goal=GoalConfig(kind=goal), device="cuda", walk=default_walk(goal, "constrained"))
    graphed, waiting = build(config).walker, build(config).walker
    for _ in range(8):
        a, b = waiting.step_waiting(), graphed.step()
        assert b.step == a.step and b.accuracy == pytest.approx(a.accuracy, abs=2e-3)
        assert b.step_norm == pytest.approx(a.step_norm, rel=1e-3)
    alone = graphed._batch_of_one()
    assert alone is not None and not alone.fused_failed  # recorded, not fallen back to the waiting step
    assert any(k[0] == "fused" for k in alone._static)
