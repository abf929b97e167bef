"""The factored Jacobian of Linear-only networks against the dense one from vmap(jacrev)."""
import threading

import pytest
import torch
from torch import nn

from geodesic.config import ModelConfig, WalkConfig
from geodesic.data import from_tensors
from geodesic.goals import Sparsify
from geodesic.metric import PullbackMetric
from geodesic.models import NetworkFunction, build_network, network_from_module
from geodesic.rows import DenseRows, LinearLayerRows, linear_layers
from geodesic.step import constrained_step


def _mlp(hidden=(6, 5), n_in=4, n_out=3, bias=True):
    torch.manual_seed(0)
    layers, widths = [], (n_in, *hidden)
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    module = nn.Sequential(*layers, nn.Linear(widths[-1], n_out, bias=bias)).double()
    net, params = network_from_module(module, (n_in,), n_out)
    return net, params, torch.randn(7, n_in, dtype=torch.float64)


def _assert_same_rows(rows, dense, params) -> dict:
    """K, L v and Lᵀ y of `rows` equal the dense Jacobian's in float64; returns the random v used."""
    torch.testing.assert_close(rows.gram(), dense.gram(), rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    torch.testing.assert_close(rows.matvec(v), dense.matvec(v), rtol=1e-10, atol=1e-12)
    y = torch.randn(rows.n_rows, generator=gen, dtype=torch.float64)
    back, dense_back = rows.rmatvec(y), dense.rmatvec(y)
    assert set(back) == set(params)
    for k in params:
        torch.testing.assert_close(back[k].reshape(-1), dense_back[k], rtol=1e-10, atol=1e-12)
    return v


@pytest.mark.parametrize("kind", ["fisher", "logit"])
@pytest.mark.parametrize("bias", [True, False])
def test_factored_rows_match_dense_rows(kind, bias):
    net, params, x = _mlp(bias=bias)
    metric = PullbackMetric(NetworkFunction(net, net.buffers), x, kind)
    rows = metric.jacobian_rows(params)
    assert isinstance(rows, LinearLayerRows) and net.module._geodesic_factored_rows_ok is True
    dense = DenseRows(metric.jacobian_blocks(params))
    assert rows.n_rows == dense.n_rows == 7 * 3
    v = _assert_same_rows(rows, dense, params)
    # and the metric the rows define is the metric g·v of the matrix-free products
    gv = metric.metric_vector_product(v, params)
    lt_lv = rows.rmatvec(rows.matvec(v))
    for k in params:
        torch.testing.assert_close(lt_lv[k].reshape(params[k].shape), gv[k], rtol=1e-9,
                                   atol=1e-12)


def test_the_digits_mlp_uses_the_factored_rows_and_the_step_is_unchanged():
    torch.manual_seed(0)
    net = build_network(ModelConfig(name="mlp", hidden=(16, 16)), (8,), 4)
    net.module.double()
    params = {k: v.double() for k, v in net.init_params(0).items()}
    x, y = torch.randn(60, 8, dtype=torch.float64), torch.randint(0, 4, (60,))
    data = from_tensors(x, y, x[:10], y[:10], n_classes=4)
    goal = Sparsify(NetworkFunction(net, net.buffers), params, x, {"A": data}, "fisher", 0.01,  # float64 anchor
                    prunable=net.prunable, target_sparsity=0.5)
    batch = goal.sample(torch.Generator().manual_seed(0), 40)
    moved = {k: v + 1e-2 * torch.randn_like(v) for k, v in params.items()}
    config = WalkConfig(solver="constrained", probe_size=6, batch_size=40, goal_weight=0.01, restoring_weight=0.3)
    fast = constrained_step(moved, goal, batch, x[:6], config, 0.05, NetworkFunction(net, net.buffers))
    slow = constrained_step(moved, goal, batch, x[:6], config, 0.05, lambda p, inputs: net.apply(p, inputs))
    for k in params:
        torch.testing.assert_close(fast.tangent_vec[k], slow.tangent_vec[k], rtol=1e-7, atol=1e-10)
    assert fast.functional_step == pytest.approx(slow.functional_step, rel=1e-7)
    assert fast.damping == pytest.approx(slow.damping, rel=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("kind", ["fisher", "logit"])
def test_conv_rows_match_the_dense_jacobian_in_float64(shape, kind):
    """LeNet-5 (two Conv2d, three Linear) on every image size it adapts to: the conv rows written out from
    δ and the unfolded patches, the Linear rows factored, against vmap(jacrev)."""
    net = build_network(ModelConfig(name="lenet5"), shape, 10)
    net.module.double()
    params = {k: v.double() for k, v in net.init_params(0).items()}
    x = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    metric = PullbackMetric(NetworkFunction(net, net.buffers), x, kind)
    rows = metric.jacobian_rows(params)
    assert isinstance(rows, LinearLayerRows) and {type(layer).__name__ for layer in rows.layers} == {
        "_Layer", "_ConvLayer"}
    _assert_same_rows(rows, DenseRows(metric.jacobian_blocks(params)), params)


def test_grouped_convolutions_and_batch_statistics_fall_back():
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    net, params = network_from_module(grouped, (2, 6, 6), 3)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    assert isinstance(PullbackMetric(NetworkFunction(net, net.buffers), x, "fisher").jacobian_rows(params), DenseRows)
    no_stats = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 3)).double()  # normalised by the batch's own statistics
    assert linear_layers(no_stats, dict(no_stats.named_parameters())) is None


