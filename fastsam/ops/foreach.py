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

from fastsam.ops import backend_from_functions, check_exponents


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
             ascent_sumsq: Optional[Tensor] = None) -> None:
    check_exponents(a, b)
    if not params:
        return
    params, grads = list(params), list(grads)
    scale = rho / (sumsq.sqrt() + eps)
    if ascent is not None:
        torch._foreach_copy_(list(ascent), grads)
        if ascent_sumsq is not None:
            torch._foreach_mul_(list(ascent), 1.0 / (ascent_sumsq.sqrt() + eps))
    if a == 0:
        step = torch._foreach_mul(grads, scale)
    else:
        step = _adaptive_powers(params, eta, a)
        torch._foreach_mul_(step, grads)
        torch._foreach_mul_(step, scale)
    torch._foreach_copy_(list(backups), params)
    torch._foreach_add_(params, step)


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


# -- the efficient variants' bookkeeping (docs/ALGORITHMS.md §9) --

def looksam_project_(gv: Sequence[Tensor], grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor,
                     weight: float, init: bool = False, eps: float = 1e-12) -> None:
    if not gv:
        return
    gv = list(gv)
    coefficient = stats[0] / (stats[1].sqrt() + eps).square()
    orthogonal = torch._foreach_mul(list(ascent), -coefficient)
    torch._foreach_add_(orthogonal, list(grads))
    if init:
        if weight != 1.0:
            torch._foreach_mul_(orthogonal, weight)
        torch._foreach_copy_(gv, orthogonal)
    else:
        torch._foreach_add_(gv, orthogonal, alpha=weight)


def looksam_combine_(grads: Sequence[Tensor], gv: Sequence[Tensor], grad_sumsq: Tensor, gv_sumsq: Tensor,
                     alpha: float, eps: float = 1e-12) -> None:
    if not gv:
        return
    coefficient = alpha * grad_sumsq.sqrt() / (gv_sumsq.sqrt() + eps)
    torch._foreach_add_(list(grads), torch._foreach_mul(list(gv), coefficient))


def friendly_direction_(direction: Sequence[Tensor], ema: Sequence[Tensor], grads: Sequence[Tensor], sigma: float,
                        lam: float, init: bool = False) -> Tensor:
    if not direction:
        return _zero("cpu")
    direction, ema, grads = list(direction), list(ema), list(grads)
    if init:
        torch._foreach_copy_(direction, grads)
        torch._foreach_copy_(ema, grads)
    else:
        torch._foreach_copy_(direction, grads)
        torch._foreach_add_(direction, ema, alpha=-sigma)
        torch._foreach_mul_(ema, lam)
        torch._foreach_add_(ema, grads, alpha=1.0 - lam)
    return _sum_of_squared_norms(direction)


BACKEND = backend_from_functions("foreach", globals())
