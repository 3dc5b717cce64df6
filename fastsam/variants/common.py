"""Argument checks shared by the variant classes."""

from __future__ import annotations

import math


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def check_real(name: str, value, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
               high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}; got {value!r}")
    return value


def refuse(cls_name: str, kwargs: dict, options: dict) -> None:
    """Raise for SAM options the method does not combine with: ``options`` maps each to why."""
    for key, why in options.items():
        value = kwargs.get(key)
        if value not in (None, False, 0, 0.0):
            raise ValueError(f"{cls_name} does not take {key}={value!r}: {why}")


def refuse_group_gsam(cls_name: str, param_groups: list) -> None:
    for i, group in enumerate(param_groups):
        if group.get("gsam_alpha", 0.0) != 0.0:
            raise ValueError(f"{cls_name} does not combine with GSAM (param group {i} has gsam_alpha="
                             f"{group['gsam_alpha']}): both rewrite the perturbed-point gradient")
