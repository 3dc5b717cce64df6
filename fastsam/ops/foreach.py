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

from fastsam.ops import backend_from_functions, check_exponents, step_args


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


# ---- fused base steps: compositions of foreach ops (the state stays torch.optim's) ----------
# New values are computed out of place and then committed: copied, or, with GradScaler's
# found_inf, chosen per tensor with torch.where (there is no foreach select), so that a
# skipped step leaves every tensor bit-exactly as it was without reading found_inf on the host.
# Unlike the ops above, the steps compute bf16/fp16 lists on fp32 copies (rounded once on
# commit), as the contract asks: in fp16 Adam's eps = 1e-8 alone rounds to 0, and a zero
# second moment then turned a parameter into inf (seen in the tests).

def _compute(tensors) -> Optional[list[Tensor]]:
    """fp32 copies of bf16/fp16 tensors, the tensors themselves otherwise (None stays None)."""
    if tensors is None:
        return None
    tensors = list(tensors)
    return [t.float() for t in tensors] if tensors and tensors[0].dtype in (torch.bfloat16, torch.float16) \
        else tensors


def _direction(grads, ascent, gsam_stats, alpha, gsam_eps, accum, accum_scale, grad_scale, maximize) -> list[Tensor]:
    """The direction the step consumes; new tensors unless it is ``grads`` itself (then only read)."""
    d = list(grads)
    if ascent is not None:
        d = torch._foreach_mul(d, 1.0 + alpha * gsam_stats[0] / (gsam_stats[1].sqrt() + gsam_eps).square())
        torch._foreach_add_(d, list(ascent), alpha=-alpha)
    if accum is not None:
        d = torch._foreach_add(list(accum), d, alpha=accum_scale)
    if grad_scale is not None:
        d = torch._foreach_div(d, grad_scale.to(device=d[0].device, dtype=torch.float32))
    if maximize:
        d = torch._foreach_neg(d)
    return d


def _commit(targets: list[Tensor], olds: list[Tensor], news: list[Tensor], found_inf: Optional[Tensor]) -> None:
    """targets <- news, or olds where found_inf is nonzero."""
    if found_inf is None:
        torch._foreach_copy_(targets, news)
        return
    skip = found_inf.to(targets[0].device) != 0
    for target, old, new in zip(targets, olds, news):
        target.copy_(torch.where(skip, old, new))


