"""Whole trajectories of the efficient variants: every backend follows the reference backend step for step.

tests/test_trajectories.py's set-up (a BatchNorm MLP, 7 steps of fastsam.train_step with 3
perturbation sub-batches, a cosine LR scheduler) for every method of docs/ALGORITHMS.md §9,
alone and combined with ASAM, GSAM and OBF where the method allows it, with SGD and AdamW.
After every step parameters, BatchNorm buffers and the base optimizer's state must match the
run with backend="reference"; so must the methods' own state (g_v, EMAs, schedule counters).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam import schedules
from tests.conftest import backend_cases
from tests.test_trajectories import BASES, MICRO, STEPS, assert_same_history, make_data, make_model, snapshot

VARIANTS = {
    "every_asam": dict(cls=fastsam.SAM, rho=0.5, adaptive=True, eta=0.01, schedule=lambda: schedules.Every(2)),
    "random_gsam": dict(cls=fastsam.SAM, rho=0.1, gsam_alpha=0.4,
                        schedule=lambda: schedules.Random(0.5, torch.Generator().manual_seed(3))),
    "adaptive": dict(cls=fastsam.SAM, rho=0.05, schedule=lambda: schedules.Adaptive(STEPS)),
    "adaptive_obf": dict(cls=fastsam.SAM, rho=0.6, ascent_loss=dict(C=5.0, gamma=0.5),
                         schedule=lambda: schedules.Adaptive(STEPS, lambda1=0.0, lambda2=0.0)),
    "looksam": dict(cls=fastsam.LookSAM, rho=0.05, k=3, alpha=0.7),
    "looksam_asam": dict(cls=fastsam.LookSAM, rho=0.5, k=2, alpha=0.5, adaptive=True),
    "msam": dict(cls=fastsam.MomentumSAM, rho=0.5),
    "fsam": dict(cls=fastsam.FriendlySAM, rho=0.05, sigma=1.0, lmbda=0.6),
    "fsam_asam": dict(cls=fastsam.FriendlySAM, rho=0.5, adaptive="before_norm", lmbda=0.9),
    "esam": dict(cls=fastsam.ESAM, rho=0.05, beta=0.5, gamma=0.5,
                 generator=lambda: torch.Generator().manual_seed(4)),
    "sam_on": dict(cls=fastsam.SAM, rho=0.5, groups=fastsam.normalization_params),
}


def run(backend: str, variant: str, base: str, device="cpu", dtype=torch.float32, smooth=False):
    """Train and return the state after every step: [(params, buffers, base state + method state)]."""
    settings = dict(VARIANTS[variant])
    cls = settings.pop("cls")
    obf = settings.pop("ascent_loss", None)
    groups = settings.pop("groups", None)
    for key in ("schedule", "generator"):
        if key in settings:
            settings[key] = settings[key]()
    base_cls, base_kwargs = BASES[base]
    model = make_model(dtype, device, smooth)
    params = groups(model) if groups is not None else model.parameters()
    optimizer = cls(params, base_cls, backend=backend, **settings, **base_kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS, eta_min=1e-4)
    ascent_loss = fastsam.OutputBiasForgetting(**obf) if obf else None
    x, y = make_data(dtype, device)
    history = []
    for step in range(STEPS):
        fastsam.train_step(model, optimizer, x[step], y[step], F.cross_entropy, ascent_loss=ascent_loss,
                           micro_batch=MICRO)
        scheduler.step()
        params_, buffers, state = snapshot(model, optimizer)
        own = optimizer._per_param_state()
        for index in sorted(own):
            for name, tensor in sorted(own[index].items()):
                state.append((f"{index}.{name}", tensor.detach().clone()))
        extras = optimizer._extra_state().get("schedule", {})
        for key, value in sorted(extras.items()):  # counters exactly, EMA statistics within the tolerance
            if isinstance(value, float):
                state.append((f"schedule.{key}", torch.tensor(value, dtype=torch.float64)))
            elif isinstance(value, (int, bool)):
                state.append((f"schedule.{key}", value))
        history.append((params_, buffers, state))
    return history


@functools.lru_cache(maxsize=None)
def reference_run(variant: str, base: str, device: str, dtype=torch.float32, smooth=False):
    """The reference trajectory, computed once for all the backends compared with it (read only)."""
    return run("reference", variant, base, device, dtype, smooth)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trajectory_matches_reference_fp32(device, backend, base, variant):
    expected = reference_run(variant, base, device)
    actual = run(backend, variant, base, device)
    assert_same_history(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["looksam", "msam", "fsam"])
def test_variant_trajectory_low_precision_tracks_fp32(device, backend, dtype, variant):
    """In bf16/fp16 a backend may differ from the reference by roundings, but must not drift
    from the fp32 trajectory more than twice as far as the reference itself does."""
    fp32 = reference_run(variant, "sgd_momentum", device, smooth=True)[-1][0]
    ref = reference_run(variant, "sgd_momentum", device, dtype, smooth=True)[-1][0]
    got = run(backend, variant, "sgd_momentum", device, dtype, smooth=True)[-1][0]
    for f, r, g in zip(fp32, ref, got):
        ref_err = (r.float() - f).abs().max().item()
        got_err = (g.float() - f).abs().max().item()
        assert got_err <= 2 * ref_err + 2 * torch.finfo(dtype).eps * f.abs().max().item()
