"""Compiled backends: ``cpp`` (CPU kernels) and ``cuda`` (CUDA kernels) of ``fastsam._C``.

Each op of the contract (fastsam/ops/__init__.py) is one registered ``torch.ops.fastsam``
op that makes one pass over memory for all tensors of a call: CPU kernels run
``at::parallel_for`` over fixed-size work items of the concatenated tensors, CUDA kernels
are multi-tensor-apply launches (csrc/). Both share one header of element-wise math
(csrc/math.h); reductions are two-phase and bitwise repeatable.

The extension is loaded on first use of a backend, never by ``import fastsam``.
"""

from __future__ import annotations

import importlib
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastsam.ops import BackendUnavailableError, MissingGrad, backend_from_functions, check_exponents, step_args

BUILD_HINT = ("reinstall fastsam with `pip install --no-build-isolation -e .` after installing torch "
              "and ninja (a C++ compiler is needed; see README.md)")

_module = None
_load_error: Optional[str] = None


def load_extension():
    """The ``fastsam._C`` module (importing it registers ``torch.ops.fastsam``), or None."""
    global _module, _load_error
    if _module is None and _load_error is None:
        try:
            _module = importlib.import_module("fastsam._C")
        except ImportError as error:
            if getattr(error, "name", None) == "fastsam._C":
                _load_error = "fastsam was installed without its compiled extension"
            else:  # built, but does not load (e.g. compiled against another torch)
                _load_error = f"the compiled extension fastsam._C failed to load ({error})"
    return _module


def extension_error() -> Optional[str]:
    """Why ``fastsam._C`` is not loaded (None when it is)."""
    load_extension()
    return _load_error


def cuda_kernels_built() -> bool:
    """True when the loaded extension contains the CUDA kernels."""
    module = load_extension()
    return bool(module is not None and getattr(module, "WITH_CUDA", 0))


def _cpp_unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only (use 'cuda' or 'auto' for {device.type} tensors)"
    error = extension_error()
    if error is not None:
        return f"{error}: {BUILD_HINT}"
    return None


def _cuda_unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only (use 'cpp' or 'auto' for {device.type} tensors)"
    error = extension_error()
    if error is not None:
        return f"{error}: {BUILD_HINT}"
    if not cuda_kernels_built():
        return ("the extension was built without CUDA kernels (torch without CUDA, no CUDA toolkit, or "
                "FASTSAM_SKIP_CUDA set at build time): install a CUDA build of torch and the CUDA toolkit "
                "(nvcc), set CUDA_HOME if needed, then reinstall with "
                "`FASTSAM_REQUIRE_CUDA=1 pip install --no-build-isolation -e .`")
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


# ---- the ops contract, with the reference's signatures ----------------------------------
# Empty lists are answered here: with no tensor there is nothing to dispatch on.

def _ops():
    """torch.ops.fastsam, loading the extension on first use (also when a backend function
    is called without going through fastsam.ops.get_backend)."""
    if _module is None and load_extension() is None:
        raise BackendUnavailableError(f"fastsam's compiled ops cannot run: {_load_error}: {BUILD_HINT}")
    return torch.ops.fastsam


def _device_scalar(t: Tensor, like: Tensor) -> Tensor:
    return t.to(device=like.device, dtype=torch.float32)


def _seq(tensors: Sequence[Tensor]):
    """A list or tuple as is (torch.ops takes both; copying 4096-entry lists per call only
    feeds the garbage collector), a GradsOf view as is (the eager entry points read it in
    C++), anything else as a list."""
    if isinstance(tensors, (list, tuple)) or _is_grads_view(tensors):
        return tensors
    return list(tensors)


def _is_grads_view(x) -> bool:
    return _module is not None and type(x) is _module.GradsOf


def _listed(tensors):
    """What torch.ops takes: a GradsOf view becomes the list of its gradients."""
    if not _is_grads_view(tensors):
        return tensors
    grads = tensors.tensors()
    if any(g is None for g in grads):
        raise MissingGrad(f"{sum(g is None for g in grads)} parameter(s) of the bucket have no gradient")
    return grads


# ---- the step plan's helpers (fastsam/plan.py), with pure-Python equivalents -------------

