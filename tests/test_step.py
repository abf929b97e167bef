"""The constrained step solves its trust-region problem; both rules respect ‖θ‖ ≤ ε."""
import math

import pytest
import torch

from geodesic.config import WalkConfig
from geodesic.metric import PullbackMetric
from geodesic.params import flatten, norm, unflatten
from geodesic.step import constrained_step, penalty_step, trust_region_kernel
from tests.test_metric import dense_metric


def objective(g, v, beta, theta):
    return float(theta @ g @ theta - beta * (theta @ v))


@pytest.mark.parametrize("beta,radius", [(1.0, 0.1), (0.01, 0.5), (100.0, 0.05)])
def test_kernel_solution_matches_dense_trust_region(tiny, beta, radius):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "fisher")
    g = dense_metric(net, params, x, "fisher")
    v = torch.randn(g.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta, mu = trust_region_kernel(metric.jacobian(params), v, beta, radius)
    assert float(theta.norm()) == pytest.approx(radius, rel=1e-6)  # the bound is active
    dense = (beta / 2) * torch.linalg.solve(g + mu * torch.eye(len(v), dtype=g.dtype), v)
    torch.testing.assert_close(theta, dense, rtol=1e-6, atol=1e-9)
    # No feasible point does better (random points on and inside the ball).
    best = objective(g, v, beta, theta)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        other = torch.randn(len(v), dtype=torch.float64, generator=gen)
        other *= radius * float(torch.rand(1, generator=gen)) ** 0.5 / other.norm()
        assert objective(g, v, beta, other) >= best - 1e-12


def test_large_goal_weight_tends_to_a_plain_gradient_step(tiny):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "logit")
    v = torch.randn(31, dtype=torch.float64)
    theta, _ = trust_region_kernel(metric.jacobian(params), v, 1e9, 0.1)
    assert float(torch.nn.functional.cosine_similarity(theta, v, dim=0)) > 0.999


def test_zero_goal_weight_gives_a_zero_step(tiny):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "logit")
    theta, _ = trust_region_kernel(metric.jacobian(params), torch.randn(31, dtype=torch.float64), 0.0, 0.1)
    assert float(theta.abs().max()) == 0.0


class _PointGoal:
    """A goal that pulls toward a fixed point, restoring the function on the probe."""

    is_point_target = True
    landing_steps = 5  # exercises the fading restoring pull near a fixed target
    n_outputs = 3

    def __init__(self, net, target, x, anchor):
        self.net, self.target, self.x, self.anchor = net, target, x, anchor

    def direction(self, params, batch):
        return {k: self.target[k] - params[k] for k in params}

    def restoring_loss(self, params, batch):
        return 0.5 * (self.net.apply(params, self.x) - self.anchor).pow(2).sum()


@pytest.mark.parametrize("solver", ["kernel", "cg"])
@pytest.mark.parametrize("rule", ["constrained", "penalty"])
def test_step_rules_respect_the_step_size_and_zero_weight(tiny, solver, rule):
    net, params, x = tiny
    target = {k: torch.zeros_like(v) for k, v in params.items()}
    moved = {k: v + 0.05 for k, v in params.items()}  # off the anchor, so the restoring term is active
    goal = _PointGoal(net, target, x, net.apply(params, x).detach())
    fn = (constrained_step if rule == "constrained" else penalty_step)
    model_fn = lambda p, inputs: net.apply(p, inputs)  # noqa: E731
    config = WalkConfig(linear_solver=solver, goal_weight=1.0, restoring_weight=0.5, cg_iters=50)
    step = fn(moved, goal, None, x, config, 0.1, model_fn)
    assert float(norm(step.tangent_vec)) <= 0.1 + 1e-9
    if rule == "constrained":  # the penalty rule leaves θᵀgθ to the walker's measurements
        assert math.isfinite(step.functional_step) and step.functional_step >= 0
    if rule == "constrained":
        zero = fn(moved, goal, None, x, WalkConfig(linear_solver=solver, goal_weight=0.0), 0.1, model_fn)
        assert float(norm(zero.tangent_vec)) == 0.0


def test_constrained_step_prefers_flat_directions(tiny):
    """For the same length, the metric-aware step moves the outputs less than a plain gradient step."""
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "logit")
    v = torch.randn(31, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    jac = metric.jacobian(params)
    theta, _ = trust_region_kernel(jac, v, 0.01, 0.1)
    plain = v * 0.1 / v.norm()
    assert float((jac @ theta).pow(2).sum()) < 0.5 * float((jac @ plain).pow(2).sum())
    assert float(theta @ v) > 0  # still makes progress toward the goal
    assert unflatten(theta, params).keys() == params.keys() and flatten(params).shape == theta.shape


def test_auto_linear_solver_picks_factored_dense_or_cg_by_model_and_size(monkeypatch):
    import geodesic.step as step_module
    from geodesic.config import ModelConfig
    from geodesic.data import from_tensors
    from geodesic.goals import Sparsify
    from geodesic.models import build_network

    def solver_used(model, shape, linear_solver="auto"):
        net = build_network(ModelConfig(name=model), shape, 10)
        params = net.init_params(0)
        x, y = torch.randn(20, *shape), torch.randint(0, 10, (20,))
        goal = Sparsify.for_network(net, params, from_tensors(x, y, x[:5], y[:5], n_classes=10), target_sparsity=0.5)
        batch = goal.sample(torch.Generator().manual_seed(0), 20)
        config = WalkConfig(solver="constrained", probe_size=4, batch_size=20, linear_solver=linear_solver)
        step = constrained_step(params, goal, batch, x[:4], config, 0.05, goal.model_fn)
        assert float(norm(step.tangent_vec)) <= 0.05 * (1 + 1e-5)
        return step.linear_solver

    import geodesic.rows as rows_module

    assert solver_used("mlp", (64,)) == "kernel (factored)"
    assert solver_used("lenet5", (1, 28, 28)) == "kernel (factored)"  # Linear factors + written-out conv rows
    assert solver_used("vgg11", (3, 32, 32)) == "cg"  # its convolutions' rows are too big to write out on the CPU
    assert solver_used("lenet5", (1, 28, 28), "cg") == "cg"
    assert step_module.dense_jacobian_fits(160, 26_000, torch.device("cpu"))
    assert not step_module.dense_jacobian_fits(160, 9_000_000, torch.device("cpu"))  # VGG11 on the CPU: CG
    for module in (step_module, rows_module):
        monkeypatch.setattr(module, "dense_jacobian_fits", lambda *args: False)
    assert solver_used("lenet5", (1, 28, 28)) == "cg"  # its conv rows and a dense L are both too big
    assert solver_used("mlp", (64,)) == "kernel (factored)"  # never written out, so never too big
