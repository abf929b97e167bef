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
    theta, mu, _ = trust_region_kernel(metric.jacobian(params), v, beta, radius)
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
    theta, _, _ = trust_region_kernel(metric.jacobian(params), v, 1e9, 0.1)
    assert float(torch.nn.functional.cosine_similarity(theta, v, dim=0)) > 0.999


def test_zero_goal_weight_gives_a_zero_step(tiny):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "logit")
    theta, _, _ = trust_region_kernel(metric.jacobian(params), torch.randn(31, dtype=torch.float64), 0.0, 0.1)
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
    theta, _, _ = trust_region_kernel(jac, v, 0.01, 0.1)
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

    def solver_used(model, shape, linear_solver="auto", probe_size=4):
        net = build_network(ModelConfig(name=model), shape, 10)
        params = net.init_params(0)
        x, y = torch.randn(20, *shape), torch.randint(0, 10, (20,))
        goal = Sparsify.for_network(net, params, from_tensors(x, y, x[:5], y[:5], n_classes=10), target_sparsity=0.5)
        batch = goal.sample(torch.Generator().manual_seed(0), 20)
        config = WalkConfig(solver="constrained", probe_size=probe_size, batch_size=20, linear_solver=linear_solver)
        step = constrained_step(params, goal, batch, x[:probe_size], config, 0.05, goal.model_fn)
        assert float(norm(step.tangent_vec)) <= 0.05 * (1 + 1e-5)
        return step.linear_solver

    import geodesic.rows as rows_module

    assert solver_used("mlp", (64,)) == "kernel (factored)"
    assert solver_used("lenet5", (1, 28, 28)) == "kernel (factored)"  # Linear factors + written-out conv rows
    # VGG16's early convolutions' rows (16 probe inputs × 10 outputs × 1.7M weights) are too big to write out on
    # the CPU; VGG11's (0.96M weights) are not, and the deep convolutions of both take the patch form (rows.py)
    assert solver_used("vgg16", (3, 32, 32), probe_size=16) == "cg"
    assert solver_used("vgg11", (3, 32, 32), probe_size=16) == "kernel (factored)"
    assert solver_used("lenet5", (1, 28, 28), "cg") == "cg"
    assert step_module.dense_jacobian_fits(160, 26_000, torch.device("cpu"))
    assert not step_module.dense_jacobian_fits(160, 9_000_000, torch.device("cpu"))  # VGG11 on the CPU: CG
    for module in (step_module, rows_module):
        monkeypatch.setattr(module, "dense_jacobian_fits", lambda *args: False)
    monkeypatch.setattr(rows_module, "CPU_CONV_ENTRIES", 0)
    assert solver_used("lenet5", (1, 28, 28)) == "cg"  # its conv rows and a dense L are both too big
    assert solver_used("mlp", (64,)) == "kernel (factored)"  # never written out, so never too big
    # asked for the exact step, the factored rows whatever their size, never the bigger dense L
    assert solver_used("lenet5", (1, 28, 28), "kernel") == "kernel (factored)"


def _problems(seed: int = 0):
    """Five walks' row-space problems (K = L Lᵀ, L v, ‖v‖², β, ε) in float64: full rank, rank-deficient (12 rows
    of rank 6), badly scaled, β = 0, and ε tiny against β‖v‖ (the plain gradient step)."""
    gen = torch.Generator().manual_seed(seed)
    ls = [torch.randn(12, 40, generator=gen, dtype=torch.float64) for _ in range(5)]
    ls[1] = torch.randn(12, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 40, generator=gen,
                                                                                   dtype=torch.float64)
    ls[2] = ls[2] * torch.logspace(-3, 2, 12, dtype=torch.float64)[:, None]
    vs = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    kernel = torch.stack([jac @ jac.T for jac in ls])
    jv = torch.stack([jac @ v for jac, v in zip(ls, vs, strict=True)])
    beta = torch.tensor([1.0, 0.5, 2.0, 0.0, 1e9], dtype=torch.float64)
    radius = torch.tensor([0.1, 0.3, 0.05, 0.1, 1e-9], dtype=torch.float64)
    return ls, vs, kernel, jv, vs.pow(2).sum(-1), beta, radius


