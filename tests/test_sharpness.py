"""fastsam.sharpness against Hessians and loss increases known in closed form.

Least squares on a linear model has Hessian [X 1]'[X 1]/n (times 2/k for k outputs under
a mean MSE); softmax cross-entropy on a linear model has (1/n) sum_i (diag p_i - p_i p_i')
kron x_i x_i'. Both are built here in float64 and diagonalised with torch.linalg.eigvalsh.
On a quadratic, the loss increase along rho g/||g|| is exactly rho ||g|| + rho^2/2 u'Hu.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastsam.sharpness import hessian_top_eigenvalue, m_sharpness


def half_mse(out, y):
    return 0.5 * F.mse_loss(out, y)


def least_squares_data(n=64, d=6, k=1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # anisotropic features so that the top eigenvalue is well separated
    x = torch.randn(n, d, generator=g, dtype=dtype) * torch.linspace(0.3, 2.0, d, dtype=dtype)
    y = torch.randn(n, k, generator=g, dtype=dtype)
    return x, y


def linear_model(d, k, dtype=torch.float64, bias=True, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(d, k, bias=bias).to(dtype)


def least_squares_hessian(x, k, bias=True):
    """Hessian of 0.5 * mean over n*k entries of (Xw + b - y)^2 w.r.t. every weight."""
    n = x.shape[0]
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1) if bias else x
    return torch.kron(torch.eye(k, dtype=x.dtype), a.T @ a) / (n * k)


def softmax_ce_hessian(model: nn.Linear, x):
    """Hessian of mean cross-entropy of softmax(xW' + b) w.r.t. vec(W, b), ordered per class."""
    n = x.shape[0]
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    k, d1 = p.shape[1], a.shape[1]
    h = torch.zeros(k * d1, k * d1, dtype=x.dtype)
    for i in range(n):
        s = torch.diag(p[i]) - torch.outer(p[i], p[i])
        h += torch.kron(s, torch.outer(a[i], a[i]))
    return h / n


def eigvals(h):
    return torch.linalg.eigvalsh(h)


@pytest.mark.parametrize("k,bias", [(1, False), (1, True), (3, True)])
def test_top_eigenvalue_least_squares(k, bias):
    x, y = least_squares_data(k=k)
    model = linear_model(x.shape[1], k, bias=bias)
    expected = eigvals(least_squares_hessian(x, k, bias))[-1].item()
    result = hessian_top_eigenvalue(model, half_mse, x, y, iters=500, tol=1e-10)
    assert result.converged
    assert result.eigenvalue == pytest.approx(expected, rel=1e-7)


def test_top_eigenvalue_float32_default_tolerance():
    x, y = least_squares_data(k=2, dtype=torch.float32)
    model = linear_model(x.shape[1], 2, dtype=torch.float32)
    expected = eigvals(least_squares_hessian(x.double(), 2))[-1].item()
    result = hessian_top_eigenvalue(model, half_mse, x, y)  # 100 iterations, tol 1e-4
    assert result.converged and result.iterations <= 100
    assert result.eigenvalue == pytest.approx(expected, rel=1e-3)


def test_top_eigenvalue_softmax_cross_entropy_at_current_weights():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, 3, (40,), generator=g)
    model = linear_model(4, 3)
    with torch.no_grad():
        model.weight.mul_(3.0)  # away from uniform outputs, so the weights matter
    expected = eigvals(softmax_ce_hessian(model, x))[-1].item()
    result = hessian_top_eigenvalue(model, F.cross_entropy, x, y, iters=1000, tol=1e-12)
    assert result.eigenvalue == pytest.approx(expected, rel=1e-6)


def test_chunked_equals_one_pass_closed_form():
    """batch_size splits the set into weighted chunks (uneven last one) with the same Hessian."""
    x, y = least_squares_data(n=50, k=2)
    model = linear_model(x.shape[1], 2)
    expected = eigvals(least_squares_hessian(x, 2))[-1].item()
    result = hessian_top_eigenvalue(model, half_mse, x, y, iters=500, tol=1e-10, batch_size=16)
    assert result.eigenvalue == pytest.approx(expected, rel=1e-7)


def test_eigenvector_is_top_eigenvector():
    x, y = least_squares_data(k=1)
    model = linear_model(x.shape[1], 1)
    h = least_squares_hessian(x, 1)
    _, vecs = torch.linalg.eigh(h)
    result = hessian_top_eigenvalue(model, half_mse, x, y, iters=1000, tol=1e-12)
    v = torch.cat([t.reshape(-1) for t in result.eigenvector])
    assert abs(torch.dot(v, vecs[:, -1]).item()) == pytest.approx(1.0, abs=1e-6)


class Quadratic(nn.Module):
    """loss = 0.5 w'Aw (the inputs are ignored): Hessian A exactly."""

    def __init__(self, a):
        super().__init__()
        self.a = a
        self.w = nn.Parameter(torch.randn(a.shape[0], dtype=a.dtype, generator=torch.Generator().manual_seed(5)))

    def forward(self, x):
        return 0.5 * self.w @ self.a @ self.w + 0.0 * x.sum()


