"""Peer baselines: one SAM (and GSAM) sub-step done the way other implementations do it.

These are benchmark peers, not backends: each is written here from its published algorithm
(no code copied) and works on the bench's ``TensorSet`` buffers, so ``python -m fastsam.bench
--peers`` times them in the same run, on the same tensors, with the same engine as fastsam's
backends. Each has ``perturb`` (global gradient norm, backup, ``w <- w + rho g / (||g|| +
eps)``) and ``restore`` (the weights back, bit for bit); a SAM sub-step is the two.

* ``peer:loop``: the widely used single-file SAM wrapper (davda54/sam, non-adaptive): the
  norm is the norm of a stack of per-tensor norms; then, tensor by tensor, the backup is a
  fresh ``clone()`` kept in a per-parameter state dict, ``e_w = g * scale`` and ``p.add_(e_w)``;
  the restore rebinds ``p.data`` to that clone. (The published code computes
  ``(1.0 if not adaptive) * p.grad * scale``, one more pass and allocation per tensor, which
  is left out here.) Because the rebinding moves the weights to new memory at every step, it
  works on its own copy of the TensorSet's weights (same values, same gradients): moving the
  shared weights would change their addresses under the backends timed beside it, whose
  per-address caches (triton's launch plans) would then miss on every call. It has no GSAM.
* ``peer:paper``: the Forget-Sharpness paper's code (BorealisAI/perturbed-forgetting,
  ``optim/sam.py``): backup with a copy per tensor list, the norm as the vector norm of the
  stacked ``_foreach_norm`` results, the gradient normalised in place by ``_foreach_div_``,
  then ``_foreach_add_(w, g, alpha=rho)`` (the paper subtracts the gradient of a negated
  loss: the same step) and a copy back. Its list copy is a TorchScript loop of ``copy_``
  named ``_foreach_copy_`` (written before torch had one); ``torch._foreach_copy_`` is used
  here, which is no slower. GSAM as there: the ascent gradient copied before the
  normalisation; after the descent backward a normalised copy ``h`` of the descent gradient
  (a persistent buffer), ``<g_asc, h>`` summed over per-tensor ``torch.dot``,
  ``g_asc -= <g_asc, h> h`` (the coefficient passed as ``alpha``, which reads it on the host:
  a sync on a GPU) and ``g_p -= alpha g_asc``.
* ``peer:best-effort``: the fewest passes and no model-sized allocation that the foreach ops
  allow: ``_foreach_norm`` in fp32, the scale kept as a 0-d tensor, ``_foreach_copy_`` backup,
  one in-place update, ``_foreach_copy_`` restore. On the CPU (synchronous, so reading the
  scale waits for nothing) the update is ``_foreach_add_(w, g, alpha=scale)``: 32N bytes per
  fp32 sub-step (norm 4N, backup 8N, update 12N, restore 8N) against the fused floor of 28N.
  On a GPU no foreach op adds a list scaled by a device scalar in place, so it scales the
  gradient in place first (``_foreach_mul_``; the ascent gradient is not needed after the
  perturbation in a SAM loop) and adds it: 40N. GSAM: the ascent gradient copied first,
  ``||g_p||^2`` from ``_foreach_norm``, ``<g_asc, g_p>`` from one dot per tensor on the CPU (no
  allocation) or one ``_foreach_mul`` and a cat on a GPU (a dot per tensor would be a launch
  per tensor), then ``g_p <- c g_p - alpha g_asc`` in two in-place passes.

Two peers write into the gradient (``peer:paper`` always, ``peer:best-effort`` on a GPU), as
their originals do: there the gradient is dead after the perturbation. In the bench the
gradients are then left at a rescaled ``g``, which changes no op's speed; their GSAM sub-step
uses the gradient as ``perturb`` left it as the descent gradient.
"""

from __future__ import annotations

import collections
from typing import Callable

import torch

from fastsam.bench.workloads import TensorSet

EPS = 1e-12  # the guard in rho / (||g|| + eps), as in every peer's original
ITEMS = ("sam_substep", "gsam_substep")  # what a peer can be timed on


class Peer:
    """One peer's SAM sub-step halves on a TensorSet (see the module docstring)."""

    name = ""
    description = ""
    has_gsam = False

    def weights(self, ts: TensorSet) -> list:
        """The weight tensors this peer perturbs and restores (the TensorSet's own, unless it says otherwise)."""
        return ts.params

    def perturb(self, ts: TensorSet, rho: float, keep_ascent: bool = False) -> None:
        """Norm, backup and ``w <- w + rho g / (||g|| + eps)``; with ``keep_ascent`` (GSAM) also ``ts.ascent <- g``."""
        raise NotImplementedError

    def restore(self, ts: TensorSet) -> None:
        raise NotImplementedError

    def gsam_finish(self, ts: TensorSet, alpha: float) -> None:
        """Restore, then ``g_p <- g_p - alpha (g_asc - <g_asc, h> h)`` with ``h = g_p / (||g_p|| + eps)``,
        g_p = ``ts.grads`` (the descent gradient), g_asc = ``ts.ascent``."""
        raise NotImplementedError(f"{self.name} has no GSAM")


