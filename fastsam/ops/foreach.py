"""Foreach backend: the ops contract with ``torch._foreach_*`` multi-tensor ops.

This is how the best existing SAM implementations do their bookkeeping, and the baseline
the fused backends must beat. Norms are accumulated in fp32 (``_foreach_norm`` with
``dtype=float32``); element-wise updates run in the tensors' own dtype, as plain PyTorch
would. No op allocates a model-sized buffer (except ASAM's ``T^a`` and, on a GPU, the
perturbation step, see ``perturb_``) and none changes its inputs.

Scale factors depend on data. On a GPU they stay 0-d device tensors, so nothing here waits
for the device. On the CPU, whose ops are synchronous, reading such a scalar waits for
nothing; there the perturbation's scale is read as a Python number and passed as the
``alpha`` of one ``_foreach_add_`` (``w + s g``), which does what otherwise takes a scaled
copy of ``g`` and an add. Multipliers of ``_foreach_mul_`` stay 0-d tensors on the CPU too
(``_factor``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastsam.ops import backend_from_functions, check_exponents, rounding


def _seq(tensors: Sequence[Tensor]):
    """A list as is (the foreach ops take lists; copying a 4096-entry list per call is waste), else a list."""
    return tensors if isinstance(tensors, list) else list(tensors)


def _zero(device) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=device)


def _reduction_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if tensors[0].dtype == torch.float64 else torch.float32


def _on_host(tensors: Sequence[Tensor]) -> bool:
    """Whether data-dependent scalars of an op on ``tensors`` may be read as Python numbers."""
    return tensors[0].device.type == "cpu"


def _factor(value: float, tensors: Sequence[Tensor]):
    """``value`` as the scalar operand of ``_foreach_mul_``/``_foreach_add_`` on ``tensors``.

    On the CPU a 0-d tensor: the Python-number overloads wrap the number into a new tensor
    for every list item (``_foreach_mul_`` over the 4096 tiny tensors: 5.5 ms against 2.0 ms,
    measured on this project's 2-core CPU) and round it to bf16/fp16 first. Elsewhere the
    number, which the GPU kernels take as an argument.
    """
    return torch.tensor(value, dtype=_reduction_dtype(tensors)) if _on_host(tensors) else value


def _sum_of_squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    norms = torch._foreach_norm(tensors, 2, dtype=_reduction_dtype(tensors))
    return torch.stack(norms).square().sum()


def _adaptive_powers(params: Sequence[Tensor], eta: float, power: int) -> list[Tensor]:
    """[T_i^power] with T = |w| + eta, as new tensors (power >= 1)."""
    scales = torch._foreach_abs(params)
    if eta != 0.0:
        torch._foreach_add_(scales, _factor(eta, params))
    if power == 2:
        torch._foreach_mul_(scales, scales)
    return scales


def sumsq(tensors: Sequence[Tensor], params: Optional[Sequence[Tensor]] = None, b: int = 0,
          eta: float = 0.0) -> Tensor:
    check_exponents(0, b)
    if not len(tensors):
        return _zero("cpu")
    tensors = _seq(tensors)
    if b == 0:
        return _sum_of_squared_norms(tensors)
    if params is None:
        raise ValueError("sumsq with b > 0 needs the parameters (T = |w| + eta)")
    scaled = _adaptive_powers(_seq(params), eta, b)
    torch._foreach_mul_(scaled, tensors)
    return _sum_of_squared_norms(scaled)


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
             sumsq: Tensor, rho: float, a: int = 0, b: int = 0, eta: float = 0.0,
             eps: float = 1e-12, ascent: Optional[Sequence[Tensor]] = None,
             ascent_sumsq: Optional[Tensor] = None, seed: Optional[Tensor] = None) -> None:
    check_exponents(a, b)
    if not len(params):
        return
    params, grads, backups = _seq(params), _seq(grads), _seq(backups)
    host = _on_host(params)
    if ascent is not None:
        ascent = _seq(ascent)
        torch._foreach_copy_(ascent, grads)
        if ascent_sumsq is not None:
            torch._foreach_mul_(ascent, 1.0 / (ascent_sumsq.sqrt() + eps))
    if seed is not None and params[0].dtype in rounding.LOW_PRECISION:
        _perturb_stochastically(params, grads, backups, sumsq, rho, a, eta, eps, ascent, seed)
        return
    # T^a comes from the unperturbed weights: before the add below.
    powers = _adaptive_powers(params, eta, a) if a else None
    torch._foreach_copy_(backups, params)
    if host:
        scale = rho / (math.sqrt(float(sumsq)) + eps)
        if powers is None:
            torch._foreach_add_(params, grads, alpha=scale)  # w + s g: one pass, no step list
        else:
            torch._foreach_addcmul_(params, powers, grads, value=scale)  # w + s T^a g
        return
    scale = rho / (sumsq.sqrt() + eps)
    if powers is None:
        # No foreach op adds a list scaled by a device scalar in place: the step list comes
        # from the caching allocator (the alternatives are a host sync or writing into g).
        torch._foreach_add_(params, torch._foreach_mul(grads, scale))
    else:
        torch._foreach_mul_(powers, scale)
        torch._foreach_addcmul_(params, powers, grads)


def _perturb_stochastically(params, grads, backups, sumsq, rho, a, eta, eps, ascent, seed) -> None:
    """perturb_ for bf16/fp16 with a seed: w + eps in fp32, in the reference's order of
    operations ((scale * T^a) * g), then rounded stochastically (fastsam/ops/rounding.py),
    so the same random bits decide as in every other backend."""
    work = [p.float() for p in params]
    grads32 = [g.float() for g in grads]
    scale = rho / (sumsq.sqrt() + eps)
    if a == 0:
        step = torch._foreach_mul(grads32, scale)
    else:
        step = _adaptive_powers(work, eta, a)
        torch._foreach_mul_(step, scale)
        torch._foreach_mul_(step, grads32)
    torch._foreach_copy_(backups, params)
    torch._foreach_add_(work, step)
    seed = seed.to(params[0].device)
    for i, (p, x) in enumerate(zip(params, work)):
        partners = [grads[i], backups[i]] + ([ascent[i]] if ascent is not None else [])
        p.copy_(rounding.stochastically_rounded(x, p.dtype, seed, i, rounding.walk_index(p, partners)))


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    if len(params):
        torch._foreach_copy_(_seq(params), _seq(backups))


def _dot(ascent: list[Tensor], grads: list[Tensor]) -> Tensor:
    """sum_i <ascent_i, grads_i> in the reduction dtype."""
    dtype = _reduction_dtype(grads)
    if _on_host(grads) and grads[0].dtype in (torch.float32, torch.float64):
        # There is no foreach dot. On the CPU, one dot per tensor reads each operand once
        # and allocates nothing model-sized.
        return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(ascent, grads)]).sum()
    # On a GPU a dot per tensor is a launch per tensor: multiply with one foreach launch,
    # then one cat + sum (low precision: products rounded once, summed in fp32).
    products = torch._foreach_mul(ascent, grads)
    return torch.cat([p.reshape(-1) for p in products]).sum(dtype=dtype)


def gsam_reduce(ascent: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    if not len(grads):
        return torch.zeros(2, dtype=torch.float32)
    ascent, grads = _seq(ascent), _seq(grads)
    return torch.stack([_dot(ascent, grads), _sum_of_squared_norms(grads)])


def gsam_combine_(grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor, alpha: float,
                  eps: float = 1e-12) -> None:
    if not len(grads):
        return
    grads, ascent = _seq(grads), _seq(ascent)
    # g_p - alpha * (g_asc - <g_asc,h> h) = (1 + alpha * dot / (|g_p| + eps)^2) * g_p - alpha * g_asc
    gp_coefficient = 1.0 + alpha * stats[0] / (stats[1].sqrt() + eps).square()
    torch._foreach_mul_(grads, gp_coefficient)
    torch._foreach_add_(grads, ascent, alpha=-alpha)


def accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], scale: float,
                init: bool = False) -> None:
    if not len(accum):
        return
    accum, grads = _seq(accum), _seq(grads)
    if init:
        torch._foreach_copy_(accum, grads)
        if scale != 1.0:
            torch._foreach_mul_(accum, _factor(scale, accum))
    else:
        torch._foreach_add_(accum, grads, alpha=scale)


BACKEND = backend_from_functions("foreach", globals())
