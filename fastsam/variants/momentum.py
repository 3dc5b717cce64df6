"""Momentum-SAM (Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", 2024).

The perturbation is against the base optimizer's momentum: ``w~ = w - rho v / ||v||`` with v
the momentum buffer in PyTorch's convention (SGD's ``momentum_buffer``, which includes
weight decay; Adam's ``exp_avg``, not bias-corrected), one global norm. The step's only
forward/backward runs at w~, and its gradient feeds the base step at the clean weights w.
On the first step v does not exist yet (v = 0), so that step is unperturbed.

The authors' code keeps the weights at w~ between steps and moves back before evaluation;
here the weights are clean at every step boundary (perturb at the start of the step, one
pass, exact restore, base step): the same arithmetic, and checkpoints, evaluation and
other code never see perturbed weights. docs/ALGORITHMS.md §9.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastsam import distributed
from fastsam.optimizer import SAM
from fastsam.passes import Pass, SubStepResult
from fastsam.variants import common

# base optimizer class -> (state key of its momentum, how to read the group's momentum coefficient)
MOMENTUM_STATE = (
    (torch.optim.SGD, "momentum_buffer", lambda group: group.get("momentum", 0.0), "momentum"),
    (torch.optim.RMSprop, "momentum_buffer", lambda group: group.get("momentum", 0.0), "momentum"),
    (torch.optim.Adam, "exp_avg", lambda group: group["betas"][0], "betas[0]"),
    (torch.optim.AdamW, "exp_avg", lambda group: group["betas"][0], "betas[0]"),
    (torch.optim.NAdam, "exp_avg", lambda group: group["betas"][0], "betas[0]"),
    (torch.optim.RAdam, "exp_avg", lambda group: group["betas"][0], "betas[0]"),
    (torch.optim.Adamax, "exp_avg", lambda group: group["betas"][0], "betas[0]"),
)


def find_momentum_key(base: Optimizer) -> str:
    """The state key of ``base``'s momentum; a clear error where it has none."""
    for cls, key, coefficient, setting in MOMENTUM_STATE:
        if isinstance(base, cls):
            for i, group in enumerate(base.param_groups):
                if not coefficient(group) > 0.0:
                    raise ValueError(
                        f"MomentumSAM perturbs against the base optimizer's momentum, but {type(base).__name__} has "
                        f"{setting}={coefficient(group)} in param group {i}: give it momentum (e.g. "
                        + ("momentum=0.9)" if setting == "momentum" else "betas=(0.9, 0.999))"))
            return key
    supported = ", ".join(cls.__name__ for cls, *_ in MOMENTUM_STATE)
    raise ValueError(f"MomentumSAM does not know where {type(base).__name__} keeps its momentum (it knows {supported}); "
                     "pass momentum_key='<the key of its momentum tensor in optimizer.state[p]>'")


class MomentumSAM(SAM):
    """Momentum-SAM: SAM's perturbation from the base optimizer's momentum, one pass per step.

    ``MomentumSAM(params, base_optimizer, rho=0.3, momentum_key=None, **options_and_base_kwargs)``.
    The published runs use a larger radius than SAM's (rho = 3 with SGD and with AdamW on
    CIFAR-100 and ImageNet; the authors' class defaults are 0.3 for SGD and 1 for AdamW).
    ``momentum_key`` names the momentum tensor in ``base_optimizer.state[p]`` for optimizers
    other than SGD, RMSprop (both with momentum > 0) and the Adam family.

    The one pass is a ``Pass.PLAIN`` pass at w~: BatchNorm statistics update there (as in the
    authors' code, whose weights stay perturbed), and the reported loss is the loss at w~.
    Two-step loop: ``first_step()`` (perturbs; the gradients present are cleared, they are
    not used), forward/backward, ``second_step()``. ``step(closure)`` calls the closure once, at
    w~, and returns its loss.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.3, *, momentum_key: Optional[str] = None, **kwargs):
        common.refuse("MomentumSAM", kwargs, {
            "schedule": "its perturbation costs no pass, so there is nothing to skip",
            "randsam": "the direction is the momentum",
            "gsam_alpha": "there is no ascent gradient to decompose",
            "gsam_normalize_ascent": "it is a GSAM option"})
        super().__init__(params, base_optimizer, rho, **kwargs)
        common.refuse_group_gsam("MomentumSAM", self.param_groups)
        if momentum_key is not None and not isinstance(momentum_key, str):
            raise TypeError(f"momentum_key must be a str; got {momentum_key!r}")
        self.momentum_key = momentum_key or find_momentum_key(self.base_optimizer)
        self._momentum_total: Optional[Tensor] = None  # ||v||^2 of this step (v changes only in the base step)

    def descent_is_linear(self) -> bool:
        return True  # the one backward is the step's gradient

    def _ascent(self, buckets, active):
        """The buckets with momentum, with rho negated (w - rho v/||v||), the momentum buffers, ||v||^2."""
        state, key = self.base_optimizer.state, self.momentum_key
        kept, directions = [], []
        for b in active:
            buffers = [state[p].get(key) if p in state else None for p in b.params]
            missing = {id(p) for p, v in zip(b.params, buffers) if v is None}
            if len(missing) == len(b.params):
                continue  # no momentum yet (the first step, or parameters that never had a gradient)
            if missing:
                b = b.without(missing)
                buffers = [v for v in buffers if v is not None]
            kept.append(dataclasses.replace(b, rho=-b.rho))
            directions.append([distributed.local(v) for v in buffers])
        if not kept:
            return [], [], None
        if self._momentum_total is None:
            self._momentum_total = self._sumsq(kept, directions, adaptive=True)
        return kept, directions, self._momentum_total

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, skip_nonfinite: bool = False) -> bool:
        """Move to w - rho v/||v|| (exact backup kept); the present gradients are cleared (not used)."""
        self.zero_grad(set_to_none=True)
        return super().first_step(zero_grad=False)

    def sub_step(self, run_pass: Callable, *, weight: Optional[float] = None, sync: bool = False,
                 skip_nonfinite: bool = False) -> SubStepResult:
        """Perturb against the momentum, one PLAIN pass at w~, restore."""
        try:
            self.first_step()
            perturbed = bool(self._perturbed)
            synced = sync and self.descent_is_linear()
            if synced and weight is not None and self.accumulating:
                self.load_accumulated_grads()
            scale = 1.0 if (weight is None or not synced) else float(weight)
            loss = run_pass(Pass.PLAIN, scale=scale, sync=synced)
            self.unperturb(accumulate_weight=None if synced else weight)
            return SubStepResult(loss, loss if perturbed else None, synced=synced)
        except BaseException:
            self.abort()
            raise

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        if closure is None:
            return self._finish_step()
        closure = torch.enable_grad()(closure)
        self.first_step()
        try:
            loss = closure()
        except BaseException:
            self.abort()
            raise
        self.second_step()
        return loss

    def _after_base_step(self) -> None:
        super()._after_base_step()
        self._momentum_total = None

    def _load_extra_state(self, extras: dict) -> None:
        super()._load_extra_state(extras)
        self._momentum_total = None  # the loaded momentum has its own norm