class _Residual(nn.Module):
    """Conv-BN-ReLU twice with a skip connection, as in a ResNet block."""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("form", [None, "patches"])
def test_batchnorm_and_residual_blocks_take_the_factored_rows(monkeypatch, form):
    """Eval-mode BatchNorm (running statistics not at 0 and 1) in a residual block, against vmap(jacrev) in
    float64; with every conv layer written out or as patches."""
    from geodesic import rows as rows_module

    monkeypatch.setattr(rows_module, "FORCE_CONV_FORM", form)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True), _Residual(3),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).double()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    module.eval()
    net, params = network_from_module(module, (2, 6, 6), 4)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    metric = PullbackMetric(NetworkFunction(net, net.buffers), x, "fisher")
    rows = metric.jacobian_rows(params)
    assert isinstance(rows, LinearLayerRows) and len(rows.layers) == 7  # 3 conv, 3 BatchNorm, 1 Linear
    _assert_same_rows(rows, DenseRows(metric.jacobian_blocks(params)), params)
    # the buffers passed to the call are the ones x̂ is normalised with, not the module's own
    other = {k: v + 0.5 if "running_mean" in k else v for k, v in net.buffers.items()}
    metric = PullbackMetric(NetworkFunction(net, other), x, "fisher")
    _assert_same_rows(metric.jacobian_rows(params), DenseRows(metric.jacobian_blocks(params)), params)


