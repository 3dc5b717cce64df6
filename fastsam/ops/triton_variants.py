"""Triton backend: the efficient variants' ops (fastsam/ops/triton_variant_kernels.py), on the
launch machinery of fastsam/ops/triton_backend.py (cached offset tables and plans, one
launch per op, staging of strided views, data-dependent scalars read on the device)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastsam.ops import triton_backend as launching

_module = None


def _kernels():
    global _module
    if _module is None:
        launching._kernels()  # the core kernels (and their helpers) first: raises if triton is missing
        from fastsam.ops import triton_variant_kernels
        _module = triton_variant_kernels
    return _module


def looksam_project_(gv: Sequence[Tensor], grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor,
                     weight: float, init: bool = False, eps: float = 1e-12) -> None:
    launch = launching._prepare((gv, grads, ascent), ("gv", "grads", "ascent"), ("w" if init else "rw", "r", "r"))
    if launch is None:
        return
    stats = launching._device_scalar(stats, launch.device, "stats")
    with launch.guard():
        _kernels().looksam_project_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), stats, float(weight), float(eps), INIT=bool(init), **launch.sizes())
    launch.finish()


def looksam_combine_(grads: Sequence[Tensor], gv: Sequence[Tensor], grad_sumsq: Tensor, gv_sumsq: Tensor,
                     alpha: float, eps: float = 1e-12) -> None:
    launch = launching._prepare((grads, gv), ("grads", "gv"), ("rw", "r"))
    if launch is None:
        return
    grad_sumsq = launching._device_scalar(grad_sumsq, launch.device, "grad_sumsq")
    gv_sumsq = launching._device_scalar(gv_sumsq, launch.device, "gv_sumsq")
    with launch.guard():
        _kernels().looksam_combine_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), grad_sumsq, gv_sumsq, float(alpha), float(eps), **launch.sizes())
    launch.finish()


def friendly_direction_(direction: Sequence[Tensor], ema: Sequence[Tensor], grads: Sequence[Tensor], sigma: float,
                        lam: float, init: bool = False) -> Tensor:
    launch = launching._prepare((direction, ema, grads), ("direction", "ema", "grads"),
                                ("w", "w" if init else "rw", "r"))
    if launch is None:
        device = grads[0].device if len(grads) else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=device)
    with launch.guard():
        partials = torch.empty(launch.grid[0], dtype=torch.float32, device=launch.device)
        _kernels().friendly_direction_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), partials, float(sigma), float(lam), float(1.0 - lam),
            INIT=bool(init), **launch.sizes())
        out = launching._sum_partials(launch, partials, 1, ())
    launch.finish()
    return out
