"""The matrix-free metric against dense float64 oracles built with jacrev."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import jacrev

from geodesic.measures import bhattacharyya
from geodesic.metric import PullbackMetric, conjugate_gradient
from geodesic.params import flatten, unflatten


def dense_metric(net, params, x, kind):
    """g = (1/N) Σ J_iᵀ H_i J_i from a full Jacobian."""
    def f(flat):
        return net.apply(unflatten(flat, params), x)

    flat = flatten(params)
    jac = jacrev(f)(flat)  # (N, C, n)
    n = len(x)
    if kind == "logit":
        h = torch.eye(jac.shape[1], dtype=flat.dtype).expand(n, -1, -1)
    else:
        p = F.softmax(f(flat), -1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ica,icd,idb->ab", jac, h, jac) / n


@pytest.mark.parametrize("kind", ["logit", "fisher"])
def test_metric_vector_product_matches_dense(tiny, kind):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, kind)
    g = dense_metric(net, params, x, kind)
    v = unflatten(torch.randn(g.shape[0], dtype=torch.float64), params)
    gv = flatten(metric.metric_vector_product(v, params))
    torch.testing.assert_close(gv, g @ flatten(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["logit", "fisher"])
def test_jacobian_factor_and_inner_product_match_dense(tiny, kind):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, kind)
    g = dense_metric(net, params, x, kind)
    jac = metric.jacobian(params)
    torch.testing.assert_close(jac.T @ jac, g, rtol=1e-10, atol=1e-12)
    a, b = (unflatten(torch.randn(g.shape[0], dtype=torch.float64), params) for _ in range(2))
    expected = flatten(a) @ g @ flatten(b)
    torch.testing.assert_close(metric.inner_product(a, b, params), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metric.squared_norm(a, params), flatten(a) @ g @ flatten(a), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["logit", "fisher"])
def test_metric_is_symmetric_and_positive_semidefinite(tiny, kind):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, kind)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        a, b = (unflatten(torch.randn(31, generator=gen, dtype=torch.float64), params) for _ in range(2))
        ab, ba = metric.inner_product(a, b, params), metric.inner_product(b, a, params)
        torch.testing.assert_close(ab, ba)
        assert metric.squared_norm(a, params) >= -1e-12


def test_fisher_ignores_a_shift_of_all_logits(tiny):
    """A step that only moves the last layer's bias equally on every class changes no probability."""
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "fisher")
    shift = {k: torch.zeros_like(v) for k, v in params.items()}
    last_bias = [k for k in params if k.endswith("bias")][-1]
    shift[last_bias] = torch.ones_like(params[last_bias])
    assert abs(float(metric.squared_norm(shift, params))) < 1e-12
    logit = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "logit")
    assert float(logit.squared_norm(shift, params)) == pytest.approx(3.0)  # ‖(1,1,1)‖² per input


def test_spectrum_exact_and_lanczos_agree_with_dense(tiny):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "logit")
    dense = torch.linalg.eigvalsh(dense_metric(net, params, x, "logit")).flip(0).numpy()
    exact = metric.spectrum(params, n_eigenvalues=5)
    np.testing.assert_allclose(exact, dense[:5], rtol=1e-8, atol=1e-10)
    assert np.linalg.matrix_rank(dense_metric(net, params, x, "logit").numpy(), tol=1e-9) <= 5 * 3


def test_bhattacharyya_second_order_is_fisher_over_eight(tiny):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "fisher")
    direction = unflatten(torch.randn(31, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), params)
    t = 1e-4
    moved = {k: params[k] + t * direction[k] for k in params}
    d_b = bhattacharyya(net.apply(moved, x), net.apply(params, x)).mean()
    quadratic = metric.squared_norm(direction, params) * t**2 / 8
    assert float(d_b) == pytest.approx(float(quadratic), rel=1e-3)


def test_conjugate_gradient_solves_a_damped_metric(tiny):
    net, params, x = tiny
    metric = PullbackMetric(lambda p, inputs: net.apply(p, inputs), x, "logit")
    g = dense_metric(net, params, x, "logit") + 0.1 * torch.eye(31, dtype=torch.float64)
    rhs = unflatten(torch.randn(31, dtype=torch.float64), params)
    sol = conjugate_gradient(lambda t: {k: metric.metric_vector_product(t, params)[k] + 0.1 * t[k] for k in t},
                             rhs, n_iters=100, tol=1e-12)
    torch.testing.assert_close(flatten(sol), torch.linalg.solve(g, flatten(rhs)), rtol=1e-7, atol=1e-9)
