"""Whole-optimizer trajectories: every backend follows the reference backend step for step.

A small BatchNorm MLP trains for 7 steps of fastsam.train_step (3 perturbation
sub-batches per step, an LR scheduler driving lr and the GSAM rho schedule) with every
algorithm variant and two base optimizers. After every step, parameters, BatchNorm
buffers and the base optimizer's state must match the run with backend="reference".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam.tolerances import TRAJECTORY_ATOL, TRAJECTORY_RTOL, drift_bound
from tests.conftest import backend_cases

VARIANTS = {
    "sam": dict(rho=0.05),
    "asam": dict(rho=0.5, adaptive=True, eta=0.01),
    "asam_before_norm": dict(rho=0.5, adaptive="before_norm"),
    "asam_after_norm": dict(rho=0.5, adaptive="after_norm", eta=0.01),
    "asam_matrices_only": dict(rho=0.5, adaptive=True, adaptive_scope="matrices"),
    "gsam": dict(rho=0.1, gsam_alpha=0.4, rho_schedule="lr", rho_min=0.02),
    "gsam_normalized": dict(rho=0.1, gsam_alpha=0.4, gsam_normalize_ascent=True),
    "asam_gsam_normalized": dict(rho=0.5, adaptive=True, gsam_alpha=0.4, gsam_normalize_ascent=True),
    "obf": dict(rho=0.6, ascent_loss=dict(C=1000.0, gamma=1.0)),
    "obf_gsam": dict(rho=0.6, gsam_alpha=0.4, ascent_loss=dict(C=5.0, gamma=0.5)),
    "randsam": dict(rho=0.05, randsam=True),
}
BASES = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01)),
}
STEPS, BATCH, MICRO = 7, 24, 8


def make_model(dtype=torch.float32, device="cpu", smooth=False):
    torch.manual_seed(0)
    if smooth:
        # For low-precision runs: no BatchNorm or ReLU kinks, so that a 1-ulp difference
        # stays 1 ulp instead of being amplified chaotically (seen with BN in fp16).
        model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    else:
        # No bias before BatchNorm: its gradient would be pure rounding noise, which Adam
        # normalises into full-size steps that no two summation orders agree on.
        model = torch.nn.Sequential(torch.nn.Linear(10, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    return model.to(device=device, dtype=dtype)


def make_data(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 10, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 5, (STEPS, BATCH), generator=gen).to(device)
    return x, y


def run(backend: str, variant: str, base: str, device="cpu", dtype=torch.float32, smooth=False):
    """Train and return the state after every step: [(params, buffers, base state)]."""
    settings = dict(VARIANTS[variant])
    obf = settings.pop("ascent_loss", None)
    base_cls, base_kwargs = BASES[base]
    model = make_model(dtype, device, smooth)
    if settings.get("randsam"):
        settings["generator"] = torch.Generator(device=device).manual_seed(2)
    optimizer = fastsam.SAM(model.parameters(), base_cls, backend=backend, **settings, **base_kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS, eta_min=1e-4)
    ascent_loss = fastsam.OutputBiasForgetting(**obf) if obf else None
    x, y = make_data(dtype, device)
    history = []
    for step in range(STEPS):
        fastsam.train_step(model, optimizer, x[step], y[step], F.cross_entropy,
                           ascent_loss=ascent_loss, micro_batch=MICRO)
        scheduler.step()
        history.append(snapshot(model, optimizer))
    return history


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    state = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in sorted(optimizer.base_optimizer.state[p].items()):
                state.append((key, value.detach().clone() if torch.is_tensor(value) else value))
    return params, buffers, state


def assert_same_history(actual, expected, rtol, atol):
    for step, ((p_a, b_a, s_a), (p_e, b_e, s_e)) in enumerate(zip(actual, expected)):
        for a, e in zip(p_a + b_a, p_e + b_e):
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"step {step}: {m}")
        assert [k for k, _ in s_a] == [k for k, _ in s_e]
        for (key, a), (_, e) in zip(s_a, s_e):
            if torch.is_tensor(e):
                torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"step {step} {key}: {m}")
            else:
                assert a == e


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trajectory_matches_reference_fp32(device, backend, base, variant):
    expected = run("reference", variant, base, device)
    actual = run(backend, variant, base, device)
    # fp32: ulp-level differences in the norm's summation order, amplified over 7 steps
    assert_same_history(actual, expected, rtol=TRAJECTORY_RTOL, atol=TRAJECTORY_ATOL)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["sam", "asam", "gsam"])
def test_trajectory_low_precision_tracks_fp32(device, backend, dtype, variant):
    """In bf16/fp16 a backend may differ from the reference by roundings, but must not
    drift from the fp32 trajectory more than twice as far as the reference itself does."""
    fp32 = run("reference", variant, "sgd_momentum", device, smooth=True)[-1][0]
    ref = run("reference", variant, "sgd_momentum", device, dtype, smooth=True)[-1][0]
    got = run(backend, variant, "sgd_momentum", device, dtype, smooth=True)[-1][0]
    for f, r, g in zip(fp32, ref, got):
        ref_err = (r.float() - f).abs().max().item()
        got_err = (g.float() - f).abs().max().item()
        assert got_err <= drift_bound(ref_err, f.abs().max().item(), dtype)
