"""Argument checks of the fused base steps shared by the Python backends (reference,
foreach, triton); the compiled backends make the same checks in C++ (csrc/base_step_lists.cpp)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def check_sgd(params: Sequence[Tensor], lr, momentum: float, dampening: float, nesterov: bool,
              momentum_buffers: Optional[Sequence[Tensor]]) -> None:
    _check_lr("sgd_step_", lr)
    if momentum < 0.0:
        raise ValueError(f"fastsam.sgd_step_: invalid momentum {momentum}")
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("fastsam.sgd_step_: Nesterov momentum requires a momentum and zero dampening "
                         "(as torch.optim.SGD)")
    has_buffers = momentum_buffers is not None and len(momentum_buffers) > 0
    if has_buffers != (momentum != 0.0):
        problem = ("momentum != 0 needs one momentum buffer per parameter" if momentum != 0.0
                   else "momentum buffers were given but momentum is 0")
        raise ValueError(f"fastsam.sgd_step_: {problem}")
    if has_buffers and len(momentum_buffers) != len(params):
        raise ValueError(f"fastsam.sgd_step_: momentum_buffers has {len(momentum_buffers)} tensors but params has "
                         f"{len(params)}")


def check_adam(params: Sequence[Tensor], lr, beta1: float, beta2: float, eps: float, amsgrad: bool,
               max_exp_avg_sqs: Optional[Sequence[Tensor]], steps: Sequence[Tensor]) -> None:
    _check_lr("adam_step_", lr)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"fastsam.adam_step_: betas must be in [0, 1); got ({beta1}, {beta2})")
    if eps < 0.0:
        raise ValueError(f"fastsam.adam_step_: invalid epsilon {eps}")
    has_max = max_exp_avg_sqs is not None and len(max_exp_avg_sqs) > 0
    if has_max != bool(amsgrad):
        raise ValueError("fastsam.adam_step_: " + ("amsgrad needs one max_exp_avg_sq per parameter" if amsgrad
                                                   else "max_exp_avg_sqs were given without amsgrad"))
    if len(steps) != len(params):
        raise ValueError(f"fastsam.adam_step_: steps has {len(steps)} tensors but params has {len(params)}; "
                         "Adam keeps one step count per parameter (state['step'])")
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype != torch.float32:
            raise ValueError(f"fastsam.adam_step_: steps[{i}] must be a 1-element float32 tensor "
                             f"(torch.optim.Adam's state['step']); got {s.dtype} of shape {tuple(s.shape)}")
        if params and s.device != params[0].device:
            raise ValueError(f"fastsam.adam_step_: steps[{i}] is on {s.device} but the parameters are on "
                             f"{params[0].device}; keep the step counts on the parameters' device (as "
                             "torch.optim.Adam does with fused=True or capturable=True)")


def check_chain(ascent, gsam_stats) -> None:
    if (ascent is not None) != (gsam_stats is not None):
        raise ValueError("fastsam: GSAM's ascent and gsam_stats go together (stats from gsam_reduce or "
                         "restore_gsam_reduce)")


def _check_lr(op: str, lr) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"fastsam.{op}: a tensor lr must have one element; got shape {tuple(lr.shape)}")
        return
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"fastsam.{op}: invalid learning rate {lr}")