def grads_view(params: list):
    """A ``fastsam._C.GradsOf`` over ``params`` (their ``.grad`` read in C++ at each op call)."""
    if load_extension() is None:
        raise BackendUnavailableError(f"fastsam's compiled ops cannot run: {_load_error}: {BUILD_HINT}")
    return _module.GradsOf(params)


def param_signature(params: list):
    """What the step plan depends on, per parameter, as one comparable value (C++ when built)."""
    module = load_extension()
    if module is not None:
        return module._param_signature(params)
    return tuple((p.numel(), p.requires_grad, p.dtype, p.device) for p in params)


class _PythonGradRecord:
    """GradRecord without the extension: weak references to the gradient tensors and their versions."""

    def __init__(self, params: list):
        self._grads = [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params]

    def compare(self, params: list) -> tuple[int, int]:
        unchanged = present = 0
        for p, record in zip(params, self._grads):
            if p.grad is None:
                continue
            present += 1
            unchanged += record is not None and record[0]() is p.grad and record[1] == p.grad._version
        present += sum(p.grad is not None for p in params[len(self._grads):])
        return unchanged, present


def grad_record(params: list):
    """A record of which gradient tensors the parameters hold, at which versions (``.compare(params)``
    -> (unchanged, present)); a C++ pass where the extension is built."""
    module = load_extension()
    if module is not None:
        return module.GradRecord(params)
    return _PythonGradRecord(params)


def clear_grads(params: list) -> None:
    """``p.grad = None`` for each parameter."""
    module = load_extension()
    if module is not None:
        module._clear_grads(params)
        return
    for p in params:
        p.grad = None


def set_grads(params: list, tensors: list) -> None:
    """``p.grad = t`` for each pair (same shapes, dtypes and devices)."""
    module = load_extension()
    if module is not None:
        module._set_grads(params, tensors)
        return
    for p, t in zip(params, tensors):
        p.grad = t


def _eager():
    """fastsam._C's eager entry points when the call may take them, else None.

    They skip torch.ops' conversion of every Tensor[] argument (csrc/eager.cpp: 1.22 ms vs
    0.014 ms for two lists of 4096 tensors, measured here). torch.compile must see the
    registered ops, and so must active torch function or dispatch modes; each entry point
    itself returns NotImplemented for tensor subclasses (FakeTensor, DTensor, ...).
    """
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack()):
        return None
    return _module


def sumsq(tensors: Sequence[Tensor], params: Optional[Sequence[Tensor]] = None, b: int = 0,
          eta: float = 0.0) -> Tensor:
    check_exponents(0, b)
    if b > 0 and params is None:
        raise ValueError("sumsq with b > 0 needs the parameters (T = |w| + eta)")
    if not len(tensors):
        return torch.zeros((), dtype=torch.float32)
    params = _seq(params) if b > 0 else []
    eager = _eager()
    if eager is not None:
        out = eager.sumsq(_seq(tensors), params, b, float(eta))
        if out is not NotImplemented:
            return out
    return _ops().sumsq(_listed(_seq(tensors)), params, b, float(eta))


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
             sumsq: Tensor, rho: float, a: int = 0, b: int = 0, eta: float = 0.0,
             eps: float = 1e-12, ascent: Optional[Sequence[Tensor]] = None,
             ascent_sumsq: Optional[Tensor] = None, seed: Optional[Tensor] = None) -> None:
    check_exponents(a, b)
    if not len(params):
        return
    params, grads, backups = _seq(params), _seq(grads), _seq(backups)
    ascent_list = _seq(ascent) if ascent is not None else []
    if ascent is None:
        ascent_sumsq = None
    elif ascent_sumsq is not None:
        ascent_sumsq = _device_scalar(ascent_sumsq, params[0])
    sumsq = _device_scalar(sumsq, params[0])
    eager = _eager()
    if eager is not None and eager.perturb_(params, grads, backups, sumsq, float(rho), a, float(eta), float(eps),
                                            ascent_list, ascent_sumsq, seed) is not NotImplemented:
        return
    _ops().perturb_(params, _listed(grads), backups, sumsq, float(rho), a, float(eta), float(eps), ascent_list,
                    ascent_sumsq, seed)


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    if len(params):
        params, backups = _seq(params), _seq(backups)
        eager = _eager()
        if eager is not None and eager.restore_(params, backups) is not NotImplemented:
            return
        _ops().restore_(params, backups)


