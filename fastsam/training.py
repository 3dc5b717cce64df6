"""train_step: one complete optimizer step with SAM-family perturbation sub-batches.

PAPER.md section 5: the batch is split into sub-batches of ``micro_batch`` examples; each
gets its own ascent pass, perturbation, descent pass at w + eps and exact restore, and its
descent gradient is accumulated (weighted by its share of the batch). One base-optimizer
step follows. BatchNorm running statistics come from the unperturbed passes only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from fastsam.batchnorm import frozen_running_stats
from fastsam.optimizer import SAM


@dataclasses.dataclass
class StepOutput:
    """What one train_step returns (all detached).

    ``loss``: training loss at the unperturbed weights, averaged over the batch.
    ``outputs``: the model's outputs of the unperturbed passes, concatenated along dim 0
    when they are tensors (else a list, one per sub-batch).
    ``perturbed_loss``: training loss at the perturbed weights (None without SAM).
    """

    loss: Tensor
    outputs: Any
    perturbed_loss: Optional[Tensor]


def _split(batch, sizes: list[int]):
    """Split a tensor, or a tuple/list/dict of tensors, along dim 0 into pieces of ``sizes``."""
    if isinstance(batch, Tensor):
        return list(torch.split(batch, sizes))
    if isinstance(batch, (tuple, list)):
        return [type(batch)(parts) for parts in zip(*(_split(item, sizes) for item in batch))]
    if isinstance(batch, dict):
        split = {key: _split(value, sizes) for key, value in batch.items()}
        return [{key: split[key][i] for key in batch} for i in range(len(sizes))]
    raise TypeError(f"inputs must be a tensor or a tuple, list or dict of tensors; got {type(batch).__name__}")


def _call(model: nn.Module, inputs):
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _sub_batch_sizes(batch_size: int, micro_batch: Optional[int]) -> list[int]:
    if micro_batch is None:
        return [batch_size]
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive int or None (whole batch); got {micro_batch!r}")
    full, rest = divmod(batch_size, micro_batch)
    return [micro_batch] * full + ([rest] if rest else [])


def _detached_outputs(outputs: list):
    if all(isinstance(o, Tensor) for o in outputs):
        return torch.cat([o.detach() for o in outputs]) if len(outputs) > 1 else outputs[0].detach()
    return outputs


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs, targets: Tensor,
               loss_fn: Callable[[Any, Tensor], Tensor], *,
               ascent_loss: Optional[Callable[[Any, Tensor], Tensor]] = None,
               micro_batch: Optional[int] = None, max_grad_norm: Optional[float] = None,
               freeze_bn: bool = True) -> StepOutput:
    """One optimizer step on ``(inputs, targets)``.

    With a :class:`fastsam.SAM` optimizer each sub-batch of ``micro_batch`` examples runs:
    forward -> ascent backward (of ``ascent_loss(outputs, targets)``, e.g.
    :class:`fastsam.OutputBiasForgetting`, else of ``loss_fn``) -> perturb -> forward and
    backward of ``loss_fn`` at w + eps with BatchNorm statistics frozen (``freeze_bn``) ->
    restore -> accumulate. With RandSAM the ascent pass is a forward only. Any other
    optimizer gets plain gradient accumulation over the same sub-batches, so baselines run
    through the same loop. Gradients are clipped to ``max_grad_norm`` (if given) right
    before the single base step.

    ``loss_fn`` must average over its sub-batch; sub-batch results are weighted by their
    share of the batch (a last, smaller sub-batch is allowed). If anything raises, the
    weights are restored to their unperturbed values and the gradients cleared.
    """
    sizes = _sub_batch_sizes(int(targets.shape[0]), micro_batch)
    sam = optimizer if isinstance(optimizer, SAM) else None
    if sam is None and ascent_loss is not None:
        raise ValueError("ascent_loss needs a fastsam.SAM optimizer")
    if sam is not None and sam.randsam and ascent_loss is not None:
        raise ValueError("ascent_loss has no effect with randsam=True (the ascent direction is noise)")
    batch_size = sum(sizes)
    sub_inputs, sub_targets = _split(inputs, sizes), _split(targets, sizes)

    optimizer.zero_grad(set_to_none=True)
    losses, perturbed_losses, outputs = [], [], []
    try:
        for x, y, size in zip(sub_inputs, sub_targets, sizes):
            weight = size / batch_size
            if sam is None:
                out = _call(model, x)
                loss = loss_fn(out, y)
                (loss * weight).backward()
            else:
                out, loss = _sam_sub_step(model, sam, x, y, loss_fn, ascent_loss, freeze_bn,
                                          accumulate_weight=weight if len(sizes) > 1 else None,
                                          perturbed_losses=perturbed_losses)
            losses.append(loss.detach() * weight)
            outputs.append(out)
        if sam is not None and len(sizes) > 1:
            sam.load_accumulated_grads()
        if max_grad_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if sam is not None:
            sam.base_step()
        else:
            optimizer.step()
    except BaseException:
        if sam is not None:
            sam._abort()
        optimizer.zero_grad(set_to_none=True)
        raise
    perturbed = None
    if perturbed_losses:
        perturbed = torch.stack([l * (s / batch_size) for l, s in zip(perturbed_losses, sizes)]).sum()
    return StepOutput(loss=torch.stack(losses).sum(), outputs=_detached_outputs(outputs),
                      perturbed_loss=perturbed)


def _sam_sub_step(model, sam: SAM, x, y, loss_fn, ascent_loss, freeze_bn: bool,
                  accumulate_weight: Optional[float], perturbed_losses: list):
    if sam.randsam:
        with torch.no_grad():
            out = _call(model, x)
            loss = loss_fn(out, y)
    else:
        out = _call(model, x)
        loss = loss_fn(out, y)
        (ascent_loss(out, y) if ascent_loss is not None else loss).backward()
    sam.first_step(zero_grad=True)
    with frozen_running_stats(model) if freeze_bn else contextlib.nullcontext():
        perturbed_loss = loss_fn(_call(model, x), y)
    perturbed_loss.backward()
    perturbed_losses.append(perturbed_loss.detach())
    sam.unperturb(accumulate_weight=accumulate_weight)
    return out, loss
