"""Models as pure functions: every architecture builds for its inputs, runs through functional_call, lists
its prunable weights, and BatchNorm statistics are recomputed for new weights."""
import pytest
import torch

from geodesic.config import ModelConfig
from geodesic.errors import ConfigError
from geodesic.models import build_network, recompute_batchnorm


@pytest.mark.parametrize("name,shape,n_prunable", [("mlp", (64,), 3), ("lenet5", (1, 28, 28), 5),
                                                   ("lenet5", (3, 32, 32), 5), ("vgg11", (3, 32, 32), 9),
                                                   ("resnet18", (3, 32, 32), 21)])
def test_architectures_run_as_functions_of_their_params(name, shape, n_prunable):
    net = build_network(ModelConfig(name=name), shape, 10)
    params = net.init_params(0)
    out = net.apply(params, torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert len(net.prunable) == n_prunable and all(k.endswith("weight") for k in net.prunable)
    zeroed = {k: torch.zeros_like(v) for k, v in params.items()}
    assert not torch.equal(net.apply(zeroed, torch.randn(2, *shape)), out)  # the params dict is what runs


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    net = build_network(ModelConfig(), (64,), 10)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = net.init_params(7)
    assert torch.equal(torch.rand(1), before)
    b = net.init_params(7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.1.weight"], net.init_params(8)["layers.1.weight"])


def test_batchnorm_statistics_are_recomputed_for_new_weights():
    net = build_network(ModelConfig(name="resnet18"), (3, 32, 32), 10)
    assert net.has_batchnorm
    params = net.init_params(0)
    x = torch.randn(64, 3, 32, 32) * 3 + 1
    fresh = recompute_batchnorm(net, params, x, batch_size=32)
    assert float(fresh["bn1.running_mean"].abs().sum()) > 0  # stats of these inputs, not the init's zeros
    assert torch.equal(net.buffers["bn1.running_mean"], torch.zeros_like(net.buffers["bn1.running_mean"]))
    scaled = {k: v * 2 if k == "conv1.weight" else v for k, v in params.items()}
    moved = recompute_batchnorm(net, scaled, x, batch_size=32)
    torch.testing.assert_close(moved["bn1.running_mean"], 2 * fresh["bn1.running_mean"], rtol=1e-4, atol=1e-5)


def test_image_models_refuse_flat_or_wrong_sized_inputs():
    with pytest.raises(ConfigError, match="needs images"):
        build_network(ModelConfig(name="vgg11"), (64,), 10)
    with pytest.raises(ConfigError, match="8 to 32 pixels"):
        build_network(ModelConfig(name="resnet18"), (1, 64, 64), 10)
    with pytest.raises(ConfigError, match="square"):
        build_network(ModelConfig(name="lenet5"), (1, 28, 32), 10)


@pytest.mark.parametrize("size", [8, 28, 32])
@pytest.mark.parametrize("name", ["lenet5", "vgg11", "vgg16", "resnet18"])
def test_conv_models_adapt_to_8_28_and_32_pixel_images(name, size):
    net = build_network(ModelConfig(name=name), (1, size, size), 10)
    params = net.init_params(0)
    logits = net.apply(params, torch.randn(3, 1, size, size))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("solver", ["constrained", "penalty"])
def test_a_step_of_each_rule_on_lenet5_images(size, solver):
    from geodesic.config import WalkConfig
    from geodesic.data import from_tensors
    from geodesic.goals import Sparsify
    from geodesic.step import constrained_step, penalty_step

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, size, size, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    net = build_network(ModelConfig(name="lenet5"), (1, size, size), 10)
    params = net.init_params(0)
    goal = Sparsify.for_network(net, params, from_tensors(x, y, x[:8], y[:8], n_classes=10), target_sparsity=0.9)
    config = WalkConfig(solver=solver, probe_size=4, batch_size=16, goal_weight=0.003, restoring_weight=0.3)
    rule = {"constrained": constrained_step, "penalty": penalty_step}[solver]
    step = rule(params, goal, goal.sample(gen, 16), x[:4], config, 0.05, goal.model_fn)
    length = float(sum(v.pow(2).sum() for v in step.tangent_vec.values()).sqrt())
    assert 0 < length <= 0.05 * (1 + 1e-4)


def test_sessions_asking_for_the_same_start_network_at_once_train_it_once(tmp_path, monkeypatch):
    """A class opening one link: many sessions build the same walk at once; one trains, the rest read the cache."""
    import threading
    import time

    from geodesic import training
    from geodesic.config import GoalConfig, RunConfig, TrainConfig
    from geodesic.experiment import build

    monkeypatch.setenv("GEODESIC_CACHE", str(tmp_path / "cache"))
    calls, real_train = [], training.train

    def counted(*args, **kwargs):
        calls.append(threading.get_ident())
        args[5](0.5)  # (progress) half done ...
        time.sleep(1.2)  # ... for long enough that every other session arrives and waits meanwhile
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", counted)
    config = RunConfig(goal=GoalConfig(kind="sparsify"), train=TrainConfig(epochs=2))
    barrier, starts, errors = threading.Barrier(6), [], []

    seen: dict[int, list[float]] = {}

    def session():
        barrier.wait()
        mine = seen.setdefault(threading.get_ident(), [])
        try:
            starts.append(build(config, progress=lambda what, fraction: mine.append(fraction)).start)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=session) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1 and len(starts) == 6
    # the sessions that waited were shown the training's progress (their bars stood still at 0 before)
    waiting = [fractions for ident, fractions in seen.items() if ident != calls[0]]
    assert len(waiting) == 5 and all(0.5 in fractions for fractions in waiting), seen
    assert all(torch.equal(s[k], starts[0][k]) for s in starts for k in s)  # every session walks the same network


def test_a_long_phase_of_a_build_says_about_how_long_it_has_left():
    """Training a ResNet-18's start network took minutes behind a bar that said nothing of how long."""
    from geodesic.training import PhaseClock

    now = [0.0]
    clock = PhaseClock(clock=lambda: now[0])
    assert clock.text("training start network (seed 0)", 0.0) == "training start network (seed 0)"
    now[0] = 60.0  # a quarter done in a minute: three minutes left
    assert clock.text("training start network (seed 0)", 0.25) == (
        "training start network (seed 0): about 3 min left (trained once, then cached for every walk that uses it)")
    now[0] = 61.0
    assert clock.text("loading data", 0.5) == "loading data"  # a new phase: too soon to tell
    now[0] = 71.0
    assert clock.text("loading data", 0.5) == "loading data"  # nothing done since it was first seen: no rate yet
    late = PhaseClock(clock=lambda: now[0])  # a page that joins a training already half done
    assert late.text("training", 0.5) == "training"
    now[0] = 81.0  # 10 % more in 10 s: 40 s left (from a start at 0 it would have said 10 s)
    assert late.text("training", 0.6) == ("training: about 40 s left (trained once, then cached for every walk that "
                                          "uses it)")
