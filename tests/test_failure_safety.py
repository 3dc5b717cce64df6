"""Nothing is left perturbed and nothing is lost when a step fails, and gradient
accumulation over several calls is the same math as one large batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastsam


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8, bias=False), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3)).double()


def batch(n=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def sam(model, **kwargs):
    return fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **kwargs)


def failing_on_call(n, error=RuntimeError):
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) == n:
            raise error("boom")
        return F.cross_entropy(out, y)
    return loss_fn


def snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.base_optimizer.state_dict()))


def assert_same(model, opt, snap):
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # the unperturbed forward before the failure legitimately updated them
        assert torch.equal(value, snap[0][key]), key
    assert str(opt.base_optimizer.state_dict()) == str(snap[1])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("failing_call", [2, 4, 5])  # descent of sub-batch 1, of sub-batch 2, ascent of 3
def test_train_step_failure_restores_weights_and_drops_partial_gradients(error, failing_call):
    model = make_model()
    opt = sam(model, gsam_alpha=0.2)
    fastsam.train_step(model, opt, *batch(seed=0), F.cross_entropy, micro_batch=4)
    snap = snapshot(model, opt)
    with pytest.raises(error, match="boom"):
        fastsam.train_step(model, opt, *batch(), failing_on_call(failing_call, error), micro_batch=4)
    assert not opt.is_perturbed and not opt.accumulating
    assert all(p.grad is None for p in model.parameters())
    assert_same(model, opt, snap)
    # training continues exactly as if the failed call had never happened
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    twin_opt = sam(twin, gsam_alpha=0.2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a live state_dict shares its tensors
    fastsam.train_step(model, opt, *batch(seed=2), F.cross_entropy, micro_batch=4)
    fastsam.train_step(twin, twin_opt, *batch(seed=2), F.cross_entropy, micro_batch=4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_closure_failure_at_perturbed_weights_restores_them():
    model = make_model()
    opt = sam(model)
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("descent pass failed")
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="descent pass failed"):
        opt.step(closure)
    assert not opt.is_perturbed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_checkpoint_mid_accumulation_is_refused():
    model = make_model()
    opt = sam(model)
    fastsam.train_step(model, opt, *batch(), F.cross_entropy, micro_batch=4, accumulation_steps=2, step=False)
    with pytest.raises(RuntimeError, match="accumulated"):
        opt.state_dict()


@pytest.mark.parametrize("use_sam", [True, False])
def test_accumulation_over_calls_equals_one_large_batch(use_sam):
    x, y = batch(24)
    big, acc = make_model(), make_model()
    make_opt = sam if use_sam else (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    big_opt, acc_opt = make_opt(big), make_opt(acc)
    for _ in range(2):
        fastsam.train_step(big, big_opt, x, y, F.cross_entropy, micro_batch=4)
        for i, (xs, ys) in enumerate(zip(torch.split(x, 8), torch.split(y, 8))):
            out = fastsam.train_step(acc, acc_opt, xs, ys, F.cross_entropy, micro_batch=4,
                                     accumulation_steps=3, step=(i == 2))
            assert out.stepped == (i == 2)
    for a, b in zip(list(big.parameters()) + list(big.buffers()), list(acc.parameters()) + list(acc.buffers())):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_invalid_step_arguments():
    model = make_model()
    opt = sam(model)
    with pytest.raises(ValueError, match="accumulation_steps must be a positive int"):
        fastsam.train_step(model, opt, *batch(), F.cross_entropy, accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        fastsam.train_step(model, opt, *batch(), F.cross_entropy, max_grad_norm=0.0)
