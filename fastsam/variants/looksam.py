"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022).

Every k-th step (the first one included) is a SAM step that also stores
``g_v = g_s - (<g, g_s> / ||g||^2) g``, the part of the perturbed-point gradient g_s
orthogonal to the clean gradient g (one global projection over all perturbed parameters,
not per tensor). The steps in between run one forward/backward and step with
``g + alpha * (||g|| / ||g_v||) * g_v``. docs/ALGORITHMS.md §9.

With perturbation sub-batches (``train_step(micro_batch=...)``) each sub-batch of a refresh
step contributes its own projection, weighted by its share of the batch: g_v is the weighted
sum of the sub-batches' orthogonal components, as the step's SAM gradient is the weighted sum
of theirs. A reuse step combines the step's complete gradient once, with its norm, at the
start of ``base_step()``: after the sub-batches are accumulated and a data-parallel caller
has averaged them (so DDP gives the same step as one process with the ranks' data as
sub-batches), and after ``train_step``'s clipping (``max_grad_norm`` bounds g; the combined
gradient's norm is then at most (1 + alpha) times it). (Combining every sub-batch with its
own, larger ||g_i|| instead added alpha times the mean sub-batch norm along one fixed
direction, and training on MNIST-1D with 16-example sub-batches collapsed to chance.) g_v
lives in per-parameter state (``state_dict``); a data-parallel caller averages it together
with the gradients on refresh steps.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fastsam.optimizer import SAM
from fastsam.passes import Pass, SubStepResult
from fastsam.plan import MissingGrad, global_sum, with_grads
from fastsam.variants import common, scheduled
from fastsam.variants.state import ParamTensors, pack, unpack


