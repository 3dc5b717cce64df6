"""OutputBiasForgetting against docs/ALGORITHMS.md §4, with the gradient w.r.t. the logits in closed form:
dL/dz = (u - alpha p - (1 - alpha) Y) / B, alpha = gamma max(0, (C - 1/p_y)/(C - 1)) (C > 1), gamma (C <= 0)."""

from __future__ import annotations

import pytest
import torch

import fastsam


def logit_gradient(obf, logits, targets):
    z = logits.clone().requires_grad_(True)
    obf(z, targets).backward()
    return z.grad


def closed_form(z, y, C, gamma, sigmoid=True):
    B, K = z.shape
    p = torch.sigmoid(z) if sigmoid else torch.softmax(z, dim=1)
    Y = torch.nn.functional.one_hot(y, K).double()
    p_y = p[torch.arange(B), y]
    if C <= 0:
        alpha = torch.full((B,), gamma, dtype=torch.float64)
    else:
        alpha = gamma * torch.clamp((C - 1 / p_y) / (C - 1), min=0)
    return (1.0 / K - alpha[:, None] * p - (1 - alpha[:, None]) * Y) / B


@pytest.mark.parametrize("sigmoid", [True, False])
@pytest.mark.parametrize("C,gamma", [(1000.0, 1.0), (10.0, 0.5), (2.0, 1e-12), (0.0, 0.7), (-5.0, 1.0)])
def test_gradient_matches_closed_form(C, gamma, sigmoid):
    torch.manual_seed(0)
    z = torch.randn(7, 5, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (7,))
    obf = fastsam.OutputBiasForgetting(C=C, gamma=gamma, sigmoid=sigmoid)
    torch.testing.assert_close(logit_gradient(obf, z, y), closed_form(z, y, C, gamma, sigmoid),
                               rtol=1e-12, atol=1e-15)


def test_clamp_forgets_the_label_when_the_model_is_unsure():
    """p_y <= 1/C gives alpha = 0 and the direction u - Y."""
    z = torch.tensor([[-10.0, 0.0, 0.0]], dtype=torch.float64)  # sigmoid(-10) = 4.5e-5 < 1/1000
    y = torch.tensor([0])
    grad = logit_gradient(fastsam.OutputBiasForgetting(C=1000, gamma=1.0), z, y)
    torch.testing.assert_close(grad, torch.tensor([[1 / 3 - 1, 1 / 3, 1 / 3]], dtype=torch.float64))


def test_confident_model_is_pushed_to_uniform():
    """gamma = 1 and p_y -> 1 give the direction u - p."""
    z = torch.tensor([[40.0, -1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0])
    grad = logit_gradient(fastsam.OutputBiasForgetting(C=1000, gamma=1.0), z, y)
    torch.testing.assert_close(grad, 1 / 3 - torch.sigmoid(z), rtol=1e-12, atol=1e-12)


def test_tiny_gamma_is_label_forgetting():
    """The ResNet setting gamma = 1e-12 makes alpha ~ 0: direction u - Y whatever p is."""
    torch.manual_seed(1)
    z, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 6, (4,))
    grad = logit_gradient(fastsam.OutputBiasForgetting(C=1000, gamma=1e-12), z, y)
    expected = (1 / 6 - torch.nn.functional.one_hot(y, 6).double()) / 4
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_sequences_and_ignore_index():
    torch.manual_seed(2)
    z = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.tensor([[0, 3, -100], [1, -100, 2]])
    obf = fastsam.OutputBiasForgetting(C=8.0, gamma=0.5)
    grad = logit_gradient(obf, z, y)
    keep = y != -100
    expected = torch.zeros_like(z)
    expected[keep] = closed_form(z[keep], y[keep], 8.0, 0.5)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_half_precision_logits_get_fp32_coefficients():
    torch.manual_seed(3)
    z = torch.randn(5, 4) * 2
    y = torch.randint(0, 4, (5,))
    grad = logit_gradient(fastsam.OutputBiasForgetting(C=100.0), z.to(torch.bfloat16), y)
    assert grad.dtype == torch.bfloat16
    expected = closed_form(z.to(torch.bfloat16).double(), y, 100.0, 1.0)
    torch.testing.assert_close(grad.double(), expected, rtol=2 ** -7, atol=1e-3 / 5)


def test_coefficients_are_detached():
    """L_OBF is linear in z: its Hessian w.r.t. the logits is zero (p and alpha detached)."""
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    (g,) = torch.autograd.grad(fastsam.OutputBiasForgetting()(z, y), z, create_graph=True)
    assert g.grad_fn is None or torch.autograd.grad(g.sum(), z, allow_unused=True)[0] is None


@pytest.mark.parametrize("C", [0.5, 1.0, float("nan"), float("inf")])
def test_invalid_C(C):
    with pytest.raises(ValueError, match="C must be > 1"):
        fastsam.OutputBiasForgetting(C=C)


def test_invalid_gamma_and_shapes():
    with pytest.raises(ValueError, match="gamma"):
        fastsam.OutputBiasForgetting(gamma=-1.0)
    with pytest.raises(ValueError, match="do not match"):
        fastsam.OutputBiasForgetting()(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
