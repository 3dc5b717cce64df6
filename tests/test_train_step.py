"""train_step against an explicit per-sub-batch loop written here with plain autograd.

The hand-written loop computes each sub-batch's ascent gradient with torch.autograd.grad,
perturbs a *copy* of the model (so its BatchNorm statistics cannot leak into the
original), takes the descent gradient there, averages, and applies SGD by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastsam

LR, RHO = 0.1, 0.2


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12, bias=False), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),
                               torch.nn.Linear(12, 4)).double()


def make_batch(n=24):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen)


def explicit_sam_step(model, x, y, micro_batch, ascent_loss=None):
    """One SAM step written out by hand; updates ``model`` in place."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for xs, ys in zip(torch.split(x, micro_batch), torch.split(y, micro_batch)):
        weight = len(ys) / len(y)
        out = model(xs)  # unperturbed pass: updates the running statistics
        ascent = (ascent_loss or F.cross_entropy)(out, ys)
        g = torch.autograd.grad(ascent, params)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        perturbed = copy.deepcopy(model)
        with torch.no_grad():
            for q, gi in zip(perturbed.parameters(), g):
                q.add_(RHO * gi / (norm + 1e-12))
        gp = torch.autograd.grad(F.cross_entropy(perturbed(xs), ys), list(perturbed.parameters()))
        total = [t + weight * gpi for t, gpi in zip(total, gp)]
    with torch.no_grad():
        for p, t in zip(params, total):
            p.sub_(LR * t)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("micro_batch", [None, 8, 5])  # 5: last sub-batch has 4 examples
@pytest.mark.parametrize("obf", [False, True])
def test_micro_batches_match_an_explicit_loop(backend, micro_batch, obf):
    x, y = make_batch()
    ascent = fastsam.OutputBiasForgetting(C=10.0, gamma=0.5) if obf else None
    expected = make_model()
    explicit_sam_step(expected, x, y, micro_batch or len(y), ascent)

    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, backend=backend)
    result = fastsam.train_step(model, opt, x, y, F.cross_entropy, ascent_loss=ascent, micro_batch=micro_batch)

    for p, e in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)
    # BatchNorm statistics come from the unperturbed passes only
    for b, e in zip(model.buffers(), expected.buffers()):
        assert torch.equal(b, e) if b.dtype == torch.long else torch.allclose(b, e, rtol=1e-12, atol=1e-14)
    assert result.outputs.shape == (24, 4)


def test_step_output_reports_unperturbed_and_perturbed_losses():
    x, y = make_batch()
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        outs = [reference_model(xs) for xs in torch.split(x, 8)]
    expected_loss = sum(F.cross_entropy(o, ys) for o, ys in zip(outs, torch.split(y, 8))) / 3
    result = fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=8)
    torch.testing.assert_close(result.loss, expected_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.outputs, torch.cat(outs), rtol=1e-12, atol=0)
    assert result.perturbed_loss > result.loss  # the ascent step raised the training loss
    assert not result.loss.requires_grad and not result.outputs.requires_grad


def test_plain_optimizer_gets_gradient_accumulation():
    x, y = make_batch()
    model, expected = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=8)
    params = list(expected.parameters())
    total = [torch.zeros_like(p) for p in params]
    for xs, ys in zip(torch.split(x, 8), torch.split(y, 8)):
        g = torch.autograd.grad(F.cross_entropy(expected(xs), ys), params)
        total = [t + gi / 3 for t, gi in zip(total, g)]
    with torch.no_grad():
        for p, t in zip(params, total):
            p.sub_(LR * t)
    for p, e in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


def test_randsam_runs_no_ascent_backward():
    x, y = make_batch()
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, randsam=True,
                      generator=torch.Generator().manual_seed(0))
    backward_calls = []
    model[0].weight.register_hook(lambda g: backward_calls.append(1))
    fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=8)
    assert len(backward_calls) == 3  # one descent backward per sub-batch, no ascent backward


def test_max_grad_norm_clips_the_final_descent_gradient():
    x, y = make_batch()
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    seen = []
    opt.base_optimizer.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))))
    fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=8, max_grad_norm=1e-3)
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6), so the result is 1e-3 * norm / (norm + 1e-6)
    assert seen[0].item() == pytest.approx(1e-3, rel=1e-5)


def test_dict_and_tuple_inputs():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    left, right, y = torch.randn(6, 3), torch.randn(6, 4), torch.randint(0, 2, (6,))
    results = []
    for inputs in ((left, right), {"left": left, "right": right}):
        torch.manual_seed(0)
        model = TwoInputs()
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
        fastsam.train_step(model, opt, inputs, y, F.cross_entropy, micro_batch=4)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("micro_batch", [0, -3, 2.5, True, "8"])
def test_invalid_micro_batch(micro_batch):
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match="micro_batch must be a positive int"):
        fastsam.train_step(model, opt, *make_batch(), F.cross_entropy, micro_batch=micro_batch)


def test_ascent_loss_needs_sam_and_is_refused_with_randsam():
    model = make_model()
    with pytest.raises(ValueError, match="needs a fastsam.SAM"):
        fastsam.train_step(model, torch.optim.SGD(model.parameters(), lr=LR), *make_batch(), F.cross_entropy,
                           ascent_loss=fastsam.OutputBiasForgetting())
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=LR, randsam=True)
    with pytest.raises(ValueError, match="no effect with randsam"):
        fastsam.train_step(model, opt, *make_batch(), F.cross_entropy, ascent_loss=fastsam.OutputBiasForgetting())


@pytest.mark.parametrize("inputs,match", [
    (lambda x: x[:8], r"inputs has 8 examples \(dim 0 of shape \(8, 6\)\) but targets has 24"),
    (lambda x: (x, x[:5]), r"inputs\[1\] has 5 examples"),
    (lambda x: {"left": x, "right": x[:3]}, r"inputs\['right'\] has 3 examples"),
    (lambda x: (x, 3), r"inputs\[1\] must be a tensor"),
], ids=["tensor", "tuple", "dict", "not-a-tensor"])
def test_mismatched_inputs_are_named(inputs, match):
    x, y = make_batch()
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    with pytest.raises((ValueError, TypeError), match=match):
        fastsam.train_step(model, opt, inputs(x), y, F.cross_entropy, micro_batch=4)
    assert not opt.is_perturbed and all(p.grad is None for p in model.parameters())


def test_empty_batch_and_targets_elsewhere_are_refused():
    x, y = make_batch()
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    with pytest.raises(ValueError, match="empty batch"):
        fastsam.train_step(model, opt, x[:0], y[:0], F.cross_entropy)
    with pytest.raises(ValueError, match=r"targets are on meta but the model's parameters on cpu"):
        fastsam.train_step(model, opt, x, y.to("meta"), F.cross_entropy)
    with pytest.raises(TypeError, match="targets must be a tensor"):
        fastsam.train_step(model, opt, x, [0, 1], F.cross_entropy)
