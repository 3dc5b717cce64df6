"""Each algorithm of docs/ALGORITHMS.md against values derived by hand, in float64 numpy.

The problem is a separable quadratic L(w) = sum_i (a_i w_i^2 / 2 - c_i w_i) over two
parameter tensors (a vector and a matrix), so g = a*w - c and every step has a closed
form: eps = rho T^a g / ||T^b g|| with one global norm, g_p = a*(w + eps) - c, GSAM's
d = g_p - alpha (g - <g, h> h), h = g_p / ||g_p||, and SGD's w' = w - lr * d.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam.optimizer import ADAPTIVE_EXPONENTS

BACKENDS = ["reference", "foreach"]
LR = 0.1


class Quadratic:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.shapes = [(3,), (2, 4)]
        self.w0 = [rng.normal(size=s) for s in self.shapes]
        self.a = [rng.uniform(0.5, 2.0, size=s) for s in self.shapes]
        self.c = [rng.normal(size=s) for s in self.shapes]
        self.params = [torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in self.w0]

    def loss(self):
        return sum((torch.tensor(a) * p ** 2 / 2 - torch.tensor(c) * p).sum()
                   for p, a, c in zip(self.params, self.a, self.c))

    def grad(self, w):
        return [a * wi - c for wi, a, c in zip(w, self.a, self.c)]

    def closure(self):
        for p in self.params:
            p.grad = None
        loss = self.loss()
        loss.backward()
        return loss


def global_norm(vectors):
    return np.sqrt(sum((v ** 2).sum() for v in vectors))


def expected_sam_step(q: Quadratic, w, rho, a=0, b=0, eta=0.0, alpha=0.0, normalize=False,
                      adaptive_mask=(True, True), direction=None):
    g = q.grad(w) if direction is None else direction
    T = [np.abs(wi) + eta for wi in w]
    ta = [t ** a if m else np.ones_like(t) for t, m in zip(T, adaptive_mask)]
    tb = [t ** b if m else np.ones_like(t) for t, m in zip(T, adaptive_mask)]
    norm = global_norm([t * gi for t, gi in zip(tb, g)])
    eps = [rho * t * gi / (norm + 1e-12) for t, gi in zip(ta, g)]
    gp = q.grad([wi + e for wi, e in zip(w, eps)])
    if alpha:
        g_asc = [gi / (global_norm(g) + 1e-12) for gi in g] if normalize else g
        gp_norm = global_norm(gp)
        h = [x / (gp_norm + 1e-12) for x in gp]
        along = sum((ga * hi).sum() for ga, hi in zip(g_asc, h))
        gp = [x - alpha * (ga - along * hi) for x, ga, hi in zip(gp, g_asc, h)]
    return [wi - LR * d for wi, d in zip(w, gp)]


def current(q):
    return [p.detach().numpy().copy() for p in q.params]


def assert_params(q, expected):
    for p, e in zip(q.params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", list(ADAPTIVE_EXPONENTS))
def test_sam_and_asam_variants(backend, adaptive):
    q = Quadratic()
    opt = fastsam.SAM(q.params, torch.optim.SGD, rho=0.3, adaptive=adaptive, eta=0.05, lr=LR, backend=backend)
    a, b = ADAPTIVE_EXPONENTS[adaptive]
    for _ in range(3):
        expected = expected_sam_step(q, current(q), 0.3, a, b, 0.05)
        opt.step(q.closure)
        assert_params(q, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_asam_on_matrices_only(backend):
    q = Quadratic()
    opt = fastsam.SAM(q.params, torch.optim.SGD, rho=0.3, adaptive=True, adaptive_scope="matrices", lr=LR,
                      backend=backend)
    expected = expected_sam_step(q, current(q), 0.3, 2, 1, adaptive_mask=(False, True))
    opt.step(q.closure)
    assert_params(q, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam(backend, normalize, adaptive):
    q = Quadratic()
    opt = fastsam.SAM(q.params, torch.optim.SGD, rho=0.2, adaptive=adaptive, gsam_alpha=0.4,
                      gsam_normalize_ascent=normalize, lr=LR, backend=backend)
    a, b = ADAPTIVE_EXPONENTS[adaptive]
    for _ in range(3):
        expected = expected_sam_step(q, current(q), 0.2, a, b, alpha=0.4, normalize=normalize)
        opt.step(q.closure)
        assert_params(q, expected)


def test_gsam_decomposition_removes_only_the_orthogonal_part():
    """d = g_p - alpha g_orth keeps <d, g_p> = ||g_p||^2 (g_orth is orthogonal to g_p)."""
    q = Quadratic()
    opt = fastsam.SAM(q.params, torch.optim.SGD, rho=0.2, gsam_alpha=0.7, lr=LR)
    q.closure()
    opt.first_step(zero_grad=True)
    q.closure()
    gp = [p.grad.clone() for p in q.params]
    opt.unperturb()
    d = [p.grad for p in q.params]
    dot = sum((x * y).sum() for x, y in zip(d, gp)).item()
    assert dot == pytest.approx(sum((y * y).sum() for y in gp).item(), rel=1e-10)
    assert not all(torch.allclose(x, y) for x, y in zip(d, gp))  # and it did change the direction


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_proportional_rho(backend):
    q = Quadratic()
    opt = fastsam.SAM(q.params, torch.optim.SGD, rho=0.4, rho_schedule="lr", rho_min=0.1, lr_min=0.0,
                      lr=LR, backend=backend)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        lr = LR * 0.5 ** step
        rho_t = 0.1 + (0.4 - 0.1) * (lr - 0.0) / (LR - 0.0)
        w = current(q)
        expected_eps_norm = rho_t * global_norm(q.grad(w)) / (global_norm(q.grad(w)) + 1e-12)
        q.closure()
        opt.first_step(zero_grad=True)
        eps = [p.detach().numpy() - wi for p, wi in zip(q.params, w)]
        assert global_norm(eps) == pytest.approx(expected_eps_norm, rel=1e-10)
        q.closure()
        opt.second_step()
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(LR / 8)


def test_rho_schedule_is_clipped_at_zero_and_validated():
    # warm-up far below lr_min: 0.1 + 0.4 * (0.0 - 0.5) / 0.5 = -0.3 -> 0
    assert fastsam.lr_proportional_rho(0.0, 0.5, 0.1, 1.0, 0.5) == 0.0
    assert fastsam.lr_proportional_rho(0.505, 0.5, 0.1, 1.0, 0.01) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="lr_max > lr_min"):
        fastsam.lr_proportional_rho(0.1, 0.5, 0.1, 0.01, 0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_randsam_uses_normalised_noise(backend):
    q = Quadratic()
    gen = torch.Generator().manual_seed(7)
    opt = fastsam.SAM(q.params, torch.optim.SGD, rho=0.3, randsam=True, generator=gen, lr=LR, backend=backend)
    replay = torch.Generator().manual_seed(7)
    for _ in range(2):
        noise = [torch.randn(s, generator=replay, dtype=torch.float64).numpy() for s in q.shapes]
        expected = expected_sam_step(q, current(q), 0.3, direction=noise)
        opt.step(q.closure)
        assert_params(q, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_param_groups_share_one_global_norm(backend):
    q = Quadratic()
    opt = fastsam.SAM([{"params": [q.params[0]], "rho": 0.05},
                       {"params": [q.params[1]], "rho": 0.5, "adaptive": True, "lr": 0.05}],
                      torch.optim.SGD, rho=0.1, lr=LR, backend=backend)
    w = current(q)
    g = q.grad(w)
    T1 = np.abs(w[1])
    norm = np.sqrt((g[0] ** 2).sum() + ((T1 * g[1]) ** 2).sum())  # group 0: b = 0, group 1: b = 1
    eps = [0.05 * g[0] / norm, 0.5 * T1 ** 2 * g[1] / norm]
    gp = q.grad([wi + e for wi, e in zip(w, eps)])
    expected = [w[0] - LR * gp[0], w[1] - 0.05 * gp[1]]
    opt.step(q.closure)
    assert_params(q, expected)


def test_params_without_grad_or_frozen_are_left_out():
    q = Quadratic()
    frozen = torch.nn.Parameter(torch.ones(5, dtype=torch.float64), requires_grad=False)
    unused = torch.nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    opt = fastsam.SAM(q.params + [frozen, unused], torch.optim.SGD, rho=0.3, lr=LR)
    expected = expected_sam_step(q, current(q), 0.3)  # the norm covers q.params only
    opt.step(q.closure)
    assert_params(q, expected)
    assert torch.equal(frozen, torch.ones(5, dtype=torch.float64))
    assert torch.equal(unused, torch.full((4,), 2.0, dtype=torch.float64)) and unused.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,gamma", [(1000.0, 1.0), (3.0, 0.5), (-1.0, 0.3)])
def test_obf_ascent_with_sam_on_a_linear_model(backend, C, gamma):
    """OBF + SAM on z = W x: ascent gradient (u - alpha p - (1-alpha) Y)^T x / B, descent with CE at W + eps."""
    rng = np.random.default_rng(3)
    B, D, K = 6, 4, 3
    x, y = rng.normal(size=(B, D)), rng.integers(0, K, size=B)
    W0 = rng.normal(size=(K, D))
    model = torch.nn.Linear(D, K, bias=False).double()
    model.weight.data = torch.tensor(W0)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=LR, backend=backend)
    fastsam.train_step(model, opt, torch.tensor(x), torch.tensor(y), F.cross_entropy,
                       ascent_loss=fastsam.OutputBiasForgetting(C=C, gamma=gamma))

    Y = np.eye(K)[y]
    z = x @ W0.T
    p = 1 / (1 + np.exp(-z))
    p_y = p[np.arange(B), y]
    alpha = np.full(B, gamma) if C <= 0 else gamma * np.maximum(0.0, (C - 1 / p_y) / (C - 1))
    dz = (1.0 / K - alpha[:, None] * p - (1 - alpha[:, None]) * Y) / B
    g = dz.T @ x
    W1 = W0 + 0.2 * g / (np.sqrt((g ** 2).sum()) + 1e-12)
    z1 = x @ W1.T
    softmax = np.exp(z1 - z1.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    gp = (softmax - Y).T @ x / B
    np.testing.assert_allclose(model.weight.detach().numpy(), W0 - LR * gp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_closure_conventions_give_the_same_steps(backend):
    """torch.optim's (closure runs both passes, zero_grad inside) and the single-file SAM
    wrapper's (loss.backward() first, closure for the second pass)."""
    q_torch, q_wrapper = Quadratic(), Quadratic()
    opt_torch = fastsam.SAM(q_torch.params, torch.optim.SGD, rho=0.3, lr=LR, backend=backend)
    opt_wrapper = fastsam.SAM(q_wrapper.params, torch.optim.SGD, rho=0.3, lr=LR, backend=backend)
    calls = []

    def counting_closure():
        calls.append(1)
        return q_torch.closure()

    for _ in range(3):
        expected = expected_sam_step(q_torch, current(q_torch), 0.3)
        loss = opt_torch.step(counting_closure)
        assert_params(q_torch, expected)
        assert loss is not None

        loss = q_wrapper.loss()
        loss.backward()
        assert opt_wrapper.step(q_wrapper.closure) is None
        assert_params(q_wrapper, expected)
        opt_wrapper.zero_grad()
    # torch's convention left the descent gradients in .grad after every step; each step
    # still ran its own first pass instead of reusing them
    assert len(calls) == 6
