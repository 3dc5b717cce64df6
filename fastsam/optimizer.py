"""fastsam.SAM: the SAM-family optimizer (SAM, ASAM, GSAM, RandSAM; OBF via the ascent loss).

One SAM sub-step (docs/ALGORITHMS.md §§1-5) is: global norm of the ascent direction ->
perturb with an exact backup -> (descent backward by the caller) -> restore -> GSAM
combination -> optional accumulation. The bookkeeping runs through a backend of the ops
contract (fastsam.ops) on lists of tensors grouped into buckets of one device, dtype and
setting, so the number of launches does not grow with the number of parameter tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastsam import ops
from fastsam.schedules import RHO_SCHEDULES, lr_proportional_rho

try:  # FSDP2 parameters are DTensors; the kernels work on their local shards
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None

logger = logging.getLogger("fastsam")

# adaptive option -> (a, b) exponents of T = |w| + eta in eps = rho * T^a g / ||T^b g||
ADAPTIVE_EXPONENTS = {
    False: (0, 0),
    True: (2, 1),  # ASAM as published (Kwon et al.)
    "before_norm": (1, 1),
    "after_norm": (1, 0),
}
ADAPTIVE_SCOPES = ("all", "matrices")

# Keys SAM adds to every param group (settable per group).
GROUP_KEYS = ("rho", "adaptive", "eta", "adaptive_scope", "gsam_alpha", "rho_schedule",
              "rho_min", "lr_max", "lr_min")


def _adaptive_exponents(adaptive) -> tuple[int, int]:
    for key, exponents in ADAPTIVE_EXPONENTS.items():
        if type(adaptive) is type(key) and adaptive == key:
            return exponents
    raise ValueError(
        f"adaptive must be False, True (ASAM as published), 'before_norm' or 'after_norm'; got {adaptive!r}"
    )


def _check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0; got {value}")
    return float(value)


def _check_group(group: dict) -> None:
    """Validate SAM's settings of one param group; raises with the group's bad key."""
    _check_nonnegative("rho", group["rho"])
    _check_nonnegative("eta", group["eta"])
    _check_nonnegative("gsam_alpha", group["gsam_alpha"])
    _adaptive_exponents(group["adaptive"])
    if group["adaptive_scope"] not in ADAPTIVE_SCOPES:
        raise ValueError(f"adaptive_scope must be one of {ADAPTIVE_SCOPES}; got {group['adaptive_scope']!r}")
    if group["rho_schedule"] not in RHO_SCHEDULES:
        raise ValueError(f"rho_schedule must be one of {RHO_SCHEDULES}; got {group['rho_schedule']!r}")
    if group["rho_schedule"] == "lr":
        _check_nonnegative("rho_min", group["rho_min"])
        lr_max = group["lr_max"] if group["lr_max"] is not None else _lr(group)
        lr_proportional_rho(_lr(group), group["rho"], group["rho_min"], lr_max, group["lr_min"])


def _lr(group: dict) -> float:
    lr = group.get("lr")
    if lr is None:
        raise ValueError("rho_schedule='lr' needs a base optimizer whose param groups have an 'lr'")
    return float(lr)


def _is_dtensor(t) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t: Tensor) -> Tensor:
    """The tensor the kernels work on: the local shard of a DTensor (FSDP), else the tensor."""
    return t.to_local() if _is_dtensor(t) else t


def _like_param(p: Tensor, local: Tensor) -> Tensor:
    """Wrap a local tensor as a gradient for ``p`` (a DTensor again when ``p`` is one)."""
    if not _is_dtensor(p):
        return local
    return _DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _shard_group(p: Tensor):
    """The process group over which ``p``'s local sums must be added (None: ``p`` is whole here)."""
    if not _is_dtensor(p):
        return None
    placements = p.placements
    if any(pl.is_partial() for pl in placements):
        raise ValueError("fastsam.SAM cannot work on parameters with Partial placements")
    shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if not shard_dims:
        return None
    if len(shard_dims) > 1:
        raise NotImplementedError("fastsam.SAM supports parameters sharded over one device-mesh dimension "
                                  f"(FSDP, HSDP); got placements {placements}")
    return p.device_mesh.get_group(mesh_dim=shard_dims[0])


