"""train_step: one complete optimizer step with SAM-family perturbation sub-batches.

docs/ALGORITHMS.md §5: the batch is split into sub-batches of ``micro_batch`` examples;
each gets its own ascent pass, perturbation, descent pass at w + eps and exact restore
(``SAM.sub_step``, driven through this module's pass runner), and its descent gradient is
accumulated, weighted by its share of the batch. Then clipping, if asked, and one base
step. BatchNorm running statistics come from the unperturbed passes only.

Under DistributedDataParallel every ascent pass runs without gradient synchronisation
(each replica perturbs on its own data). The step's last descent backward runs with
synchronisation, after the accumulated gradients are loaded into ``.grad``, so that DDP's
own bucketed, overlapped all-reduce and its communication hooks average the step's
gradient. GSAM cannot be done that way (its combination needs the last descent gradient
on its own, after the backward), so there fastsam averages the combined gradients with one
all-reduce per parameter bucket, and DDP communication hooks do not apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from fastsam import distributed
from fastsam.batchnorm import frozen_running_stats
from fastsam.optimizer import SAM
from fastsam.passes import Pass


@dataclasses.dataclass
class StepOutput:
    """What one train_step returns (all detached).

    ``loss``: training loss at the unperturbed weights, averaged over the batch.
    ``outputs``: the model's outputs of the unperturbed passes, concatenated along dim 0
    when they are tensors (else a list, one per sub-batch).
    ``perturbed_loss``: training loss at the perturbed weights (None without SAM, or
    when a GradScaler skipped every perturbation of the call).
    ``stepped``: whether the base optimizer stepped (False while accumulating with
    ``step=False``; with a GradScaler, False when the step was skipped on inf/nan).
    """

    loss: Tensor
    outputs: Any
    perturbed_loss: Optional[Tensor]
    stepped: bool = True


# -- checking and splitting the batch --------------------------------------------------------

def _leaves(batch, path: str):
    """(path, tensor) for every tensor of a tensor or a (nested) tuple, list or dict of them."""
    if isinstance(batch, Tensor):
        yield path, batch
    elif isinstance(batch, (tuple, list)):
        for i, item in enumerate(batch):
            yield from _leaves(item, f"{path}[{i}]")
    elif isinstance(batch, dict):
        for key, item in batch.items():
            yield from _leaves(item, f"{path}[{key!r}]")
    else:
        raise TypeError(f"{path} must be a tensor or a tuple, list or dict of tensors; got {type(batch).__name__}")


def _batch_size(model: nn.Module, inputs, targets) -> int:
    """The number of examples, after checking that every tensor has it along dim 0."""
    if not isinstance(targets, Tensor) or targets.dim() == 0:
        raise TypeError("targets must be a tensor with the examples along dim 0; got "
                        + (f"a 0-d tensor" if isinstance(targets, Tensor) else type(targets).__name__))
    size = int(targets.shape[0])
    if size == 0:
        raise ValueError("train_step got an empty batch (targets has 0 examples); skip empty batches in the loader")
    for path, t in _leaves(inputs, "inputs"):
        if t.dim() == 0 or t.shape[0] != size:
            found = "a 0-d tensor" if t.dim() == 0 else f"{t.shape[0]} examples (dim 0 of shape {tuple(t.shape)})"
            raise ValueError(f"{path} has {found} but targets has {size}: every input and the targets must hold "
                             "the same examples along dim 0")
    param = next((p for p in model.parameters()), None)
    if param is not None and targets.device != param.device:
        raise ValueError(f"targets are on {targets.device} but the model's parameters on {param.device}; "
                         f"move them there (targets.to({str(param.device)!r}))")
    return size


def _split(batch, sizes: list[int]):
    """Split a tensor, or a tuple/list/dict of tensors, along dim 0 into pieces of ``sizes``."""
    if isinstance(batch, Tensor):
        return list(torch.split(batch, sizes))
    if isinstance(batch, (tuple, list)):
        return [type(batch)(parts) for parts in zip(*(_split(item, sizes) for item in batch))]
    split = {key: _split(value, sizes) for key, value in batch.items()}
    return [{key: split[key][i] for key in batch} for i in range(len(sizes))]


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


def _autocast_context(model: nn.Module, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=dtype)


# -- the pass runner (fastsam/passes.py) of one sub-batch --------------------------------------

def _index(batch, index: Tensor):
    """The examples ``index`` (along dim 0) of a tensor or a (nested) tuple, list or dict of tensors."""
    if isinstance(batch, Tensor):
        return batch.index_select(0, index.to(batch.device))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_index(item, index) for item in batch)
    return {key: _index(value, index) for key, value in batch.items()}


def _default_per_sample_loss(loss_fn):
    def per_sample(outputs, targets):
        try:
            return loss_fn(outputs, targets, reduction="none")
        except TypeError as error:
            raise TypeError(
                "this method needs per-example losses: loss_fn does not take reduction='none' "
                f"({error}); pass train_step(..., per_sample_loss=fn) with fn(outputs, targets) -> one loss per "
                "example") from None
    return per_sample


class _SubBatchPasses:
    """Runs the passes a SAM method asks for on one sub-batch of ``train_step``.

    Besides the protocol's passes it supports data selection (fastsam/passes.py):
    ``per_sample=True`` returns ``(loss, per-example losses)`` (with ``Pass.DESCENT``, a
    forward without gradient at the current weights), and ``subset=`` runs the pass on those
    examples only.
    """

    supports_selection = True

    def __init__(self, model, inputs, targets, loss_fn, ascent_loss, freeze_bn, scaler, autocast,
                 per_sample_loss=None):
        self.model, self.inputs, self.targets = model, inputs, targets
        self.loss_fn, self.ascent_loss, self.freeze_bn = loss_fn, ascent_loss, freeze_bn
        self.scaler, self.autocast = scaler, autocast
        self.per_sample_loss = per_sample_loss or _default_per_sample_loss(loss_fn)
        self.ascent_is_plain = ascent_loss is None  # the ascent backward is the training loss's
        self.outputs = None  # of the unperturbed pass

    def _per_example(self, out, targets) -> Tensor:
        losses = self.per_sample_loss(out, targets)
        if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != targets.shape[0]:
            raise ValueError(f"per-example losses must be a 1-d tensor with one loss per example ({targets.shape[0]}); "
                             f"got {getattr(losses, 'shape', type(losses).__name__)}")
        return losses.detach()

    def __call__(self, kind: Pass, *, scale: float = 1.0, sync: bool = False, subset: Optional[Tensor] = None,
                 per_sample: bool = False):
        model = self.model
        inputs, targets = self.inputs, self.targets
        if subset is not None:
            inputs, targets = _index(inputs, subset), _index(targets, subset)
        if per_sample and kind is Pass.DESCENT:  # forward only, at the perturbed weights, statistics frozen
            frozen = frozen_running_stats(model) if self.freeze_bn else contextlib.nullcontext()
            with torch.no_grad(), frozen, _autocast_context(model, self.autocast):
                out = _call(model, inputs)
                return self.loss_fn(out, targets).detach(), self._per_example(out, targets)
        if kind is Pass.LOSS:
            with torch.no_grad(), _autocast_context(model, self.autocast):
                self.outputs = _call(model, self.inputs)
                return self.loss_fn(self.outputs, self.targets).detach()
        frozen = kind is Pass.DESCENT and self.freeze_bn
        with distributed.no_sync(model, sync), frozen_running_stats(model) if frozen else contextlib.nullcontext():
            with _autocast_context(model, self.autocast):
                out = _call(model, inputs)
                loss = self.loss_fn(out, targets)
                objective = self.ascent_loss(out, targets) if (
                    kind is Pass.ASCENT and self.ascent_loss is not None) else loss
                per_example = self._per_example(out, targets) if per_sample else None
            if scale != 1.0:
                objective = objective * scale
            (self.scaler.scale(objective) if self.scaler is not None else objective).backward()
        if kind is not Pass.DESCENT:
            self.outputs = out
        return (loss.detach(), per_example) if per_sample else loss.detach()


# Calls into an accumulation cycle so far, for plain optimizers (SAM keeps its own accumulator).
_plain_cycle_calls: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs, targets: Tensor,
               loss_fn: Callable[[Any, Tensor], Tensor], *,
               ascent_loss: Optional[Callable[[Any, Tensor], Tensor]] = None,
               micro_batch: Optional[int] = None, max_grad_norm: Optional[float] = None,
               freeze_bn: bool = True, scaler: Optional["torch.amp.GradScaler"] = None,
               autocast: Optional[torch.dtype] = None, accumulation_steps: int = 1,
               step: bool = True, per_sample_loss: Optional[Callable[[Any, Tensor], Tensor]] = None) -> StepOutput:
    """One optimizer step on ``(inputs, targets)``.

    With a :class:`fastsam.SAM` optimizer each sub-batch of ``micro_batch`` examples runs:
    forward -> ascent backward (of ``ascent_loss(outputs, targets)``, e.g.
    :class:`fastsam.OutputBiasForgetting`, else of ``loss_fn``) -> perturb -> forward and
    backward of ``loss_fn`` at w + eps with BatchNorm statistics frozen (``freeze_bn``) ->
    restore -> accumulate. With RandSAM the ascent pass is a forward only. Any other
    optimizer gets plain gradient accumulation over the same sub-batches, so baselines run
    through the same loop. Gradients are clipped to ``max_grad_norm`` (if given) right
    before the single base step.

    ``inputs`` is a tensor or a (nested) tuple, list or dict of tensors (passed to the
    model positionally or by keyword) that hold the same examples along dim 0 as
    ``targets``. ``loss_fn`` must average over its sub-batch; sub-batch results are
    weighted by their share of the batch (a last, smaller sub-batch is allowed).

    Mixed precision: ``autocast`` (e.g. ``torch.bfloat16``) runs the forward passes under
    ``torch.autocast``; with a ``torch.amp.GradScaler`` in ``scaler`` (fp16) losses are
    scaled, and a sub-batch whose ascent gradients are inf/nan is not perturbed and makes
    the scaler skip the whole step (the whole accumulation cycle, on every DDP rank), with
    the scale backed off once; inf/nan descent gradients do the same. ``scaler.update()``
    runs once per step.

    Gradient accumulation over several calls: pass ``accumulation_steps=k`` to every call
    and ``step=False`` to all but the k-th; every call's gradients are weighted by 1/k.

    Methods that select examples (``fastsam.ESAM`` with ``gamma < 1``) need per-example
    losses: ``per_sample_loss(outputs, targets)`` returns one training loss per example (by
    default ``loss_fn(outputs, targets, reduction="none")``, which torch's losses support).

    If anything raises, the weights are restored to their unperturbed values and the
    accumulated gradients dropped.
    """
    accumulation_steps = _positive_int("accumulation_steps", accumulation_steps)
    if max_grad_norm is not None and not (float(max_grad_norm) > 0.0):
        raise ValueError(f"max_grad_norm must be > 0; got {max_grad_norm!r}")
    sam = optimizer if isinstance(optimizer, SAM) else None
    if sam is None and ascent_loss is not None:
        raise ValueError("ascent_loss needs a fastsam.SAM optimizer")
    if sam is not None and sam.randsam and ascent_loss is not None:
        raise ValueError("ascent_loss has no effect with randsam=True (the ascent direction is noise)")
    batch_size = _batch_size(model, inputs, targets)
    sizes = _sub_batch_sizes(batch_size, micro_batch)
    sub_inputs, sub_targets = _split(inputs, sizes), _split(targets, sizes)
    ddp = distributed.is_ddp(model)
    # SAM keeps its own accumulator when gradients must outlive one descent pass; under DDP
    # GSAM always uses it, so that the final average is one collective per bucket.
    accumulate = len(sizes) > 1 or accumulation_steps > 1 or (ddp and sam is not None
                                                               and not sam.descent_is_linear())
    if sam is None and _plain_cycle_calls.get(optimizer, 0) == 0:
        optimizer.zero_grad(set_to_none=True)

    losses, perturbed_losses, outputs = [], [], []
    synced = False
    try:
        for i, (x, y, size) in enumerate(zip(sub_inputs, sub_targets, sizes)):
            weight = size / batch_size / accumulation_steps
            last = step and i == len(sizes) - 1  # the step's final backward
            passes = _SubBatchPasses(model, x, y, loss_fn, ascent_loss, freeze_bn, scaler, autocast, per_sample_loss)
            if sam is None:
                loss = passes(Pass.PLAIN, scale=weight, sync=last)
            else:
                kwargs = dict(weight=weight if accumulate else None, sync=last and ddp,
                              skip_nonfinite=scaler is not None)
                if last and max_grad_norm is None and sam.schedule is None and type(sam).sub_step is SAM.sub_step:
                    # the base step follows at once: it may take the restore (and the
                    # accumulation) over (fused_base_step)
                    result = sam._sam_sub_step(passes, then_base_step=True, **kwargs)
                else:
                    result = sam.sub_step(passes, **kwargs)
                loss, synced = result.loss, result.synced
                if result.perturbed_loss is not None:
                    perturbed_losses.append((result.perturbed_loss, size))
            losses.append(loss * (size / batch_size))
            outputs.append(passes.outputs)
        stepped = False
        if sam is None:
            _plain_cycle_calls[optimizer] = 0 if step else _plain_cycle_calls.get(optimizer, 0) + 1
        if step:
            stepped = _finish(model, optimizer, sam, scaler, max_grad_norm, synced or not ddp)
    except BaseException:
        if sam is not None:
            sam.abort()
        _plain_cycle_calls.pop(optimizer, None)
        optimizer.zero_grad(set_to_none=True)
        raise
    perturbed = None
    if perturbed_losses:
        perturbed = torch.stack([l * (s / batch_size) for l, s in perturbed_losses]).sum()
    return StepOutput(loss=torch.stack(losses).sum(), outputs=_detached_outputs(outputs),
                      perturbed_loss=perturbed, stepped=stepped)


def _finish(model, optimizer, sam: Optional[SAM], scaler, max_grad_norm, synced: bool) -> bool:
    """Load (SAM), average (DDP, where the last backward did not), unscale and clip, then the
    single base step. Returns whether it stepped."""
    flats = sam.load_accumulated_grads() if sam is not None and sam.accumulating else []
    if not synced:
        # GSAM under DDP: the combined gradients live in the accumulator's flat buffers
        distributed.all_reduce_mean_(flats, distributed.ddp_group(model))
    base = sam.base_optimizer if sam is not None else optimizer
    if scaler is not None and max_grad_norm is not None:
        scaler.unscale_(base)
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scale_before = scaler.get_scale()
        sam.base_step(scaler) if sam is not None else scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale() >= scale_before  # the scale backs off exactly when the step was skipped
    sam.base_step() if sam is not None else optimizer.step()
    return True
