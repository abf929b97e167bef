"""The step guard (guard.py): a step that lowers the share of training inputs keeping their class by more than
`step_guard`, or moves their outputs by more than KL_BUDGET, is halved before it is taken; alone and batched
alike; conv nets' sparsify and connect walks have it on."""
import pytest
import torch

from geodesic.batch import WalkBatch, batch_key
from geodesic.config import GoalConfig, RunConfig, TrainConfig, WalkConfig, default_walk
from geodesic.errors import ConfigError
from geodesic.experiment import build
from geodesic.guard import HALVINGS, KL_BUDGET, guard_inputs, guard_outputs, kept_and_moved

LIMIT = 0.003
LONG = 1.5  # ε far beyond the tuned 0.2: steps that move other inputs' classes, so the guard has work to do


def _walker(guard: float, seed: int = 0, eps: float = LONG):
    config = RunConfig(goal=GoalConfig(kind="sparsify"), train=TrainConfig(epochs=10), seed=seed,
                       walk=default_walk("sparsify", "constrained", max_step_norm=eps, step_guard=guard))
    return build(config).walker


def _outputs(walker):
    return guard_outputs(walker.model_fn, walker.params, guard_inputs(walker.goal)[0])


def _share(walker) -> float:
    outputs = _outputs(walker)
    return float(kept_and_moved(outputs, outputs, guard_inputs(walker.goal)[1])[0])


def test_a_guarded_step_loses_at_most_its_limit_or_is_halved_to_the_end():
    unguarded, guarded = _walker(0.0), _walker(LIMIT)
    worst_unguarded = 0.0
    for _ in range(12):
        before = _share(unguarded)
        unguarded.step()
        worst_unguarded = max(worst_unguarded, before - _share(unguarded))
    assert worst_unguarded > LIMIT  # without the guard these steps cost more than the limit: the test can fail
    halved = 0
    classes = guard_inputs(guarded.goal)[1]
    for _ in range(12):
        before, radius = _outputs(guarded), guarded.radius()
        point = guarded.step()
        after = _outputs(guarded)
        kept_before, _ = kept_and_moved(before, before, classes)
        kept_after, moved = kept_and_moved(before, after, classes)
        shortest = radius / 2 ** HALVINGS
        assert (kept_after >= kept_before - LIMIT - 1e-7 and moved <= KL_BUDGET + 1e-7
                or point.step_norm == pytest.approx(shortest, rel=1e-3))
        assert shortest * (1 - 1e-3) <= point.step_norm <= radius * (1 + 1e-3)
        halved += point.step_norm < radius * 0.99
    assert halved > 0


def test_the_guard_is_off_by_default_for_mlps_and_on_for_conv_nets_sparsify_and_connect_walks():
    assert default_walk("sparsify", "constrained").step_guard == 0
    assert default_walk("sparsify", "constrained", "lenet5").step_guard == LIMIT
    assert default_walk("sparsify", "constrained", "vgg11", step_guard=0.0).step_guard == 0  # the user's word wins
    assert default_walk("new-task", "constrained", "lenet5").step_guard == 0
    # connect: a LeNet-5 walk on digits-images dipped 5-25 points on single steps unguarded (BENCHMARKS.md)
    conv_connect = default_walk("connect", "constrained", "lenet5")
    assert conv_connect.step_guard == LIMIT and conv_connect.n_steps == 3000
    assert default_walk("connect", "constrained").step_guard == 0 and default_walk("connect", "constrained").n_steps \
        == 2000  # the MLP's defaults unchanged
    from geodesic.config import CONV_MODELS
    from geodesic.models import MODEL_NAMES

    assert set(CONV_MODELS) == set(MODEL_NAMES) - {"mlp"}  # every conv model gets the conv defaults
    config = RunConfig(walk=default_walk("sparsify", "constrained", "lenet5"))
    assert RunConfig.from_dict(config.to_dict()).walk.step_guard == LIMIT  # saved and resumed with the run
    for bad in (-0.1, 1.0, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="step-guard"):
            WalkConfig(step_guard=bad)


@pytest.mark.parametrize("vmapped", [False, True], ids=["walk-by-walk", "vmapped"])
def test_batched_guarded_walks_follow_the_paths_of_separate_walkers(vmapped, monkeypatch):
    import geodesic.batch

    monkeypatch.setattr(geodesic.batch, "VMAP_GUARD_ON_CPU", vmapped)  # the CUDA path's vmapped guard, on the CPU
    settings = [(0, LONG), (1, LONG), (0, LONG / 3)]
    alone = [_walker(LIMIT, s, e) for s, e in settings]
    together = [_walker(LIMIT, s, e) for s, e in settings]
    assert len({batch_key(w) for w in together}) == 1
    assert batch_key(_walker(0.0)) != batch_key(together[0])  # guarded and unguarded walks are batched apart
    batch = WalkBatch(together)
    halved = 0
    for _ in range(8):
        radii = [w.radius() for w in alone]
        expected = [w.step() for w in alone]
        got = batch.step()
        for a, b, radius in zip(expected, got, radii, strict=True):
            assert b.step == a.step
            assert b.step_norm == pytest.approx(a.step_norm, rel=1e-4)
            assert b.functional_step == pytest.approx(a.functional_step, rel=1e-3, abs=1e-9)
            assert b.accuracy == pytest.approx(a.accuracy, abs=1e-6)
            halved += a.step_norm < radius * 0.99
    assert halved > 0  # the guard shortened some of these steps, differently per walk
    for a, b in zip(alone, together, strict=True):  # steps of length up to 1.5: float32 noise ~1e-5 after 8
        for k in a.params:
            torch.testing.assert_close(b.params[k], a.params[k], atol=1e-4, rtol=1e-4)


def test_a_diverging_guarded_walk_stops_alone_in_a_batch():
    import math

    from geodesic.errors import WalkDiverged

    walkers = [_walker(LIMIT, s) for s in (0, 1, 2)]
    batch = WalkBatch(walkers)
    batch.step()
    bad = walkers[1]
    bad.params = {k: v.clone() for k, v in bad.params.items()}
    next(iter(bad.params.values()))[0, 0] = math.nan
    results = batch.step()
    assert isinstance(results[1], WalkDiverged) and bad.is_done and bad.n_steps == 1
    assert [r.step for r in (results[0], results[2])] == [2, 2]
    alone = _walker(LIMIT, 3)
    alone.step()
    alone.params = {k: v.clone() for k, v in alone.params.items()}
    next(iter(alone.params.values()))[0, 0] = math.nan
    with pytest.raises(WalkDiverged):
        alone.step()
    assert alone.n_steps == 1  # kept its last finite point
