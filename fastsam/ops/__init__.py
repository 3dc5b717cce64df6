"""The ops contract and the registry of backends that implement it.

Every backend implements the same functions (OP_NAMES) on *lists* of tensors that share one
device and one dtype (the optimizer groups them). Data-dependent scalars stay 0-d fp32
device tensors so that a GPU step never waits for the host. Math is fp32 for fp32, bf16
and fp16 tensors (fp64 for float64 tensors, where a backend supports them); results are
rounded once into the tensor's own dtype. ``Backend.dtypes`` lists the dtypes a backend
accepts; "auto" picks per (device, dtype).

``sumsq(tensors, params=None, b=0, eta=0.0) -> Tensor``
    fp32 (fp64 for float64 tensors) 0-d ``sum_i ||T_i^b * g_i||^2`` with ``T = |w| + eta`` (``params`` needed iff b > 0).
    Returning the sum of squares, not the norm, lets callers add partial sums across
    groups, devices or processes before the square root.

``perturb_(params, grads, backups, sumsq, rho, a=0, b=0, eta=0.0, eps=1e-12, ascent=None, ascent_sumsq=None)``
    ``backup <- w; w <- w + rho * T^a * g / (sqrt(sumsq) + eps)`` (T from the unperturbed w).
    With ``ascent`` (GSAM) also ``ascent <- g`` or, with ``ascent_sumsq``,
    ``ascent <- g / (sqrt(ascent_sumsq) + eps)``. ``b`` is unused here (it shaped ``sumsq``)
    but part of the signature so that one key describes a perturbation.

``restore_(params, backups)``
    ``w <- backup``, bit-exact.

``gsam_reduce(ascent, grads) -> Tensor``
    fp32 (fp64 for float64 tensors) ``[<g_asc, g_p>, ||g_p||^2]`` (shape [2]) in one pass.

``gsam_combine_(grads, ascent, stats, alpha, eps=1e-12)``
    ``g_p <- g_p - alpha * (g_asc - <g_asc, h> h)`` with ``h = g_p / (||g_p|| + eps)``,
    ``stats`` as returned by ``gsam_reduce`` (summed over all groups).

``accumulate_(accum, grads, scale, init=False)``
    ``accum <- scale * g`` if ``init`` else ``accum + scale * g``.

The efficient variants (docs/ALGORITHMS.md §9) add three ops:

``looksam_project_(gv, grads, ascent, stats, weight, init=False, eps=1e-12)``
    LookSAM's refresh: ``gv <- (0 if init else gv) + weight * (g_s - c * g)`` with
    ``c = <g, g_s> / (sqrt(||g||^2) + eps)^2``; ``grads`` are g_s (the descent gradient),
    ``ascent`` is g (the clean gradient), ``stats`` is ``[<g_s, g>, ||g||^2]``, i.e.
    ``gsam_reduce(g_s, g)`` summed over all groups.

``looksam_combine_(grads, gv, grad_sumsq, gv_sumsq, alpha, eps=1e-12)``
    LookSAM's reuse step: ``g <- g + alpha * sqrt(grad_sumsq) / (sqrt(gv_sumsq) + eps) * gv``
    (``grad_sumsq`` and ``gv_sumsq`` 0-d device tensors).

``friendly_direction_(direction, ema, grads, sigma, lam, init=False) -> Tensor``
    Friendly SAM's ascent direction and gradient EMA in one pass: with ``init``
    ``direction <- g; ema <- g``, else ``direction <- g - sigma * ema`` (the old EMA), then
    ``ema <- lam * ema + (1 - lam) * g``. Returns the fp32 (fp64 for float64) 0-d sum of
    squares of the stored (rounded) direction.

``a`` is 0, 1 or 2 and ``b`` is 0 or 1 (docs/ALGORITHMS.md §2); ``rho``, ``eta``, ``eps``,
``alpha`` and ``scale`` are Python floats.

**Fused base steps and the one-pass unperturb chain.** With the ops above, a SAM step
ends with restore_ (8N bytes) and then torch.optim's own step from the restored weights.
The ops below take the step from the backups directly, and fuse GSAM's combination and the
sub-batch accumulation into the sweeps that must happen anyway (bytes: docs/DESIGN.md §9).
Sweeps after the perturbed backward, at the minimum the data dependencies allow:

* SAM (any ASAM/OBF/RandSAM variant), last sub-batch: 1 sweep, the fused step.
* SAM, earlier sub-batch: 1 sweep, ``restore_accumulate_``.
* GSAM: 2 sweeps. The combination needs ``<g_asc, g_p>`` and ``||g_p||^2`` summed over every
  element of every group (and process) before any element of the combined gradient exists,
  so no single sweep can both read the last element of g_p and write the first result:
  ``gsam_reduce`` (or ``restore_gsam_reduce`` when the weights must be restored for another
  sub-batch), then the fused step with ``ascent``/``gsam_stats`` (last sub-batch), or
  ``gsam_combine_accumulate_`` (earlier sub-batches), or ``gsam_combine_`` (no fused step).

The *direction* a step consumes is computed per element, in fp32, from its read-only inputs:
``d = g``; with ``ascent`` (GSAM) ``d = d - alpha * (g_asc - <g_asc, h> h)`` as gsam_combine_
(``gsam_stats`` from gsam_reduce, ``gsam_eps`` its eps); with ``accum`` ``d = accum +
accum_scale * d``; with ``grad_scale`` ``d = d / grad_scale`` (GradScaler, as torch's fused
optimizers unscale); with ``maximize`` ``d = -d``. The step then updates from the *source*
``s`` = ``backups`` (SAM: the restore is skipped) or the parameters themselves when
``backups`` is None (a plain fused step), with torch.optim's single-tensor math (torch/optim/
sgd.py, adam.py) in fp32 and each result rounded once into its tensor's dtype; the
optimizer state stays torch.optim's own tensors (a checkpoint moves to and from
torch.optim). With ``found_inf`` (0-d fp32, GradScaler's) nonzero the step is skipped on the
device: the parameters become the sources bit-exactly and every state tensor, step counts
included, is left unchanged. ``lr`` is a float or a 0-d tensor (read as fp32 on the device:
schedulers and CUDA graphs may change it between steps; on a GPU pass a device tensor, a
CPU one is copied over first). Scalars never go to the host on a
GPU. ``grads``, ``backups``, ``ascent``, ``accum`` are not written.

Both steps end with the *step options* ``backups=None, grad_scale=None, found_inf=None,
ascent=None, gsam_stats=None, alpha=0.0, gsam_eps=1e-12, accum=None, accum_scale=1.0``.

``sgd_step_(params, grads, momentum_buffers, lr, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
maximize=False, first=False, <step options>)``
    torch.optim.SGD: ``d <- d + weight_decay * s``; with momentum (``momentum_buffers``
    one per parameter, None when momentum is 0) ``buf <- d`` if ``first`` (torch's clone
    of d into a new buffer: pass preallocated ones) else ``momentum * buf + (1 - dampening)
    * d``, then ``d <- d + momentum * buf`` (nesterov) or ``buf``; ``w <- s - lr * d``.
    A skipped (``found_inf``) first step leaves the buffers as the caller allocated them:
    allocate zeros, and a later step with ``first=False`` starts from ``(1 - dampening) * d``,
    which is torch's clone exactly when dampening is 0 (torch's fused SGD keeps
    uninitialised memory there).

``adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1=0.9, beta2=0.999,
eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False, <step options>)``
    torch.optim.Adam (AdamW: ``decoupled_weight_decay=True``): ``steps`` are the parameters'
    ``state['step']`` (1-element float32 tensors on the parameters' device), incremented
    first; ``bc1 = 1 - beta1^step``, ``bc2 = 1 - beta2^step`` in double (fp32 with a
    tensor lr, as torch); weight decay ``s <- s * (1 - lr * wd)`` (decoupled) or
    ``d <- d + wd * s``; ``m <- lerp(m, d, 1 - beta1)``, ``v <- beta2 * v + (1 - beta2) d^2``,
    with amsgrad ``vmax <- max(vmax, v)`` (``max_exp_avg_sqs`` None otherwise);
    ``w <- s - (lr / bc1) * m / (sqrt(v or vmax) / sqrt(bc2) + eps)``.

``restore_gsam_reduce(params, backups, ascent, grads) -> Tensor``
    ``w <- backup`` bit-exactly and gsam_reduce's ``[<g_asc, g_p>, ||g_p||^2]``, one sweep.

``gsam_combine_accumulate_(accum, grads, ascent, stats, alpha, eps=1e-12, scale=1.0, init=False)``
    ``accum <- [accum +] scale * (g_p - alpha * (g_asc - <g_asc, h> h))``, one sweep;
    ``grads`` are not written (the combined gradient lives only in the accumulator).

``restore_accumulate_(params, backups, accum, grads, scale, init=False)``
    ``w <- backup`` bit-exactly and accumulate_'s update, one sweep.

``alpha``, ``scale``, ``weight``, ``sigma`` and ``lam`` are Python floats (``rho`` may be
negative: Momentum-SAM perturbs against its momentum with ``perturb_``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

import torch

SUBSTEP_OP_NAMES = ("sumsq", "perturb_", "restore_", "gsam_reduce", "gsam_combine_", "accumulate_")
FUSED_STEP_OP_NAMES = ("sgd_step_", "adam_step_", "restore_gsam_reduce", "gsam_combine_accumulate_",
                       "restore_accumulate_")
VARIANT_OP_NAMES = ("looksam_project_", "looksam_combine_", "friendly_direction_")
OP_NAMES = SUBSTEP_OP_NAMES + FUSED_STEP_OP_NAMES + VARIANT_OP_NAMES

# Order in which backend="auto" tries backends, by device type: the first one that can run
# there and takes the dtype. The rule is "fastest end to end in the recorded runs, never a
# backend slower than foreach": on the CPU cpp beat foreach on every workload; on a GPU
# cuda beat foreach, and triton, although as fast as cuda per sub-step, trailed foreach
# end to end on the small CIFAR ResNet (22.5 vs 24.3 SAM steps/s, H200, within the
# recorded spread but not ahead), so it is used only when asked for. float64 goes to
# foreach (the compiled kernels compute in fp32). "reference" is for tests (correct
# everywhere, slow everywhere) and is never chosen automatically.
AUTO_PREFERENCE = {
    "cuda": ("cuda", "foreach"),
    "cpu": ("cpp", "foreach"),
}
AUTO_DEFAULT = ("foreach",)


ALL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here; the message says why and how to fix it."""


