"""What the integrations share: perturbation sub-batches, a pass runner, the sub-step loop.

Every integration does what ``fastsam.train_step`` does (fastsam/training.py), with the
forward, the loss and the backward of its framework: split the batch into sub-batches of
``micro_batch`` examples, run ``SAM.sub_step`` on each through a pass runner
(fastsam/passes.py), weight each sub-batch's descent gradient by its share of the batch
and of the accumulation cycle, and (under DistributedDataParallel) synchronise once per
optimizer step. The arithmetic is train_step's, in the same order, so that the
integrations' tests can compare against train_step exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from fastsam import distributed, training
from fastsam.batchnorm import frozen_running_stats
from fastsam.optimizer import SAM
from fastsam.passes import Pass


def split_batch(batch, micro_batch: Optional[int]) -> list[tuple[Any, float]]:
    """``[(sub_batch, share)]``: the batch cut along dim 0 into pieces of ``micro_batch``
    examples (the last may be smaller), each with its share of the batch's examples.

    ``batch`` is a tensor or a (nested) tuple, list or dict of tensors that all hold the
    same examples along dim 0. ``micro_batch=None`` keeps the batch whole (any structure).
    """
    if micro_batch is None:
        return [(batch, 1.0)]
    leaves = list(training._leaves(batch, "batch"))
    if not leaves:
        raise ValueError("micro_batch needs a batch with at least one tensor to split")
    path, first = leaves[0]
    if first.dim() == 0:
        raise ValueError(f"{path} is a 0-d tensor: a batch split into sub-batches needs the examples along dim 0")
    size = int(first.shape[0])
    if size == 0:
        raise ValueError("got an empty batch (0 examples); skip empty batches in the loader")
    for other, t in leaves[1:]:
        if t.dim() == 0 or t.shape[0] != size:
            found = "a 0-d tensor" if t.dim() == 0 else f"{t.shape[0]} examples"
            raise ValueError(f"{other} has {found} but {path} has {size}: every tensor of the batch must hold the "
                             "same examples along dim 0 to be split into sub-batches (or use micro_batch=None)")
    sizes = training._sub_batch_sizes(size, micro_batch)
    return [(piece, n / size) for piece, n in zip(training._split(batch, sizes), sizes)]


@contextlib.contextmanager
def autocast_off(device_type: str):
    """Backward outside autocast, as the frameworks' own backward calls run."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


class Passes:
    """A pass runner (fastsam/passes.py) for one sub-batch, made of the framework's parts.

    ``compute(kind)`` runs the forward on the sub-batch and returns ``(loss, objective)``:
    the training loss and the loss to differentiate (the ascent loss for ``Pass.ASCENT``
    where there is one, else the training loss). ``backward(tensor)`` differentiates it
    (through the framework's AMP scaler, if any). ``no_sync()`` is the data-parallel
    context for backwards that must not synchronise (None: not data-parallel).
    """

    def __init__(self, model: nn.Module, compute: Callable[[Pass], tuple[Tensor, Tensor]],
                 backward: Callable[[Tensor], None], no_sync: Optional[Callable[[], Any]] = None,
                 freeze_bn: bool = True):
        self.model, self.compute, self.backward = model, compute, backward
        self.no_sync, self.freeze_bn = no_sync, freeze_bn

    def __call__(self, kind: Pass, *, scale: float = 1.0, sync: bool = False) -> Tensor:
        if kind is Pass.LOSS:
            with torch.no_grad():
                loss, _ = self.compute(kind)
            return loss.detach()
        sync_context = self.no_sync() if (self.no_sync is not None and not sync) else contextlib.nullcontext()
        frozen = kind is Pass.DESCENT and self.freeze_bn
        with sync_context, frozen_running_stats(self.model) if frozen else contextlib.nullcontext():
            loss, objective = self.compute(kind)
            if scale != 1.0:
                objective = objective * scale
            self.backward(objective)
        return loss.detach()


@dataclasses.dataclass
class SubStepsOutput:
    """Losses of one batch's sub-steps (detached, averaged over the batch) and whether the
    last backward synchronised the step's gradients (DDP's own all-reduce)."""

    loss: Tensor
    perturbed_loss: Optional[Tensor]
    synced: bool
    skipped: bool


def run_sub_steps(sam: SAM, pieces: list[tuple[Any, float]], make_passes: Callable[[Any], Passes], *,
                  accumulation_steps: int = 1, accumulate: Optional[bool] = None, sync_last: bool = False,
                  ddp: bool = False, skip_nonfinite: bool = False) -> SubStepsOutput:
    """``SAM.sub_step`` on every piece of :func:`split_batch`, in order (train_step's loop).

    Each piece's descent gradient gets the weight ``share / accumulation_steps``.
    ``accumulate`` (default: train_step's rule) keeps the gradients in SAM's accumulator
    (then ``sam.load_accumulated_grads()``) instead of ``.grad``. ``sync_last`` marks this
    call's last sub-step as the optimizer step's final backward; under ``ddp`` it then
    synchronises if the descent is linear (see ``SAM.sub_step``).
    """
    if accumulate is None:
        accumulate = len(pieces) > 1 or accumulation_steps > 1 or (ddp and not sam.descent_is_linear())
    losses, perturbed, synced, skipped = [], [], False, False
    for i, (piece, share) in enumerate(pieces):
        weight = share / accumulation_steps
        last = sync_last and i == len(pieces) - 1
        result = sam.sub_step(make_passes(piece), weight=weight if accumulate else None, sync=last and ddp,
                              skip_nonfinite=skip_nonfinite)
        losses.append(result.loss * share)
        synced, skipped = result.synced, skipped or result.skipped
        if result.perturbed_loss is not None:
            perturbed.append(result.perturbed_loss * share)
    return SubStepsOutput(torch.stack(losses).sum(), torch.stack(perturbed).sum() if perturbed else None,
                          synced, skipped)


def load_and_average(sam: SAM, model: nn.Module, synced: bool) -> None:
    """Before the base step: accumulated gradients into ``.grad``, averaged over DDP ranks
    where the last backward did not (GSAM: one all-reduce per parameter bucket)."""
    flats = sam.load_accumulated_grads() if sam.accumulating else []
    if distributed.is_ddp(model) and not synced:
        distributed.all_reduce_mean_(flats, distributed.ddp_group(model))


def unwrap_optimizer(optimizer) -> Any:
    """The optimizer inside a framework's wrapper (Lightning's LightningOptimizer,
    accelerate's AcceleratedOptimizer), or the object itself.

    The wrapper is looked through first: a LightningOptimizer is an instance of a dynamic
    subclass of the optimizer it wraps (so isinstance(it, SAM) holds) with a copy of its
    attributes, and must not be mistaken for the optimizer itself.
    """
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def require_sam(optimizer, where: str) -> SAM:
    sam = unwrap_optimizer(optimizer)
    if not isinstance(sam, SAM):
        raise TypeError(f"{where} needs a fastsam.SAM optimizer; got {type(sam).__name__}")
    return sam
