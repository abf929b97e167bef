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
    with pytest.raises(ConfigError, match="32x32"):
        build_network(ModelConfig(name="resnet18"), (1, 28, 28), 10)
