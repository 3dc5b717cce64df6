"""The step plan (fastsam/plan.py) is reused from step to step, and never serves stale state:
replaced gradients, added param groups, switched requires_grad and changed dtypes or
devices are picked up. Checked for every backend on the CPU, the compiled ones reading
gradients in C++ through fastsam._C.GradsOf."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam
from tests.conftest import fast_backends

BACKENDS = ["reference"] + fast_backends("cpu")
RHO = 0.5


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def expected_perturbation(params, grads, rho=RHO):
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return [(w.double() + rho * g.double() / (norm + 1e-12)) for w, g in zip(params, grads)]


def assert_perturbed(params, before, grads):
    for p, want in zip(params, expected_perturbation(before, grads)):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_is_built_once_for_many_steps(backend):
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=4)
    for _ in range(3):  # the two-step API with set_to_none zeroing: new gradient tensors every step
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
    assert opt._plan.rebuilds == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_gradients_are_read_fresh(backend):
    model = make_model()
    params = list(model.parameters())
    opt = fastsam.SAM(params, torch.optim.SGD, rho=RHO, lr=0.0, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:  # new tensors each time, and once new values in the same tensors
            p.grad = torch.randn(p.shape, generator=gen)
        for in_place in (False, True):
            if in_place:
                for p in params:
                    p.grad.copy_(torch.randn(p.shape, generator=gen))
            before = [p.detach().clone() for p in params]
            grads = [p.grad.clone() for p in params]
            opt.first_step()
            assert_perturbed(params, before, grads)
            opt.unperturb()
            assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_added_param_group_is_perturbed(backend):
    model = make_model()
    opt = fastsam.SAM(model[0].parameters(), torch.optim.SGD, rho=RHO, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(2)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.first_step()
    opt.unperturb()
    opt.add_param_group({"params": list(model[2].parameters())})
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt.first_step()
    assert_perturbed(params, before, [p.grad for p in params])  # the norm covers the new group too
    opt.unperturb()


@pytest.mark.parametrize("backend", BACKENDS)
def test_switched_requires_grad_is_picked_up(backend):
    model = make_model()
    params = list(model.parameters())
    opt = fastsam.SAM(params, torch.optim.SGD, rho=RHO, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.first_step()
    opt.unperturb()
    model[0].weight.requires_grad_(False)  # frozen: no longer perturbed, not in the norm
    live = [p for p in params if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt.first_step()
    assert torch.equal(model[0].weight, before[0])
    assert_perturbed(live, [b for p, b in zip(params, before) if p.requires_grad], [p.grad for p in live])
    opt.unperturb()


def test_changed_dtype_is_picked_up():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fastsam.train_step(model, opt, x, y, F.cross_entropy)
    model.double()  # replaces every parameter's data in place: same Parameter objects, new dtype
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    before = [p.detach().clone() for p in params]
    opt.first_step()
    assert all(p.dtype == torch.float64 for p in params)
    assert_perturbed(params, before, [p.grad for p in params])
    opt.unperturb()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.backend_for("cpu", torch.float64) == "foreach"  # float64 goes to foreach under auto


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_changed_device_is_picked_up():
    """model.cuda() after building the optimizer moves the same Parameter objects (torch
    refuses CPU -> meta in place, so this needs a GPU)."""
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    fastsam.train_step(model, opt, torch.randn(8, 4), torch.randint(0, 3, (8,)), F.cross_entropy)
    model.cuda()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(6)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).cuda()
    before = [p.detach().clone() for p in params]
    opt.first_step()
    assert_perturbed(params, before, [p.grad for p in params])
    opt.unperturb()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.backend_for("cuda") == fastsam.ops.resolve_auto("cuda", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_without_gradients_in_some_sub_steps(backend):
    """A branch used by some sub-batches only (as an expert no example was routed to): its
    descent gradient counts where it has one, and a parameter with none keeps grad None."""
    torch.manual_seed(0)
    trunk, branch, unused = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    params = list(trunk.parameters()) + list(branch.parameters()) + list(unused.parameters())
    opt = fastsam.SAM(params, torch.optim.SGD, rho=RHO, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 4, generator=gen) for _ in range(3)]
    ys = [torch.randint(0, 3, (4,), generator=gen) for _ in range(3)]

    def loss_of(k, layers):
        out = layers[0](xs[k]) + (layers[1](xs[k]) if k == 1 else 0.0)  # the branch only in sub-batch 1
        return F.cross_entropy(out, ys[k])

    expected = [torch.zeros_like(p) for p in params[:4]]
    for k in range(3):  # SAM by hand: per-sub-batch norm over the parameters that have a gradient
        live = params[:2] + (params[2:4] if k == 1 else [])
        g = torch.autograd.grad(loss_of(k, (trunk, branch)), live)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        shifted = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
        with torch.no_grad():
            for layer, original in zip(shifted, (trunk, branch)):
                layer.load_state_dict(original.state_dict())
            for q, gi in zip([q for layer in shifted for q in layer.parameters()][:len(live)], g):
                q.add_(RHO * gi / (norm + 1e-12))
        shifted_live = list(shifted[0].parameters()) + (list(shifted[1].parameters()) if k == 1 else [])
        gp = torch.autograd.grad(loss_of(k, shifted), shifted_live)
        for i, gpi in enumerate(gp):
            expected[i] = expected[i] + gpi / 3

    for k in range(3):
        opt.zero_grad()
        loss_of(k, (trunk, branch)).backward()
        opt.first_step(zero_grad=True)
        loss_of(k, (trunk, branch)).backward()
        opt.unperturb(accumulate_weight=1 / 3)
    opt.load_accumulated_grads()
    for p, want in zip(params[:4], expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in unused.parameters())
