"""Every backend's ops against the reference backend (fastsam/ops/reference.py).

Tensor sets cover odd sizes (0, 1, 3, 4097, 278011 and one tensor spanning several
kernel chunks), 2000 tiny tensors, and non-contiguous views (whose neighbouring elements
must stay untouched); every dtype; every ASAM exponent pair and both GSAM backups.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastsam import ops
from fastsam.ops import reference
from tests.conftest import (DTYPES, assert_close_scaled, assert_lists_close, assert_lists_equal, backend_cases,
                            expected_backends, fast_backends)

KINDS = ["odd", "tiny", "noncontig"]
EXPONENTS = [(0, 0), (2, 1), (1, 1), (1, 0)]


class Case:
    """Parameter-like tensors (possibly views into larger owners) plus gradient-like tensors."""

    def __init__(self, kind: str, dtype: torch.dtype, device: str, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

        self.owners, self.outside = [], []
        if kind == "odd":
            shapes = [(4097,), (1,), (3,), (0,), (278011,), (3, 5, 7), (2 ** 19 + 7,)]
            self.params = [randn(*s) for s in shapes]
        elif kind == "tiny":
            sizes = torch.randint(1, 10, (2000,), generator=gen).tolist()
            self.params = [randn(n) for n in sizes]
        elif kind == "noncontig":
            self.params = []
            for owner_shape, view in (((64, 130), lambda t: t[:, ::2]),
                                      ((33, 17), lambda t: t.t()),
                                      ((10, 12, 6), lambda t: t[:, :, 1:5]),
                                      ((5000,), lambda t: t[1::3])):
                owner = randn(*owner_shape)
                v = view(owner)
                mask = torch.ones_like(owner, dtype=torch.bool)
                view(mask).fill_(False)
                self.owners.append(owner)
                self.outside.append((mask, owner[mask].clone()))
                self.params.append(v)
        else:
            raise ValueError(kind)
        self.grads = [self._like(p, randn, 0.1) for p in self.params]
        self.grads2 = [self._like(p, randn, 0.1) for p in self.params]

    @staticmethod
    def _like(p, randn, scale):
        # gradients get the same layout as their parameter (views of a larger tensor too)
        if p.is_contiguous() or p.numel() == 0:
            return randn(*p.shape, scale=scale)
        return randn(*p.t().shape, scale=scale).t() if p.dim() == 2 and p.t().is_contiguous() \
            else randn(*p.shape, p.shape[-1] + 1, scale=scale)[..., 0]

    def clone_params(self):
        if not self.owners:
            return [p.clone() for p in self.params]
        # keep views into fresh copies of the owners, so non-contiguity is preserved
        views = []
        for owner, p in zip(self.owners, self.params):
            copy = owner.clone()
            views.append(copy.as_strided(p.shape, p.stride(), p.storage_offset()))
        return views

    def check_outside_untouched(self, params):
        for (mask, values), p in zip(self.outside, params):
            owner = p.as_strided((p.untyped_storage().nbytes() // p.element_size(),), (1,), 0)
            assert torch.equal(owner[mask.reshape(-1)], values), "a write escaped a non-contiguous view"


def _backend(device, name):
    return ops.get_backend(name, device)


def test_expected_backends_are_available():
    """CI names the backends it built (FASTSAM_EXPECT_BACKENDS, and FASTSAM_EXPECT_CUDA_KERNELS=1
    where torch is a CUDA build): a broken build must fail here, not pass by skipping."""
    missing = [n for n in expected_backends("cpu") if n not in fast_backends("cpu")]
    assert not missing, f"backends expected on cpu but unavailable: {missing}"
    if os.environ.get("FASTSAM_EXPECT_CUDA_KERNELS", "") in ("1", "true", "yes"):
        from fastsam.ops import compiled
        assert compiled.extension_error() is None, compiled.extension_error()
        assert compiled.cuda_kernels_built(), "fastsam._C was built without its CUDA kernels"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_expected_gpu_backends_are_available():
    """The GPU check names the backends it built (FASTSAM_EXPECT_BACKENDS_CUDA)."""
    missing = [n for n in expected_backends("cuda") if n not in fast_backends("cuda")]
    assert not missing, f"backends expected on cuda but unavailable: {missing}"


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b", [0, 1])
def test_sumsq(device, name, dtype, kind, b):
    case = Case(kind, dtype, device)
    backend = _backend(device, name)
    params = case.params if b else None
    expected = reference.sumsq(case.grads, params, b, 0.01)
    actual = backend.sumsq(case.grads, params, b, 0.01)
    assert actual.dtype == torch.float32 and actual.dim() == 0 and actual.device.type == device
    assert_close_scaled(actual, expected, 0.0, dtype, reduction=True)
    again = backend.sumsq(case.grads, params, b, 0.01)
    assert torch.equal(actual, again), "sumsq is not bitwise repeatable"
    for i in range(min(len(case.grads), 10)):  # each tensor alone: a lost tail cannot hide
        one_params = [case.params[i]] if b else None
        assert_close_scaled(backend.sumsq([case.grads[i]], one_params, b, 0.01),
                            reference.sumsq([case.grads[i]], one_params, b, 0.01), 0.0, dtype, reduction=True)


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("a,b,gsam", [(a, b, None) for a, b in EXPONENTS]
                         + [(0, 0, "raw"), (0, 0, "normalized"), (2, 1, "raw"), (2, 1, "normalized")])
def test_perturb(device, name, dtype, kind, a, b, gsam):
    case = Case(kind, dtype, device)
    backend = _backend(device, name)
    rho, eta, eps = 0.3, 0.01, 1e-12
    # A given sum of squares, not the lists' own: with that (~8e3 for the odd sizes) the step
    # rho g / ||g|| is ~1e-5 of a weight, far below a bf16/fp16 rounding, and a perturb_
    # that skipped its add passed. With 0.01 the step is ~30% of a weight (checked below).
    sumsq = torch.tensor(0.01, device=device)
    ascent_sumsq = reference.sumsq(case.grads) if gsam == "normalized" else None

    results = {}
    for impl_name, impl in (("reference", reference), ("backend", backend)):
        params = case.clone_params()
        backups = [torch.empty_like(p) for p in params]
        ascent = [torch.empty_like(g) for g in case.grads] if gsam else None
        impl.perturb_(params, case.grads, backups, sumsq, rho, a, b, eta, eps, ascent, ascent_sumsq)
        results[impl_name] = (params, backups, ascent)
        if case.owners:
            case.check_outside_untouched(params)

    inv_norm = 1.0 / (sumsq.sqrt().item() + eps)
    (ref_p, _, ref_asc), (got_p, got_b, got_asc) = results["reference"], results["backend"]
    assert_lists_equal(got_b, case.params, "backup must be a bit-exact copy of the weights")
    magnitudes = [w0.double().abs() + rho * inv_norm * (w0.double().abs() + eta) ** a * g.double().abs()
                  for w0, g in zip(case.params, case.grads)]
    assert_lists_close(got_p, ref_p, magnitudes)
    with pytest.raises(AssertionError, match="out of tolerance"):  # so a perturb_ that did nothing would fail
        assert_lists_close(case.clone_params(), ref_p, magnitudes)
    if gsam == "raw":
        assert_lists_equal(got_asc, case.grads, "the raw ascent copy must be bit-exact")
    elif gsam:
        inv_ascent = 1.0 / ascent_sumsq.sqrt().item()
        assert_lists_close(got_asc, ref_asc, [g.double().abs() * inv_ascent for g in case.grads])


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("a,b,gsam", [(0, 0, None), (2, 1, "raw"), (1, 0, "normalized")])
def test_perturb_stochastic_rounding_matches_reference(device, name, dtype, kind, a, b, gsam):
    """The same random bits everywhere (fastsam/ops/rounding.py): on the CPU every backend's
    stochastically rounded weights equal the reference's bit for bit, views included (a
    GPU's fused multiply-add may move a rare decision; tests/test_rounding.py bounds it)."""
    case = Case(kind, dtype, device)
    backend = _backend(device, name)
    sumsq = torch.tensor(25.0, device=device)  # a step of ~0.6% of a weight: a few ulps in bf16
    ascent_sumsq = reference.sumsq(case.grads) if gsam == "normalized" else None
    seed = torch.tensor(-123456789, dtype=torch.int64, device=device)
    results = []
    for impl in (reference, backend):
        params = case.clone_params()
        backups = [torch.empty_like(p) for p in params]
        ascent = [torch.empty_like(g) for g in case.grads] if gsam else None
        impl.perturb_(params, case.grads, backups, sumsq, 0.3, a, b, 0.01, 1e-12, ascent, ascent_sumsq, seed=seed)
        if case.owners:
            case.check_outside_untouched(params)
        assert_lists_equal(backups, case.params, "backup must be a bit-exact copy of the weights")
        results.append(params)
    flat = [torch.cat([t.reshape(-1).view(torch.int16) for t in r]) if r else torch.empty(0) for r in results]
    mismatched = int((flat[0].cpu() != flat[1].cpu()).sum())
    assert mismatched <= (0 if device == "cpu" else flat[0].numel() // 10_000)
    nearest = case.clone_params()
    reference.perturb_(nearest, case.grads, [torch.empty_like(p) for p in nearest], sumsq, 0.3, a, b, 0.01)
    assert not all(torch.equal(x, y) for x, y in zip(nearest, results[0]) if x.numel())  # the seed mattered


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_restore_is_bit_exact(device, name, dtype, kind):
    case = Case(kind, dtype, device)
    backend = _backend(device, name)
    params = case.clone_params()
    backups = [g.clone() for g in case.grads]  # any other values will do
    backend.restore_(params, backups)
    assert_lists_equal(params, backups, "restore_ must copy the backups bit-exactly")
    if case.owners:
        case.check_outside_untouched(params)


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gsam_reduce(device, name, dtype, kind):
    case = Case(kind, dtype, device)
    backend = _backend(device, name)
    expected = reference.gsam_reduce(case.grads, case.grads2)
    actual = backend.gsam_reduce(case.grads, case.grads2)
    assert actual.shape == (2,) and actual.dtype == torch.float32
    abs_dot = sum((g.double() * h.double()).abs().sum() for g, h in zip(case.grads, case.grads2))
    assert_close_scaled(actual[0], expected[0], abs_dot, dtype, reduction=True)
    assert_close_scaled(actual[1], expected[1], 0.0, dtype, reduction=True)
    assert torch.equal(actual, backend.gsam_reduce(case.grads, case.grads2)), "not bitwise repeatable"


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_gsam_combine(device, name, dtype, kind, alpha):
    case = Case(kind, dtype, device)
    backend = _backend(device, name)
    stats = reference.gsam_reduce(case.grads, case.grads2)
    coefficient = 1.0 + alpha * stats[0].item() / (stats[1].sqrt().item() + 1e-12) ** 2
    results = []
    for impl in (reference, backend):
        grads = [g.clone() for g in case.grads2]
        impl.gsam_combine_(grads, case.grads, stats, alpha, 1e-12)
        results.append(grads)
    assert_lists_close(results[1], results[0], [abs(coefficient) * gp.double().abs() + alpha * g.double().abs()
                                                for gp, g in zip(case.grads2, case.grads)])


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, False])
def test_accumulate(device, name, dtype, kind, init):
    case = Case(kind, dtype, device)
    backend = _backend(device, name)
    scale = 0.375
    results = []
    for impl in (reference, backend):
        accum = case.clone_params()
        impl.accumulate_(accum, case.grads, scale, init)
        results.append(accum)
        if case.owners:
            case.check_outside_untouched(accum)
    assert_lists_close(results[1], results[0], [scale * g.double().abs() + (0.0 if init else acc0.double().abs())
                                                for acc0, g in zip(case.params, case.grads)])