class MissingGrad(LookupError):
    """An op was given the gradients of parameters (a list, or a ``fastsam._C.GradsOf`` view)
    and some parameter has none; raised before any work is done."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the ops contract.

    ``unavailable_reason(device)`` returns None when the backend can run on tensors of
    ``device`` and otherwise a sentence that says why not and what to do about it.
    """

    name: str
    sumsq: Callable
    perturb_: Callable
    restore_: Callable
    gsam_reduce: Callable
    gsam_combine_: Callable
    accumulate_: Callable
    sgd_step_: Callable
    adam_step_: Callable
    restore_gsam_reduce: Callable
    gsam_combine_accumulate_: Callable
    restore_accumulate_: Callable
    looksam_project_: Callable
    looksam_combine_: Callable
    friendly_direction_: Callable
    unavailable_reason: Callable[[torch.device], Optional[str]]
    dtypes: tuple = ALL_FLOAT_DTYPES
    # True when the ops also take a ``fastsam._C.GradsOf`` view (gradients read in C++
    # at each call) wherever they take a list of gradients; see fastsam/plan.py.
    reads_grads_in_place: bool = False


def always_available(device: torch.device) -> Optional[str]:
    """``unavailable_reason`` of a backend that runs on every device."""
    return None


def backend_from_functions(name: str, functions: dict, unavailable_reason=always_available,
                           dtypes: tuple = ALL_FLOAT_DTYPES, reads_grads_in_place: bool = False) -> Backend:
    """A Backend whose ops (OP_NAMES) are the functions named like them in ``functions`` (e.g. a module's globals())."""
    missing = [op for op in OP_NAMES if not callable(functions.get(op))]
    if missing:
        raise TypeError(f"backend {name!r} lacks the ops {missing}")
    return Backend(name, *(functions[op] for op in OP_NAMES), unavailable_reason=unavailable_reason, dtypes=dtypes,
                   reads_grads_in_place=reads_grads_in_place)