def test_cholesky_coefficients_match_the_eigendecomposition():
    from geodesic.step import _coefficients_by_cholesky, _coefficients_by_eigh

    ls, vs, kernel, jv, v2, beta, radius = _problems()
    found = _coefficients_by_cholesky(kernel, jv, v2, beta / 2, radius)
    assert found is not None
    a, y, mu = found
    a_e, y_e, mu_e = _coefficients_by_eigh(kernel, jv, v2, beta / 2, radius)
    torch.testing.assert_close(mu[:3], mu_e[:3], rtol=1e-9, atol=0)
    assert mu[3] == math.inf and mu[4] == math.inf and mu_e[3] == math.inf and mu_e[4] == math.inf
    torch.testing.assert_close(a, a_e, rtol=1e-9, atol=1e-12)
    for k, (jac, v) in enumerate(zip(ls, vs, strict=True)):
        theta, theta_e = a[k] * v + beta[k] / 2 * jac.T @ y[k], a_e[k] * v + beta[k] / 2 * jac.T @ y_e[k]
        torch.testing.assert_close(theta, theta_e, rtol=1e-8, atol=1e-12)
        if k in (0, 1, 2):  # the bound is active and θ solves (g + μI) θ = (β/2) v
            assert float(theta.norm()) == pytest.approx(float(radius[k]), rel=1e-9)
            g = jac.T @ jac
            torch.testing.assert_close((g + mu[k] * torch.eye(40, dtype=g.dtype)) @ theta, beta[k] / 2 * v)
    assert float(a[3]) == 0 and float(y[3].abs().max()) == 0  # β = 0: no step
    assert float((a[4] * vs[4]).norm()) == pytest.approx(1e-9, rel=1e-9)  # the plain gradient step of length ε


def test_cholesky_leaves_the_noise_floor_to_the_eigendecomposition():
    from geodesic.step import _coefficients_by_cholesky, trust_region_coefficients

    ls, vs, kernel, jv, v2, beta, radius = _problems()
    inside = ls[0].T @ torch.randn(12, dtype=torch.float64)  # v in L's row space, and ε long enough: μ = 0
    jv0, v20 = (ls[0] @ inside)[None], inside.pow(2).sum()[None]
    args = (kernel[:1], jv0, v20, beta[:1] / 2, torch.tensor([1e6], dtype=torch.float64))
    assert _coefficients_by_cholesky(*args) is None
    a, y, mu, functional = trust_region_coefficients(kernel[:1], jv0, v20, beta[:1], args[-1])
    assert float(mu[0]) == 0 and float(a[0]) == 0  # the pseudo-inverse step, through the eigendecomposition
    theta = beta[0] / 2 * ls[0].T @ y[0]
    assert float(functional[0]) == pytest.approx(float((ls[0] @ theta).pow(2).sum()), rel=1e-9)


def test_functional_step_from_the_row_space_is_theta_g_theta():
    ls, vs, kernel, jv, v2, beta, radius = _problems(1)
    from geodesic import step

    for by_cholesky in (False, True):
        step.CHOLESKY_ON_CPU = by_cholesky
        try:
            a, y, _, functional = step.trust_region_coefficients(kernel, jv, v2, beta, radius)
        finally:
            step.CHOLESKY_ON_CPU = False
        for k, (jac, v) in enumerate(zip(ls, vs, strict=True)):
            theta = a[k] * v + beta[k] / 2 * jac.T @ y[k]
            assert float(functional[k]) == pytest.approx(float((jac @ theta).pow(2).sum()), rel=1e-8, abs=1e-30)


def test_a_walk_solved_by_cholesky_follows_the_eigendecomposition_walk(monkeypatch):
    """The GPU's way (no eigendecomposition) and the CPU's way take the same default walk, to rounding."""
    from geodesic import step
    from geodesic.config import GoalConfig, RunConfig, default_walk
    from geodesic.experiment import build

    runs = {}
    for by_cholesky in (False, True):
        monkeypatch.setattr(step, "CHOLESKY_ON_CPU", by_cholesky)
        walker = build(RunConfig(goal=GoalConfig(kind="sparsify"),
                                 walk=default_walk("sparsify", "constrained", n_steps=30))).walker
        points = [walker.step() for _ in range(30)]
        runs[by_cholesky] = (walker.params, [p.functional_step for p in points], points[-1].accuracy["A"])
    (p_e, f_e, acc_e), (p_c, f_c, acc_c) = runs[False], runs[True]
    assert all(f > 0 for f in f_c)
    assert f_c == pytest.approx(f_e, rel=1e-2)
    diff = math.sqrt(sum(float((p_e[k] - p_c[k]).pow(2).sum()) for k in p_e))
    assert diff < 1e-3 * math.sqrt(sum(float(p.pow(2).sum()) for p in p_e.values()))
    assert acc_c == pytest.approx(acc_e, abs=0.01)
