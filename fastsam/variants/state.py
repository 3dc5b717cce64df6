"""Per-parameter state of a variant (LookSAM's g_v, Friendly SAM's EMA), outside the step plan.

The step plan's buckets (fastsam/plan.py) are rebuilt when the parameters change
(requires_grad switched, add_param_group, ...), and their buffers with them; a method's
state must survive that. :class:`ParamTensors` keeps one tensor per parameter, keyed by the
parameter, shaped like its local data (its shard under FSDP). Tensors first needed together
for a bucket are views of one flat allocation, so that a data-parallel caller can average
a bucket's state with one collective. Checkpoints hold them per parameter index
(fastsam/checkpoint.py); loaded values are copied into fresh allocations on first use.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsam import distributed
from fastsam.plan import Bucket, _is_dense

_CACHE_LIMIT = 64  # bucket -> list entries kept (transient buckets of a step with missing gradients come and go)


class ParamTensors:
    """One state tensor per parameter, called ``name`` in checkpoints."""

    def __init__(self, name: str):
        self.name = name
        self._tensors: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (param, state)
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}  # loaded from a checkpoint, not yet allocated
        self._lists: dict[int, tuple[Bucket, list, Optional[Tensor]]] = {}  # id(bucket) -> (bucket, tensors, flat)
        self._ready: set[int] = set()  # ids of the parameters whose state holds a value (not just zeros)

    def __len__(self) -> int:
        return len(self._ready)

    def clear(self) -> None:
        self._tensors.clear()
        self._pending.clear()
        self._lists.clear()
        self._ready.clear()

    def unready(self, params: list) -> list:
        """The parameters of ``params`` whose state was never written (or loaded)."""
        return [p for p in params if id(p) not in self._ready]

    def mark_ready(self, params: list) -> None:
        self._ready.update(id(p) for p in params)

    def for_bucket(self, bucket: Bucket) -> list[Tensor]:
        """The state tensors of the bucket's parameters (zeros where none existed yet)."""
        cached = self._lists.get(id(bucket))
        if cached is not None and cached[0] is bucket:
            return cached[1]
        missing = [p for p in bucket.params if id(p) not in self._tensors]
        flat = None
        if missing:
            flat = self._allocate(missing)
            if len(missing) != len(bucket.params):
                flat = None
        tensors = [self._tensors[id(p)][1] for p in bucket.params]
        if len(self._lists) >= _CACHE_LIMIT:
            self._lists.clear()
        self._lists[id(bucket)] = (bucket, tensors, flat)
        return tensors

    def collective(self, bucket: Bucket) -> list[Tensor]:
        """What a data-parallel caller averages for this bucket: one flat tensor where the state
        was allocated as one, else the tensors themselves."""
        tensors = self.for_bucket(bucket)
        flat = self._lists[id(bucket)][2]
        return [flat] if flat is not None else list(tensors)

    def _allocate(self, params: list) -> Tensor:
        locals_ = [distributed.local(p) for p in params]
        flat = torch.zeros(sum(t.numel() for t in locals_), dtype=locals_[0].dtype, device=locals_[0].device)
        offset = 0
        for p, t in zip(params, locals_):
            view = flat.narrow(0, offset, t.numel())
            view = view.as_strided(t.shape, t.stride()) if _is_dense(t) else view.view(t.shape)
            offset += t.numel()
            loaded = self._pending.pop(id(p), None)
            if loaded is not None:
                view.copy_(loaded[1])
            self._tensors[id(p)] = (p, view)
        return flat

    def state(self, params: list) -> dict:
        """{index of the parameter in ``params``: state tensor} for the parameters that have one."""
        out = {}
        for i, p in enumerate(params):
            entry = self._pending.get(id(p)) or self._tensors.get(id(p))
            if entry is not None and id(p) in self._ready:
                out[i] = entry[1]
        return out

    def load(self, params: list, values: dict) -> None:
        """Replace the state by ``values`` ({parameter index: tensor}), checking the shapes."""
        self.clear()
        for i, value in values.items():
            if not (0 <= int(i) < len(params)):
                raise ValueError(f"the checkpoint has {self.name!r} state for parameter {i}, but there are "
                                 f"{len(params)} parameters")
            p = params[int(i)]
            if tuple(value.shape) != tuple(distributed.local(p).shape):
                raise ValueError(f"the checkpoint's {self.name!r} state of parameter {i} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(distributed.local(p).shape)}")
            self._pending[id(p)] = (p, value)
            self._ready.add(id(p))


def pack(stores: list, params: list) -> dict:
    """{parameter index: {store name: tensor}} of several stores (SAM._per_param_state)."""
    out: dict = {}
    for store in stores:
        for i, tensor in store.state(params).items():
            out.setdefault(i, {})[store.name] = tensor
    return out


def unpack(stores: list, params: list, per_param: dict) -> dict:
    """Load each store's entries of a checkpoint's per-parameter state; returns what no store claimed."""
    names = {store.name for store in stores}
    for store in stores:
        store.load(params, {i: values[store.name] for i, values in per_param.items() if store.name in values})
    rest = {i: {k: v for k, v in values.items() if k not in names} for i, values in per_param.items()}
    return {i: values for i, values in rest.items() if values}
