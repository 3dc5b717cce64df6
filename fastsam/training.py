"""train_step: one complete optimizer step with SAM-family perturbation sub-batches.

docs/ALGORITHMS.md §5: the batch is split into sub-batches of ``micro_batch`` examples; each
gets its own ascent pass, perturbation, descent pass at w + eps and exact restore, and its
descent gradient is accumulated (weighted by its share of the batch). Under
DistributedDataParallel every pass runs without gradient synchronisation (each replica
perturbs on its own data) and the accumulated gradients are all-reduced once. Then
clipping, if asked, and one base-optimizer step. BatchNorm running statistics come from
the unperturbed passes only.
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
    ``perturbed_loss``: training loss at the perturbed weights (None without SAM, or
    when a GradScaler skipped the step before any perturbed pass).
    ``stepped``: whether the base optimizer stepped (False while accumulating with
    ``step=False``; with a GradScaler, False when this call skipped its step on inf/nan).
    """

    loss: Tensor
    outputs: Any
    perturbed_loss: Optional[Tensor]
    stepped: bool = True


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


def _positive_int(name: str, value, alternative: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{alternative}; got {value!r}")
    return value


def _sub_batch_sizes(batch_size: int, micro_batch: Optional[int]) -> list[int]:
    if micro_batch is None:
        return [batch_size]
    _positive_int("micro_batch", micro_batch, " or None (whole batch)")
    full, rest = divmod(batch_size, micro_batch)
    return [micro_batch] * full + ([rest] if rest else [])


def _detached_outputs(outputs: list):
    if all(isinstance(o, Tensor) for o in outputs):
        return torch.cat([o.detach() for o in outputs]) if len(outputs) > 1 else outputs[0].detach()
    return outputs


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


@torch.no_grad()
def _all_reduce_mean_grads(model: nn.parallel.DistributedDataParallel, params: list) -> None:
    """Average .grad over the DDP process group: one all-reduce per dtype of a flat buffer."""
    group = model.process_group
    world = torch.distributed.get_world_size(group)
    for p in params:  # every rank must contribute the same tensors
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=group)
        flat.div_(world)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def _autocast_context(model: nn.Module, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=dtype)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs, targets: Tensor,
               loss_fn: Callable[[Any, Tensor], Tensor], *,
               ascent_loss: Optional[Callable[[Any, Tensor], Tensor]] = None,
               micro_batch: Optional[int] = None, max_grad_norm: Optional[float] = None,
               freeze_bn: bool = True, scaler: Optional["torch.amp.GradScaler"] = None,
               autocast: Optional[torch.dtype] = None, accumulation_steps: int = 1,
               step: bool = True) -> StepOutput:
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
    share of the batch (a last, smaller sub-batch is allowed).

    Mixed precision: ``autocast`` (e.g. ``torch.bfloat16``) runs the forward passes under
    ``torch.autocast``; with a ``torch.amp.GradScaler`` in ``scaler`` (fp16) losses are
    scaled, a sub-batch whose ascent gradients are inf/nan skips its perturbation and the
    whole step (weights untouched), inf/nan descent gradients make the scaler skip the base
    step, and ``scaler.update()`` runs as usual at every step.

    Gradient accumulation over several calls: pass ``accumulation_steps=k`` to every call
    and ``step=False`` to all but the k-th; every call's gradients are weighted by 1/k.

    If anything raises, the weights are restored to their unperturbed values and the
    accumulated gradients dropped.
    """
    accumulation_steps = _positive_int("accumulation_steps", accumulation_steps)
    if max_grad_norm is not None and not (float(max_grad_norm) > 0.0):
        raise ValueError(f"max_grad_norm must be > 0; got {max_grad_norm!r}")
    sizes = _sub_batch_sizes(int(targets.shape[0]), micro_batch)
    sam = optimizer if isinstance(optimizer, SAM) else None
    if sam is None and ascent_loss is not None:
        raise ValueError("ascent_loss needs a fastsam.SAM optimizer")
    if sam is not None and sam.randsam and ascent_loss is not None:
        raise ValueError("ascent_loss has no effect with randsam=True (the ascent direction is noise)")
    batch_size = sum(sizes)
    sub_inputs, sub_targets = _split(inputs, sizes), _split(targets, sizes)
    # SAM keeps its own accumulator when gradients must outlive one descent pass
    accumulate = len(sizes) > 1 or accumulation_steps > 1
    mid_cycle = getattr(optimizer, "_fastsam_mid_accumulation", False)
    if sam is not None or not mid_cycle:
        optimizer.zero_grad(set_to_none=True)
    no_sync = model.no_sync if _is_ddp(model) else contextlib.nullcontext

    losses, perturbed_losses, outputs = [], [], []
    skipped = False
    try:
        for x, y, size in zip(sub_inputs, sub_targets, sizes):
            weight = size / batch_size / accumulation_steps
            with no_sync():
                if sam is None:
                    with _autocast_context(model, autocast):
                        out = _call(model, x)
                        loss = loss_fn(out, y)
                    _backward(loss * weight, scaler)
                else:
                    out, loss, perturbed = _sam_sub_step(model, sam, x, y, loss_fn, ascent_loss, freeze_bn,
                                                         weight if accumulate else None, scaler, autocast)
                    if perturbed is None:  # the scaler saw inf/nan in the ascent gradients
                        skipped = True
                    else:
                        perturbed_losses.append(perturbed)
            losses.append(loss.detach() * (size / batch_size))
            outputs.append(out)
            if skipped:
                break
        optimizer._fastsam_mid_accumulation = not step and not skipped
        stepped = False
        if skipped:
            # Drop what this step accumulated: .grad holds the inf/nan ascent gradients,
            # so the scaler skips the base step and backs off as usual.
            sam._drop_accumulation()
            _finish(model, optimizer, sam, scaler, max_grad_norm)
        elif step:
            if sam is not None and sam.accumulating:
                sam.load_accumulated_grads()
            stepped = _finish(model, optimizer, sam, scaler, max_grad_norm)
    except BaseException:
        if sam is not None:
            sam._abort()
        optimizer._fastsam_mid_accumulation = False
        optimizer.zero_grad(set_to_none=True)
        raise
    perturbed = None
    if perturbed_losses:
        perturbed = torch.stack([l * (s / batch_size) for l, s in zip(perturbed_losses, sizes)]).sum()
    return StepOutput(loss=torch.stack(losses).sum(), outputs=_detached_outputs(outputs),
                      perturbed_loss=perturbed, stepped=stepped)


def _backward(loss: Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _finish(model, optimizer, sam: Optional[SAM], scaler, max_grad_norm) -> bool:
    """All-reduce (DDP), unscale and clip, then the single base step. Returns whether it stepped."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if _is_ddp(model):
        _all_reduce_mean_grads(model, params)
    base = sam.base_optimizer if sam is not None else optimizer
    if scaler is not None and max_grad_norm is not None:
        scaler.unscale_(base)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    if scaler is not None:
        scale_before = scaler.get_scale()
        sam.base_step(scaler) if sam is not None else scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale() >= scale_before  # the scale backs off exactly when the step was skipped
    sam.base_step() if sam is not None else optimizer.step()
    return True


