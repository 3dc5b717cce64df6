"""ESAM (Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for Improved
Training of Neural Networks", ICLR 2022).

* Stochastic weight perturbation (SWP): each parameter tensor is perturbed with probability
  beta, drawn anew for every perturbation; the norm is over the kept tensors and the radius
  is rho / beta: ``eps = (rho / beta) g_kept / ||g_kept||``, 0 for the others. Per tensor and
  rescaled as in the authors' code (their paper writes the mask element-wise). Their code
  also skips the masked tensors' weight gradients in the ascent backward by switching
  ``requires_grad``; fastsam computes the full ascent gradient (switching requires_grad
  every step is invisible to neither DDP nor the step plan), so SWP saves bookkeeping only.
* Sharpness-sensitive data selection (SDS): after perturbing, a forward pass without
  gradient at w + eps gives each example's loss increase ``s_i = l_i(w + eps) - l_i(w)``; the
  descent forward/backward runs on the ``floor(gamma n)`` examples (at least one) with the
  largest s_i only. It needs per-example losses, so it runs in ``sub_step`` with a pass runner
  that provides them (``fastsam.train_step`` does: its ``per_sample_loss`` argument, by default
  ``loss_fn(outputs, targets, reduction="none")``).

beta = gamma = 1 is SAM. docs/ALGORITHMS.md §9.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from fastsam.optimizer import SAM
from fastsam.passes import Pass, SubStepResult
from fastsam.variants import common


def select_examples(clean: Tensor, perturbed: Tensor, gamma: float) -> Tensor:
    """Indices (ascending) of the ``max(1, floor(gamma n))`` examples whose loss rose most under the perturbation."""
    if clean.shape != perturbed.shape or clean.dim() != 1:
        raise ValueError(f"per-example losses must be 1-d and of one shape; got {tuple(clean.shape)} and "
                         f"{tuple(perturbed.shape)}")
    n = clean.numel()
    k = max(1, min(n, int(math.floor(gamma * n))))
    rise = perturbed.detach().float() - clean.detach().float()
    return torch.topk(rise, k, sorted=False).indices.sort().values


class ESAM(SAM):
    """ESAM: SAM with stochastic weight perturbation (``beta``) and sharpness-sensitive data selection (``gamma``).

    ``ESAM(params, base_optimizer, rho=0.05, beta=0.6, gamma=0.5, generator=None, **options_and_base_kwargs)``.
    ``generator``: the CPU ``torch.Generator`` of the weight masks (drawn on the host: no
    device synchronisation); by default one seeded with ``torch.initial_seed()``. Its state is
    saved in checkpoints. With ``gamma < 1`` the data selection runs in ``sub_step``
    (``fastsam.train_step`` and runners that provide per-example losses); ``step(closure)``
    and ``first_step()`` then refuse, since they cannot select data: use ``gamma=1`` there
    (and :func:`select_examples` in your own loop). GSAM, RandSAM and ``schedule`` are refused.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, beta: float = 0.6, gamma: float = 0.5,
                 generator: Optional[torch.Generator] = None, **kwargs):
        common.refuse("ESAM", kwargs, {
            "schedule": "it already reduces the work of every SAM step",
            "randsam": "data selection and the weight mask act on the gradient direction",
            "gsam_alpha": "the combination with GSAM is not defined by either paper",
            "gsam_normalize_ascent": "it is a GSAM option"})
        self.beta = common.check_real("ESAM beta", beta, low=0.0, high=1.0, low_open=True)
        self.gamma = common.check_real("ESAM gamma", gamma, low=0.0, high=1.0, low_open=True)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError("ESAM(generator=...) needs a CPU torch.Generator (the masks are drawn on the host)")
        super().__init__(params, base_optimizer, rho, **kwargs)
        common.refuse_group_gsam("ESAM", self.param_groups)
        self.mask_generator = generator
        self._selecting = False  # inside sub_step's data selection

    # -- stochastic weight perturbation --

    def _ascent(self, buckets, active):
        if self.beta < 1.0 and active:
            params = [p for b in active for p in b.params]
            keep = (torch.rand(len(params), generator=self.mask_generator) < self.beta).tolist()
            dropped = {id(p) for p, k in zip(params, keep) if not k}
            masked = []
            for b in active:
                b.buffer("backup")  # allocated once on the plan's bucket; the masked copies take slices of it
                b = b.without(dropped)  # a copy: the plan's bucket keeps its rho
                if b.params:
                    b.rho = b.rho / self.beta
                    masked.append(b)
            active = masked
        return super()._ascent(buckets, active)

    # -- sharpness-sensitive data selection --

    def _refuse_without_selection(self) -> None:
        if self.gamma < 1.0 and not self._selecting:
            raise RuntimeError(
                f"ESAM(gamma={self.gamma}) selects the examples of the perturbed pass from per-example losses, which "
                "first_step()/step(closure) cannot see. Use fastsam.train_step (or sub_step with a pass runner that "
                "provides per-example losses), or construct ESAM with gamma=1 and select examples yourself "
                "(fastsam.variants.esam.select_examples).")

    def first_step(self, zero_grad: bool = False, skip_nonfinite: bool = False) -> bool:
        self._refuse_without_selection()
        return super().first_step(zero_grad=zero_grad, skip_nonfinite=skip_nonfinite)

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        if closure is not None:
            self._refuse_without_selection()
        return super().step(closure)

    def sub_step(self, run_pass: Callable, *, weight: Optional[float] = None, sync: bool = False,
                 skip_nonfinite: bool = False) -> SubStepResult:
        if self.gamma >= 1.0:
            return self._sam_sub_step(run_pass, weight=weight, sync=sync, skip_nonfinite=skip_nonfinite)
        if not getattr(run_pass, "supports_selection", False):
            raise TypeError(
                f"ESAM(gamma={self.gamma}) needs per-example losses and a descent pass on a subset of the examples; "
                f"this pass runner ({type(run_pass).__name__}) does not provide them (see fastsam/passes.py: "
                "supports_selection). Use fastsam.train_step, or gamma=1.")
        self.zero_grad(set_to_none=True)
        self._selecting = True
        try:
            loss, clean = run_pass(Pass.ASCENT, per_sample=True)
            perturbed = self.first_step(zero_grad=True, skip_nonfinite=skip_nonfinite)
            synced = sync and self.descent_is_linear()
            if synced and weight is not None and self.accumulating:
                self.load_accumulated_grads()
            scale = 1.0 if (weight is None or not synced) else float(weight)
            subset = None
            if perturbed:
                _, after = run_pass(Pass.DESCENT, per_sample=True)  # forward only, at w + eps
                subset = select_examples(clean, after, self.gamma)
            else:
                self.zero_grad(set_to_none=True)
                scale = math.inf  # as in SAM.sub_step: the scaler sees inf and skips the whole step
            perturbed_loss = run_pass(Pass.DESCENT, scale=scale, sync=synced, subset=subset)
            if perturbed:
                self.unperturb(accumulate_weight=None if synced else weight)
            elif weight is not None and not synced:
                for bucket in self._buckets():
                    self._accumulator.add(bucket, float(weight))
                self.zero_grad(set_to_none=True)
            return SubStepResult(loss, perturbed_loss if perturbed else None, skipped=not perturbed, synced=synced)
        except BaseException:
            self.abort()
            raise
        finally:
            self._selecting = False

    # -- checkpoints --

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "esam": {"mask_generator_state": self.mask_generator.get_state()}}

    def _load_extra_state(self, extras: dict) -> None:
        super()._load_extra_state(extras)
        state = extras.get("esam")
        if state is not None:
            self.mask_generator.set_state(state["mask_generator_state"])
