"""Ascent losses: output-bias forgetting (OBF), the seed paper's perturbation (docs/ALGORITHMS.md §4).

OBF keeps SAM's normalise-and-perturb step but takes the ascent direction from a loss on
the model's outputs. The surrogate is linear in the logits z, with detached coefficients:

    L_OBF = mean_i sum_k (u_k - alpha_i p_ik - (1 - alpha_i) Y_ik) z_ik,
    alpha_i = gamma * max(0, (C - 1/p_iy) / (C - 1))   (C > 1),   alpha_i = gamma   (C <= 0),

so dL/dz = (u - alpha p - (1 - alpha) Y) / B, with p = sigmoid(z) (or softmax) detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OutputBiasForgetting(nn.Module):
    """The OBF ascent loss. Call it like a loss: ``obf(logits, targets)``; SAM *maximises* it.

    ``logits`` has shape ``[..., K]`` and ``targets`` the matching integer shape ``[...]``
    (so sequence models work too); positions whose target is ``ignore_index`` are left out
    of the mean. Reference settings: ViT C=1000, gamma=1; ResNets gamma=1e-12;
    CIFAR fine-tuning C=K.
    """

    def __init__(self, C: float = 1000.0, gamma: float = 1.0, sigmoid: bool = True,
                 ignore_index: int = -100):
        super().__init__()
        C, gamma = float(C), float(gamma)
        if not math.isfinite(C) or 0.0 < C <= 1.0:
            raise ValueError(f"C must be > 1 (or <= 0 for a constant alpha = gamma); got {C}")
        if not math.isfinite(gamma) or gamma < 0.0:
            raise ValueError(f"gamma must be finite and >= 0; got {gamma}")
        self.C, self.gamma, self.sigmoid, self.ignore_index = C, gamma, bool(sigmoid), ignore_index

    def extra_repr(self) -> str:
        return f"C={self.C}, gamma={self.gamma}, sigmoid={self.sigmoid}"

    def alpha(self, p_target: Tensor) -> Tensor:
        """alpha_i from the probability of the true class (detached)."""
        if self.C <= 0.0:
            return torch.full_like(p_target, self.gamma)
        return self.gamma * ((self.C - 1.0 / p_target) / (self.C - 1.0)).clamp(min=0.0)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        num_classes = logits.shape[-1]
        z = logits.reshape(-1, num_classes)
        y = targets.reshape(-1)
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)}")
        keep = y != self.ignore_index
        z, y = z[keep], y[keep]
        if z.shape[0] == 0:
            return (logits * 0.0).sum()
        # fp32 math for half-precision logits (autocast), fp64 stays fp64
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = z.to(compute_dtype)
        with torch.no_grad():
            p = torch.sigmoid(z.detach()) if self.sigmoid else torch.softmax(z.detach(), dim=-1)
            one_hot = F.one_hot(y, num_classes).to(compute_dtype)
            alpha = self.alpha(p.gather(1, y[:, None]))
            coefficients = 1.0 / num_classes - alpha * p - (1.0 - alpha) * one_hot
        return (coefficients * z).sum(dim=1).mean()
