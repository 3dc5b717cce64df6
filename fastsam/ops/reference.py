"""Reference backend: the ops contract one tensor at a time, in plain fp32 PyTorch.

Written to be obviously right, not fast. Every other backend is tested against it.
Each formula upcasts to fp32 (float64 stays float64), computes, and rounds once into
the tensor's dtype. The fused base steps are the unfused composition they replace:
restore_, the GSAM and accumulation ops above, then torch.optim's own single-tensor step
(torch.optim.sgd.sgd / torch.optim.adam.adam with foreach=False) on fp32 copies.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam  # torch.optim's functional steps
from torch.optim.sgd import sgd as torch_sgd

from fastsam.ops import backend_from_functions, check_exponents, rounding, step_args


def _upcast(t: Tensor) -> Tensor:
    """The compute copy: fp32, or fp64 for float64 tensors."""
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _accumulator(tensors: Sequence[Tensor]) -> Tensor:
    dtype = torch.float64 if len(tensors) and tensors[0].dtype == torch.float64 else torch.float32
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    return torch.zeros((), dtype=dtype, device=device)


def _adaptive_scale(w: Tensor, eta: float, power: int) -> Tensor | float:
    """T^power with T = |w| + eta, in fp32 (1.0 when power == 0)."""
    if power == 0:
        return 1.0
    return (_upcast(w).abs() + eta) ** power


def _inverse_norm(sumsq: Tensor, eps: float) -> Tensor:
    return 1.0 / (sumsq.sqrt() + eps)


def sumsq(tensors: Sequence[Tensor], params: Optional[Sequence[Tensor]] = None, b: int = 0,
          eta: float = 0.0) -> Tensor:
    check_exponents(0, b)
    if b > 0 and params is None:
        raise ValueError("sumsq with b > 0 needs the parameters (T = |w| + eta)")
    total = _accumulator(tensors)
    for i, g in enumerate(tensors):
        scaled = _upcast(g) * _adaptive_scale(params[i], eta, b) if b > 0 else _upcast(g)
        total = total + scaled.square().sum()
    return total


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
             sumsq: Tensor, rho: float, a: int = 0, b: int = 0, eta: float = 0.0,
             eps: float = 1e-12, ascent: Optional[Sequence[Tensor]] = None,
             ascent_sumsq: Optional[Tensor] = None, seed: Optional[Tensor] = None) -> None:
    check_exponents(a, b)
    scale = rho * _inverse_norm(sumsq, eps)
    ascent_scale = _inverse_norm(ascent_sumsq, eps) if ascent_sumsq is not None else None
    with torch.no_grad():
        for i, (w, g, backup) in enumerate(zip(params, grads, backups)):
            g32 = _upcast(g)
            if ascent is not None:
                ascent[i].copy_(g32 * ascent_scale if ascent_scale is not None else g)
            step = scale * _adaptive_scale(w, eta, a) * g32
            backup.copy_(w)
            perturbed = _upcast(w) + step
            if seed is not None and w.dtype in rounding.LOW_PRECISION:
                partners = [g, backup] + ([ascent[i]] if ascent is not None else [])
                index = rounding.walk_index(w, partners)
                perturbed = rounding.stochastically_rounded(perturbed, w.dtype, seed.to(w.device), i, index)
            w.copy_(perturbed)


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for w, backup in zip(params, backups):
            w.copy_(backup)


def gsam_reduce(ascent: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    dot = _accumulator(grads)
    gp_sumsq = _accumulator(grads)
    for g_asc, g_p in zip(ascent, grads):
        dot = dot + (_upcast(g_asc) * _upcast(g_p)).sum()
        gp_sumsq = gp_sumsq + _upcast(g_p).square().sum()
    return torch.stack([dot, gp_sumsq])


def gsam_combine_(grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor, alpha: float,
                  eps: float = 1e-12) -> None:
    gp_norm = stats[1].sqrt() + eps
    ascent_along_gp = stats[0] / gp_norm  # <g_asc, h> with h = g_p / (||g_p|| + eps)
    with torch.no_grad():
        for g_p, g_asc in zip(grads, ascent):
            h = _upcast(g_p) / gp_norm
            g_orth = _upcast(g_asc) - ascent_along_gp * h
            g_p.copy_(_upcast(g_p) - alpha * g_orth)


def accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], scale: float,
                init: bool = False) -> None:
    with torch.no_grad():
        for acc, g in zip(accum, grads):
            contribution = scale * _upcast(g)
            acc.copy_(contribution if init else _upcast(acc) + contribution)


# ---- fused base steps: restore_ + GSAM + accumulate_ + torch.optim's single-tensor step ----

def _direction(grads, ascent, gsam_stats, alpha, gsam_eps, accum, accum_scale) -> list[Tensor]:
    """The gradient the base step consumes, as the unfused chain computes it (on copies)."""
    d = [g.detach().clone() for g in grads]
    if ascent is not None:
        gsam_combine_(d, ascent, gsam_stats, alpha, gsam_eps)
    if accum is not None:
        total = [a.detach().clone() for a in accum]
        accumulate_(total, d, accum_scale, init=False)
        d = total
    return d


def _step_inputs(params, grads, backups, found_inf, grad_scale, chain) -> Optional[list[Tensor]]:
    """Restore, then the fp32 gradients for torch.optim (None: GradScaler found inf, skip the step)."""
    if backups is not None:
        restore_(params, backups)
    if found_inf is not None and found_inf.item() != 0:
        return None
    d = [_upcast(x) for x in _direction(grads, *chain)]
    if grad_scale is not None:  # unscaled by division, as torch's fused optimizers do
        d = [x / grad_scale.to(device=x.device, dtype=x.dtype) for x in d]
    return d


def _copy_back(targets: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    for t, v in zip(targets, values):
        t.copy_(v)  # one rounding into a bf16/fp16 tensor; fp32 compute copies alias their tensor


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Optional[Sequence[Tensor]],
              lr, weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
              nesterov: bool = False, maximize: bool = False, first: bool = False,
              backups: Optional[Sequence[Tensor]] = None, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None, ascent: Optional[Sequence[Tensor]] = None,
              gsam_stats: Optional[Tensor] = None, alpha: float = 0.0, gsam_eps: float = 1e-12,
              accum: Optional[Sequence[Tensor]] = None, accum_scale: float = 1.0) -> None:
    step_args.check_sgd(params, lr, momentum, dampening, nesterov, momentum_buffers)
    step_args.check_chain(ascent, gsam_stats)
    if not len(params):
        return
    with torch.no_grad():
        d = _step_inputs(params, grads, backups, found_inf, grad_scale,
                         (ascent, gsam_stats, alpha, gsam_eps, accum, accum_scale))
        if d is None:
            return
        work = [_upcast(p) for p in params]
        bufs = [None if first else _upcast(b) for b in momentum_buffers] if momentum != 0.0 else [None] * len(params)
        torch_sgd(work, d, bufs, foreach=False, fused=False, weight_decay=weight_decay, momentum=momentum, lr=lr,
                  dampening=dampening, nesterov=nesterov, maximize=maximize)
        _copy_back(params, work)
        if momentum != 0.0:
            _copy_back(momentum_buffers, bufs)


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
    if not len(params):
        return
    with torch.no_grad():
        d = _step_inputs(params, grads, backups, found_inf, grad_scale,
                         (ascent, gsam_stats, alpha, gsam_eps, accum, accum_scale))
        if d is None:
            return
        work, m, v = ([_upcast(t) for t in ts] for ts in (params, exp_avgs, exp_avg_sqs))
        vmax = [_upcast(t) for t in max_exp_avg_sqs] if amsgrad else []
        torch_adam(work, d, m, v, vmax, list(steps), foreach=False, capturable=False, differentiable=False,
                   fused=False, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, beta1=beta1,
                   beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize)
        for targets, values in ((params, work), (exp_avgs, m), (exp_avg_sqs, v)):
            _copy_back(targets, values)
        if amsgrad:
            _copy_back(max_exp_avg_sqs, vmax)


def restore_gsam_reduce(params: Sequence[Tensor], backups: Sequence[Tensor], ascent: Sequence[Tensor],
                        grads: Sequence[Tensor]) -> Tensor:
    restore_(params, backups)
    return gsam_reduce(ascent, grads)


def gsam_combine_accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], ascent: Sequence[Tensor],
                             stats: Tensor, alpha: float, eps: float = 1e-12, scale: float = 1.0,
                             init: bool = False) -> None:
    combined = [g.detach().clone() for g in grads]
    gsam_combine_(combined, ascent, stats, alpha, eps)
    accumulate_(accum, combined, scale, init)


def restore_accumulate_(params: Sequence[Tensor], backups: Sequence[Tensor], accum: Sequence[Tensor],
                        grads: Sequence[Tensor], scale: float, init: bool = False) -> None:
    restore_(params, backups)
    accumulate_(accum, grads, scale, init)
# -- the efficient variants' bookkeeping (docs/ALGORITHMS.md §9) --

def _projection_coefficient(stats: Tensor, eps: float) -> Tensor:
    """LookSAM's c = <g, g_s> / (||g|| + eps)^2 from stats = [<g_s, g>, ||g||^2]."""
    return stats[0] / (stats[1].sqrt() + eps).square()


