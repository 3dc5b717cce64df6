"""Sharpness measures (docs/ALGORITHMS.md §7): the top Hessian eigenvalue and m-sharpness.

``hessian_top_eigenvalue`` runs power iteration on Hessian-vector products (double
backward through the loss on a fixed set of examples, model in eval mode). The Rayleigh
quotient v'Hv of the normalised iterate converges to the eigenvalue of largest magnitude.
``m_sharpness`` averages, over sub-batches of m examples, the loss increase under SAM's
normalised ascent step of radius rho, L_S(w + rho g_S/||g_S||) - L_S(w).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

LossFn = Callable[[Any, Tensor], Tensor]


@dataclasses.dataclass
class EigenResult:
    """What :func:`hessian_top_eigenvalue` returns.

    ``eigenvalue``: the last Rayleigh quotient v'Hv (float). ``iterations``: Hessian-vector
    products computed. ``converged``: whether two successive estimates differed by at most
    ``tol`` relative to the latest one. ``eigenvector``: the last unit iterate, one tensor
    per parameter.
    """

    eigenvalue: float
    iterations: int
    converged: bool
    eigenvector: list


def _trainable(model: nn.Module, params: Optional[Iterable[Tensor]]) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ValueError("no trainable parameters to measure")
    return params


@contextlib.contextmanager
def _eval_mode(model: nn.Module, enabled: bool = True):
    """Put every module in eval mode for the block, then give each back its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    if enabled:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _chunks(inputs: Tensor, targets: Tensor, size: Optional[int]):
    n = int(targets.shape[0])
    if n == 0:
        raise ValueError("need at least one example")
    size = n if size is None else int(size)
    if size < 1:
        raise ValueError(f"batch_size must be a positive int or None; got {size}")
    return [(inputs[i:i + size], targets[i:i + size]) for i in range(0, n, size)]


def _dot(xs: list[Tensor], ys: list[Tensor]) -> float:
    return math.fsum(float(torch.sum(x.double() * y.double())) for x, y in zip(xs, ys))


def _norm(xs: list[Tensor]) -> float:
    return math.sqrt(_dot(xs, xs))


def hessian_top_eigenvalue(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *,
                           iters: int = 100, tol: float = 1e-4, batch_size: Optional[int] = None,
                           params: Optional[Iterable[Tensor]] = None, seed: int = 0,
                           eval_mode: bool = True) -> EigenResult:
    """The dominant eigenvalue of the Hessian of the mean loss over ``(inputs, targets)``.

    Power iteration ``v <- Hv / ||Hv||`` from a seeded N(0, I) start, at most ``iters``
    Hessian-vector products; it stops once successive Rayleigh quotients differ by at most
    ``tol * |latest|`` (docs/ALGORITHMS.md §7: 100 iterations, tolerance 1e-4). Power
    iteration finds the eigenvalue of largest *magnitude*: it is the largest eigenvalue
    unless negative curvature dominates (then the result is negative and says so).

    ``loss_fn(model(x), y)`` must average over its examples; with ``batch_size`` the set is
    processed in chunks (weighted by their share), otherwise in one pass whose graph is
    kept for all iterations. The model runs in eval mode (each module's mode is restored
    afterwards); ``params`` defaults to every parameter that requires grad. Neither the
    parameters nor their ``.grad`` are modified.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int; got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0; got {tol!r}")
    params = _trainable(model, params)
    chunks = _chunks(inputs, targets, batch_size)
    n = int(targets.shape[0])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]

    with _eval_mode(model, eval_mode), torch.enable_grad():
        graphs = None
        if len(chunks) == 1:  # one graph, reused by every product
            x, y = chunks[0]
            graphs = [(torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True), 1.0)]

        def hvp(vector: list[Tensor]) -> list[Tensor]:
            total = [torch.zeros_like(p) for p in params]
            parts = graphs if graphs is not None else (
                (torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True), y.shape[0] / n)
                for x, y in chunks)
            for grads, weight in parts:
                products = torch.autograd.grad(grads, params, vector, retain_graph=graphs is not None,
                                               allow_unused=True)
                for t, h in zip(total, products):
                    if h is not None:
                        t.add_(h.detach(), alpha=weight)
            return total

        norm = _norm(v)
        v = [t / norm for t in v]
        eigenvalue, converged, iterations = None, False, 0
        for iterations in range(1, iters + 1):
            hv = hvp(v)
            estimate = _dot(v, hv)
            hv_norm = _norm(hv)
            previous, eigenvalue = eigenvalue, estimate
            if hv_norm == 0.0:  # v lies in the null space: the Hessian is zero along it
                converged = True
                break
            v = [t / hv_norm for t in hv]
            if previous is not None and abs(estimate - previous) <= tol * abs(estimate):
                converged = True
                break
    return EigenResult(eigenvalue=float(eigenvalue), iterations=iterations, converged=converged,
                       eigenvector=[t.detach() for t in v])


def m_sharpness(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *, rho: float,
                m: Optional[int] = None, params: Optional[Iterable[Tensor]] = None,
                eval_mode: bool = True, eps: float = 1e-12) -> float:
    """m-sharpness: the mean over sub-batches S of m examples of ``L_S(w + e_S) - L_S(w)``.

    ``e_S = rho * g_S / (||g_S|| + eps)`` with ``g_S`` the gradient of ``L_S`` at ``w`` and one
    global norm over all ``params`` (SAM's ascent step, docs/ALGORITHMS.md §1). Sub-batches are
    consecutive slices of ``m`` examples (``m=None``: the whole set, a last smaller one
    counts by its share). The weights are restored bit for bit after each sub-batch, and
    ``.grad`` is left untouched. Runs in eval mode unless ``eval_mode=False``.
    """
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0; got {rho!r}")
    params = _trainable(model, params)
    chunks = _chunks(inputs, targets, m)
    n = int(targets.shape[0])
    total = 0.0
    with _eval_mode(model, eval_mode):
        for x, y in chunks:
            with torch.enable_grad():
                loss = loss_fn(model(x), y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            scale = rho / (_norm(grads) + eps)
            backups = [p.detach().clone() for p in params]
            try:
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.add_(g, alpha=scale)
                    perturbed = loss_fn(model(x), y)
            finally:
                with torch.no_grad():
                    for p, b in zip(params, backups):
                        p.copy_(b)
            total += (float(perturbed) - float(loss.detach())) * (y.shape[0] / n)
    return total