def _global_sum(buckets, parts: list[Tensor]) -> Tensor:
    """Add per-bucket partial sums; sums over shards are all-reduced over their group first."""
    total, sharded = None, {}
    for bucket, part in zip(buckets, parts):
        if bucket.shard_group is None:
            total = part if total is None else total + part
        else:
            key = id(bucket.shard_group)
            group, acc = sharded.get(key, (bucket.shard_group, None))
            sharded[key] = (group, part if acc is None else acc + part)
    for group, part in sharded.values():
        part = part.clone()
        torch.distributed.all_reduce(part, group=group)
        total = part if total is None else total + part.to(total.device)
    return total


@dataclasses.dataclass
class _Bucket:
    """Parameters that share device, dtype, shard group and every per-tensor setting of one SAM sub-step.

    Buckets are built once and cached (see SAM._plan); only rho is refreshed every step.
    """

    params: list
    backend: ops.Backend
    a: int
    b: int
    eta: float
    rho: float
    alpha: float
    group_index: int = 0
    shard_group: Optional[object] = None
    sharded: bool = False  # DTensor parameters: kernels see their local shards
    buffers: dict = dataclasses.field(default_factory=dict)  # name -> list of scratch tensors

    def tensors(self) -> list[Tensor]:
        return [p.to_local() for p in self.params] if self.sharded else self.params

    def grads(self) -> list[Tensor]:
        if self.sharded:
            return [p.grad.to_local() for p in self.params]
        return [p.grad for p in self.params]