def _scaled_lr(lr, tensors: list[Tensor]) -> list[Tensor]:
    """-lr * t for each t (lr a float or a 0-d tensor)."""
    return torch._foreach_mul(tensors, -lr.to(tensors[0].device) if isinstance(lr, Tensor) else -lr)


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Optional[Sequence[Tensor]],
              lr, weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
              nesterov: bool = False, maximize: bool = False, first: bool = False,
              backups: Optional[Sequence[Tensor]] = None, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None, ascent: Optional[Sequence[Tensor]] = None,
              gsam_stats: Optional[Tensor] = None, alpha: float = 0.0, gsam_eps: float = 1e-12,
              accum: Optional[Sequence[Tensor]] = None, accum_scale: float = 1.0) -> None:
    step_args.check_sgd(params, lr, momentum, dampening, nesterov, momentum_buffers)
    step_args.check_chain(ascent, gsam_stats)
    if not params:
        return
    params = list(params)
    sources = list(backups) if backups is not None else params
    w = _compute(sources)
    d = _direction(_compute(grads), _compute(ascent), gsam_stats, alpha, gsam_eps, _compute(accum), accum_scale,
                   grad_scale, maximize)
    if weight_decay != 0.0:
        d = torch._foreach_add(d, w, alpha=weight_decay)
    targets, olds, news = [], [], []
    if momentum != 0.0:
        bufs = list(momentum_buffers)
        if first:
            new_bufs = d
        else:
            new_bufs = torch._foreach_mul(_compute(bufs), momentum)
            torch._foreach_add_(new_bufs, d, alpha=1.0 - dampening)
        d = torch._foreach_add(d, new_bufs, alpha=momentum) if nesterov else new_bufs
        targets, olds, news = bufs, bufs, new_bufs
    new_params = torch._foreach_add(w, _scaled_lr(lr, d))
    _commit([*params, *targets], [*sources, *olds], [*new_params, *news], found_inf)


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Optional[Sequence[Tensor]], steps: Sequence[Tensor],
               lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
               amsgrad: bool = False, maximize: bool = False, decoupled_weight_decay: bool = False,
               backups: Optional[Sequence[Tensor]] = None, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None, ascent: Optional[Sequence[Tensor]] = None,
               gsam_stats: Optional[Tensor] = None, alpha: float = 0.0, gsam_eps: float = 1e-12,
               accum: Optional[Sequence[Tensor]] = None, accum_scale: float = 1.0) -> None:
    step_args.check_adam(params, lr, beta1, beta2, eps, amsgrad, max_exp_avg_sqs, steps)
    step_args.check_chain(ascent, gsam_stats)
    if not params:
        return
    params, steps = list(params), list(steps)
    m, v = list(exp_avgs), list(exp_avg_sqs)
    sources = list(backups) if backups is not None else params
    device = params[0].device
    # step += 1 (not when skipped); bias corrections per tensor on the device, in double
    torch._foreach_add_(steps, 1.0 if found_inf is None else (found_inf.to(device) == 0).to(torch.float32))
    counts = torch.stack([s.reshape(()) for s in steps]).double()
    lr64 = lr.to(device=device, dtype=torch.float64) if isinstance(lr, Tensor) else lr
    neg_step_size = (-(lr64 / (1.0 - beta1 ** counts))).float().unbind(0)
    bc2_sqrt = (1.0 - beta2 ** counts).sqrt().float().unbind(0)
    d = _direction(_compute(grads), _compute(ascent), gsam_stats, alpha, gsam_eps, _compute(accum), accum_scale,
                   grad_scale, maximize)
    base = _compute(sources)
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            base = torch._foreach_mul(base, (1.0 - lr64 * weight_decay).float() if isinstance(lr, Tensor)
                                      else 1.0 - lr * weight_decay)
        else:
            d = torch._foreach_add(d, base, alpha=weight_decay)
    new_m = torch._foreach_lerp(_compute(m), d, 1.0 - beta1)
    new_v = torch._foreach_mul(_compute(v), beta2)
    torch._foreach_addcmul_(new_v, d, d, value=1.0 - beta2)
    targets, olds, news = [*m, *v], [*m, *v], [*new_m, *new_v]
    second = new_v
    if amsgrad:
        vmax = list(max_exp_avg_sqs)
        second = torch._foreach_maximum(_compute(vmax), new_v)
        targets, olds, news = [*targets, *vmax], [*olds, *vmax], [*news, *second]
    # as torch's capturable foreach Adam: w + m / (denom / (-lr / bc1))
    denom = torch._foreach_sqrt(second)
    torch._foreach_div_(denom, list(bc2_sqrt))
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(denom, list(neg_step_size))
    new_params = torch._foreach_addcdiv(base, new_m, denom)
    _commit([*params, *targets], [*sources, *olds], [*new_params, *news], found_inf)


def restore_gsam_reduce(params: Sequence[Tensor], backups: Sequence[Tensor], ascent: Sequence[Tensor],
                        grads: Sequence[Tensor]) -> Tensor:
    restore_(params, backups)
    return gsam_reduce(ascent, grads)


def gsam_combine_accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], ascent: Sequence[Tensor],
                             stats: Tensor, alpha: float, eps: float = 1e-12, scale: float = 1.0,
                             init: bool = False) -> None:
    if not accum:
        return
    combined = torch._foreach_mul(list(grads), 1.0 + alpha * stats[0] / (stats[1].sqrt() + eps).square())
    torch._foreach_add_(combined, list(ascent), alpha=-alpha)
    accumulate_(accum, combined, scale, init)


def restore_accumulate_(params: Sequence[Tensor], backups: Sequence[Tensor], accum: Sequence[Tensor],
                        grads: Sequence[Tensor], scale: float, init: bool = False) -> None:
    restore_(params, backups)
    accumulate_(accum, grads, scale, init)


BACKEND = backend_from_functions("foreach", globals())
