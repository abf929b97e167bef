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
        expected = [w.step() for w in alone]
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