def gsam_reduce(ascent: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    if not len(grads):
        return torch.zeros(2, dtype=torch.float32)
    ascent, grads = _seq(ascent), _seq(grads)
    eager = _eager()
    if eager is not None:
        out = eager.gsam_reduce(ascent, grads)
        if out is not NotImplemented:
            return out
    return _ops().gsam_reduce(ascent, _listed(grads))


def gsam_combine_(grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor, alpha: float,
                  eps: float = 1e-12) -> None:
    if len(grads):
        grads, ascent = _seq(grads), _seq(ascent)
        stats = _device_scalar(stats, ascent[0])  # (grads may be a GradsOf view)
        eager = _eager()
        if eager is not None and eager.gsam_combine_(grads, ascent, stats, float(alpha),
                                                     float(eps)) is not NotImplemented:
            return
        _ops().gsam_combine_(_listed(grads), ascent, stats, float(alpha), float(eps))


def accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], scale: float,
                init: bool = False) -> None:
    if len(accum):
        accum, grads = _seq(accum), _seq(grads)
        eager = _eager()
        if eager is not None and eager.accumulate_(accum, grads, float(scale), bool(init)) is not NotImplemented:
            return
        _ops().accumulate_(accum, _listed(grads), float(scale), bool(init))


# ---- fused base steps and the unperturb chain (csrc/base_step*.{h,cpp,cu}) --------------------

def _optional_list(tensors) -> list:
    return _seq(tensors) if tensors is not None else []