@pytest.mark.parametrize("name", ["reference"] + fast_backends("cpu"))
def test_empty_lists_and_empty_tensors_are_no_ops(name):
    backend = ops.get_backend(name, "cpu")
    assert backend.sumsq([]).item() == 0.0
    backend.perturb_([], [], [], torch.tensor(1.0), 0.1)
    backend.restore_([], [])
    backend.accumulate_([], [], 1.0, init=True)
    assert backend.gsam_reduce([], []).tolist() == [0.0, 0.0]
    backend.gsam_combine_([], [], torch.zeros(2), 0.5)
    empty = [torch.empty(0), torch.empty(2, 0)]
    assert backend.sumsq(empty).item() == 0.0
    assert backend.gsam_reduce(empty, empty).tolist() == [0.0, 0.0]
    backend.perturb_(empty, empty, [torch.empty(0), torch.empty(2, 0)], torch.tensor(1.0), 0.1)


def test_reference_formulas_match_closed_form():
    """The reference itself, against numbers derived by hand (so the ground truth is grounded)."""
    w = [torch.tensor([3.0, -4.0]), torch.tensor([12.0])]
    g = [torch.tensor([1.0, 2.0]), torch.tensor([-2.0])]
    # sum g^2 = 1 + 4 + 4 = 9; with b = 1, eta = 0: sum (|w| g)^2 = 9 + 64 + 576 = 649
    assert reference.sumsq(g).item() == 9.0
    assert reference.sumsq(g, w, 1, 0.0).item() == 649.0
    params, backups = [t.clone() for t in w], [torch.empty(2), torch.empty(1)]
    reference.perturb_(params, g, backups, torch.tensor(9.0), 0.3)  # eps = 0.3 g / 3 = 0.1 g
    torch.testing.assert_close(params[0], torch.tensor([3.1, -3.8]))
    torch.testing.assert_close(params[1], torch.tensor([11.8]))
    # GSAM with g_asc = (1, 0), g_p = (1, 1): <g,h> h = (0.5, 0.5), g_orth = (0.5, -0.5)
    stats = reference.gsam_reduce([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])])
    assert stats.tolist() == [1.0, 2.0]
    gp = [torch.tensor([1.0, 1.0])]
    reference.gsam_combine_(gp, [torch.tensor([1.0, 0.0])], stats, 0.5, 0.0)
    torch.testing.assert_close(gp[0], torch.tensor([0.75, 1.25]))


def test_unknown_and_unavailable_backends_raise_clearly():
    with pytest.raises(ValueError, match="unknown fastsam backend 'nope'"):
        ops.get_backend("nope", "cpu")
    with pytest.raises(ValueError, match="ASAM exponents"):
        reference.perturb_([], [], [], torch.tensor(1.0), 0.1, a=3)