class LookSAM(SAM):
    """LookSAM: a SAM step every ``k`` steps, its orthogonal gradient component reused in between.

    ``LookSAM(params, base_optimizer, rho=0.05, k=5, alpha=0.7, **options_and_base_kwargs)``;
    SAM's options apply to the refresh steps' perturbation (``adaptive``, ``eta``, ``backend``,
    per-group ``rho`` ...). GSAM, RandSAM and ``schedule`` are refused (LookSAM rewrites the
    gradient itself and decides itself which steps perturb).

    In a two-step loop ask :meth:`perturbs_this_step` after the first backward: on a refresh
    step call ``first_step()`` / ``second_step()``; on a reuse step call ``base_step()``, which
    (always) combines the gradient first. Under a GradScaler, a refresh step whose gradients were
    inf/nan leaves no usable g_v and the next step refreshes again; checking that costs one
    host synchronisation at the first step after each refresh (none without a scaler).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, k: int = 5, alpha: float = 0.7, **kwargs):
        common.refuse("LookSAM", kwargs, {
            "schedule": "LookSAM decides itself which steps perturb (every k-th)",
            "randsam": "its projection needs the clean gradient as the ascent direction",
            "gsam_alpha": "both rewrite the perturbed-point gradient",
            "gsam_normalize_ascent": "it is a GSAM option"})
        self.k = common.check_int("LookSAM k", k)
        self.alpha = common.check_real("LookSAM alpha", alpha, low=0.0)
        super().__init__(params, base_optimizer, rho, **kwargs)
        common.refuse_group_gsam("LookSAM", self.param_groups)
        self._gv = ParamTensors("looksam_gv")
        self._gv_valid = False  # a complete g_v is stored
        self._gv_sumsq: Optional[Tensor] = None  # ||g_v||^2 (computed at its first use after a refresh)
        self._refresh: Optional[bool] = None  # whether this step refreshes (decided at its start)
        self._gv_started = False  # this refresh step has written g_v (later sub-batches add)
        self._gv_broken = False  # a refresh sub-step was skipped (inf/nan): g_v incomplete
        self._gv_check_finite = False  # the last refresh ran under a GradScaler: check its g_v once

    # -- which step is which --

    def perturbs_this_step(self) -> bool:
        """True on refresh steps (every k-th, or after a refresh that left no usable g_v)."""
        if self._refresh is None:
            if self._gv_valid and self._gv_check_finite:
                # the first step after a refresh under a GradScaler: was that refresh's g_v finite?
                self._gv_check_finite = False
                if not bool(torch.isfinite(self._gv_norm_sumsq())):
                    self._gv_valid, self._gv_sumsq = False, None
            self._refresh = (not self._gv_valid) or self.steps_taken % self.k == 0
        return self._refresh

    def descent_is_linear(self) -> bool:
        # refresh steps project each sub-batch's own descent gradient; reuse steps combine at
        # base_step, after any averaging, so their backward may synchronise
        return not self.perturbs_this_step()

    def _active(self) -> list:
        return [b for b in self._buckets() if b.rho > 0.0]

    # -- refresh steps: SAM, plus the projection --

    def _keeps_ascent(self, active) -> bool:
        return True  # perturb_ keeps the clean gradient g for the projection

    def first_step(self, zero_grad: bool = False, skip_nonfinite: bool = False) -> bool:
        if self._perturbed is None and not self.perturbs_this_step():
            raise RuntimeError(
                "LookSAM: this is a reuse step (a SAM step comes every k steps), so first_step() has nothing to do. "
                "In a two-step loop ask optimizer.perturbs_this_step() after the first backward and call "
                "optimizer.base_step() when it is False (it combines the gradient with the stored g_v first).")
        return super().first_step(zero_grad=zero_grad, skip_nonfinite=skip_nonfinite)

    @torch.no_grad()
    def unperturb(self, accumulate_weight: Optional[float] = None) -> None:
        if self._perturbed is not None:
            self._project(self._perturbed, 1.0 if accumulate_weight is None else float(accumulate_weight))
        super().unperturb(accumulate_weight)

    def _project(self, buckets: list, weight: float) -> None:
        """g_v (+)= weight * (g_s - <g, g_s>/||g||^2 g): one reduction, one fused write."""
        try:
            parts = [b.backend.gsam_reduce(b.grad_list(), b.buffer("ascent")) for b in buckets]
        except MissingGrad:  # a parameter got no gradient in the descent pass: project the others
            buckets = with_grads(buckets)
            parts = [b.backend.gsam_reduce(b.grad_list(), b.buffer("ascent")) for b in buckets]
        if not buckets:
            return
        stats = global_sum(buckets, parts)  # [<g_s, g>, ||g||^2]
        init = not self._gv_started
        for b in buckets:
            b.backend.looksam_project_(self._gv.for_bucket(b), b.grads(), b.buffer("ascent"), stats, weight,
                                       init, self.perturb_eps)
            self._gv.mark_ready(b.params)
        self._gv_started = True

    @torch.no_grad()
    def load_accumulated_grads(self) -> list[Tensor]:
        """As SAM's; on refresh steps the returned buffers also hold g_v (one per bucket), which a
        data-parallel caller must average with the gradients so that every rank reuses the same g_v."""
        flats = super().load_accumulated_grads()
        if self._refresh and self._gv_started:
            for b in self._active():
                flats.extend(self._gv.collective(b))
        return flats

    # -- reuse steps: one pass, then g + alpha ||g|| / ||g_v|| g_v --

    def _gv_norm_sumsq(self) -> Tensor:
        if self._gv_sumsq is None:
            buckets = self._active()
            parts = [b.backend.sumsq(self._gv.for_bucket(b)) for b in buckets]
            self._gv_sumsq = global_sum(buckets, parts)
        return self._gv_sumsq

    @torch.no_grad()
    def _combine(self) -> None:
        buckets = self._active()
        if not buckets:
            return
        gv_sumsq = self._gv_norm_sumsq()
        try:
            parts = [b.backend.sumsq(b.grads()) for b in buckets]
        except MissingGrad:
            buckets = with_grads(buckets)
            parts = [b.backend.sumsq(b.grads()) for b in buckets]
        if not buckets:
            return
        grad_sumsq = global_sum(buckets, parts)
        for b in buckets:
            b.backend.looksam_combine_(b.grads(), self._gv.for_bucket(b), grad_sumsq, gv_sumsq, self.alpha,
                                       self.perturb_eps)

    # -- whole steps --

    def sub_step(self, run_pass: Callable, *, weight: Optional[float] = None, sync: bool = False,
                 skip_nonfinite: bool = False) -> SubStepResult:
        """A SAM sub-step with the projection on refresh steps; one PLAIN pass on reuse steps (base_step combines)."""
        if self.perturbs_this_step():
            result = self._sam_sub_step(run_pass, weight=weight, sync=sync, skip_nonfinite=skip_nonfinite)
            if result.skipped:
                self._gv_broken = True
            return result
        try:
            return scheduled.plain_sub_step(self, run_pass, Pass.PLAIN, weight=weight, sync=sync)
        except BaseException:
            self.abort()
            raise

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        if closure is None:
            return self._finish_step()
        return scheduled.closure_step(self, closure, self.perturbs_this_step)

    def _before_base_step(self, scaler) -> None:
        super()._before_base_step(scaler)
        if self._refresh:
            self._gv_valid = self._gv_started and not self._gv_broken
            self._gv_sumsq = None
            self._gv_check_finite = scaler is not None
        elif self._refresh is False:
            self._combine()  # the step's gradient is complete (accumulated, averaged, clipped)

    def _after_base_step(self) -> None:
        super()._after_base_step()
        self._refresh, self._gv_started, self._gv_broken = None, False, False

    def abort(self) -> None:
        super().abort()
        self._gv_started = self._gv_broken = False  # the step starts over

    # -- checkpoints --

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "looksam": {
            "gv_valid": self._gv_valid, "refresh": self._refresh, "gv_started": self._gv_started,
            "gv_broken": self._gv_broken, "gv_check_finite": self._gv_check_finite}}

    def _load_extra_state(self, extras: dict) -> None:
        super()._load_extra_state(extras)
        state = extras.get("looksam", {})
        self._gv_valid = bool(state.get("gv_valid", False))
        self._refresh = state.get("refresh")
        self._gv_started = bool(state.get("gv_started", False))
        self._gv_broken = bool(state.get("gv_broken", False))
        self._gv_check_finite = bool(state.get("gv_check_finite", False))
        self._gv_sumsq = None

    def _per_param_state(self) -> dict:
        return {**super()._per_param_state(), **pack([self._gv], self._params())}

    def _load_per_param_state(self, per_param: dict) -> None:
        super()._load_per_param_state(unpack([self._gv], self._params(), per_param))
        if self._gv_valid and len(self._gv) == 0:
            self._gv_valid = False  # e.g. a plain torch.optim checkpoint: refresh first
