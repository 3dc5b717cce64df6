"""Stochastic rounding of bf16/fp16 perturbed weights (fastsam/ops/rounding.py, csrc/math.h).

At realistic sizes the per-element perturbation rho * g_i / ||g|| is far below half a unit
in the last place of a bf16 weight, so rounding to nearest drops most of it. With a seed,
every backend rounds w + eps to one of its two neighbours, unbiased. Checked on 10^6+
elements per backend: each result is a neighbour of the exact w + eps (exactly, up to the
fp32 rounding of w + eps itself), the achieved perturbation projects onto eps with length
rho to well within a few percent (round to nearest: about 0.4-0.6 rho), the backends draw
the same random bits as the reference, and restores stay bit-exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam.ops import reference
from tests.conftest import backend_cases

N = 1_200_000
RHO = 0.02  # N(0, 0.02) bf16 weights keep ~0.48 rho of it when rounded to nearest (measured)
LOW = [torch.bfloat16, torch.float16]


def problem(dtype, device, seed=0):
    """Weights ~ N(0, 0.02) in a few tensors of odd sizes (one transposed), gradients ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [N - 4099 - 15 * 37, 4097, 1, 1, 15 * 37]
    w = [(torch.randn(n, generator=gen) * 0.02).to(dtype) for n in sizes]
    g = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    w[-1], g[-1] = w[-1].view(37, 15).t(), g[-1].view(37, 15).t()  # a dense, non-contiguous layout
    return [t.to(device) for t in w], [t.to(device) for t in g]


def perturbed(impl, w, g, seed=None, rho=RHO):
    params = [t.clone() if t.is_contiguous() else t.t().clone().t() for t in w]
    backups = [torch.empty_like(t) for t in params]
    impl.perturb_(params, g, backups, reference.sumsq(g), rho, seed=seed)
    return params, backups


def exact(w, g, rho=RHO):
    """w + rho g / ||g|| in float64."""
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g))
    return [a.double() + rho * b.double() / (norm + 1e-12) for a, b in zip(w, g)]


def neighbours(x: torch.Tensor, dtype):
    """The largest ``dtype`` value <= x and the smallest >= x, for float64 ``x``."""
    nearest = x.to(dtype)
    below = torch.where(nearest.double() <= x, nearest, torch.nextafter(nearest, torch.full_like(nearest, -float("inf"))))
    above = torch.where(nearest.double() >= x, nearest, torch.nextafter(nearest, torch.full_like(nearest, float("inf"))))
    return below, above


def assert_neighbours(results, targets, dtype):
    """Every result lies on a neighbour of its target, allowing for the fp32 rounding of the target."""
    for r, x in zip(results, targets):
        slack = x.abs() * 2.0 ** -22 + 1e-30  # two fp32 ulps: w + eps is formed in fp32
        low, _ = neighbours(x - slack, dtype)
        _, high = neighbours(x + slack, dtype)
        rd = r.double().cpu()
        bad = (rd < low.double().cpu()) | (rd > high.double().cpu())
        assert not bad.any(), f"{int(bad.sum())} results are not neighbours of w + eps"


def projection(results, w, targets):
    """<achieved, eps> / ||eps||: the length of the achieved perturbation along eps."""
    num = sum(((r.double() - a.double()) * (x - a.double())).sum() for r, a, x in zip(results, w, targets))
    den = torch.sqrt(sum(((x - a.double()) ** 2).sum() for a, x in zip(w, targets)))
    return (num / den).item()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_round_to_nearest_loses_the_perturbation(dtype):
    """The defect that stochastic rounding fixes, measured: bf16 keeps about half of rho."""
    w, g = problem(dtype, "cpu")
    results, _ = perturbed(reference, w, g)
    length = projection(results, w, exact(w, g)) / RHO
    if dtype == torch.bfloat16:
        assert length < 0.6
    assert_neighbours(results, exact(w, g), dtype)


