"""Hugging Face ``accelerate``: SAM-family steps in an ``Accelerator`` loop.

::

    accelerator = Accelerator(gradient_accumulation_steps=4, mixed_precision="bf16")
    optimizer = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for x, y in loader:
        with accelerator.accumulate(model):
            out = sam_sub_steps(accelerator, model, optimizer, x, y, F.cross_entropy, micro_batch=64)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()        # only on the cycle's last batch: SAM.step() finishes the step
            scheduler.step()
            optimizer.zero_grad()

:func:`sam_sub_steps` runs ``SAM.sub_step`` on each sub-batch of ``micro_batch`` examples
(fastsam/passes.py) with ``accelerator.backward`` (loss scaling by the accumulation
steps, the fp16 GradScaler) and, under DDP, ``accelerator.no_sync(model)`` for every pass
but the optimizer step's final descent backward, which synchronises; on the cycle's last
batch (``accelerator.sync_gradients``) the step's gradients are then in ``.grad`` for
clipping and ``optimizer.step()``. With the GradScaler (fp16) a sub-batch whose ascent
gradients are inf/nan makes the scaler skip the whole step, as in ``fastsam.train_step``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from fastsam import distributed, training
from fastsam.integrations import _common
from fastsam.passes import Pass

__all__ = ["sam_sub_steps"]


def sam_sub_steps(accelerator, model: nn.Module, optimizer, inputs, targets: Tensor,
                  loss_fn: Callable[[Any, Tensor], Tensor], *,
                  ascent_loss: Optional[Callable[[Any, Tensor], Tensor]] = None,
                  micro_batch: Optional[int] = None, freeze_bn: bool = True) -> _common.SubStepsOutput:
    """The SAM passes of one batch, inside ``with accelerator.accumulate(model):``.

    ``inputs``, ``targets``, ``loss_fn``, ``ascent_loss``, ``micro_batch`` and
    ``freeze_bn`` mean what they mean in ``fastsam.train_step``. Returns the batch's mean
    loss at the clean weights and at the perturbed ones (detached).
    """
    sam = _common.require_sam(optimizer, "sam_sub_steps")
    if sam.randsam and ascent_loss is not None:
        raise ValueError("ascent_loss has no effect with randsam=True (the ascent direction is noise)")
    ddp = distributed.is_ddp(model)
    scaler = accelerator.scaler

    def make_passes(piece) -> _common.Passes:
        x, y = piece

        def compute(kind: Pass):
            outputs = training._call(model, x)
            loss = loss_fn(outputs, y)
            objective = ascent_loss(outputs, y) if (kind is Pass.ASCENT and ascent_loss is not None) else loss
            return loss, objective

        return _common.Passes(model, compute, accelerator.backward,
                              no_sync=(lambda: accelerator.no_sync(model)) if ddp else None, freeze_bn=freeze_bn)

    pieces = _common.split_batch((inputs, targets), micro_batch)
    # accelerator.backward divides every loss by the accumulation steps itself
    across_calls = accelerator.gradient_accumulation_steps > 1
    accumulate = len(pieces) > 1 or across_calls or (ddp and not sam.descent_is_linear())
    done = _common.run_sub_steps(sam, pieces, make_passes, accumulate=accumulate,
                                 sync_last=accelerator.sync_gradients, ddp=ddp, skip_nonfinite=scaler is not None)
    if accelerator.sync_gradients:
        _common.load_and_average(sam, model, done.synced)
    return done
