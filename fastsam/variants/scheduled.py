"""Steps that may or may not perturb: ``SAM(schedule=...)`` and the shared pieces of the variants.

A :class:`fastsam.schedules.StepSchedule` decides whether a step is a SAM step or the base
optimizer's step alone (docs/ALGORITHMS.md §9). Every and Random decide once per optimizer
step, before any pass; Adaptive (AE-SAM) decides for each perturbation sub-batch from its
clean gradient's norm, which it reads on the host (one synchronisation per decision).

The decision is taken when first needed (by ``sub_step``, ``step(closure)``, ``first_step``
or :meth:`fastsam.SAM.perturbs_this_step`) and kept until it is used: until the base step
for per-step schedules, until the sub-step's perturbation for Adaptive.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from fastsam import closure as closure_protocol
from fastsam.passes import Pass, SubStepResult
from fastsam.plan import MissingGrad, global_sum, with_grads
from fastsam.schedules import StepSchedule


def check_schedule(schedule) -> Optional[StepSchedule]:
    if schedule is not None and not isinstance(schedule, StepSchedule):
        raise TypeError("schedule must be None or a fastsam.schedules schedule (Every(k), Random(p), "
                        f"Adaptive(total_steps)); got {schedule!r}")
    return schedule


def clean_grad_sumsq(sam) -> float:
    """||g||^2 of the perturbed groups' current gradients, on the host (one synchronisation)."""
    buckets = [b for b in sam._buckets() if b.rho > 0.0]
    try:
        parts = [b.backend.sumsq(b.grads()) for b in buckets]
    except MissingGrad:
        buckets = with_grads(buckets)
        parts = [b.backend.sumsq(b.grads()) for b in buckets]
    if not buckets:
        return 0.0
    return float(global_sum(buckets, parts))


def decision(sam) -> bool:
    """Whether the current step (or, for per-sub-step schedules, sub-step) perturbs; decided once."""
    if sam._sam_decision is None:
        schedule = sam.schedule
        sumsq = clean_grad_sumsq(sam) if schedule.needs_gradient else None
        sam._sam_decision = bool(schedule.decide(sam.steps_taken, sumsq))
    return sam._sam_decision


def consume_sub_step_decision(sam) -> None:
    """After a sub-step used the decision: a per-sub-step schedule decides again next time."""
    if sam.schedule is not None and sam.schedule.per_sub_step:
        sam._sam_decision = None


def plain_sub_step(sam, run_pass: Callable, kind: Pass, *, weight: Optional[float], sync: bool) -> SubStepResult:
    """A sub-step without perturbation: one pass of ``kind``, its gradient kept or accumulated.

    Mirrors the SAM sub-step's handling of ``weight`` and ``sync`` (fastsam.SAM.sub_step):
    when the optimizer's step is linear in this backward, the accumulated gradients are loaded
    first and the backward synchronises everything.
    """
    sam.zero_grad(set_to_none=True)
    synced = sync and sam.descent_is_linear()
    if synced and weight is not None and sam.accumulating:
        sam.load_accumulated_grads()
    scale = 1.0 if (weight is None or not synced) else float(weight)
    loss = run_pass(kind, scale=scale, sync=synced)
    finish_plain_gradient(sam, None if synced else weight)
    return SubStepResult(loss, None, skipped=False, synced=synced)


@torch.no_grad()
def finish_plain_gradient(sam, weight: Optional[float]) -> None:
    """The gradient in ``.grad`` is this sub-step's: accumulate it (with ``weight``) or leave it there."""
    if weight is not None:
        for bucket in sam._buckets():
            sam._accumulator.add(bucket, float(weight))
        sam.zero_grad(set_to_none=True)
    sam._descent_ready = True


def sub_step(sam, run_pass: Callable, *, weight: Optional[float], sync: bool, skip_nonfinite: bool) -> SubStepResult:
    """``SAM.sub_step`` under a schedule."""
    try:
        if not sam.schedule.needs_gradient:
            if decision(sam):
                return sam._sam_sub_step(run_pass, weight=weight, sync=sync, skip_nonfinite=skip_nonfinite)
            return plain_sub_step(sam, run_pass, Pass.PLAIN, weight=weight, sync=sync)
        return _gradient_gated_sub_step(sam, run_pass, weight=weight, skip_nonfinite=skip_nonfinite)
    except BaseException:
        sam.abort()
        raise


def _gradient_gated_sub_step(sam, run_pass, *, weight, skip_nonfinite) -> SubStepResult:
    """AE-SAM: the clean training-loss gradient first, then SAM only if the schedule says so.

    Its descent_is_linear() is False, so nothing here synchronises inside a backward: a
    data-parallel caller averages the accumulated gradients.
    """
    sam.zero_grad(set_to_none=True)
    loss = run_pass(Pass.PLAIN)
    sam._sam_decision = None  # this sub-batch's gradient decides
    perturb = decision(sam)
    sam._sam_decision = None
    if not perturb:
        finish_plain_gradient(sam, weight)
        return SubStepResult(loss, None)
    if not getattr(run_pass, "ascent_is_plain", False):
        # the ascent loss is not the training loss (e.g. OBF): its own pass gives the direction
        sam.zero_grad(set_to_none=True)
        run_pass(Pass.LOSS if sam.randsam else Pass.ASCENT)
    sam._sam_decision = True
    perturbed = sam.first_step(zero_grad=True, skip_nonfinite=skip_nonfinite)  # uses up the decision
    scale = 1.0
    if not perturbed:
        sam.zero_grad(set_to_none=True)
        scale = math.inf  # as in SAM.sub_step: the scaler sees inf and skips the whole step
    perturbed_loss = run_pass(Pass.DESCENT, scale=scale)
    if perturbed:
        sam.unperturb(accumulate_weight=weight)
    else:
        finish_plain_gradient(sam, weight)
    return SubStepResult(loss, perturbed_loss if perturbed else None, skipped=not perturbed)


def check_first_step(sam) -> None:
    """first_step() on a step the schedule made a plain one: refuse, saying what to do."""
    if not decision(sam):
        raise RuntimeError(
            f"{type(sam).__name__}: this step is not a SAM step (schedule {sam.schedule!r}), so first_step() has "
            "nothing to do and the perturbed pass after it would be wasted. With a schedule, ask "
            "optimizer.perturbs_this_step() after the first backward: if it is True, call first_step() / "
            "second_step() as usual; if False, call optimizer.base_step() (then zero_grad()). step(closure), "
            "fastsam.train_step and sub_step() do this themselves.")


def closure_step(sam, closure: Callable, perturbs: Callable[[], bool]):
    """``step(closure)`` for a method that decides per step whether to perturb.

    The ascent gradient comes from the closure or from ``.grad`` as SAM's closure
    convention says; then ``perturbs()`` decides. A SAM step runs the closure again at
    w + eps; a plain step runs the base step on the clean gradient.
    """
    closure = torch.enable_grad()(closure)
    loss = None
    if sam._closure_ascent() is closure_protocol.Ascent.FROM_CLOSURE:
        sam.zero_grad(set_to_none=True)
        loss = closure()
    if perturbs():
        sam.first_step(zero_grad=True)
        try:
            closure()
        except BaseException:
            sam.abort()
            raise
        sam.second_step()
    else:
        sam._descent_ready = True
        sam.base_step()
    sam._closure.consumed(sam._params())
    return loss
