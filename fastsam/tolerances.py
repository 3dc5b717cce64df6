"""How close a backend must come to ``reference``: the test suite's tolerances, for users too.

``tests/`` and ``fastsam.verify`` use these, so that a user's check of their own model
holds the backends to exactly the bounds the test suite does.

* One op or one step, element-wise: ``|actual - expected| <= tolerance(dtype) *
  (|expected| + magnitude) + step`` (:func:`scaled_error`, :func:`assert_close_scaled`).
* A whole fp32 trajectory: ``torch.testing.assert_close`` with :data:`TRAJECTORY_RTOL` and
  :data:`TRAJECTORY_ATOL` after every step.
* A low-precision (bf16, fp16) trajectory: the backend may not drift from the fp32
  trajectory more than twice as far as ``reference`` itself does (:func:`drift_bound`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

# fp32 trajectories: ulp-level differences in the norm's summation order, amplified over
# the steps (tests/test_trajectories.py: 7 steps of every variant).
TRAJECTORY_RTOL = 1e-5
TRAJECTORY_ATOL = 1e-6


def tolerance(dtype: torch.dtype, reduction: bool = False) -> float:
    """Relative error allowed against the fp32 reference, per unit of operand magnitude.

    fp32 element-wise: a few ulps, 1e-5. fp32 reductions over up to ~1e6 terms: 1e-4,
    because summation order alone moves them that far (measured: torch's own CPU norm
    kernel over 524295 fp32 values is 3e-5 off the float64 sum); tests also reduce each
    tensor on its own, where a lost tail element cannot hide in a large total. Low
    precision: two roundings of the dtype, i.e. no worse than plain PyTorch evaluating the
    formula term by term at that precision.
    """
    if dtype == torch.float32:
        return 1e-4 if reduction else 1e-5
    return 2.0 * torch.finfo(dtype).eps


@dataclasses.dataclass
class ScaledError:
    """The outcome of :func:`scaled_error`. ``worst`` is max(error / bound) over the
    elements (<= 1 passes); ``first`` the flat index of the first element out of bounds
    (None when all pass), with its actual, expected and bound values."""

    worst: float
    max_abs: float
    bad: int
    total: int
    first: Optional[int] = None
    actual: Optional[float] = None
    expected: Optional[float] = None
    bound: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.bad == 0


def scaled_error(actual: torch.Tensor, expected: torch.Tensor, magnitude, dtype=None,
                 reduction: bool = False) -> ScaledError:
    """Compare element-wise with ``bound = tolerance(dtype) * (|expected| + magnitude) + step``.

    ``magnitude`` is the size of the operands that an implementation rounds on the way
    (a tensor broadcastable to ``expected`` or a float). ``step`` is the dtype's subnormal
    spacing (2^-24 in fp16): below the smallest normal number a rounding errs by up to
    half a step whatever the magnitude, so two roundings by up to one step. fp16 perturbed
    weights of ~3e-6 hit this on a GPU, where the foreach backend's fused multiply-add
    rounded once where the reference rounds twice (one step, 6e-8, off).
    """
    dtype = dtype or expected.dtype
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if isinstance(magnitude, torch.Tensor):
        magnitude = magnitude.detach().double().cpu()
    info = torch.finfo(dtype)
    step = max(1e-30, info.smallest_normal * info.eps)
    bound = tolerance(dtype, reduction) * (e.abs() + magnitude) + step
    err = (a - e).abs()
    # equal values (infinities too) and nan where nan is expected pass; any other nan fails
    err = torch.where((a == e) | (torch.isnan(a) & torch.isnan(e)), torch.zeros_like(err), err)
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    bad = err > bound
    total = e.numel()
    if total == 0:
        return ScaledError(0.0, 0.0, 0, 0)
    ratio = err / bound
    result = ScaledError(float(ratio.max()), float(err.max()), int(bad.sum()), total)
    if result.bad:
        i = int(torch.nonzero(bad.reshape(-1))[0])
        result.first, result.actual = i, a.reshape(-1)[i].item()
        result.expected, result.bound = e.reshape(-1)[i].item(), bound.reshape(-1)[i].item()
    return result


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, magnitude, dtype=None,
                        reduction: bool = False, describe: Optional[Callable[[int], str]] = None):
    """:func:`scaled_error` that raises AssertionError naming the first failing element
    (``describe(flat_index)``, if given, says where it is)."""
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    result = scaled_error(actual, expected, magnitude, dtype, reduction)
    if not result.ok:
        i = result.first
        raise AssertionError(
            f"{result.bad} of {result.total} elements out of tolerance ({dtype}); first at flat index {i}: "
            f"actual {result.actual!r}, expected {result.expected!r}, "
            f"bound {result.bound!r}" + (f" [{describe(i)}]" if describe else ""))


def trajectory_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / (TRAJECTORY_ATOL + TRAJECTORY_RTOL |e|) (<= 1 passes, as
    ``torch.testing.assert_close(a, e, rtol=TRAJECTORY_RTOL, atol=TRAJECTORY_ATOL)``)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if e.numel() == 0:
        return 0.0
    err = (a - e).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    return float((err / (TRAJECTORY_ATOL + TRAJECTORY_RTOL * e.abs())).max())


def drift_bound(reference_drift: float, fp32_magnitude: float, dtype: torch.dtype) -> float:
    """How far (max abs) a low-precision trajectory may end from the fp32 one: twice as far
    as ``reference`` does in that dtype, plus two ulps of the largest fp32 value."""
    return 2 * reference_drift + 2 * torch.finfo(dtype).eps * fp32_magnitude
