"""Schedules: the perturbation radius rho (docs/ALGORITHMS.md §3) and which steps perturb (§9).

GSAM lets rho follow the learning rate, so that the perturbation shrinks as training
anneals. The optimizer reads the current lr of each param group (whatever scheduler set
it) and calls :func:`lr_proportional_rho` once per step.

``SAM(..., schedule=...)`` takes a :class:`StepSchedule` that decides which steps are SAM
steps and which are the base optimizer's alone: :class:`Every` (every k-th step),
:class:`Random` (RST / SS-SAM: Bernoulli(p) per step) and :class:`Adaptive` (AE-SAM: where
the gradient norm is large against its running statistics).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

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


# -- which steps perturb: SAM(..., schedule=...) (docs/ALGORITHMS.md §9) ----------------------

def _check_probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1]; got {p!r}")
    return float(p)


class StepSchedule:
    """Decides, step by step, whether SAM perturbs or the step is the base optimizer's alone.

    ``decide(step, grad_sumsq)`` returns True for a SAM step. ``step`` counts the optimizer's
    base steps so far (0 for the first); ``grad_sumsq`` is the host value of the clean
    gradient's sum of squares when ``needs_gradient`` is True (None otherwise).
    ``per_sub_step``: decided for each perturbation sub-batch instead of once per step.
    A schedule belongs to one optimizer (its state is in that optimizer's checkpoints).
    """

    needs_gradient = False
    per_sub_step = False

    def decide(self, step: int, grad_sumsq: Optional[float] = None) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Every(StepSchedule):
    """A SAM step every ``k`` steps, the base step alone otherwise (composer's ``interval``).

    Phase: the first step is a SAM step, then steps k, 2k, ... (step % k == 0).
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Every(k) needs an int k >= 1 (a SAM step every k steps); got {k!r}")
        self.k = k

    def decide(self, step: int, grad_sumsq: Optional[float] = None) -> bool:
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"Every({self.k})"


class Linear:
    """A probability that moves linearly from ``start`` (step 0) to ``end`` (step ``total_steps``), then stays."""

    def __init__(self, start: float, end: float, total_steps: int):
        self.start = _check_probability("Linear start", start)
        self.end = _check_probability("Linear end", end)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"Linear total_steps must be an int >= 1; got {total_steps!r}")
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(step, self.total_steps) / self.total_steps

    def __repr__(self) -> str:
        return f"Linear({self.start}, {self.end}, {self.total_steps})"


class Random(StepSchedule):
    """Randomised SAM/SGD switching (RST, Zhao et al. 2022; SS-SAM): per step, a SAM step with probability p.

    ``p`` is a probability or a schedule ``p(step) -> probability`` (e.g. :class:`Linear`).
    ``generator``: a CPU ``torch.Generator`` for the Bernoulli draws (one per step, drawn on
    the host: no device synchronisation); by default one seeded with ``torch.initial_seed()``,
    so that ``torch.manual_seed`` fixes it. Its state is saved in the optimizer's checkpoints.
    """

    def __init__(self, p, generator: Optional[torch.Generator] = None):
        if callable(p):
            self.p = p
        else:
            self.p = _check_probability("Random(p)", p)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError("Random(generator=...) needs a CPU torch.Generator (the draws are made on the host, so "
                             "that a step never waits for the GPU)")
        self.generator = generator

    def probability(self, step: int) -> float:
        return _check_probability(f"Random's p at step {step}", self.p(step) if callable(self.p) else self.p)

    def decide(self, step: int, grad_sumsq: Optional[float] = None) -> bool:
        p = self.probability(step)
        draw = float(torch.rand((), generator=self.generator))  # drawn every step, so resuming stays in step
        return draw < p

    def state_dict(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])

    def __repr__(self) -> str:
        return f"Random({self.p!r})"


class Adaptive(StepSchedule):
    """AE-SAM (Jiang, Yang, Zhang, Kwok, ICLR 2023): SAM where the gradient norm is large.

    With n_t = ||g_t||^2 of the clean gradient, exponential moving averages
    ``mu_t = delta mu_{t-1} + (1 - delta) n_t`` and
    ``var_t = delta var_{t-1} + (1 - delta) (n_t - mu_t)^2`` (mu and var start at 0 and are
    updated before the test), and the threshold ``c_t = (t/T) lambda1 + (1 - t/T) lambda2``
    (t clipped at T = ``total_steps``), the step perturbs iff ``n_t >= mu_t + c_t sqrt(var_t)``.
    The defaults (delta = 0.9, lambda1 = -1, lambda2 = 1) are this project's reading of the
    paper: the threshold falls from mu + sigma to mu - sigma over training, so SAM steps grow
    from about 16% to 84% of the steps for a normally distributed n_t (half on average).

    The decision needs n_t on the host: one device synchronisation per decision. It is made
    for every perturbation sub-batch (``per_sub_step``), from that sub-batch's gradient.
    ``sam_decisions`` / ``decisions`` count the SAM ones.
    """

    needs_gradient = True
    per_sub_step = True

    def __init__(self, total_steps: int, delta: float = 0.9, lambda1: float = -1.0, lambda2: float = 1.0):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"Adaptive(total_steps) needs the number of training steps, an int >= 1; got {total_steps!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < float(delta) < 1.0):
            raise ValueError(f"Adaptive delta (the EMA's decay) must be in (0, 1); got {delta!r}")
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Adaptive {name} must be a finite number; got {value!r}")
        self.total_steps, self.delta = total_steps, float(delta)
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.mean = 0.0
        self.var = 0.0
        self.decisions = 0
        self.sam_decisions = 0

    def threshold(self, step: int) -> float:
        """c_t of the step."""
        fraction = min(step, self.total_steps) / self.total_steps
        return fraction * self.lambda1 + (1.0 - fraction) * self.lambda2

    def decide(self, step: int, grad_sumsq: Optional[float] = None) -> bool:
        if grad_sumsq is None:
            raise ValueError("Adaptive.decide needs the gradient's sum of squares")
        n = float(grad_sumsq)
        if not math.isfinite(n):
            return False  # an inf/nan gradient (a GradScaler skips the step): statistics untouched
        d = self.delta
        self.mean = d * self.mean + (1.0 - d) * n
        self.var = d * self.var + (1.0 - d) * (n - self.mean) ** 2
        sam = n >= self.mean + self.threshold(step) * math.sqrt(self.var)
        self.decisions += 1
        self.sam_decisions += int(sam)
        return sam

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "decisions": self.decisions, "sam_decisions": self.sam_decisions}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.decisions, self.sam_decisions = int(state["decisions"]), int(state["sam_decisions"])

    def __repr__(self) -> str:
        return f"Adaptive({self.total_steps}, delta={self.delta}, lambda1={self.lambda1}, lambda2={self.lambda2})"
