"""Descent gradients summed over the sub-steps (and calls) of one optimizer step.

Each bucket of the step plan (fastsam/plan.py) accumulates into views of one flat buffer,
so that loading the sum into ``.grad`` is a pointer assignment per parameter and a
data-parallel all-reduce can cover a whole bucket in one collective. A parameter's first
contribution overwrites its buffer (``init=True``: no zero-fill pass), later ones add. A
parameter without a gradient in some sub-step (an unused branch, an expert no example was
routed to) simply contributes nothing there; one that never had a gradient keeps
``.grad = None`` after loading, so the base optimizer leaves it alone as torch.optim does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from fastsam import distributed
from fastsam.ops import compiled
from fastsam.plan import Bucket, MissingGrad


@dataclasses.dataclass
class _Entry:
    bucket: Bucket
    done: Optional[list] = None  # per parameter: holds a contribution; None: all do


class Accumulator:
    """The running sum, per bucket."""

    def __init__(self):
        self._entries: dict[int, _Entry] = {}

    @property
    def active(self) -> bool:
        return bool(self._entries)

    def add(self, bucket: Bucket, weight: float) -> None:
        """``accum += weight * grad`` for the bucket's parameters that have a gradient now."""
        accum = bucket.flat_buffer("accum")
        entry = self._entries.get(id(bucket))
        if entry is None or entry.done is None:  # the usual case: one call for the whole bucket
            try:
                bucket.backend.accumulate_(accum, bucket.grads(), weight, init=entry is None)
                if entry is None:
                    self._entries[id(bucket)] = _Entry(bucket)
                return
            except MissingGrad:  # raised before any work is done
                pass
        present = [i for i, p in enumerate(bucket.params) if p.grad is not None]
        by_index = {i: distributed.local(bucket.params[i].grad) for i in present}
        if entry is None:
            entry = self._entries[id(bucket)] = _Entry(bucket, [False] * len(bucket.params))
        elif entry.done is None:
            entry.done = [True] * len(bucket.params)
        for init in (True, False):  # first contributions overwrite, later ones add
            chosen = [i for i in present if entry.done[i] != init]
            if chosen:
                bucket.backend.accumulate_([accum[i] for i in chosen], [by_index[i] for i in chosen], weight,
                                           init=init)
        for i in present:
            entry.done[i] = True
        if all(entry.done):
            entry.done = None

    def whole_bucket_init(self, bucket: Bucket) -> Optional[bool]:
        """For an op that adds the whole bucket's contribution in one call (the fused unperturb
        chain): its ``init`` flag, or None when the bucket's parameters are at different stages."""
        entry = self._entries.get(id(bucket))
        if entry is None:
            return True
        return False if entry.done is None else None

    def added_whole(self, bucket: Bucket) -> None:
        """Record that such an op added the whole bucket's contribution."""
        self._entries.setdefault(id(bucket), _Entry(bucket))

    def load(self) -> list[Tensor]:
        """Move the sums into ``.grad``; returns the flat buffers now holding them (one per bucket)."""
        flats = []
        for entry in self._entries.values():
            bucket = entry.bucket
            accum = bucket.flat_buffer("accum")
            if entry.done is None and not bucket.sharded:
                compiled.set_grads(bucket.params, accum)
            else:
                for i, p in enumerate(bucket.params):
                    if entry.done is None or entry.done[i]:
                        p.grad = distributed.like_param(p, accum[i])
                    else:
                        accum[i].zero_()  # keeps the flat buffer finite for a collective over it
                        p.grad = None
            flats.extend(bucket.buffers["accum.flat"])
        self._entries.clear()
        return flats

    def drop(self) -> None:
        self._entries.clear()


@torch.no_grad()
def expose_nonfinite_sums(buckets: list[Bucket]) -> None:
    """Make GradScaler see inf/nan in the accumulated sums of a fused last sub-batch.

    The scaler finds infs in ``.grad``, which then holds only the last sub-batch's gradient
    while the earlier ones live in the accumulator (the fused step adds them in its sweep).
    Where a bucket's sum is not finite, one element of one of its gradients becomes inf, on
    the device without a host read, so the scaler skips the step and backs off exactly as it
    would have on the summed gradient. Costs one read of the sums (an inf-norm, exact: no
    overflow of finite values, and nan propagates).
    """
    for bucket in buckets:
        grad = next((p.grad for p in bucket.params if p.grad is not None and p.grad.numel() > 0), None)
        if grad is None:
            continue
        (flat,) = bucket.buffers["accum.flat"]
        finite = torch.isfinite(torch.linalg.vector_norm(flat, float("inf")))
        element = grad[(0,) * grad.dim()]
        element.copy_(torch.where(finite, element, torch.full_like(element, float("inf"))))