class LoopPeer(Peer):
    name = "peer:loop"
    description = "per-tensor loop, as the single-file SAM wrapper (davda54/sam)"

    def __init__(self):
        self.state: dict = collections.defaultdict(dict)
        self._weights = None

    def weights(self, ts: TensorSet) -> list:
        """A copy of the TensorSet's weights, made on first use (see the module docstring)."""
        if self._weights is None:
            self._weights = [p.clone() for p in ts.params]
        return self._weights

    def perturb(self, ts: TensorSet, rho: float, keep_ascent: bool = False) -> None:
        if keep_ascent:
            raise NotImplementedError(f"{self.name} has no GSAM")
        params = self.weights(ts)
        device = params[0].device
        norm = torch.norm(torch.stack([g.norm(p=2).to(device) for g in ts.grads]), p=2)
        scale = rho / (norm + EPS)
        for p, g in zip(params, ts.grads):
            self.state[p]["old_p"] = p.data.clone()
            e_w = g * scale.to(p)
            p.add_(e_w)

    def restore(self, ts: TensorSet) -> None:
        for p in self.weights(ts):
            p.data = self.state[p]["old_p"]


def _reduced_norm(tensors: list) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class PaperPeer(Peer):
    name = "peer:paper"
    description = "foreach, as the Forget-Sharpness paper's code (BorealisAI/perturbed-forgetting)"
    has_gsam = True

    def __init__(self):
        self.normalized = None  # h, GSAM's descent-gradient copy (the paper keeps one buffer)

    @staticmethod
    def _normalize_(tensors: list) -> None:
        torch._foreach_div_(tensors, _reduced_norm(tensors) + EPS)

    def perturb(self, ts: TensorSet, rho: float, keep_ascent: bool = False) -> None:
        torch._foreach_copy_(ts.backups, ts.params)
        if keep_ascent:
            torch._foreach_copy_(ts.ascent, ts.grads)
        self._normalize_(ts.grads)
        torch._foreach_add_(ts.params, ts.grads, alpha=rho)

    def restore(self, ts: TensorSet) -> None:
        torch._foreach_copy_(ts.params, ts.backups)

    def gsam_finish(self, ts: TensorSet, alpha: float) -> None:
        if self.normalized is None:
            self.normalized = [torch.zeros_like(g) for g in ts.grads]
        h = self.normalized
        torch._foreach_copy_(h, ts.grads)
        self._normalize_(h)
        first = ts.grads[0]
        dot = torch.zeros((), dtype=first.dtype, device=first.device)
        for a, b in zip(ts.ascent, h):
            dot.add_(torch.dot(a.flatten(), b.flatten()))
        torch._foreach_sub_(ts.ascent, h, alpha=dot)  # g_asc <- g_asc - <g_asc, h> h
        torch._foreach_sub_(ts.grads, ts.ascent, alpha=alpha)
        self.restore(ts)


class BestEffortPeer(Peer):
    name = "peer:best-effort"
    description = "foreach, fewest passes, no allocation (fp32 norm, device scalars)"
    has_gsam = True

    @staticmethod
    def _sumsq(tensors: list) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()

    def perturb(self, ts: TensorSet, rho: float, keep_ascent: bool = False) -> None:
        w, g = ts.params, ts.grads
        scale = rho / (self._sumsq(g).sqrt() + EPS)
        if keep_ascent:
            torch._foreach_copy_(ts.ascent, g)
        torch._foreach_copy_(ts.backups, w)
        if ts.device.type == "cpu":
            torch._foreach_add_(w, g, alpha=scale.item())
        else:
            torch._foreach_mul_(g, scale)
            torch._foreach_add_(w, g)

    def restore(self, ts: TensorSet) -> None:
        torch._foreach_copy_(ts.params, ts.backups)

    @staticmethod
    def _dot(xs: list, ys: list) -> torch.Tensor:
        if xs[0].device.type == "cpu":
            return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)]).sum(
                dtype=torch.float32)
        products = torch._foreach_mul(xs, ys)
        return torch.cat([p.reshape(-1) for p in products]).sum(dtype=torch.float32)

    def gsam_finish(self, ts: TensorSet, alpha: float) -> None:
        self.restore(ts)
        g, asc = ts.grads, ts.ascent
        dot, gp_sumsq = self._dot(asc, g), self._sumsq(g)
        # g_p - alpha (g_asc - <g_asc, h> h) = (1 + alpha <g_asc, g_p> / (||g_p|| + eps)^2) g_p - alpha g_asc
        torch._foreach_mul_(g, 1.0 + alpha * dot / (gp_sumsq.sqrt() + EPS).square())
        torch._foreach_add_(g, asc, alpha=-alpha)


PEERS: dict[str, Callable[[], Peer]] = {cls.name: cls for cls in (LoopPeer, PaperPeer, BestEffortPeer)}


def peers_for(item: str) -> list[str]:
    """Names of the peers that have ``item`` (all have the SAM sub-step; peer:loop has no GSAM)."""
    if item not in ITEMS:
        return []
    return [name for name, cls in PEERS.items() if item == "sam_substep" or cls.has_gsam]


def make_peers() -> dict[str, Peer]:
    """Fresh peers (their state and scratch buffers belong to one TensorSet)."""
    return {name: factory() for name, factory in PEERS.items()}


def make_call(item: str, peer: Peer, ts: TensorSet, rho: float, alpha: float) -> Callable[[], None]:
    """A no-argument function that runs ``item`` (a SAM or GSAM sub-step) once with ``peer`` on ``ts``.

    Raises NotImplementedError where the peer has no such sub-step (peer:loop has no GSAM).
    """
    if item == "sam_substep":
        def sam_substep():
            peer.perturb(ts, rho)
            peer.restore(ts)
        return sam_substep
    if item == "gsam_substep":
        if not peer.has_gsam:
            raise NotImplementedError(f"{peer.name} has no GSAM")

        def gsam_substep():
            peer.perturb(ts, rho, keep_ascent=True)
            peer.gsam_finish(ts, alpha)
        return gsam_substep
    raise ValueError(f"peers are timed on {', '.join(ITEMS)} only; got {item!r}")
