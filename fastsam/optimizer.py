"""fastsam.SAM: the SAM-family optimizer (SAM, ASAM, GSAM, RandSAM; OBF via the ascent loss).

The path through the code, for one SAM sub-step::

    SAM.first_step / unperturb / base_step    this module: what a step does, in order
      -> StepPlan.buckets()                   fastsam/plan.py: which parameters each op call covers
        -> the ops contract                   fastsam/ops/__init__.py: sumsq, perturb_, restore_, ...
          -> a backend                        reference, foreach, cpp, cuda, triton

A sub-step (docs/ALGORITHMS.md §§1-5): global norm of the ascent direction -> perturb with
an exact backup -> (the descent backward, by the caller) -> restore -> GSAM combination
-> optional accumulation (fastsam/accumulation.py) -> the base optimizer's step.
``sub_step`` runs a whole sub-step through a pass runner (fastsam/passes.py), which is how
``train_step`` and the integrations drive it; ``step(closure)`` runs one through a closure
(fastsam/closure.py). Checkpoints use torch.optim's layout (fastsam/checkpoint.py).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastsam import checkpoint, closure as closure_protocol, fused_step, ops
from fastsam.accumulation import Accumulator, expose_nonfinite_sums
from fastsam.ops import compiled
from fastsam.passes import Pass, SubStepResult
from fastsam.plan import (ADAPTIVE_EXPONENTS, Bucket, MissingGrad, StepPlan, adaptive_exponents,  # noqa: F401
                          global_sum, with_grads)
from fastsam.schedules import RHO_SCHEDULES, lr_proportional_rho
from fastsam.variants import scheduled

logger = logging.getLogger("fastsam")

ADAPTIVE_SCOPES = ("all", "matrices")
ROUNDING_MODES = ("stochastic", "nearest")

# Keys SAM adds to every param group (settable per group).
GROUP_KEYS = ("rho", "adaptive", "eta", "adaptive_scope", "gsam_alpha", "rho_schedule",
              "rho_min", "lr_max", "lr_min")


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
    adaptive_exponents(group["adaptive"])
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


def _mix64(x: int) -> int:
    """splitmix64's finaliser (public domain): independent-looking 64-bit values from counters."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def _current_rho(group: dict) -> float:
    """This step's rho of a group (validating its settings, which a user may have changed)."""
    _check_group(group)
    if group["rho_schedule"] == "lr":
        return lr_proportional_rho(_lr(group), group["rho"], group["rho_min"], group["lr_max"], group["lr_min"])
    return float(group["rho"])


