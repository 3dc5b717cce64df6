"""Foreach backend: the ops contract with ``torch._foreach_*`` multi-tensor ops.

This is how the best existing SAM implementations do their bookkeeping, and the baseline
the fused backends must beat. Norms are accumulated in fp32 (``_foreach_norm`` with
``dtype=float32``); element-wise updates run in the tensors' own dtype, as plain PyTorch
would. Scale factors stay 0-d device tensors, so nothing here waits for the GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastsam.ops import backend_from_functions, check_exponents, rounding


def _zero(device) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=device)


def _reduction_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if tensors[0].dtype == torch.float64 else torch.float32


def _sum_of_squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    norms = torch._foreach_norm(list(tensors), 2, dtype=_reduction_dtype(tensors))
    return torch.stack(norms).square().sum()


def _adaptive_powers(params: Sequence[Tensor], eta: float, power: int) -> list[Tensor]:
    """[T_i^power] with T = |w| + eta, as new tensors (power >= 1)."""
    scales = torch._foreach_abs(list(params))
    if eta != 0.0:
        torch._foreach_add_(scales, eta)
    if power == 2:
        torch._foreach_mul_(scales, scales)
    return scales


def sumsq(tensors: Sequence[Tensor], params: Optional[Sequence[Tensor]] = None, b: int = 0,
          eta: float = 0.0) -> Tensor:
    check_exponents(0, b)
    if not tensors:
        return _zero("cpu")
    if b == 0:
        return _sum_of_squared_norms(tensors)
    if params is None:
        raise ValueError("sumsq with b > 0 needs the parameters (T = |w| + eta)")
    scaled = _adaptive_powers(params, eta, b)
    torch._foreach_mul_(scaled, list(tensors))
    return _sum_of_squared_norms(scaled)


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
             sumsq: Tensor, rho: float, a: int = 0, b: int = 0, eta: float = 0.0,
             eps: float = 1e-12, ascent: Optional[Sequence[Tensor]] = None,
             ascent_sumsq: Optional[Tensor] = None, seed: Optional[Tensor] = None) -> None:
    check_exponents(a, b)
    if not params:
        return
    params, grads = list(params), list(grads)
    scale = rho / (sumsq.sqrt() + eps)
    if ascent is not None:
        torch._foreach_copy_(list(ascent), grads)
        if ascent_sumsq is not None:
            torch._foreach_mul_(list(ascent), 1.0 / (ascent_sumsq.sqrt() + eps))
    stochastic = seed is not None and params[0].dtype in rounding.LOW_PRECISION
    if stochastic:  # w + eps in fp32, then rounded stochastically (fastsam/ops/rounding.py)
        work = [p.float() for p in params]
        grads = [g.float() for g in grads]
    else:
        work = params
    if a == 0:
        step = torch._foreach_mul(grads, scale)
    else:  # (scale * T^a) * g, in the reference's order (stochastic rounding then draws the same bits)
        step = _adaptive_powers(work, eta, a)
        torch._foreach_mul_(step, scale)
        torch._foreach_mul_(step, grads)
    torch._foreach_copy_(list(backups), params)
    torch._foreach_add_(work, step)
    if stochastic:
        seed = seed.to(params[0].device)
        for i, (p, x) in enumerate(zip(params, work)):
            partners = [grads[i], backups[i]] + ([ascent[i]] if ascent is not None else [])
            p.copy_(rounding.stochastically_rounded(x, p.dtype, seed, i, rounding.walk_index(p, partners)))


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    if params:
        torch._foreach_copy_(list(params), list(backups))


def gsam_reduce(ascent: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    if not grads:
        return torch.zeros(2, dtype=torch.float32)
    # There is no _foreach_sum: multiply with one launch, then one cat + sum.
    products = torch._foreach_mul(list(ascent), list(grads))
    dot = torch.cat([p.reshape(-1) for p in products]).sum(dtype=_reduction_dtype(grads))
    return torch.stack([dot, _sum_of_squared_norms(grads)])


def gsam_combine_(grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor, alpha: float,
                  eps: float = 1e-12) -> None:
    if not grads:
        return
    # g_p - alpha * (g_asc - <g_asc,h> h) = (1 + alpha * dot / (|g_p| + eps)^2) * g_p - alpha * g_asc
    gp_coefficient = 1.0 + alpha * stats[0] / (stats[1].sqrt() + eps).square()
    torch._foreach_mul_(list(grads), gp_coefficient)
    torch._foreach_add_(list(grads), list(ascent), alpha=-alpha)


def accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], scale: float,
                init: bool = False) -> None:
    if not accum:
        return
    accum, grads = list(accum), list(grads)
    if init:
        torch._foreach_copy_(accum, grads)
        if scale != 1.0:
            torch._foreach_mul_(accum, scale)
    else:
        torch._foreach_add_(accum, grads, alpha=scale)


BACKEND = backend_from_functions("foreach", globals())