# name -> Backend, or "module:attribute" for backends imported on first use (so that
# `import fastsam` never builds or loads a compiled extension).
_REGISTRY: dict[str, object] = {
    "reference": "fastsam.ops.reference:BACKEND",
    "foreach": "fastsam.ops.foreach:BACKEND",
    "triton": "fastsam.ops.triton_backend:BACKEND",
    "cpp": "fastsam.ops.compiled:CPP",
    "cuda": "fastsam.ops.compiled:CUDA",
}


def register_backend(backend, name: Optional[str] = None) -> None:
    """Register a Backend (or a lazy "module:attribute" path to one) under ``name``."""
    key = name if name is not None else backend.name
    _REGISTRY[key] = backend


def backend_names() -> list[str]:
    return list(_REGISTRY)


def _load(name: str) -> Backend:
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module_name, attr = entry.split(":")
        entry = getattr(importlib.import_module(module_name), attr)
        _REGISTRY[name] = entry
    return entry


def get_backend(name: str, device, dtype: Optional[torch.dtype] = None) -> Backend:
    """The backend called ``name`` for tensors on ``device`` (of ``dtype``); raises if it cannot run there."""
    device = torch.device(device)
    if name == "auto":
        return _load(resolve_auto(device, dtype))
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown fastsam backend {name!r}; choose 'auto' or one of {backend_names()}"
        )
    backend = _load(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"fastsam backend {name!r} cannot run on {device}: {reason}")
    if dtype is not None and dtype not in backend.dtypes:
        raise BackendUnavailableError(
            f"fastsam backend {name!r} does not support {dtype} tensors (it supports "
            f"{[str(d) for d in backend.dtypes]}); use backend='auto' or 'foreach' for them")
    return backend


def resolve_auto(device, dtype: Optional[torch.dtype] = None) -> str:
    """The name of the backend that backend="auto" uses on ``device`` (for ``dtype``): the first available one."""
    device = torch.device(device)
    for name in AUTO_PREFERENCE.get(device.type, AUTO_DEFAULT):
        if name not in _REGISTRY:
            continue
        backend = _load(name)
        if backend.unavailable_reason(device) is None and (dtype is None or dtype in backend.dtypes):
            return name
    raise BackendUnavailableError(f"no fastsam backend can run on {device}" + (f" for {dtype}" if dtype else ""))


def available_backends(device="cpu") -> list[str]:
    """Names of the registered backends that can run on ``device`` right now."""
    device = torch.device(device)
    return [name for name in _REGISTRY if _load(name).unavailable_reason(device) is None]


def check_exponents(a: int, b: int) -> None:
    """The ASAM exponents every backend supports (docs/ALGORITHMS.md §2)."""
    if a not in (0, 1, 2) or b not in (0, 1):
        raise ValueError(f"ASAM exponents must be a in (0, 1, 2) and b in (0, 1); got a={a}, b={b}")