def test_resnet18_takes_the_factored_rows():
    net = build_network(ModelConfig(name="resnet18"), (3, 8, 8), 10)
    params = net.init_params(0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = PullbackMetric(NetworkFunction(net, net.buffers), x, "fisher").jacobian_rows(params, allow_dense=False)
    assert isinstance(rows, LinearLayerRows) and net.module._geodesic_factored_rows_ok is True  # agreed with a jvp


def test_networks_with_other_layers_or_shared_layers_fall_back_to_dense_rows():
    class Shared(nn.Module):  # one Linear applied twice: its gradient is not one outer product per input
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(torch.tanh(self.inner(x)))

    net, params = network_from_module(Shared().double(), (3,), 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    metric = PullbackMetric(NetworkFunction(net, net.buffers), x, "logit")
    rows = metric.jacobian_rows(params)
    assert isinstance(rows, DenseRows)
    # the hooks left behind change nothing outside the factored computation
    torch.testing.assert_close(net.apply(params, x), Shared().double().forward.__func__(net.module, x))


def test_the_hooks_are_inert_in_other_threads_while_rows_are_built():
    net, params, x = _mlp()
    fn = NetworkFunction(net, net.buffers)
    expected = fn(params, x)
    metric = PullbackMetric(fn, x, "fisher")
    metric.jacobian_rows(params)  # registers the hooks
    errors = []

    def forward_many():
        for _ in range(200):
            if not torch.equal(fn(params, x), expected):
                errors.append("changed")

    thread = threading.Thread(target=forward_many)
    thread.start()
    for _ in range(50):
        metric.jacobian_rows(params)
    thread.join()
    assert errors == []


def test_threads_meeting_a_fresh_network_at_once_hook_each_layer_once():
    """Eight threads hook the layers of a network nobody has hooked yet, all at once: one capture hook per layer
    (two would make every capture fail, and the rows fall back to dense for good)."""
    import sys

    from geodesic import rows as rows_module

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between almost any two bytecodes: the race shows if there is one
    try:
        _hook_at_once(rows_module)
    finally:
        sys.setswitchinterval(interval)


def _hook_at_once(rows_module):
    for _ in range(20):
        net = build_network(ModelConfig(name="lenet5"), (1, 8, 8), 10)
        layers = rows_module.factored_layers(net, net.init_params(0))
        modules = dict(net.module.named_modules())
        names = {id(modules[name]): name for name in layers}
        start = threading.Barrier(8)

        def hook(names=names, net=net, start=start):
            start.wait()
            rows_module._hook_layers(net.module, names)

        threads = [threading.Thread(target=hook) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [len(modules[name]._forward_hooks) for name in layers] == [1] * len(layers)


def test_a_forward_that_mixes_inputs_is_caught_and_falls_back_to_dense_rows():
    class Centred(nn.Module):  # Linear layers only, but each output depends on the whole batch
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h - h.mean(0))

    torch.manual_seed(0)
    net, params = network_from_module(Centred().double(), (4,), 3)
    x = torch.randn(6, 4, dtype=torch.float64)
    metric = PullbackMetric(NetworkFunction(net, net.buffers), x, "logit")
    rows = metric.jacobian_rows(params)
    assert isinstance(rows, DenseRows)
    assert net.module._geodesic_factored_rows_ok is False  # the check against a jvp caught it
    assert metric.jacobian_rows(params, allow_dense=False) is None  # remembered: not checked again


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_rows_in_the_patch_form_match_the_dense_jacobian_in_float64(monkeypatch, shape, bias):
    """Every conv layer kept as δ and patches (K from their products, no rows written out), with stride, padding
    and dilation, against vmap(jacrev)."""
    from geodesic import rows as rows_module

    monkeypatch.setattr(rows_module, "FORCE_CONV_FORM", "patches")
    torch.manual_seed(0)
    c = shape[0]
    module = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1, bias=bias), nn.Tanh(),
                           nn.Conv2d(4, 5, 3, stride=2, dilation=2, padding=(2, 1), bias=bias), nn.Tanh(),
                           nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 3, bias=bias)).double()
    net, params = network_from_module(module, shape, 3)
    x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    metric = PullbackMetric(NetworkFunction(net, net.buffers), x, "fisher")
    rows = metric.jacobian_rows(params)
    assert isinstance(rows, LinearLayerRows)
    assert [type(layer).__name__ for layer in rows.layers] == ["_PatchConvLayer", "_PatchConvLayer", "_Layer"]
    _assert_same_rows(rows, DenseRows(metric.jacobian_blocks(params)), params)


def test_vgg_keeps_its_deep_conv_layers_in_the_patch_form():
    """VGG11 on 32×32 inputs: the early layers (many positions, few weights) written out, the deep ones (2.4M
    weights, 4 or 16 positions) as patches, and the step through them equal to the all-written one."""
    from geodesic import rows as rows_module

    net = build_network(ModelConfig(name="vgg11"), (3, 32, 32), 10)
    params = net.init_params(0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    metric = PullbackMetric(NetworkFunction(net, net.buffers), x, "fisher")
    modules = dict(net.module.named_modules())
    layers = rows_module.factored_layers(net, params)
    conv = {k: v for k, v in layers.items() if isinstance(modules[k], nn.Conv2d)}
    shapes = rows_module._output_shapes(net, net.buffers, params, x, {id(modules[k]): k for k in layers})
    forms = [form for form, _ in rows_module._conv_forms(modules, conv, shapes, 16, 10).values()]
    assert forms == ["written"] * 4 + ["patches"] * 4
    rows = metric.jacobian_rows(params)  # a probe of 2: m = 20, so more layers take the patch form
    kinds = [type(layer).__name__ for layer in rows.layers]
    assert "_PatchConvLayer" in kinds and kinds[-1] == "_Layer"
    rows_module.FORCE_CONV_FORM = "written"
    try:
        written = metric.jacobian_rows(params)
    finally:
        rows_module.FORCE_CONV_FORM = None
    assert {type(layer).__name__ for layer in written.layers} == {"_ConvLayer", "_Layer"}
    k, k_written = rows.gram(), written.gram()
    torch.testing.assert_close(k, k_written, rtol=1e-4, atol=1e-4 * float(k_written.abs().max()))