def looksam_project_(gv: Sequence[Tensor], grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor,
                     weight: float, init: bool = False, eps: float = 1e-12) -> None:
    c = _projection_coefficient(stats, eps)
    with torch.no_grad():
        for v, g_s, g in zip(gv, grads, ascent):
            orthogonal = _upcast(g_s) - c * _upcast(g)
            v.copy_(weight * orthogonal if init else _upcast(v) + weight * orthogonal)


def looksam_combine_(grads: Sequence[Tensor], gv: Sequence[Tensor], grad_sumsq: Tensor, gv_sumsq: Tensor,
                     alpha: float, eps: float = 1e-12) -> None:
    coefficient = alpha * grad_sumsq.sqrt() / (gv_sumsq.sqrt() + eps)
    with torch.no_grad():
        for g, v in zip(grads, gv):
            g.copy_(_upcast(g) + coefficient * _upcast(v))


def friendly_direction_(direction: Sequence[Tensor], ema: Sequence[Tensor], grads: Sequence[Tensor], sigma: float,
                        lam: float, init: bool = False) -> Tensor:
    total = _accumulator(grads)
    with torch.no_grad():
        for d, m, g in zip(direction, ema, grads):
            if init:
                d.copy_(g)
                m.copy_(g)
            else:
                g32, m32 = _upcast(g), _upcast(m)
                d.copy_(g32 - sigma * m32)
                m.copy_(lam * m32 + (1.0 - lam) * g32)
            total = total + _upcast(d).square().sum()  # of the stored direction, as perturb_ reads it
    return total


BACKEND = backend_from_functions("reference", globals())