def quadratic_loss(out, y):
    return out


def test_dominant_negative_curvature_is_reported_as_such():
    model = Quadratic(torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64)))
    x = torch.zeros(4, 1, dtype=torch.float64)
    result = hessian_top_eigenvalue(model, quadratic_loss, x, torch.zeros(4), iters=500, tol=1e-12)
    assert result.eigenvalue == pytest.approx(-5.0, rel=1e-8)


def test_iteration_cap_and_tolerance():
    x, y = least_squares_data(k=1)
    model = linear_model(x.shape[1], 1)
    capped = hessian_top_eigenvalue(model, half_mse, x, y, iters=2, tol=0.0)
    assert capped.iterations == 2 and not capped.converged
    loose = hessian_top_eigenvalue(model, half_mse, x, y, iters=1000, tol=1e-2)
    tight = hessian_top_eigenvalue(model, half_mse, x, y, iters=1000, tol=1e-10)
    assert loose.converged and tight.converged and loose.iterations < tight.iterations
    with pytest.raises(ValueError):
        hessian_top_eigenvalue(model, half_mse, x, y, iters=0)


class DropoutBN(nn.Module):
    """Dropout and BatchNorm before a linear layer: in eval mode an affine map of x, known exactly."""

    def __init__(self, d):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(d).double()
        self.lin = nn.Linear(d, 1).double()

    def forward(self, x):
        return self.lin(self.bn(self.drop(x)))


def test_eval_mode_used_and_modes_restored():
    x, y = least_squares_data(k=1)
    model = DropoutBN(x.shape[1])
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.linspace(-1, 1, x.shape[1]))
        model.bn.running_var.copy_(torch.linspace(0.5, 3.0, x.shape[1]))
        model.bn.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
    model.train()
    model.bn.eval()  # a mixed state must come back as it was
    # Only the linear layer's weights are measured: its input is the eval-mode BN output.
    bn = model.bn
    z = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = eigvals(least_squares_hessian(z.detach(), 1))[-1].item()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = hessian_top_eigenvalue(model, half_mse, x, y, iters=500, tol=1e-10,
                                    params=model.lin.parameters())
    assert result.eigenvalue == pytest.approx(expected, rel=1e-7)
    assert model.training and model.drop.training and not model.bn.training and model.lin.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # running stats untouched, weights too


def test_parameters_and_grads_untouched():
    x, y = least_squares_data(k=2)
    model = linear_model(x.shape[1], 2)
    half_mse(model(x), y).backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    hessian_top_eigenvalue(model, half_mse, x, y, iters=20)
    m_sharpness(model, half_mse, x, y, rho=0.3, m=8)
    for p, (w, g) in zip(model.parameters(), before):
        assert torch.equal(p, w) and torch.equal(p.grad, g)


def closed_form_m_sharpness(model: nn.Linear, x, y, rho, m):
    """sum over sub-batches S (weight |S|/n) of rho ||g_S|| + rho^2/2 u_S' H_S u_S."""
    n, k = y.shape
    theta = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], dim=1)  # [k, d+1]
    total = 0.0
    for start in range(0, n, m):
        xs, ys = x[start:start + m], y[start:start + m]
        a = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=x.dtype)], dim=1)
        residual = a @ theta.T - ys  # [s, k]
        grad = residual.T @ a / (xs.shape[0] * k)  # dL/dtheta, [k, d+1]
        h = least_squares_hessian(xs, k)
        u = grad.reshape(-1) / grad.norm()
        total += (rho * grad.norm() + 0.5 * rho ** 2 * u @ h @ u).item() * xs.shape[0] / n
    return total


@pytest.mark.parametrize("m", [None, 64, 16, 5, 1])
def test_m_sharpness_closed_form_on_quadratic(m):
    x, y = least_squares_data(n=64, k=2)
    model = linear_model(x.shape[1], 2)
    expected = closed_form_m_sharpness(model, x, y, rho=0.2, m=m or 64)
    assert m_sharpness(model, half_mse, x, y, rho=0.2, m=m) == pytest.approx(expected, rel=1e-9)


def test_m_sharpness_grows_as_m_shrinks_and_with_rho():
    """Closed-form facts the estimate must reproduce: small m sees larger per-batch gradients."""
    x, y = least_squares_data(n=64, k=1)
    model = linear_model(x.shape[1], 1)
    values = [m_sharpness(model, half_mse, x, y, rho=0.1, m=m) for m in (64, 16, 4)]
    assert values[0] < values[1] < values[2]
    assert m_sharpness(model, half_mse, x, y, rho=0.0, m=8) == 0.0


def test_m_sharpness_restores_weights_bit_for_bit_and_mode():
    x, y = least_squares_data(n=30, k=1, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(x.shape[1], 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    value = m_sharpness(model, half_mse, x, y, rho=0.5, m=7)
    assert value > 0
    assert model.training and all(mod.training for mod in model.modules())
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p, w)