class SAM(Optimizer):
    """Sharpness-aware minimisation around any base optimizer, with fused bookkeeping.

    Drop-in for the widely used single-file SAM wrapper::

        optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    ``base_optimizer`` is an optimizer class (built here on the same param groups with
    ``**base_kwargs``) or an optimizer instance (its param groups are adopted; ``params``
    may then be None). Per-group options (pass them in param-group dicts to vary them):

    * ``rho``: perturbation radius (with ``rho_schedule='lr'``: its maximum).
    * ``adaptive``: False (SAM), True (ASAM as published, T^2 g / ||T g||),
      ``'before_norm'`` (T g / ||T g||) or ``'after_norm'`` (T g / ||g||), T = |w| + eta.
    * ``eta``: offset of T; ``adaptive_scope``: ``'all'`` parameters or only
      ``'matrices'`` (ndim >= 2; biases and norm weights get T = 1).
    * ``gsam_alpha``: GSAM's alpha (0 = plain SAM).
    * ``rho_schedule``: ``'constant'`` or ``'lr'`` (GSAM: rho follows the group's lr between
      ``(lr_min, rho_min)`` and ``(lr_max, rho)``; ``lr_max`` defaults to the lr at construction).

    Global options: ``gsam_normalize_ascent`` (GSAM's "normalised backup"), ``randsam``
    (the ascent direction is N(0, I) noise drawn from ``generator``), ``backend``
    ('auto', 'reference', 'foreach', or a compiled backend), ``perturb_eps`` (the
    guard xi = 1e-12 of docs/ALGORITHMS.md; not called ``eps`` so that e.g. AdamW's ``eps`` still
    reaches the base optimizer) and ``check_finite`` (refuse a base step whose gradients
    are inf/nan, at the cost of one host synchronisation per step; a GradScaler
    replaces the check).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive=False, *,
                 eta: float = 0.0, adaptive_scope: str = "all", gsam_alpha: float = 0.0,
                 gsam_normalize_ascent: bool = False, rho_schedule: str = "constant",
                 rho_min: float = 0.0, lr_max: Optional[float] = None, lr_min: float = 0.0,
                 randsam: bool = False, generator: Optional[torch.Generator] = None,
                 backend: str = "auto", perturb_eps: float = 1e-12, check_finite: bool = True,
                 **base_kwargs):
        sam_defaults = dict(rho=rho, adaptive=adaptive, eta=eta, adaptive_scope=adaptive_scope,
                            gsam_alpha=gsam_alpha, rho_schedule=rho_schedule, rho_min=rho_min,
                            lr_max=lr_max, lr_min=lr_min)
        if backend != "auto" and backend not in ops.backend_names():
            raise ValueError(f"unknown fastsam backend {backend!r}; choose 'auto' or one of {ops.backend_names()}")
        _check_nonnegative("perturb_eps", perturb_eps)
        if generator is not None and not randsam:
            raise ValueError("generator is only used with randsam=True")

        self._base: Optional[Optimizer] = None
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is an optimizer instance, so {sorted(base_kwargs)} cannot be applied; "
                    "configure the instance itself or pass its class instead")
            self._check_no_key_clash(base_optimizer.defaults)
            if params is not None and not self._same_params(params, base_optimizer):
                raise ValueError("params must be None or exactly the parameters of the base optimizer instance")
            super().__init__(base_optimizer.param_groups, sam_defaults)
            base = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            super().__init__(params, sam_defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
            self._check_no_key_clash(base.defaults)
        else:
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass or instance; got {base_optimizer!r}")
        self._base = base
        self.defaults = {**base.defaults, **sam_defaults}
        for group in self.param_groups:
            self._finish_group(group)

        self.gsam_normalize_ascent = bool(gsam_normalize_ascent)
        self.randsam = bool(randsam)
        self.generator = generator
        self.backend = backend
        self.perturb_eps = float(perturb_eps)
        self._backends: dict[tuple, ops.Backend] = {}
        for device, dtype in {(p.device, p.dtype) for group in self.param_groups for p in group["params"]}:
            if dtype.is_floating_point:
                self._backend_for(device, dtype)  # an unavailable backend fails here, not mid-training
        self.check_finite = bool(check_finite)
        self._perturbed: Optional[list[_Bucket]] = None
        self._ascent_sumsqs: list[Tensor] = []
        self._plan_key, self._plan_buckets = None, []
        self._reset_accumulation()
        self._stale_grads: list = []

    # -- param groups are the base optimizer's, so LR schedulers on SAM drive the base --

    @property
    def base_optimizer(self) -> Optimizer:
        return self._base

    @property
    def param_groups(self):
        base = self.__dict__.get("_base")
        return base.param_groups if base is not None else self.__dict__["_own_param_groups"]

    @param_groups.setter
    def param_groups(self, groups):
        base = self.__dict__.get("_base")
        if base is not None:
            base.param_groups = groups
        else:
            self.__dict__["_own_param_groups"] = groups

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_base") is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self.defaults.items():
            if key in GROUP_KEYS:
                param_group.setdefault(key, value)
        self._base.add_param_group(param_group)
        self._finish_group(self.param_groups[-1])

    def _finish_group(self, group: dict) -> None:
        if group["rho_schedule"] == "lr" and group["lr_max"] is None:
            group["lr_max"] = _lr(group)
        _check_group(group)

    @staticmethod
    def _check_no_key_clash(base_defaults: dict) -> None:
        clash = sorted(set(base_defaults) & set(GROUP_KEYS))
        if clash:
            raise ValueError(
                f"the base optimizer uses the param-group keys {clash}, which SAM needs for itself; "
                "this base optimizer cannot be wrapped")

    @staticmethod
    def _same_params(params, base: Optimizer) -> bool:
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [p for group in params for p in group["params"]]
        mine = {id(p) for p in params}
        theirs = {id(p) for group in base.param_groups for p in group["params"]}
        return mine == theirs

    # -- the SAM step --

    @property
    def is_perturbed(self) -> bool:
        """True between first_step() and the restore in unperturb()/second_step()."""
        return self._perturbed is not None

    def backend_for(self, device, dtype: torch.dtype = torch.float32) -> str:
        """The name of the backend this optimizer uses for ``dtype`` tensors on ``device``."""
        return self._backend_for(torch.device(device), dtype).name

    def _backend_for(self, device: torch.device, dtype: torch.dtype) -> ops.Backend:
        backend = self._backends.get((device, dtype))
        if backend is None:
            backend = ops.get_backend(self.backend, device, dtype)
            if self.backend == "auto":
                logger.info("fastsam: backend='auto' chose %r for %s tensors on %s", backend.name, dtype, device)
            self._backends[(device, dtype)] = backend
        return backend

    def _plan(self) -> list[_Bucket]:
        """The buckets of this step: rebuilt only when parameters, settings or the set of
        parameters with gradients change (rebuilding every step cost ~40% of a sub-step's
        time on 2000 tiny tensors with the foreach backend, measured on this project's CPU)."""
        groups = self.param_groups
        for group in groups:
            _check_group(group)
        randsam = self.randsam
        key = (tuple([(id(g), g["adaptive"], g["adaptive_scope"], g["eta"], g["gsam_alpha"]) for g in groups]),
               tuple([id(p) for g in groups for p in g["params"]]),
               tuple([p.requires_grad and (randsam or p.grad is not None) for g in groups for p in g["params"]]))
        if key != self._plan_key:
            self._plan_buckets = self._build_buckets()
            self._plan_key = key
        for bucket in self._plan_buckets:
            bucket.rho = self._current_rho(groups[bucket.group_index])
        return self._plan_buckets

    def _build_buckets(self) -> list[_Bucket]:
        """Group the parameters to perturb by device, dtype, per-tensor settings and shard group."""
        buckets: dict[tuple, _Bucket] = {}
        devices = set()
        for index, group in enumerate(self.param_groups):
            a_adaptive, b_adaptive = _adaptive_exponents(group["adaptive"])
            for p in group["params"]:
                if not p.requires_grad or (p.grad is None and not self.randsam):
                    continue
                self._check_param(p)
                adaptive = group["adaptive_scope"] == "all" or p.dim() >= 2
                a, b = (a_adaptive, b_adaptive) if adaptive else (0, 0)
                shard_group = _shard_group(p)
                key = (index, p.device, p.dtype, a, b, id(shard_group), _is_dtensor(p))
                if key not in buckets:
                    buckets[key] = _Bucket([], self._backend_for(p.device, p.dtype), a, b, float(group["eta"]),
                                           0.0, float(group["gsam_alpha"]), index, shard_group, _is_dtensor(p))
                buckets[key].params.append(p)
                devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                f"fastsam.SAM needs all parameters on one device (the norm is global); found {sorted(map(str, devices))}")
        return list(buckets.values())

    def _with_grads(self, buckets: list[_Bucket]) -> list[_Bucket]:
        """``buckets`` restricted to parameters that have a gradient now (usually all of them)."""
        if all(p.grad is not None for b in buckets for p in b.params):
            return buckets
        live = [dataclasses.replace(b, params=[p for p in b.params if p.grad is not None], buffers={})
                for b in buckets]
        return [b for b in live if b.params]

    @staticmethod
    def _check_param(p: Tensor) -> None:
        if p.is_complex():
            raise TypeError("fastsam.SAM does not support complex parameters; view them as real "
                            "(torch.view_as_real) or leave them out of the optimizer")
        if p.grad is not None and p.grad.is_sparse:
            raise TypeError("fastsam.SAM does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                            "use dense gradients")

    @staticmethod
    def _current_rho(group: dict) -> float:
        if group["rho_schedule"] == "lr":
            return lr_proportional_rho(_lr(group), group["rho"], group["rho_min"], group["lr_max"], group["lr_min"])
        return float(group["rho"])

    def _buffers(self, params, name: str) -> list[Tensor]:
        """Per-parameter scratch tensors shaped like the parameter's local data (its shard under FSDP)."""
        out = []
        for p in params:
            like = _local(p)
            state = self.state[p]
            buf = state.get(name)
            if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
                buf = torch.empty_like(like, memory_format=torch.preserve_format)
                state[name] = buf
            out.append(buf)
        return out

    def _bucket_buffers(self, bucket: _Bucket, name: str) -> list[Tensor]:
        buffers = bucket.buffers.get(name)
        if buffers is None:
            buffers = bucket.buffers[name] = self._buffers(bucket.params, name)
        return buffers

    def _directions(self, bucket: _Bucket) -> list[Tensor]:
        if not self.randsam:
            return bucket.grads()
        noise = self._bucket_buffers(bucket, "noise")
        for n in noise:
            n.normal_(generator=self.generator)
        return noise

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, skip_nonfinite: bool = False) -> bool:
        """Perturb the weights to w + eps along the normalised ascent direction, keeping an exact backup.

        The ascent direction is the current gradient (or noise with ``randsam``); the norm
        is global over every parameter of every group (and every shard, under FSDP).
        With ``skip_nonfinite`` (for loops with a GradScaler) a non-finite ascent norm
        leaves weights and gradients untouched and returns False, so that the scaler sees
        the inf and skips its step; this costs one host synchronisation. Returns True when
        the weights were perturbed.
        """
        if self._perturbed is not None:
            raise RuntimeError("first_step() was called twice: the weights are already perturbed; "
                               "call second_step() or unperturb() first")
        buckets = self._plan()
        if not buckets:
            raise RuntimeError("first_step() found no gradient: call loss.backward() before first_step() "
                               "(all parameters have grad=None or requires_grad=False)")
        directions = [self._directions(bucket) for bucket in buckets]
        total = self._sumsq(buckets, directions, adaptive=True)
        if skip_nonfinite and not bool(torch.isfinite(total)):
            return False
        self._ascent_sumsqs.append(total)
        gsam = any(bucket.alpha != 0.0 for bucket in buckets)
        ascent_sumsq = None
        if gsam and self.gsam_normalize_ascent:
            adaptive_norm = any(bucket.b != 0 for bucket in buckets)
            ascent_sumsq = self._sumsq(buckets, directions, adaptive=False) if adaptive_norm else total
        for bucket, direction in zip(buckets, directions):
            bucket.backend.perturb_(
                bucket.tensors(), direction, self._bucket_buffers(bucket, "backup"), total, bucket.rho,
                bucket.a, bucket.b, bucket.eta, self.perturb_eps,
                self._bucket_buffers(bucket, "ascent") if gsam else None, ascent_sumsq)
        self._perturbed = buckets
        if zero_grad:
            self.zero_grad()
        return True

    def _sumsq(self, buckets, directions, adaptive: bool) -> Tensor:
        parts = []
        for bucket, direction in zip(buckets, directions):
            b = bucket.b if adaptive else 0
            parts.append(bucket.backend.sumsq(direction, bucket.tensors() if b else None, b, bucket.eta))
        return _global_sum(buckets, parts)

    @torch.no_grad()
    def unperturb(self, accumulate_weight: Optional[float] = None) -> None:
        """Restore the weights saved by first_step() bit-exactly; with GSAM, combine the gradients.

        With ``accumulate_weight`` the (combined) descent gradients are added, times the
        weight, into SAM's gradient accumulator and the parameters' ``.grad`` are set to
        None; :meth:`load_accumulated_grads` moves the sum into ``.grad``.
        """
        buckets = self._perturbed
        if buckets is None:
            raise RuntimeError("the weights are not perturbed: call first_step() before second_step()/unperturb()")
        self._restore(buckets)
        live = self._with_grads(buckets)
        if any(b.alpha != 0.0 for b in live):
            stats = _global_sum(live, [b.backend.gsam_reduce(self._bucket_buffers(b, "ascent"), b.grads())
                                       for b in live])
            for b in live:
                if b.alpha != 0.0:
                    b.backend.gsam_combine_(b.grads(), self._bucket_buffers(b, "ascent"), stats, b.alpha,
                                            self.perturb_eps)
        if accumulate_weight is not None:
            self._accumulate(live, float(accumulate_weight))

    def _accumulate(self, buckets: list[_Bucket], weight: float) -> None:
        for bucket in buckets:
            # A parameter's first contribution in this round overwrites its buffer
            # (init=True); later ones add. Usually one of the two lists is empty.
            first = [p for p in bucket.params if id(p) not in self._accum_ids]
            later = [p for p in bucket.params if id(p) in self._accum_ids]
            for params, init in ((first, True), (later, False)):
                if params:
                    bucket.backend.accumulate_(self._buffers(params, "accum"), [_local(p.grad) for p in params],
                                               weight, init=init)
            for p in first:
                self._accum_ids.add(id(p))
                self._accum_params.append(p)
            for p in bucket.params:
                p.grad = None

    @torch.no_grad()
    def _restore(self, buckets: list[_Bucket]) -> None:
        for bucket in buckets:
            bucket.backend.restore_(bucket.tensors(), self._bucket_buffers(bucket, "backup"))
        self._perturbed = None

    @torch.no_grad()
    def load_accumulated_grads(self) -> None:
        """Move the gradients accumulated by unperturb(accumulate_weight=...) into ``.grad``."""
        if not self._accum_params:
            raise RuntimeError("no gradients were accumulated: call unperturb(accumulate_weight=...) first")
        for p in self._accum_params:
            p.grad = _like_param(p, self.state[p].pop("accum"))
        self._reset_accumulation()

    def _abort(self) -> None:
        """After a failure mid-step: unperturbed weights, no half-finished accumulation."""
        if self._perturbed is not None:
            self._restore(self._perturbed)
        self._drop_accumulation()
        self._ascent_sumsqs.clear()

    def _drop_accumulation(self) -> None:
        for p in self._accum_params:
            self.state[p].pop("accum", None)
        self._reset_accumulation()

    def _reset_accumulation(self) -> None:
        self._accum_params: list[Tensor] = []
        self._accum_ids: set[int] = set()

    @property
    def accumulating(self) -> bool:
        """True while unperturb(accumulate_weight=...) has gathered gradients not yet loaded."""
        return bool(self._accum_params)

    def base_step(self, scaler=None):
        """Run the base optimizer's step on the current gradients (weights must be unperturbed).

        With a ``torch.amp.GradScaler`` the step goes through ``scaler.step`` (which unscales,
        and skips the step on inf/nan); call ``scaler.update()`` afterwards as usual.
        Without one, and with ``check_finite`` (the default), non-finite gradients in this
        step raise FloatingPointError before the base step, leaving the weights unchanged.
        """
        if self._perturbed is not None:
            raise RuntimeError("the weights are perturbed: call unperturb() before base_step()")
        ascent_sumsqs, self._ascent_sumsqs = self._ascent_sumsqs, []
        if scaler is not None:
            result = scaler.step(self._base)
        else:
            if self.check_finite:
                self._raise_if_nonfinite(ascent_sumsqs)
            result = self._base.step()
        self._remember_grads()
        # LR schedulers attached to SAM watch for SAM.step(); a step through
        # second_step()/train_step() is just as real (torch.optim.lr_scheduler reads this flag).
        self._opt_called = True
        return result

    def _raise_if_nonfinite(self, ascent_sumsqs: list[Tensor]) -> None:
        buckets = self._with_grads(self._plan())
        checks = list(ascent_sumsqs)
        if buckets:
            checks.append(_global_sum(buckets, [b.backend.sumsq(b.grads()) for b in buckets]))
        if checks and not bool(torch.isfinite(torch.stack([c.to(checks[0].device) for c in checks])).all()):
            raise FloatingPointError(
                "fastsam.SAM: a gradient of this step is inf or nan, so the base step was not taken and the "
                "weights are unchanged. Train with a torch.amp.GradScaler (train_step(..., scaler=...) or "
                "base_step(scaler)) to skip such steps, or pass check_finite=False to SAM to let non-finite "
                "values through as torch.optim does (that also saves this check's one host sync per step).")

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights exactly, then run the base optimizer with the current gradients."""
        self.unperturb()
        self.base_step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One whole SAM step. ``closure`` does zero_grad (optional), forward and backward and returns the loss.

        If ``.grad`` holds gradients the caller computed since the last step (the
        single-file SAM wrapper's convention: ``loss.backward(); optimizer.step(closure)``),
        they are the ascent gradients and the closure runs once, at the perturbed weights;
        the return value is then None. Otherwise (torch.optim's convention) the closure
        runs twice and the loss at the unperturbed weights is returned. If the closure
        raises at the perturbed weights, they are restored before the error propagates.
        """
        if closure is None:
            raise RuntimeError("SAM.step() needs a closure that recomputes the loss and gradients; "
                               "or call first_step() and second_step() yourself")
        closure = torch.enable_grad()(closure)
        loss = None
        if self.randsam or not self._has_fresh_grads():
            loss = closure()
        self.first_step(zero_grad=True)
        try:
            closure()
        except BaseException:
            self._abort()
            raise
        self.second_step()
        return loss

    def _remember_grads(self) -> None:
        """Note which .grad tensors (and versions) the base step consumed; see step()."""
        self._stale_grads = [(weakref.ref(p.grad), p.grad._version)
                             for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _has_fresh_grads(self) -> bool:
        """Whether some .grad was written since the last base step (not just left over from it)."""
        stale = {id(ref()): version for ref, version in self._stale_grads if ref() is not None}
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and stale.get(id(g)) != g._version:
                    return True
        return False

    # -- checkpoints --

    def state_dict(self) -> dict:
        """The base optimizer's state (with SAM's per-group settings) and SAM's own RNG state.

        Refused while the weights are perturbed or gradients are being accumulated: a
        checkpoint then would hold perturbed weights or lose the partial sum.
        """
        if self._perturbed is not None:
            raise RuntimeError("state_dict() while the weights are perturbed would save w + eps: "
                               "call it after second_step()/unperturb()")
        if self._accum_params:
            raise RuntimeError("state_dict() while gradients are being accumulated would lose them: "
                               "call it after load_accumulated_grads() and the base step")
        generator_state = self.generator.get_state() if self.generator is not None else None
        return {"base": self._base.state_dict(), "fastsam": {"format": 1, "generator_state": generator_state}}

    def load_state_dict(self, state_dict: dict) -> None:
        if "base" not in state_dict or "fastsam" not in state_dict:
            raise ValueError("not a fastsam.SAM state_dict (expected keys 'base' and 'fastsam')")
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() while the weights are perturbed: call second_step()/unperturb() first")
        self._base.load_state_dict(state_dict["base"])
        generator_state = state_dict["fastsam"].get("generator_state")
        if generator_state is not None:
            if self.generator is None:
                raise ValueError("the checkpoint holds a RandSAM generator state but this SAM has no generator")
            self.generator.set_state(generator_state)
        for group in self.param_groups:
            _check_group(group)
