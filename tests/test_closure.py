"""SAM.step(closure) in both conventions, every way of zeroing gradients, against SAM's math
written out here with plain autograd; step() without a closure; zero ascent gradients.

torch.optim's convention: the loop zeroes gradients (or not), ``opt.step(closure)`` calls
the closure, which zeroes gradients and runs forward and backward. The single-file SAM
wrapper's: the loop zeroes, runs ``loss.backward()``, then ``opt.step(closure)`` with a
closure that only runs forward and backward. Both must give the SAM trajectory at every
step, with 2 (torch.optim) or 1 (wrapper) closure calls per step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastsam

RHO, LR, MOMENTUM, STEPS = 0.2, 0.1, 0.9, 6


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()


def batches():
    gen = torch.Generator().manual_seed(4)
    return [(torch.randn(12, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen))
            for _ in range(STEPS)]


def sam_trajectory(model, data):
    """SAM + SGD momentum written out with autograd on copies of the weights; params after each step."""
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [None] * len(params)
    probe = copy.deepcopy(model)

    def grad_at(weights, x, y):
        with torch.no_grad():
            for q, w in zip(probe.parameters(), weights):
                q.copy_(w)
        return torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))

    history = []
    for x, y in data:
        g = grad_at(params, x, y)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        gp = grad_at([w + RHO * gi / (norm + 1e-12) for w, gi in zip(params, g)], x, y)
        for i, d in enumerate(gp):
            buffers[i] = d.clone() if buffers[i] is None else MOMENTUM * buffers[i] + d
            params[i] = params[i] - LR * buffers[i]
        history.append([w.clone() for w in params])
    return history


def zero(model, opt, how: str, set_to_none: bool):
    if how == "optimizer":
        opt.zero_grad(set_to_none=set_to_none)
    elif how == "model":
        model.zero_grad(set_to_none=set_to_none)
    else:  # by hand, on each gradient
        for p in model.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()


def make_sam(model, **kwargs):
    return fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, **kwargs)


@pytest.mark.parametrize("how", ["optimizer", "model", "by-hand"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("convention", ["torch", "wrapper"])
def test_step_with_closure_follows_the_sam_trajectory(convention, set_to_none, how):
    data = batches()
    expected = sam_trajectory(make_model(), data)
    model = make_model()
    opt = make_sam(model)
    calls = []
    for step, (x, y) in enumerate(data):
        def closure():
            calls.append(step)
            if convention == "torch":
                zero(model, opt, how, set_to_none)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        zero(model, opt, how, set_to_none)
        if convention == "wrapper":
            F.cross_entropy(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no convention may need a warning here
            loss = opt.step(closure)
        if convention == "torch":
            torch.testing.assert_close(loss, F.cross_entropy(make_model_at(expected, step - 1)(x), y))
        else:
            assert loss is None
        for got, want in zip(model.parameters(), expected[step]):
            torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14, msg=f"step {step}")
    assert len(calls) == STEPS * (2 if convention == "torch" else 1)


def make_model_at(history, step):
    """The model with the weights after ``step`` (the initial ones for step -1)."""
    model = make_model()
    if step >= 0:
        with torch.no_grad():
            for p, w in zip(model.parameters(), history[step]):
                p.copy_(w)
    return model


def test_torch_convention_with_the_loop_never_zeroing():
    """The closure zeroes; the loop does not, so .grad holds the previous step's descent gradient,
    which must not be taken for a fresh ascent gradient."""
    data = batches()
    expected = sam_trajectory(make_model(), data)
    model = make_model()
    opt = make_sam(model)
    for step, (x, y) in enumerate(data):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        for got, want in zip(model.parameters(), expected[step]):
            torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def test_a_closure_that_does_not_zero_gets_a_clean_ascent_gradient():
    """torch.optim's convention with a closure that only runs forward/backward and a loop that
    never zeroes: step() clears the stale gradient before calling the closure at w."""
    data = batches()
    expected = sam_trajectory(make_model(), data)
    model = make_model()
    opt = make_sam(model, closure_convention="torch")
    for step, (x, y) in enumerate(data):
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        for got, want in zip(model.parameters(), expected[step]):
            torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("convention", ["torch", "wrapper"])
def test_explicit_conventions(convention):
    data = batches()[:3]
    expected = sam_trajectory(make_model(), data)
    model = make_model()
    opt = make_sam(model, closure_convention=convention)
    calls = []
    for step, (x, y) in enumerate(data):
        def closure():
            calls.append(1)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.zero_grad()
        if convention == "wrapper":
            F.cross_entropy(model(x), y).backward()
        opt.step(closure)
        for got, want in zip(model.parameters(), expected[step]):
            torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)
    assert len(calls) == len(data) * (2 if convention == "torch" else 1)


def test_wrapper_convention_without_gradients_is_an_error():
    model = make_model()
    opt = make_sam(model, closure_convention="wrapper")
    x, y = batches()[0]
    with pytest.raises(RuntimeError, match="found no gradient"):
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert not opt.is_perturbed


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="closure_convention must be one of"):
        make_sam(make_model(), closure_convention="guess")


def test_partly_stale_gradients_warn():
    """Some gradients left over from the previous step, others fresh: ambiguous, so it warns."""
    model = make_model()
    opt = make_sam(model)
    (x, y), (x2, y2) = batches()[:2]
    F.cross_entropy(model(x), y).backward()
    opt.step(lambda: F.cross_entropy(model(x), y).backward())  # wrapper convention, step 1
    first_layer = list(model[0].parameters())
    for p in first_layer:  # only the first layer gets a fresh gradient (accumulated onto the stale one)
        p.grad.zero_()
    F.cross_entropy(model(x2), y2).backward(inputs=first_layer)
    with pytest.warns(RuntimeWarning, match="left over from the previous step"):
        opt.step(lambda: F.cross_entropy(model(x2), y2).backward())


def test_zero_ascent_gradient_warns_and_does_not_perturb():
    model = make_model()
    opt = make_sam(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # eps = 0
    x, y = batches()[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="zero ascent gradient"):
        opt.second_step()


# -- step() without a closure ---------------------------------------------------------------

def test_step_without_closure_finishes_prepared_passes():
    """first_step, descent backward, unperturb(), then step(): the same as second_step()."""
    data = batches()[:3]
    expected = sam_trajectory(make_model(), data)
    model = make_model()
    opt = make_sam(model)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.unperturb()
        opt.step()
        for got, want in zip(model.parameters(), expected[step]):
            torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def test_step_without_closure_loads_accumulated_gradients():
    model, twin = make_model(), make_model()
    opt, twin_opt = make_sam(model), make_sam(twin)
    x, y = batches()[0]
    for m, o, finish in ((model, opt, "step"), (twin, twin_opt, "train_step")):
        if finish == "train_step":
            fastsam.train_step(m, o, x, y, F.cross_entropy, micro_batch=6)
            continue
        for xs, ys in zip(torch.split(x, 6), torch.split(y, 6)):
            o.zero_grad()
            F.cross_entropy(m(xs), ys).backward()
            o.first_step(zero_grad=True)
            F.cross_entropy(m(xs), ys).backward()
            o.unperturb(accumulate_weight=0.5)
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_step_without_closure_and_without_passes_is_refused():
    model = make_model()
    opt = make_sam(model)
    x, y = batches()[0]
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="none did, so stepping now would be plain"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.first_step()
    with pytest.raises(RuntimeError, match="while the weights are perturbed"):
        opt.step()


def test_step_without_closure_on_zero_gradients_is_the_base_step():
    """torch.distributed.checkpoint initialises optimizer state by stepping on zero gradients."""
    model = make_model()
    opt = make_sam(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all("momentum_buffer" in opt.base_optimizer.state[p] for p in model.parameters())