def _sam_sub_step(model, sam: SAM, x, y, loss_fn, ascent_loss, freeze_bn: bool,
                  accumulate_weight: Optional[float], scaler, autocast):
    """One SAM sub-step; returns (outputs, loss, perturbed_loss), perturbed_loss None if skipped."""
    if sam.randsam:
        with torch.no_grad(), _autocast_context(model, autocast):
            out = _call(model, x)
            loss = loss_fn(out, y)
    else:
        with _autocast_context(model, autocast):
            out = _call(model, x)
            loss = loss_fn(out, y)
            ascent = ascent_loss(out, y) if ascent_loss is not None else loss
        _backward(ascent, scaler)
    if not sam.first_step(zero_grad=False, skip_nonfinite=scaler is not None):
        return out, loss, None  # .grad keeps the inf/nan for the scaler to find
    sam.zero_grad(set_to_none=True)
    with frozen_running_stats(model) if freeze_bn else contextlib.nullcontext():
        with _autocast_context(model, autocast):
            perturbed_loss = loss_fn(_call(model, x), y)
    _backward(perturbed_loss, scaler)
    # weighting after the GSAM combination: d = g_p - alpha g_orth must be formed unweighted
    sam.unperturb(accumulate_weight=accumulate_weight)
    return out, loss, perturbed_loss.detach()