class SAM(Optimizer):
    """Sharpness-aware minimisation around any base optimizer, with fused bookkeeping.

    Drop-in for the widely used single-file SAM wrapper::

        optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    ``base_optimizer`` is an optimizer class (built here on the same param groups with
    ``**base_kwargs``) or an optimizer instance (its param groups are adopted; ``params``
    may then be None). Per-group options (pass them in param-group dicts to vary them):

    * ``rho``: perturbation radius (with ``rho_schedule='lr'``: its maximum). A group whose
      rho is 0 at a step is not perturbed (no backup, no kernel) and its gradients do not
      enter the norm.
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
    guard xi = 1e-12 of docs/ALGORITHMS.md; not called ``eps`` so that e.g. AdamW's ``eps``
    still reaches the base optimizer), ``check_finite`` (refuse a base step whose
    gradients are inf/nan, and warn about zero ascent gradients, at the cost of one host
    synchronisation per step; a GradScaler replaces the check) and ``closure_convention``
    (how ``step(closure)`` finds the ascent gradient: 'auto', 'torch' or 'wrapper'; see
    fastsam/closure.py), ``schedule`` (which steps are SAM steps: ``fastsam.schedules.Every(k)``,
    ``Random(p)`` or ``Adaptive(total_steps)`` (AE-SAM); the others are the base optimizer's
    steps alone; docs/ALGORITHMS.md §9) and ``rounding``: how bf16/fp16 perturbed weights
    are rounded: ``'stochastic'`` (the default: to one of the two neighbours of w + eps,
    unbiased, with a new seed at every perturbation, derived from ``rounding_seed``) or
    ``'nearest'``; see fastsam/ops/rounding.py. Restores are bit-exact either way.
    ``fused_base_step`` (``'auto'``, True, False): take torch.optim's SGD/Adam/AdamW step
    straight from the backup instead of restoring first, with GSAM's combination in the same
    sweep (fastsam/fused_step.py says where and for which options; ``'auto'`` fuses on the
    CPU, where it was measured faster).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive=False, *,
                 eta: float = 0.0, adaptive_scope: str = "all", gsam_alpha: float = 0.0,
                 gsam_normalize_ascent: bool = False, rho_schedule: str = "constant",
                 rho_min: float = 0.0, lr_max: Optional[float] = None, lr_min: float = 0.0,
                 randsam: bool = False, generator: Optional[torch.Generator] = None,
                 backend: str = "auto", perturb_eps: float = 1e-12, check_finite: bool = True,
                 closure_convention: str = "auto", schedule=None, rounding: str = "stochastic",
                 rounding_seed: Optional[int] = None, fused_base_step="auto", **base_kwargs):
        sam_defaults = dict(rho=rho, adaptive=adaptive, eta=eta, adaptive_scope=adaptive_scope,
                            gsam_alpha=gsam_alpha, rho_schedule=rho_schedule, rho_min=rho_min,
                            lr_max=lr_max, lr_min=lr_min)
        if backend != "auto" and backend not in ops.backend_names():
            raise ValueError(f"unknown fastsam backend {backend!r}; choose 'auto' or one of {ops.backend_names()}")
        _check_nonnegative("perturb_eps", perturb_eps)
        if generator is not None and not randsam:
            raise ValueError("generator is only used with randsam=True")
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}; got {rounding!r}")
        if rounding_seed is not None and (isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int)):
            raise TypeError(f"rounding_seed must be an int or None; got {rounding_seed!r}")
        fused_step.check_mode(fused_base_step)
        self._closure = closure_protocol.ClosureProtocol(closure_convention)
        self.schedule = scheduled.check_schedule(schedule)
        self._sam_decision: Optional[bool] = None  # the schedule's decision in effect (fastsam/variants/scheduled.py)

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
        self._fused = fused_step.FusedBaseStep(base, fused_base_step)
        self.defaults = {**base.defaults, **sam_defaults}
        for group in self.param_groups:
            self._finish_group(group)

        self.gsam_normalize_ascent = bool(gsam_normalize_ascent)
        self.randsam = bool(randsam)
        self.generator = generator
        self.backend = backend
        self.perturb_eps = float(perturb_eps)
        self.check_finite = bool(check_finite)
        self.rounding = rounding
        # stochastic rounding: one seed per perturbation and bucket, derived from this one
        # (drawn from torch's global generator unless given, so torch.manual_seed fixes it)
        self._rounding_seed = int(rounding_seed if rounding_seed is not None
                                  else torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())
        self._perturbations = 0
        self._backends: dict[tuple, ops.Backend] = {}
        for device, dtype in {(p.device, p.dtype) for group in self.param_groups for p in group["params"]}:
            if dtype.is_floating_point:
                self._backend_for(device, dtype)  # an unavailable backend fails here, not mid-training
        self._plan = StepPlan(lambda: self.param_groups, self._backend_for)
        self._accumulator = Accumulator()
        self._step_buckets: list[Bucket] = []  # every bucket of the step in progress
        self._perturbed: Optional[list[Bucket]] = None  # the buckets first_step() perturbed
        # perturbed buckets whose restore (and GSAM combination) the next base step does, fused
        # with it: set only right before that base step (second_step, train_step), never left set
        self._pending: Optional[list[Bucket]] = None
        # with _pending, on a step's last sub-batch: (the earlier sub-batches' sum, the last one's
        # weight), which the fused step adds into its direction (d = sum + weight * g)
        self._pending_accumulation: Optional[tuple[Accumulator, float]] = None
        self._ascent_sumsqs: list[Tensor] = []  # of this step's perturbations, for the finite check
        self._descent_ready = False  # unperturb() ran since the last base step
        self.steps_taken = 0  # base steps so far (schedules and variants count with it; in checkpoints)

    # -- param groups and state are the base optimizer's, so LR schedulers and checkpoint
    #    tools that work on SAM see the real ones --

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

    @property
    def state(self):
        base = self.__dict__.get("_base")
        return base.state if base is not None else self.__dict__["_own_state"]

    @state.setter
    def state(self, value):
        base = self.__dict__.get("_base")
        if base is not None:
            base.state = value
        else:
            self.__dict__["_own_state"] = value

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_base") is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self.defaults.items():
            if key in GROUP_KEYS:
                param_group.setdefault(key, value)
        self._base.add_param_group(param_group)
        self._finish_group(self.param_groups[-1])
        for p in self.param_groups[-1]["params"]:
            if p.dtype.is_floating_point:
                self._backend_for(p.device, p.dtype)

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

    def _params(self) -> list:
        return self._plan.params()

    def _buckets(self) -> list[Bucket]:
        """The step plan's buckets, each with this step's rho."""
        return self._plan.buckets(_current_rho)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._settle()  # a deferred restore needs the gradients: it runs first
        if set_to_none:
            compiled.clear_grads(self._params())  # one C++ pass where the extension is built
        else:
            self._base.zero_grad(set_to_none=False)

    # -- the SAM step, in order --

    @property
    def fused_base_step(self):
        """The ``fused_base_step`` setting ('auto', True or False)."""
        return self._fused.mode

    @property
    def is_perturbed(self) -> bool:
        """True between first_step() and the restore in unperturb()/second_step()."""
        return self._perturbed is not None

    @property
    def accumulating(self) -> bool:
        """True while unperturb(accumulate_weight=...) has gathered gradients not yet loaded."""
        return self._accumulator.active

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, skip_nonfinite: bool = False) -> bool:
        """Perturb the weights to w + eps along the normalised ascent direction, keeping an exact backup.

        The ascent direction is the current gradient (or noise with ``randsam``); the norm
        is global over every perturbed parameter of every group (and every shard, under
        FSDP). With ``skip_nonfinite`` (for loops with a GradScaler) a non-finite ascent
        norm leaves weights and gradients untouched and returns False, so that the scaler
        sees the inf and skips its step; this costs one host synchronisation. Returns True
        when the weights were perturbed (or nothing needed perturbing: every rho is 0).
        """
        if self._perturbed is not None:
            raise RuntimeError("first_step() was called twice: the weights are already perturbed; "
                               "call second_step() or unperturb() first")
        self._settle()
        if self.schedule is not None:
            scheduled.check_first_step(self)
            scheduled.consume_sub_step_decision(self)
        buckets = self._plan.buckets(_current_rho)
        if not buckets:
            raise RuntimeError("first_step() found no parameter to perturb: every parameter has "
                               "requires_grad=False")
        active, directions, total = self._ascent(buckets, [b for b in buckets if b.rho > 0.0])
        if skip_nonfinite and total is not None and not bool(torch.isfinite(total)):
            return False
        self._perturb(buckets, active, directions, total)
        if zero_grad:
            self.zero_grad()
        return True

    def _ascent(self, buckets: list[Bucket], active: list[Bucket]) -> tuple[list[Bucket], list, Optional[Tensor]]:
        """(buckets to perturb, their ascent directions, the global sum of squares that normalises them).

        The efficient variants (fastsam/variants/) override this to perturb along another
        direction (Friendly SAM, Momentum-SAM) or a random subset of the tensors (ESAM).
        """
        try:
            directions = [self._direction(b) for b in active]
            total = self._sumsq(active, directions, adaptive=True) if active else None
        except MissingGrad:  # some parameters have no gradient: perturb the others
            if not with_grads(buckets):
                raise RuntimeError("first_step() found no gradient: call loss.backward() before first_step() "
                                   "(all parameters have grad=None or requires_grad=False)") from None
            active = with_grads(active)
            directions = [self._direction(b) for b in active]
            total = self._sumsq(active, directions, adaptive=True) if active else None
        return active, directions, total

    def _direction(self, bucket: Bucket):
        """The ascent direction of a bucket: its gradients, or fresh noise for RandSAM."""
        if not self.randsam:
            return bucket.grads()
        noise = bucket.flat_buffer("noise")
        bucket.buffers["noise.flat"][0].normal_(generator=self.generator)
        return noise

    def _sumsq(self, buckets: list[Bucket], directions: list, adaptive: bool) -> Tensor:
        parts = []
        for bucket, direction in zip(buckets, directions):
            b = bucket.b if adaptive else 0
            parts.append(bucket.backend.sumsq(direction, bucket.tensors() if b else None, b, bucket.eta))
        return global_sum(buckets, parts)

    def _perturb(self, buckets: list[Bucket], active: list[Bucket], directions: list, total) -> None:
        self._step_buckets = buckets
        if total is not None:
            self._ascent_sumsqs.append(total)
        gsam = self._keeps_ascent(active)
        ascent_sumsq = None
        if gsam and self.gsam_normalize_ascent:
            adaptive_norm = any(bucket.b != 0 for bucket in active)
            ascent_sumsq = self._sumsq(active, directions, adaptive=False) if adaptive_norm else total
        for index, (bucket, direction) in enumerate(zip(active, directions)):
            bucket.backend.perturb_(
                bucket.tensors(), direction, bucket.buffer("backup"), total, bucket.rho,
                bucket.a, bucket.b, bucket.eta, self.perturb_eps,
                bucket.buffer("ascent") if gsam else None, ascent_sumsq, seed=self._seed(bucket, index))
        self._perturbations += 1
        self._perturbed = active

    def _seed(self, bucket: Bucket, index: int) -> Optional[Tensor]:
        """This perturbation's stochastic-rounding seed for a bf16/fp16 bucket (None: round to nearest)."""
        if self.rounding != "stochastic" or bucket.params[0].dtype not in (torch.bfloat16, torch.float16):
            return None
        value = _mix64(self._rounding_seed ^ _mix64(self._perturbations ^ _mix64(index)))
        seed = bucket.buffers.get("seed")
        if seed is None:
            seed = bucket.buffers["seed"] = [torch.empty((), dtype=torch.int64, device=bucket.params[0].device)]
        return seed[0].fill_(value - (1 << 64) if value >= 1 << 63 else value)

    def _keeps_ascent(self, active: list[Bucket]) -> bool:
        """Whether perturb_ also writes the ascent direction into ``bucket.buffer("ascent")``
        (GSAM's decomposition; LookSAM's projection overrides this)."""
        return any(bucket.alpha != 0.0 for bucket in active)

    @torch.no_grad()
    def unperturb(self, accumulate_weight: Optional[float] = None) -> None:
        """Restore the weights saved by first_step() bit-exactly; with GSAM, combine the gradients.

        With ``accumulate_weight`` the (combined) descent gradients are added, times the
        weight, into SAM's gradient accumulator and the parameters' ``.grad`` are set to
        None; :meth:`load_accumulated_grads` moves the sum into ``.grad``.
        """
        perturbed = self._perturbed
        if perturbed is None:
            raise RuntimeError("the weights are not perturbed: call first_step() before second_step()/unperturb()")
        if accumulate_weight is not None and type(self)._gsam_combine is SAM._gsam_combine \
                and self._fused.chain_enabled(self._step_buckets) \
                and self._unperturb_accumulating(perturbed, float(accumulate_weight)):
            self._perturbed = None
            self.zero_grad(set_to_none=True)
            self._descent_ready = True
            return
        for bucket in perturbed:
            bucket.backend.restore_(bucket.tensors(), bucket.buffer("backup"))
        self._perturbed = None
        if any(b.alpha != 0.0 for b in perturbed):
            self._gsam_combine(perturbed)
        if accumulate_weight is not None:
            weight = float(accumulate_weight)
            for bucket in self._step_buckets:
                self._accumulator.add(bucket, weight)
            self.zero_grad(set_to_none=True)
        self._descent_ready = True

    def _unperturb_accumulating(self, perturbed: list[Bucket], weight: float) -> bool:
        """unperturb(accumulate_weight=weight) in the fewest sweeps: SAM restore_accumulate_ (1),
        GSAM restore_gsam_reduce then gsam_combine_accumulate_ (2; docs/DESIGN.md §9). False
        (nothing accumulated; restores are idempotent) where the usual path must run instead."""
        acc = self._accumulator
        step_buckets = self._step_buckets
        ids = {id(b) for b in step_buckets}
        if any(id(b) not in ids for b in perturbed):
            return False  # some parameters had no ascent gradient: a restricted bucket
        inits = {id(b): acc.whole_bucket_init(b) for b in step_buckets}
        if any(init is None for init in inits.values()):
            return False
        perturbed_ids = {id(b) for b in perturbed}
        gsam = any(b.alpha != 0.0 for b in perturbed)
        stats = None
        if gsam:
            try:
                parts = [b.backend.restore_gsam_reduce(b.tensors(), b.buffer("backup"), b.buffer("ascent"), b.grads())
                         for b in perturbed]
            except MissingGrad:
                return False
            stats = global_sum(perturbed, parts)
        for b in step_buckets:
            accum, init = b.flat_buffer("accum"), inits[id(b)]
            try:
                if id(b) not in perturbed_ids or (gsam and b.alpha == 0.0):
                    b.backend.accumulate_(accum, b.grads(), weight, init=init)
                elif gsam:
                    b.backend.gsam_combine_accumulate_(accum, b.grads(), b.buffer("ascent"), stats, b.alpha,
                                                       self.perturb_eps, weight, init)
                else:
                    b.backend.restore_accumulate_(b.tensors(), b.buffer("backup"), accum, b.grads(), weight, init)
            except MissingGrad:  # raised before any work: this bucket goes parameter by parameter
                if id(b) in perturbed_ids and not gsam:
                    b.backend.restore_(b.tensors(), b.buffer("backup"))
                acc.add(b, weight)
                continue
            acc.added_whole(b)
        return True

    def _gsam_stats(self, buckets: list[Bucket]) -> tuple[list[Bucket], Optional[Tensor]]:
        """(the perturbed buckets with gradients, GSAM's global reductions over them)."""
        try:
            parts = [b.backend.gsam_reduce(b.buffer("ascent"), b.grads()) for b in buckets]
        except MissingGrad:  # a parameter got no gradient in the descent pass
            buckets = with_grads(buckets)
            parts = [b.backend.gsam_reduce(b.buffer("ascent"), b.grads()) for b in buckets]
        return buckets, (global_sum(buckets, parts) if buckets else None)

    def _gsam_combine(self, buckets: list[Bucket]) -> None:
        """g_p <- g_p - alpha (g - <g, h> h) over the perturbed buckets (one reduction, one combine)."""
        buckets, stats = self._gsam_stats(buckets)
        if not buckets:
            return
        for b in buckets:
            if b.alpha != 0.0:
                b.backend.gsam_combine_(b.grads(), b.buffer("ascent"), stats, b.alpha, self.perturb_eps)

    def descent_is_linear(self) -> bool:
        """Whether the step's gradient is linear in the last descent backward (no GSAM combination).

        Then a data-parallel caller may load the accumulated gradients before the last
        descent backward and let that backward synchronise everything (``sub_step(sync=True)``).
        """
        if self.schedule is not None and self.schedule.needs_gradient:
            return False  # AE-SAM decides after its first backward, which therefore cannot synchronise
        return all(group["gsam_alpha"] == 0.0 or _current_rho(group) == 0.0 for group in self.param_groups)

    @torch.no_grad()
    def load_accumulated_grads(self) -> list[Tensor]:
        """Move the gradients accumulated by unperturb(accumulate_weight=...) into ``.grad``.

        Returns the flat buffers (one per bucket) whose views the gradients now are, so
        that a data-parallel caller can average them with one collective each.
        """
        if not self._accumulator.active:
            raise RuntimeError("no gradients were accumulated: call unperturb(accumulate_weight=...) first")
        return self._accumulator.load()

    def abort(self) -> None:
        """After a failure mid-step: weights restored (if perturbed), partial accumulations dropped."""
        for perturbed in (self._perturbed, self._pending):
            if perturbed is not None:
                with torch.no_grad():
                    for bucket in perturbed:
                        bucket.backend.restore_(bucket.tensors(), bucket.buffer("backup"))
        self._perturbed = self._pending = self._pending_accumulation = None
        self._accumulator.drop()
        self._ascent_sumsqs.clear()
        self._descent_ready = False

    def base_step(self, scaler=None):
        """Run the base optimizer's step on the current gradients (weights must be unperturbed).

        With a ``torch.amp.GradScaler`` the step goes through ``scaler.step`` (which unscales,
        and skips the step on inf/nan); call ``scaler.update()`` afterwards as usual.
        Without one, and with ``check_finite`` (the default), non-finite gradients in this
        step raise FloatingPointError before the base step, leaving the weights unchanged.
        """
        if self._perturbed is not None:
            raise RuntimeError("the weights are perturbed: call unperturb() before base_step()")
        pending, self._pending = self._pending, None
        accumulation, self._pending_accumulation = self._pending_accumulation, None
        try:
            self._before_base_step(scaler)
            ascent_sumsqs, self._ascent_sumsqs = self._ascent_sumsqs, []
            self._descent_ready = False
            if pending is not None:
                result = self._fused_base_step(pending, scaler, ascent_sumsqs, accumulation)
            elif scaler is not None:
                result = scaler.step(self._base)
            else:
                if self.check_finite:
                    self._check_finite(ascent_sumsqs)
                result = self._base.step()
        except BaseException:
            if pending is not None:  # the weights are still at w + eps: put them back
                self._pending = pending
                self.abort()
            raise
        # LR schedulers attached to SAM watch for SAM.step(); a step through
        # second_step()/train_step() is just as real (torch.optim.lr_scheduler reads this flag).
        self._opt_called = True
        self._after_base_step()
        return result

    def _fused_base_step(self, pending: list[Bucket], scaler, ascent_sumsqs: list[Tensor],
                         accumulation: Optional[tuple[Accumulator, float]]):
        """The base step taken from the backups of the ``pending`` buckets (fastsam/fused_step.py);
        with ``accumulation``, of the earlier sub-batches' sum plus the weighted last gradient."""
        base = self._base
        buckets = self._step_buckets  # first_step's plan: nothing between it and here changes the parameters
        sources = {id(p): backup for b in pending for p, backup in zip(b.params, b.buffer("backup"))}
        gsam = None
        if any(b.alpha != 0.0 for b in pending):
            combined, stats = self._gsam_stats(pending)
            if stats is not None:
                gsam = (stats, {id(p): (ascent, b.alpha) for b in combined if b.alpha != 0.0
                                for p, ascent in zip(b.params, b.buffer("ascent"))})
        accums, weight = {}, 1.0
        if accumulation is not None:
            weight = accumulation[1]
            accums = {id(p): a for b in buckets for p, a in zip(b.params, b.flat_buffer("accum"))}

        @torch.no_grad()
        def fused():
            self._fused.run(buckets, sources, gsam, getattr(base, "grad_scale", None), getattr(base, "found_inf", None),
                            accums, weight)

        if scaler is not None:
            if accumulation is not None:
                expose_nonfinite_sums(buckets)
            result = fused_step.step_through_scaler(scaler, base, fused)
        else:
            if self.check_finite:
                self._check_finite(ascent_sumsqs, accumulated=accumulation is not None)
            result = fused()
        if accumulation is not None:
            accumulation[0].drop()
            # the step's summed gradient never existed anywhere (that is the sweep saved), and the
            # last sub-batch's gradient alone is not the step's: .grad is None, not misleading
            self.zero_grad(set_to_none=True)
        base._opt_called = True  # for an LR scheduler attached to the base optimizer
        return result

    def _can_defer(self) -> bool:
        """Whether the next base step may take the restore over (fused), as this class does it."""
        cls = type(self)
        if any(getattr(cls, name) is not getattr(SAM, name)
               for name in ("unperturb", "_gsam_combine", "_before_base_step", "base_step", "_fused_base_step")):
            return False  # a subclass changes what happens between the descent pass and the step
        return self._fused.usable(self._step_buckets)  # called after first_step(), which set them

    def _accumulation_can_defer(self) -> bool:
        """Whether the last sub-batch's restore and accumulation can go into the fused step too:
        every parameter of the step has a gradient now and a sum from the earlier sub-batches
        in its bucket's accumulator (a parameter that missed a sub-batch, or a restricted
        perturbation, takes the unfused path)."""
        acc = self._accumulator
        ids = {id(b) for b in self._step_buckets}
        return (all(id(b) in ids for b in self._perturbed)
                and all(acc.whole_bucket_init(b) is False and all(p.grad is not None for p in b.params)
                        for b in self._step_buckets))

    def _defer_unperturb(self, accumulate_weight: Optional[float] = None) -> None:
        """unperturb() whose restore, GSAM combination (and with ``accumulate_weight`` the
        accumulation) the base step that follows does."""
        self._pending, self._perturbed = self._perturbed, None
        if accumulate_weight is not None:
            # out of the accumulator, so that nothing loads the partial sum into .grad
            self._pending_accumulation = (self._accumulator, float(accumulate_weight))
            self._accumulator = Accumulator()
        self._descent_ready = True

    def _settle(self) -> None:
        """Do a deferred restore (GSAM combination, accumulation) now."""
        pending, self._pending = self._pending, None
        accumulation, self._pending_accumulation = self._pending_accumulation, None
        if pending is None:
            return
        with torch.no_grad():
            for bucket in pending:
                bucket.backend.restore_(bucket.tensors(), bucket.buffer("backup"))
            if any(b.alpha != 0.0 for b in pending):
                self._gsam_combine(pending)
            if accumulation is not None:
                self._accumulator, weight = accumulation
                for bucket in self._step_buckets:
                    self._accumulator.add(bucket, weight)
                self.zero_grad(set_to_none=True)

    def _before_base_step(self, scaler) -> None:
        """Called by base_step() before anything else (the variants finish their gradient here)."""

    def _after_base_step(self) -> None:
        """Called by base_step() after the base optimizer stepped: one more optimizer step taken."""
        self.steps_taken += 1
        self._sam_decision = None

    def _check_finite(self, ascent_sumsqs: list[Tensor], accumulated: bool = False) -> None:
        """One host synchronisation: inf/nan anywhere in this step raises; zero ascent norms warn.
        ``accumulated``: the gradients are the last sub-batch's, the rest is in the accumulator."""
        buckets = self._plan.buckets(_current_rho)
        checks = list(ascent_sumsqs)
        if accumulated:
            checks.append(global_sum(buckets, [b.backend.sumsq(b.buffers["accum.flat"]) for b in buckets]))
        try:
            parts = [b.backend.sumsq(b.grads()) for b in buckets]
        except MissingGrad:
            buckets = with_grads(buckets)
            parts = [b.backend.sumsq(b.grads()) for b in buckets]
        if buckets:
            checks.append(global_sum(buckets, parts))
        if not checks:
            return
        values = torch.stack([c.to(checks[0].device) for c in checks]).tolist()
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(
                "fastsam.SAM: a gradient of this step is inf or nan, so the base step was not taken and the "
                "weights are unchanged. Train with a torch.amp.GradScaler (train_step(..., scaler=...) or "
                "base_step(scaler)) to skip such steps, or pass check_finite=False to SAM to let non-finite "
                "values through as torch.optim does (that also saves this check's one host sync per step).")
        message = closure_protocol.zero_norm_warning(sum(v == 0.0 for v in values[:len(ascent_sumsqs)]),
                                                     len(ascent_sumsqs))
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights exactly, then run the base optimizer with the current gradients
        (one fused sweep where ``fused_base_step`` allows: the step reads the backup)."""
        if self._perturbed is not None and self._can_defer():
            self._defer_unperturb()
        else:
            self.unperturb()
        self.base_step()
        if zero_grad:
            self.zero_grad()

    # -- whole steps: through a pass runner, a closure, or finishing prepared passes --

    def sub_step(self, run_pass: Callable, *, weight: Optional[float] = None, sync: bool = False,
                 skip_nonfinite: bool = False) -> SubStepResult:
        """One sub-step of this optimizer's method on one (sub-)batch: here a SAM sub-step
        (:meth:`_sam_sub_step`); the efficient variants (fastsam/variants/) override it."""
        if self.schedule is not None:
            return scheduled.sub_step(self, run_pass, weight=weight, sync=sync, skip_nonfinite=skip_nonfinite)
        return self._sam_sub_step(run_pass, weight=weight, sync=sync, skip_nonfinite=skip_nonfinite)

    def perturbs_this_step(self) -> bool:
        """Whether this step (with ``Adaptive``: this sub-step) is a SAM step.

        True without a schedule. With one, the decision is taken now if it was not yet
        (``Adaptive`` reads ``||g||^2`` of the present gradients: one host synchronisation)
        and kept until it is used. Two-step loops with a schedule ask this after the first
        backward and call ``base_step()`` instead of ``first_step()`` when it is False.
        """
        return scheduled.decision(self) if self.schedule is not None else True

    def _sam_sub_step(self, run_pass: Callable, *, weight: Optional[float] = None, sync: bool = False,
                      skip_nonfinite: bool = False, then_base_step: bool = False) -> SubStepResult:
        """One SAM sub-step on one (sub-)batch, through ``run_pass`` (fastsam/passes.py).

        Clears ``.grad``, runs the ascent pass (a forward only with RandSAM), perturbs,
        runs the descent pass at w + eps and restores. With ``weight`` the descent gradient
        is accumulated with that weight (then :meth:`load_accumulated_grads`), else it is
        left in ``.grad``. ``sync`` marks the step's last sub-step under data parallelism:
        if the gradient is linear in the descent backward (:meth:`descent_is_linear`), the
        accumulated gradients are loaded first and that backward runs with ``sync=True``,
        so DDP's own bucketed all-reduce (and its communication hooks) averages
        everything; the result then says ``synced``. ``skip_nonfinite`` (with a
        GradScaler): inf/nan ascent gradients are not used to perturb (``skipped``); the
        descent pass then runs at the clean weights with its loss scaled by inf, so the
        step's gradient is non-finite wherever it ends (in ``.grad``, in the accumulator
        across later sub-steps and calls, through DDP's all-reduce to every rank) and the
        scaler skips the whole step and backs off once. Every rank thus runs the same
        passes and collectives. If a pass raises, the weights are restored and partial
        accumulations dropped before the error propagates. ``then_base_step`` (fastsam's own
        train_step): the caller calls ``base_step()`` next, with nothing in between that reads
        the weights or the gradients, so the restore (and with ``weight`` the accumulation,
        unless ``sync`` asks for an average first) may be left to a fused base step.
        """
        self.zero_grad(set_to_none=True)
        try:
            loss = run_pass(Pass.LOSS if self.randsam else Pass.ASCENT)
            perturbed = self.first_step(zero_grad=True, skip_nonfinite=skip_nonfinite)
            synced = sync and self.descent_is_linear()
            if synced and weight is not None and self.accumulating:
                self.load_accumulated_grads()
            scale = 1.0 if (weight is None or not synced) else float(weight)
            if not perturbed:
                self.zero_grad(set_to_none=True)
                scale = math.inf  # poisons this step's gradient on purpose (see above)
            perturbed_loss = run_pass(Pass.DESCENT, scale=scale, sync=synced)
            if perturbed:
                accumulate_weight = None if synced else weight
                if then_base_step and self._can_defer() and (
                        accumulate_weight is None or (not sync and self._accumulation_can_defer())):
                    # the caller's base_step() follows at once and restores (and accumulates), fused;
                    # not when a data-parallel caller averages the accumulator first (sync)
                    self._defer_unperturb(accumulate_weight)
                else:
                    self.unperturb(accumulate_weight=accumulate_weight)
            elif weight is not None and not synced:
                for bucket in self._plan.buckets(_current_rho):
                    self._accumulator.add(bucket, float(weight))
                self.zero_grad(set_to_none=True)
            return SubStepResult(loss, perturbed_loss if perturbed else None, skipped=not perturbed, synced=synced)
        except BaseException:
            self.abort()
            raise

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One whole SAM step.

        With a ``closure`` (which does forward and backward and returns the loss; zeroing
        gradients inside it is optional), the ascent gradient comes from the closure or
        from ``.grad`` as ``closure_convention`` says (fastsam/closure.py): torch.optim's
        convention calls the closure at w and at w + eps and returns the first loss; the
        single-file SAM wrapper's (``loss.backward(); optimizer.step(closure)``) calls it
        once, at w + eps, and returns None. If the closure raises at the perturbed weights,
        they are restored before the error propagates.

        Without a closure, ``step()`` finishes a step whose SAM passes already ran
        (``first_step()``, the descent backward and ``unperturb()``, or ``sub_step``):
        accumulated gradients are loaded and the base optimizer steps. This is what
        trainers that call ``optimizer.step()`` themselves (or ``scaler.step(optimizer)``)
        need. Called with no SAM pass done it raises, unless every gradient is zero (as
        torch.distributed.checkpoint sets them to initialise optimizer state), where the
        base step runs as it would in torch.optim.
        """
        if closure is None:
            return self._finish_step()
        if self.schedule is not None:
            return scheduled.closure_step(self, closure, lambda: scheduled.decision(self))
        closure = torch.enable_grad()(closure)
        loss = None
        if self._closure_ascent() is closure_protocol.Ascent.FROM_CLOSURE:
            self.zero_grad(set_to_none=True)  # the ascent gradient is this closure's alone
            loss = closure()
        self.first_step(zero_grad=True)
        try:
            closure()
        except BaseException:
            self.abort()
            raise
        self.second_step()
        self._closure.consumed(self._params())
        return loss

    def _closure_ascent(self) -> "closure_protocol.Ascent":
        def present_sumsq():
            if self.randsam:
                return None  # noise needs no gradient: present ones only mean a caller's pass ran
            try:
                buckets = self._plan.buckets(_current_rho)
                active = [b for b in buckets if b.rho > 0.0]
                return self._sumsq(active, [b.grads() for b in active], adaptive=True) if active else None
            except MissingGrad:
                return None
        return self._closure.decide(self._params(), present_sumsq)

    def _finish_step(self):
        if self._perturbed is not None:
            raise RuntimeError("SAM.step() was called while the weights are perturbed: run the descent backward, "
                               "then unperturb() (or second_step()) before stepping")
        if self._accumulator.active:
            self.load_accumulated_grads()
            return self.base_step()
        if self._descent_ready or self._all_gradients_zero():
            return self.base_step()
        raise RuntimeError(
            "SAM.step() without a closure finishes a step whose SAM passes already ran (first_step(), the "
            "descent backward and unperturb(), or sub_step()); none did, so stepping now would be plain "
            "base-optimizer training. Pass a closure (optimizer.step(closure)), call first_step()/second_step(), "
            "or use fastsam.train_step or an integration in fastsam.integrations.")

    @torch.no_grad()
    def _all_gradients_zero(self) -> bool:
        grads = [p.grad for p in self._params() if p.grad is not None]
        return all(not bool(g.any()) for g in grads)

    # -- checkpoints (torch.optim's layout; fastsam/checkpoint.py) --

    def _extra_state(self) -> dict:
        """fastsam's global state for checkpoints (subclasses add theirs)."""
        extras = {"steps_taken": self.steps_taken, "rounding_seed": self._rounding_seed,
                  "perturbations": self._perturbations}
        if self.schedule is not None:
            extras["schedule"] = {**self.schedule.state_dict(), "decision": self._sam_decision}
        if self.generator is not None:
            extras["generator_state"] = self.generator.get_state()
        return extras

    def _load_extra_state(self, extras: dict) -> None:
        if "rounding_seed" in extras:
            self._rounding_seed = int(extras["rounding_seed"])
            self._perturbations = int(extras["perturbations"])
        self.steps_taken = int(extras.get("steps_taken", 0))
        schedule_state = extras.get("schedule")  # none saved (e.g. a plain torch.optim checkpoint): as constructed
        if schedule_state is not None and self.schedule is None:
            raise ValueError("the checkpoint holds a schedule's state (SAM(schedule=...)) but this optimizer has no "
                             "schedule; construct it with the same schedule to resume")
        if schedule_state is not None:
            self.schedule.load_state_dict(schedule_state)
            self._sam_decision = schedule_state.get("decision")
        generator_state = extras.get("generator_state")
        if generator_state is not None:
            if self.generator is None:
                raise ValueError("the checkpoint holds a RandSAM generator state but this SAM has no generator")
            self.generator.set_state(generator_state)

    def _per_param_state(self) -> dict:
        """{parameter index: {name: tensor}} of fastsam's per-parameter state (subclasses add theirs)."""
        return {}

    def _load_per_param_state(self, per_param: dict) -> None:
        if per_param:
            raise ValueError(f"the checkpoint holds per-parameter fastsam state {sorted(next(iter(per_param.values())))} "
                             f"that {type(self).__name__} does not use")

    def state_dict(self) -> dict:
        """torch.optim's layout: the base optimizer's ``state`` and ``param_groups`` (with SAM's
        per-group settings), fastsam's own state in the first group under ``"fastsam"``.

        Refused while the weights are perturbed or gradients are being accumulated: a
        checkpoint then would hold perturbed weights or lose the partial sum.
        """
        if self._perturbed is not None:
            raise RuntimeError("state_dict() while the weights are perturbed would save w + eps: "
                               "call it after second_step()/unperturb()")
        if self._accumulator.active:
            raise RuntimeError("state_dict() while gradients are being accumulated would lose them: "
                               "call it after load_accumulated_grads() and the base step")
        return checkpoint.pack(self._base.state_dict(), self._extra_state(), self._per_param_state())

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of this layout, of fastsam 0.1's (``{"base", "fastsam"}``) or of the
        plain base optimizer (torch.optim's own: SAM's settings then stay as constructed)."""
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() while the weights are perturbed: call second_step()/unperturb() first")
        base_state, extras, per_param = checkpoint.unpack(state_dict)
        own_settings = [{key: group[key] for key in GROUP_KEYS} for group in self.param_groups]
        self._base.load_state_dict(base_state)
        for group, settings in zip(self.param_groups, own_settings):
            for key, value in settings.items():
                group.setdefault(key, value)  # a plain torch.optim checkpoint has none of SAM's keys
        self._load_extra_state(extras)
        self._load_per_param_state(per_param)
        self._accumulator.drop()
        self._plan.invalidate()
        for group in self.param_groups:
            _check_group(group)
