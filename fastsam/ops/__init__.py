"""The ops contract and the registry of backends that implement it.

Every backend implements the same functions on *lists* of tensors that share one
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
``alpha``, ``scale``, ``weight``, ``sigma`` and ``lam`` are Python floats (``rho`` may be
negative: Momentum-SAM perturbs against its momentum with ``perturb_``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

import torch

OP_NAMES = ("sumsq", "perturb_", "restore_", "gsam_reduce", "gsam_combine_", "accumulate_",
            "looksam_project_", "looksam_combine_", "friendly_direction_")

# Order in which backend="auto" tries backends, by device type. The fused backends come
# first once they are registered; "foreach" is the portable fallback, "reference" is for
# tests (correct everywhere, slow everywhere) and is never chosen automatically.
AUTO_PREFERENCE = {
    "cuda": ("cuda", "triton", "foreach"),
    "cpu": ("cpp", "foreach"),
}
AUTO_DEFAULT = ("foreach",)


ALL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here; the message says why and how to fix it."""


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
    """A Backend whose ops are the functions named like them in ``functions`` (e.g. a module's globals())."""
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
