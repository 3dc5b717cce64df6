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

from fastsam.ops import backend_from_functions, check_exponents, rounding, step_args


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
    indices = [rounding.walk_index(p, [grads[i], backups[i]] + ([ascent[i]] if ascent is not None else []))
               for i, p in enumerate(params)]
    rounded = rounding.stochastically_rounded_lists(work, params[0].dtype, seed.to(params[0].device), indices)
    torch._foreach_copy_(params, rounded)


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