def _optional_scalar(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return _device_scalar(t, like) if t is not None else None


def _lr_args(lr, like: Tensor) -> tuple:
    """(float lr, lr tensor or None) for the schemas' ``float lr, Tensor? lr_tensor``."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"a tensor lr must have one element; got shape {tuple(lr.shape)}")
        return 0.0, _device_scalar(lr.reshape(()), like)
    return float(lr), None


def _call(name: str, args: tuple):
    eager = _eager()
    if eager is not None:
        out = getattr(eager, name)(*args)
        if out is not NotImplemented:
            return out
    return getattr(_ops(), name)(*args)


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Optional[Sequence[Tensor]],
              lr, weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
              nesterov: bool = False, maximize: bool = False, first: bool = False,
              backups: Optional[Sequence[Tensor]] = None, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None, ascent: Optional[Sequence[Tensor]] = None,
              gsam_stats: Optional[Tensor] = None, alpha: float = 0.0, gsam_eps: float = 1e-12,
              accum: Optional[Sequence[Tensor]] = None, accum_scale: float = 1.0) -> None:
    step_args.check_sgd(params, lr, momentum, dampening, nesterov, momentum_buffers)
    step_args.check_chain(ascent, gsam_stats)
    if not len(params):
        return
    params = _seq(params)
    like = params[0]
    lr_value, lr_tensor = _lr_args(lr, like)
    _call("sgd_step_", (params, _seq(grads), _optional_list(momentum_buffers), _optional_list(backups), lr_value,
                        lr_tensor, float(weight_decay), float(momentum), float(dampening), bool(nesterov),
                        bool(maximize), bool(first), _optional_scalar(grad_scale, like),
                        _optional_scalar(found_inf, like), _optional_list(ascent),
                        _optional_scalar(gsam_stats, like), float(alpha), float(gsam_eps), _optional_list(accum),
                        float(accum_scale)))


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Optional[Sequence[Tensor]], steps: Sequence[Tensor],
               lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
               amsgrad: bool = False, maximize: bool = False, decoupled_weight_decay: bool = False,
               backups: Optional[Sequence[Tensor]] = None, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None, ascent: Optional[Sequence[Tensor]] = None,
               gsam_stats: Optional[Tensor] = None, alpha: float = 0.0, gsam_eps: float = 1e-12,
               accum: Optional[Sequence[Tensor]] = None, accum_scale: float = 1.0) -> None:
    step_args.check_adam(params, lr, beta1, beta2, eps, amsgrad, max_exp_avg_sqs, steps)
    step_args.check_chain(ascent, gsam_stats)
    if not len(params):
        return
    params = _seq(params)
    like = params[0]
    lr_value, lr_tensor = _lr_args(lr, like)
    _call("adam_step_", (params, _seq(grads), _seq(exp_avgs), _seq(exp_avg_sqs), _optional_list(max_exp_avg_sqs),
                         _seq(steps), _optional_list(backups), lr_value, lr_tensor, float(beta1), float(beta2),
                         float(eps), float(weight_decay), bool(amsgrad), bool(maximize),
                         bool(decoupled_weight_decay), _optional_scalar(grad_scale, like),
                         _optional_scalar(found_inf, like), _optional_list(ascent),
                         _optional_scalar(gsam_stats, like), float(alpha), float(gsam_eps), _optional_list(accum),
                         float(accum_scale)))


def restore_gsam_reduce(params: Sequence[Tensor], backups: Sequence[Tensor], ascent: Sequence[Tensor],
                        grads: Sequence[Tensor]) -> Tensor:
    if not len(grads):
        return torch.zeros(2, dtype=torch.float32)
    return _call("restore_gsam_reduce", (_seq(params), _seq(backups), _seq(ascent), _seq(grads)))


def gsam_combine_accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], ascent: Sequence[Tensor],
                             stats: Tensor, alpha: float, eps: float = 1e-12, scale: float = 1.0,
                             init: bool = False) -> None:
    if len(accum):
        accum = _seq(accum)
        _call("gsam_combine_accumulate_", (accum, _seq(grads), _seq(ascent), _device_scalar(stats, accum[0]),
                                           float(alpha), float(eps), float(scale), bool(init)))


def restore_accumulate_(params: Sequence[Tensor], backups: Sequence[Tensor], accum: Sequence[Tensor],
                        grads: Sequence[Tensor], scale: float, init: bool = False) -> None:
    if len(params):
        _call("restore_accumulate_", (_seq(params), _seq(backups), _seq(accum), _seq(grads), float(scale),
                                      bool(init)))
# -- the efficient variants' bookkeeping (csrc/variant_*.cpp, docs/ALGORITHMS.md §9) ------

def looksam_project_(gv: Sequence[Tensor], grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor,
                     weight: float, init: bool = False, eps: float = 1e-12) -> None:
    if len(gv):
        gv, grads, ascent = _seq(gv), _seq(grads), _seq(ascent)
        stats = _device_scalar(stats, gv[0])
        eager = _eager()
        if eager is not None and eager.looksam_project_(gv, grads, ascent, stats, float(weight), bool(init),
                                                        float(eps)) is not NotImplemented:
            return
        _ops().looksam_project_(gv, _listed(grads), _listed(ascent), stats, float(weight), bool(init), float(eps))


def looksam_combine_(grads: Sequence[Tensor], gv: Sequence[Tensor], grad_sumsq: Tensor, gv_sumsq: Tensor,
                     alpha: float, eps: float = 1e-12) -> None:
    if len(gv):
        grads, gv = _seq(grads), _seq(gv)
        grad_sumsq, gv_sumsq = _device_scalar(grad_sumsq, gv[0]), _device_scalar(gv_sumsq, gv[0])
        eager = _eager()
        if eager is not None and eager.looksam_combine_(grads, gv, grad_sumsq, gv_sumsq, float(alpha),
                                                        float(eps)) is not NotImplemented:
            return
        _ops().looksam_combine_(_listed(grads), gv, grad_sumsq, gv_sumsq, float(alpha), float(eps))


def friendly_direction_(direction: Sequence[Tensor], ema: Sequence[Tensor], grads: Sequence[Tensor], sigma: float,
                        lam: float, init: bool = False) -> Tensor:
    if not len(direction):
        return torch.zeros((), dtype=torch.float32)
    direction, ema, grads = _seq(direction), _seq(ema), _seq(grads)
    eager = _eager()
    if eager is not None:
        out = eager.friendly_direction_(direction, ema, grads, float(sigma), float(lam), bool(init))
        if out is not NotImplemented:
            return out
    return _ops().friendly_direction_(direction, ema, _listed(grads), float(sigma), float(lam), bool(init))


# The kernels compute in fp32; the contract computes float64 tensors in fp64, which
# "auto" then leaves to foreach.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# reads_grads_in_place: the step plan may pass a GradsOf view wherever these ops take gradients.
CPP = backend_from_functions("cpp", globals(), _cpp_unavailable_reason, DTYPES, reads_grads_in_place=True)
CUDA = backend_from_functions("cuda", globals(), _cuda_unavailable_reason, DTYPES, reads_grads_in_place=True)
