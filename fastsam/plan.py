"""The step plan: which parameters each op call covers, kept from step to step.

``SAM`` groups its parameters into buckets of one param group, device, dtype, ASAM
exponent pair and shard group; one call of an op (fastsam.ops) covers a whole bucket, so
the number of calls does not grow with the number of parameter tensors. The plan is built
once and reused while nothing it depends on changes. Checking that costs a few Python
operations per param group plus one pass over the parameters in C++ (``fastsam._C``'s
``_param_signature``: requires_grad, dtypes, devices and sizes),
so a step walks no parameter list in Python. Gradients are read at every op call, so
ones replaced between steps (new ``.grad`` tensors, ``set_to_none``) are picked up, and
so are parameters added with ``add_param_group``, ``requires_grad`` switched, and changed
dtypes, devices or sizes; nothing is served stale.

The compiled backends read gradients through a ``fastsam._C.GradsOf`` view of the
parameters (their ``.grad`` read in C++ at each call); the other backends get lists.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from fastsam import distributed, ops
from fastsam.ops import MissingGrad, compiled  # noqa: F401  (MissingGrad: raised by Bucket.grads users)

# adaptive option -> (a, b) exponents of T = |w| + eta in eps = rho * T^a g / ||T^b g||
ADAPTIVE_EXPONENTS = {
    False: (0, 0),
    True: (2, 1),  # ASAM as published (Kwon et al.)
    "before_norm": (1, 1),
    "after_norm": (1, 0),
}


def adaptive_exponents(adaptive) -> tuple[int, int]:
    for key, exponents in ADAPTIVE_EXPONENTS.items():
        if type(adaptive) is type(key) and adaptive == key:
            return exponents
    raise ValueError(
        f"adaptive must be False, True (ASAM as published), 'before_norm' or 'after_norm'; got {adaptive!r}"
    )




@dataclasses.dataclass
class Bucket:
    """Parameters that one op call covers: one param group, device, dtype, (a, b) and shard group."""

    params: list
    group_index: int
    backend: ops.Backend
    a: int
    b: int
    eta: float
    alpha: float
    shard_group: Optional[object] = None
    sharded: bool = False  # DTensor parameters: kernels see their local shards
    rho: float = 0.0  # refreshed at every step (rho schedules)
    buffers: dict = dataclasses.field(default_factory=dict)  # name -> list of scratch tensors
    _grads_view: Optional[object] = None

    def bind(self) -> "Bucket":
        """Attach the compiled backends' in-place view of the gradients (once the parameters are final)."""
        if self.backend.reads_grads_in_place and not self.sharded:
            self._grads_view = compiled.grads_view(self.params)
        return self

    def tensors(self) -> list[Tensor]:
        return [p.to_local() for p in self.params] if self.sharded else self.params

    def grads(self):
        """The parameters' gradients as the backend reads them (local shards under FSDP).

        A list, or for the compiled backends a view that they read in C++ when called; a
        missing gradient raises MissingGrad (from the list here, from C++ there).
        """
        if self._grads_view is not None:
            return self._grads_view
        return self.grad_list()

    def grad_list(self) -> list[Tensor]:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise MissingGrad(f"{sum(g is None for g in grads)} parameter(s) of the bucket have no gradient")
        return [g.to_local() for g in grads] if self.sharded else grads

    def buffer(self, name: str) -> list[Tensor]:
        """Scratch tensors (one per parameter, shaped like its local data), allocated on first use."""
        buffers = self.buffers.get(name)
        if buffers is None:
            buffers = self.buffers[name] = [torch.empty_like(distributed.local(p), memory_format=torch.preserve_format)
                                            for p in self.params]
        return buffers

    def flat_buffer(self, name: str) -> list[Tensor]:
        """Like ``buffer``, but the tensors are views of one flat allocation (one collective can cover them)."""
        buffers = self.buffers.get(name)
        if buffers is None:
            locals_ = [distributed.local(p) for p in self.params]
            flat = torch.empty(sum(t.numel() for t in locals_), dtype=locals_[0].dtype, device=locals_[0].device)
            buffers, offset = [], 0
            for t in locals_:
                view = flat.narrow(0, offset, t.numel())
                # keep a dense parameter's memory layout (e.g. channels_last), so kernels walk both flat
                buffers.append(view.as_strided(t.shape, t.stride()) if _is_dense(t) else view.view(t.shape))
                offset += t.numel()
            self.buffers[name] = buffers
            self.buffers[name + ".flat"] = [flat]
        return buffers

    def without(self, missing: set) -> "Bucket":
        """This bucket restricted to the parameters whose id is not in ``missing``, sharing their buffers."""
        keep = [i for i, p in enumerate(self.params) if id(p) not in missing]
        buffers = {name: [tensors[i] for i in keep] for name, tensors in self.buffers.items()
                   if not name.endswith(".flat")}
        return dataclasses.replace(self, params=[self.params[i] for i in keep], buffers=buffers,
                                   _grads_view=None).bind()


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers one gap-free range of memory (contiguous or a permutation of it):
    ``empty_like`` keeps exactly such strides (checked on the meta device, nothing allocated)."""
    return t.is_contiguous() or torch.empty_like(t, device="meta").stride() == t.stride()


def _group_key(groups: list) -> tuple:
    return tuple((id(g), id(g["params"]), len(g["params"]), g["adaptive"], g["adaptive_scope"], g["eta"],
                  g["gsam_alpha"]) for g in groups)


class StepPlan:
    """The buckets of the current step, rebuilt only when something they depend on changed.

    A bucket holds every parameter of its kind that requires a gradient, whether or not it
    has one at the moment; ops that need gradients raise MissingGrad when some are
    absent, and the optimizer then works on the parameters that have one (``with_grads``).
    """

    def __init__(self, groups: Callable[[], list], backend_for: Callable):
        self._groups = groups
        self._backend_for = backend_for
        self._group_key = None
        self._params: list = []
        self._signature = None
        self._buckets: list[Bucket] = []
        self.rebuilds = 0  # how often the buckets were built (tests check that nothing is rebuilt per step)

    def invalidate(self) -> None:
        self._group_key = None

    def params(self) -> list:
        """Every parameter of every group, in order (cached while the groups are unchanged)."""
        groups = self._groups()
        key = _group_key(groups)
        if key != self._group_key:
            self._params = [p for g in groups for p in g["params"]]
            self._signature = None
            self._group_key = key
        return self._params

    def buckets(self, rho_of: Callable[[dict], float]) -> list[Bucket]:
        """Every bucket of this step, each with its current rho (``rho_of(group)``)."""
        params = self.params()
        signature = compiled.param_signature(params)
        groups = self._groups()
        if signature != self._signature:
            self._buckets = self._build(groups)
            self._signature = signature
            self.rebuilds += 1
        for bucket in self._buckets:
            bucket.rho = rho_of(groups[bucket.group_index])
        return self._buckets

    def _build(self, groups: list) -> list[Bucket]:
        buckets: dict[tuple, Bucket] = {}
        devices = set()
        for index, group in enumerate(groups):
            a_adaptive, b_adaptive = adaptive_exponents(group["adaptive"])
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                _check_param(p)
                adaptive = group["adaptive_scope"] == "all" or p.dim() >= 2
                a, b = (a_adaptive, b_adaptive) if adaptive else (0, 0)
                shard = distributed.shard_group(p)
                sharded = distributed.is_dtensor(p)
                key = (index, p.device, p.dtype, a, b, id(shard), sharded)
                if key not in buckets:
                    buckets[key] = Bucket([], index, self._backend_for(p.device, p.dtype), a, b,
                                          float(group["eta"]), float(group["gsam_alpha"]), shard, sharded)
                buckets[key].params.append(p)
                devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                f"fastsam.SAM needs all parameters on one device (the norm is global); found {sorted(map(str, devices))}")
        return [bucket.bind() for bucket in buckets.values()]


def _check_param(p: Tensor) -> None:
    if p.is_complex():
        raise TypeError("fastsam.SAM does not support complex parameters; view them as real "
                        "(torch.view_as_real) or leave them out of the optimizer")
    if p.grad is not None and p.grad.is_sparse:
        raise TypeError("fastsam.SAM does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                        "use dense gradients")


def with_grads(buckets: list[Bucket]) -> list[Bucket]:
    """``buckets`` restricted to parameters that have a gradient now (the slow path of a rare case)."""
    missing = {id(p) for b in buckets for p in b.params if p.grad is None}
    if not missing:
        return buckets
    live = [b.without(missing) for b in buckets]
    return [b for b in live if b.params]


def global_sum(buckets: list[Bucket], parts: list[Tensor]) -> Tensor:
    """Add per-bucket partial sums (all-reducing sums over shards first)."""
    return distributed.global_sum([b.shard_group for b in buckets], parts)
