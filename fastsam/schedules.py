"""Schedules for the perturbation radius rho (docs/ALGORITHMS.md §3).

GSAM lets rho follow the learning rate, so that the perturbation shrinks as training
anneals. The optimizer reads the current lr of each param group (whatever scheduler set
it) and calls :func:`lr_proportional_rho` once per step.
"""

from __future__ import annotations

import math

RHO_SCHEDULES = ("constant", "lr")


def lr_proportional_rho(lr: float, rho_max: float, rho_min: float, lr_max: float,
                        lr_min: float) -> float:
    """``rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)``, clipped at 0.

    The clip matters during warm-up, when lr can sit below ``lr_min``.
    """
    if not lr_max > lr_min:
        raise ValueError(
            f"the lr-proportional rho schedule needs lr_max > lr_min; got lr_max={lr_max}, lr_min={lr_min}"
        )
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    if not math.isfinite(rho):
        raise ValueError(f"rho schedule gave a non-finite rho ({rho}) at lr={lr}")
    return max(0.0, rho)