@pytest.mark.parametrize("device,name", [pytest.param("cpu", "reference", id="cpu-reference")] + backend_cases())
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(device, name, dtype):
    w, g = problem(dtype, device)
    backend = fastsam.ops.get_backend(name, device)
    seed = torch.tensor(20261202, dtype=torch.int64, device=device)
    results, backups = perturbed(backend, w, g, seed)
    targets = [x.to(device) for x in exact(w, g)]
    assert_neighbours(results, targets, dtype)
    length = projection(results, w, targets) / RHO
    assert abs(length - 1.0) < 0.03, f"projection {length:.4f} rho"
    changed = sum(int((r != a).sum()) for r, a in zip(results, w)) / N
    nearest_changed = sum(int((r != a).sum()) for r, a in zip(perturbed(reference, w, g)[0], w)) / N
    assert changed > nearest_changed  # more elements move than with rounding to nearest
    for b, a in zip(backups, w):  # backups are bit-exact, so restores are too
        assert torch.equal(b.view(torch.int16), a.view(torch.int16))
    # the same random bits as the reference (a GPU's fused multiply-add may move w + eps by an
    # fp32 ulp, which changes a decision only where the threshold falls inside that ulp)
    expected, _ = perturbed(reference, w, g, seed)
    mismatched = sum(int((r.view(torch.int16) != e.view(torch.int16)).sum()) for r, e in zip(results, expected))
    assert mismatched <= (0 if device == "cpu" else N // 10_000)


@pytest.mark.parametrize("device,name", [pytest.param("cpu", "reference", id="cpu-reference")] + backend_cases())
def test_seeds_decide_the_bits(device, name):
    w, g = problem(torch.bfloat16, device)
    backend = fastsam.ops.get_backend(name, device)
    seed = lambda value: torch.tensor(value, dtype=torch.int64, device=device)  # noqa: E731
    first, _ = perturbed(backend, w, g, seed(7))
    again, _ = perturbed(backend, w, g, seed(7))
    other, _ = perturbed(backend, w, g, seed(-(2 ** 40) - 3))  # high bits of the seed count too
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    differ = sum(int((a != b).sum()) for a, b in zip(first, other))
    assert differ > N // 100


@pytest.mark.parametrize("device,name", [pytest.param("cpu", "reference", id="cpu-reference")] + backend_cases())
def test_fp32_ignores_the_seed(device, name):
    w, g = problem(torch.float32, device)
    backend = fastsam.ops.get_backend(name, device)
    with_seed, _ = perturbed(backend, w, g, torch.tensor(3, dtype=torch.int64, device=device))
    without, _ = perturbed(backend, w, g)
    assert all(torch.equal(a, b) for a, b in zip(with_seed, without))


def test_special_values():
    """inf and nan stay, the largest finite value never rounds up to inf, zeros and
    subnormals round within their neighbours."""
    for dtype in LOW:
        big = torch.finfo(dtype).max
        w = torch.tensor([float("inf"), float("nan"), big, -big, 0.0, 0.0, torch.finfo(dtype).tiny], dtype=dtype)
        g = torch.tensor([1.0, 1.0, 1.0, -1.0, 1e-9, -1e-9, -1e-9], dtype=dtype)
        for impl in (reference, fastsam.ops.get_backend("cpp", "cpu")):
            params, _ = perturbed(impl, [w], [g], torch.tensor(1, dtype=torch.int64), rho=1e-3)
            r = params[0]
            assert r[0] == float("inf") and torch.isnan(r[1])
            assert r[2] == big and r[3] == -big
            assert r[4] >= 0 and r[5] <= 0 and r[6] <= torch.finfo(dtype).tiny


# -- through the optimizer ---------------------------------------------------------------------

def big_bf16_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_sam_perturbs_bf16_weights_by_rho(rounding):
    model = big_bf16_model()
    params = list(model.parameters())
    opt = fastsam.SAM(params, torch.optim.SGD, rho=RHO, lr=0.0, rounding=rounding, rounding_seed=5)
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    opt.first_step()
    length = projection(list(model.parameters()), before, exact(before, [p.grad for p in params])) / RHO
    if rounding == "stochastic":
        assert abs(length - 1.0) < 0.03
    else:
        assert length < 0.6
    first = [p.detach().clone() for p in params]
    opt.unperturb()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.first_step()  # a new seed at every perturbation
    if rounding == "stochastic":
        assert not all(torch.equal(a, b) for a, b in zip(first, model.parameters()))
    else:
        assert all(torch.equal(a, b) for a, b in zip(first, model.parameters()))
    opt.unperturb()


def test_bad_rounding_settings():
    params = list(big_bf16_model().parameters())
    with pytest.raises(ValueError, match="rounding must be one of"):
        fastsam.SAM(params, torch.optim.SGD, lr=0.1, rounding="truncate")
    with pytest.raises(TypeError, match="rounding_seed must be an int"):
        fastsam.SAM(params, torch.optim.SGD, lr=0.1, rounding_seed=1.5)


def test_bf16_training_resumes_bit_exactly_with_stochastic_rounding():
    """The seed sequence is part of the checkpoint."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),  # noqa: E731
                                       torch.nn.Linear(16, 3)).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(12, 8, generator=gen).to(torch.bfloat16), torch.randint(0, 3, (12,), generator=gen))
            for _ in range(6)]
    model = make()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    for x, y in data[:3]:
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=4)
    ckpt = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
    import copy
    ckpt = copy.deepcopy(ckpt)
    for x, y in data[3:]:
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=4)
    resumed = make()
    resumed.load_state_dict(initial)
    resumed.load_state_dict(ckpt[0])
    resumed_opt = fastsam.SAM(resumed.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9,
                              rounding_seed=12345)  # overwritten by the checkpoint
    resumed_opt.load_state_dict(ckpt[1])
    for x, y in data[3:]:
        fastsam.train_step(resumed, resumed_opt, x, y, F.cross_entropy, micro_batch=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
