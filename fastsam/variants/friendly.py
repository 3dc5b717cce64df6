"""Friendly SAM (Li, Zhou, He, Cheng, Huang, "Friendly Sharpness-Aware Minimization", CVPR 2024).

The ascent direction is the stochastic gradient minus an EMA of past gradients, which
removes the full-batch gradient component and keeps the batch-specific noise:
``d_t = g_t - sigma m_{t-1}`` (the old EMA), then ``m_t = lambda m_{t-1} + (1 - lambda) g_t``
with the raw g_t, and ``eps = rho d_t / ||d_t||``. On the first step ``m = g`` and d = g (a
plain SAM perturbation), as in the authors' code. The EMA update, the subtraction and the
norm are one fused pass (``friendly_direction_``). docs/ALGORITHMS.md §9.

With perturbation sub-batches the EMA is updated once per sub-batch (each perturbation),
as the authors' gradient-accumulation script does, so lambda's horizon counts sub-batches.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastsam.optimizer import SAM
from fastsam.plan import MissingGrad, global_sum, with_grads
from fastsam.variants import common
from fastsam.variants.state import ParamTensors, pack, unpack


class FriendlySAM(SAM):
    """Friendly SAM: perturb along g - sigma * EMA(g), normalised.

    ``FriendlySAM(params, base_optimizer, rho=0.05, sigma=1.0, lmbda=0.9, **options_and_base_kwargs)``
    (``lmbda`` as the authors call it; their published runs use 0.6 and 0.95). ASAM
    (``adaptive``) applies to the perturbation as in the authors' code; GSAM, RandSAM and
    ``schedule`` are refused. The EMA is per-parameter state in ``state_dict``. A step whose
    gradient is inf/nan (skipped by a GradScaler, or refused by ``check_finite``) restarts the
    EMA at the next step, which the inf/nan would otherwise poison for good.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, sigma: float = 1.0, lmbda: float = 0.9,
                 **kwargs):
        common.refuse("FriendlySAM", kwargs, {
            "schedule": "its EMA follows every step's gradient",
            "randsam": "the direction is computed from the gradient",
            "gsam_alpha": "the combination with GSAM is not defined by either paper",
            "gsam_normalize_ascent": "it is a GSAM option"})
        self.sigma = common.check_real("FriendlySAM sigma", sigma)
        self.lmbda = common.check_real("FriendlySAM lmbda", lmbda, low=0.0, high=1.0)
        super().__init__(params, base_optimizer, rho, **kwargs)
        common.refuse_group_gsam("FriendlySAM", self.param_groups)
        self._ema = ParamTensors("friendly_ema")

    def _direction_of(self, bucket):
        """(direction, partial ||d||^2) of one bucket; updates its EMA. Raises MissingGrad before any write."""
        ema = self._ema.for_bucket(bucket)
        direction = bucket.buffer("friendly.direction")
        fresh = self._ema.unready(bucket.params)
        if not fresh or len(fresh) == len(bucket.params):
            part = bucket.backend.friendly_direction_(direction, ema, bucket.grads(), self.sigma, self.lmbda,
                                                      init=bool(fresh))
        else:  # parameters new to the EMA (e.g. added with add_param_group) start it, the others follow it
            grads = bucket.grad_list()
            new = {id(p) for p in fresh}
            part = None
            for init in (True, False):
                index = [i for i, p in enumerate(bucket.params) if (id(p) in new) == init]
                piece = bucket.backend.friendly_direction_([direction[i] for i in index], [ema[i] for i in index],
                                                           [grads[i] for i in index], self.sigma, self.lmbda, init)
                part = piece if part is None else part + piece
        self._ema.mark_ready(bucket.params)
        return direction, part

    def _ascent(self, buckets, active):
        kept, directions, parts = [], [], []
        pending = list(active)
        while pending:
            bucket = pending.pop(0)
            try:
                direction, part = self._direction_of(bucket)
            except MissingGrad:  # this bucket (and maybe later ones) lacks some gradients: use the present ones
                pending = with_grads([bucket] + pending)
                continue
            kept.append(bucket)
            directions.append(direction)
            parts.append(part)
        if not kept:
            if not with_grads(buckets):
                raise RuntimeError("first_step() found no gradient: call loss.backward() before first_step() "
                                   "(all parameters have grad=None or requires_grad=False)")
            return [], [], None
        if any(b.b != 0 for b in kept):  # ASAM's norm of T^b d: one more read of d
            total = self._sumsq(kept, directions, adaptive=True)
        else:
            total = global_sum(kept, parts)
        return kept, directions, total

    # -- an inf/nan gradient must not stay in the EMA --

    def first_step(self, zero_grad: bool = False, skip_nonfinite: bool = False) -> bool:
        """As SAM's; when ``skip_nonfinite`` finds the direction inf/nan (the EMA has taken the
        same values), the EMA starts over at the next step (m = g, as at step 1)."""
        perturbed = super().first_step(zero_grad=zero_grad, skip_nonfinite=skip_nonfinite)
        if not perturbed:
            self._ema.clear()
        return perturbed

    def base_step(self, scaler=None):
        try:
            return super().base_step(scaler)
        except FloatingPointError:  # check_finite refused the step: the EMA may hold inf/nan too
            self._ema.clear()
            raise

    # -- checkpoints --

    def _per_param_state(self) -> dict:
        return {**super()._per_param_state(), **pack([self._ema], self._params())}

    def _load_per_param_state(self, per_param: dict) -> None:
        super()._load_per_param_state(unpack([self._ema], self._params(), per_param))
