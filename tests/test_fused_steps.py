"""The fused base steps (sgd_step_, adam_step_) and the one-pass unperturb chain
(restore_gsam_reduce, gsam_combine_accumulate_, restore_accumulate_) of every backend
against the reference backend, which is the unfused composition: restore_, the GSAM and
accumulation ops, then torch.optim's own single-tensor step. The reference itself is
checked against torch.optim's optimizer classes.

Cases: every option of SGD (momentum 0/0.9 and the first step's buffer, dampening,
nesterov, weight decay, maximize) and Adam/AdamW (decoupled or L2 weight decay, amsgrad,
maximize, both forms of torch's lerp, float and tensor lr), with and without backups,
GradScaler's grad_scale and found_inf (0 and 1), GSAM's combination and an accumulator
feeding the step; on the tensor sets of tests/test_ops.py (odd sizes, 2000 tiny tensors,
non-contiguous views) in fp32, bf16 and fp16; one step, and trajectories of 7 steps with
a changing lr and a skipped step, comparing parameters and state.

Tolerances (tests/conftest.py): |actual - expected| <= tol(dtype) * (|expected| + magnitude),
tol = 1e-5 in fp32 (~80 ulps; the kernels differ from torch's FMA-vectorised CPU ops by a
few) and two roundings of the dtype for bf16/fp16. The magnitude is first-order error
propagation: every operand an implementation reads or rounds may be off by tol times its
size, and that error reaches the result through the step's formula (for Adam through
m / (sqrt(v) + eps), which amplifies an error in d by up to 1 / (|d| + eps) on the first
step), and, over a trajectory, carries into the next step. Low-precision trajectories use
the rule of tests/test_trajectories.py instead: a backend may drift from the fp32
trajectory at most twice as far as the reference does (plus two roundings).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import pytest
import torch

from fastsam import ops
from fastsam.ops import compiled, reference
from tests.conftest import (DTYPES, HAS_CUDA, assert_close_scaled, assert_lists_close, assert_lists_equal,
                            backend_cases, fast_backends, tolerance)
from tests.test_ops import KINDS, Case

GSAM_ALPHA, GSAM_EPS, ACCUM_SCALE, GRAD_SCALE = 0.4, 1e-12, 0.375, 1024.0


# ---- inputs -------------------------------------------------------------------------------

def like(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A tensor with ``p``'s sizes and strides (so views stay views) holding ``values``."""
    t = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
    t.copy_(values.reshape(p.shape))
    return t


@dataclasses.dataclass
class Inputs:
    """Everything a step reads: the source weights, gradients, GSAM's ascent copy, an accumulator."""

    case: Case
    sources: list  # the weights the step starts from (the backups)
    perturbed: list  # what the parameters hold before the step (the perturbed weights)
    grads: list
    ascent: list
    accum: list

    @staticmethod
    def make(kind: str, dtype: torch.dtype, device: str, seed: int = 0, scale: float = 1.0) -> "Inputs":
        case = Case(kind, dtype, device, seed)
        gen = torch.Generator().manual_seed(seed + 100)

        def rand(p, s):
            return like(p, (torch.randn(p.shape, generator=gen) * s).to(dtype))

        sources = case.clone_params()
        perturbed = case.clone_params()
        for w in perturbed:
            w.add_(rand(w, 0.05))
        # gradient-like inputs carry GradScaler's scale (a power of two: exact)
        grads = [g * scale for g in case.grads]
        return Inputs(case, sources, perturbed, grads, [rand(p, 0.1 * scale) for p in case.params],
                      [rand(p, 0.1 * scale) for p in case.params])

    def params_before(self, backups: bool) -> list:
        """The parameters before the step (the perturbed weights, or the sources without backups),
        as views into fresh copies of their owners (so writes outside a view can be seen)."""
        return [_view_copy(p) for p in (self.perturbed if backups else self.sources)]


def _view_copy(p: torch.Tensor) -> torch.Tensor:
    owner = p.as_strided((p.untyped_storage().nbytes() // p.element_size(),), (1,), 0).clone()
    return owner.as_strided(p.shape, p.stride(), p.storage_offset())


def chain_kwargs(cfg: dict, inputs: Inputs, device) -> dict:
    """The chain and GradScaler arguments a config asks for (stats from the reference)."""
    kw = {}
    if cfg.get("gsam"):
        kw.update(ascent=inputs.ascent, gsam_stats=reference.gsam_reduce(inputs.ascent, inputs.grads),
                  alpha=GSAM_ALPHA, gsam_eps=GSAM_EPS)
    if cfg.get("accum"):
        kw.update(accum=inputs.accum, accum_scale=ACCUM_SCALE)
    if "grad_scale" in cfg:
        kw["grad_scale"] = torch.tensor(cfg["grad_scale"], device=device)
    if "found_inf" in cfg:
        kw["found_inf"] = torch.tensor(cfg["found_inf"], device=device)
    return kw


def lr_argument(cfg: dict, lr: float, device):
    return torch.tensor(lr, device=device) if cfg.get("lr_tensor") else lr


# ---- error budgets (see the module docstring), on flat float64 copies -----------------------

def flat(tensors) -> torch.Tensor:
    """All elements of ``tensors`` as one float64 CPU vector (empty for None)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def per_element(values: list, tensors: list) -> torch.Tensor:
    """One value per tensor, repeated for each of its elements."""
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.float64),
                                   torch.tensor([t.numel() for t in tensors]))


def direction_magnitude(kw: dict, grads: list) -> torch.Tensor:
    """Per element: the size of the operands of the direction d (GSAM, accumulator, unscale)."""
    out = flat(grads).abs()
    if "ascent" in kw:
        stats = kw["gsam_stats"].double().cpu()
        along = abs(stats[0].item()) / (math.sqrt(stats[1].item()) + kw["gsam_eps"]) ** 2
        out = out + kw["alpha"] * (flat(kw["ascent"]).abs() + along * out)
    if "accum" in kw:
        out = flat(kw["accum"]).abs() + kw["accum_scale"] * out
    if "grad_scale" in kw:
        out = out / kw["grad_scale"].item()
    return out


def sgd_budget(h: dict, kw: dict, sources: list, bufs: Optional[list], grads: list,
               carried: Optional[dict] = None) -> dict:
    """Magnitudes of the new params and buffers of one SGD step (carried: the previous step's)."""
    lr, wd, mom = float(h["lr"]), h.get("weight_decay", 0.0), h.get("momentum", 0.0)
    w_mag = flat(sources).abs() + (carried["p"] if carried else 0.0)
    dw = direction_magnitude(kw, grads) + wd * w_mag
    if mom:
        old = 0.0 if h.get("first") else mom * (flat(bufs).abs() + (carried["buf"] if carried else 0.0))
        buf = old + (1.0 - h.get("dampening", 0.0)) * dw
        direction = dw + mom * buf if h.get("nesterov") else buf
    else:
        buf, direction = torch.zeros_like(dw), dw
    return {"p": w_mag + lr * direction, "buf": buf}


def adam_budget(h: dict, kw: dict, sources: list, before: dict, after: dict, grads: list, counts: list,
                carried: Optional[dict] = None) -> dict:
    """Magnitudes of params, exp_avg and exp_avg_sq after one Adam step from ``before`` (the
    reference's state; ``after``: its new state; ``counts``: the new step count of each tensor)."""
    lr, wd, eps = float(h["lr"]), h.get("weight_decay", 0.0), h.get("eps", 1e-8)
    beta1, beta2 = h.get("beta1", 0.9), h.get("beta2", 0.999)
    l2 = 0.0 if h.get("decoupled_weight_decay") else wd
    c = carried or {"p": 0.0, "m": 0.0, "v": 0.0}
    w_mag = flat(sources).abs() + c["p"]
    dw = direction_magnitude(kw, grads) + l2 * w_mag
    m_mag = beta1 * c["m"] + flat(before["m"]).abs() + dw
    v_mag = beta2 * c["v"] + flat(before["v"]).abs() + dw * dw
    bc1 = per_element([1.0 - beta1 ** n for n in counts], sources)
    bc2_sqrt = per_element([math.sqrt(1.0 - beta2 ** n) for n in counts], sources)
    v_new = flat(after["vmax" if h.get("amsgrad") else "v"]).abs()
    denom = v_new.sqrt() / bc2_sqrt + eps
    update = lr / bc1 * flat(after["m"]).abs() / denom
    # an error dv in v moves the update by update * dv / (2 sqrt(v) bc2_sqrt denom)
    v_term = torch.where(v_new > 0, update * v_mag / (2 * v_new.sqrt().clamp_min(1e-300) * bc2_sqrt * denom),
                         torch.zeros_like(v_new))
    return {"p": w_mag * (1.0 + lr * wd) + lr / bc1 * m_mag / denom + v_term, "m": m_mag, "v": v_mag}


# ---- running a step -------------------------------------------------------------------------

SGD_CONFIGS = {
    "plain": dict(),
    "momentum_first": dict(momentum=0.9, first=True),
    "momentum": dict(momentum=0.9),
    "dampening_weight_decay": dict(momentum=0.9, dampening=0.25, weight_decay=1e-2),
    "nesterov_weight_decay_maximize": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True),
    "no_backups": dict(momentum=0.9, weight_decay=1e-2, backups=False),
    "grad_scale": dict(momentum=0.9, weight_decay=1e-2, grad_scale=GRAD_SCALE, found_inf=0.0),
    "found_inf": dict(momentum=0.9, grad_scale=GRAD_SCALE, found_inf=1.0),
    "found_inf_first_no_backups": dict(momentum=0.9, first=True, grad_scale=GRAD_SCALE, found_inf=1.0,
                                       backups=False),
    "tensor_lr": dict(momentum=0.9, nesterov=True, lr_tensor=True),
    "gsam": dict(momentum=0.9, gsam=True),
    "accum": dict(accum=True, weight_decay=1e-2),
    "gsam_accum_first_scaled": dict(momentum=0.9, first=True, gsam=True, accum=True, grad_scale=GRAD_SCALE),
}
ADAM_CONFIGS = {
    "adam": dict(),
    "adamw": dict(weight_decay=1e-2, decoupled_weight_decay=True),
    "adam_l2_maximize": dict(weight_decay=1e-2, maximize=True),
    "amsgrad_adamw": dict(amsgrad=True, weight_decay=1e-2, decoupled_weight_decay=True),
    "large_lerp_weight": dict(beta1=0.3, beta2=0.9),  # 1 - beta1 >= 0.5: torch.lerp's other form
    "tensor_lr_adamw": dict(lr_tensor=True, weight_decay=1e-2, decoupled_weight_decay=True),
    "tensor_lr_amsgrad_l2": dict(lr_tensor=True, amsgrad=True, weight_decay=1e-2),
    "no_backups": dict(backups=False, weight_decay=1e-2, decoupled_weight_decay=True),
    "grad_scale": dict(grad_scale=GRAD_SCALE, found_inf=0.0, amsgrad=True),
    "found_inf": dict(grad_scale=GRAD_SCALE, found_inf=1.0, amsgrad=True),
    "found_inf_no_backups": dict(grad_scale=GRAD_SCALE, found_inf=1.0, backups=False),
    "gsam": dict(gsam=True, weight_decay=1e-2, decoupled_weight_decay=True),
    "accum": dict(accum=True),
    "gsam_accum_amsgrad_scaled": dict(gsam=True, accum=True, amsgrad=True, grad_scale=GRAD_SCALE),
}
STEP_OPTIONS = ("gsam", "accum", "grad_scale", "found_inf", "lr_tensor", "backups")


def hyper(cfg: dict, lr: float) -> dict:
    """The optimizer's own keyword arguments of a config."""
    return {"lr": lr, **{k: v for k, v in cfg.items() if k not in STEP_OPTIONS}}


def scale_of(cfg: dict) -> float:
    return cfg.get("grad_scale", 1.0)


def poison_if_skipped(cfg: dict, grads: list) -> None:
    """A skipped step (found_inf) comes with an inf gradient: nothing of it may reach the weights."""
    if cfg.get("found_inf"):
        g = next(g for g in grads if g.numel())
        g[(0,) * g.dim()] = float("inf")


@dataclasses.dataclass
class SgdState:
    bufs: Optional[list]

    @staticmethod
    def make(cfg: dict, inputs: Inputs, seed: int) -> "SgdState":
        if not cfg.get("momentum"):
            return SgdState(None)
        gen = torch.Generator().manual_seed(seed + 200)
        if cfg.get("first"):
            # uninitialised memory: the first step must not read it (zeros where found_inf skips)
            fill = 0.0 if cfg.get("found_inf") else float("nan")
            return SgdState([like(p, torch.full(p.shape, fill)) for p in inputs.sources])
        return SgdState([like(p, torch.randn(p.shape, generator=gen) * 0.1) for p in inputs.sources])

    def clone(self) -> "SgdState":
        return SgdState([like(b, b.clone()) for b in self.bufs] if self.bufs is not None else None)


def run_sgd(impl, cfg: dict, inputs: Inputs, state: SgdState, lr: float, device) -> tuple:
    params = inputs.params_before(cfg.get("backups", True))
    state = state.clone()
    kw = chain_kwargs(cfg, inputs, device)
    impl.sgd_step_(params, inputs.grads, state.bufs, lr_argument(cfg, lr, device),
                   backups=inputs.sources if cfg.get("backups", True) else None,
                   **{k: v for k, v in hyper(cfg, lr).items() if k != "lr"}, **kw)
    return params, state, kw


@dataclasses.dataclass
class AdamState:
    m: list
    v: list
    vmax: Optional[list]
    steps: list

    @staticmethod
    def make(cfg: dict, inputs: Inputs, seed: int, device) -> "AdamState":
        gen = torch.Generator().manual_seed(seed + 300)
        src = inputs.sources
        m = [like(p, torch.randn(p.shape, generator=gen) * 0.05) for p in src]
        v = [like(p, (torch.randn(p.shape, generator=gen) * 0.05) ** 2) for p in src]
        vmax = [like(p, vi.float() + torch.rand(p.shape, generator=gen) * 1e-3) for p, vi in zip(src, v)] \
            if cfg.get("amsgrad") else None
        # per-tensor step counts 0..4: each tensor has its own bias corrections
        steps = [torch.tensor(float(i % 5), device=device) for i in range(len(src))]
        return AdamState(m, v, vmax, steps)

    def clone(self) -> "AdamState":
        copy = lambda ts: [like(t, t.clone()) for t in ts] if ts is not None else None  # noqa: E731
        return AdamState(copy(self.m), copy(self.v), copy(self.vmax), [s.clone() for s in self.steps])

    def lists(self) -> dict:
        out = {"m": self.m, "v": self.v}
        if self.vmax is not None:
            out["vmax"] = self.vmax
        return out


def run_adam(impl, cfg: dict, inputs: Inputs, state: AdamState, lr: float, device) -> tuple:
    params = inputs.params_before(cfg.get("backups", True))
    state = state.clone()
    kw = chain_kwargs(cfg, inputs, device)
    impl.adam_step_(params, inputs.grads, state.m, state.v, state.vmax, state.steps, lr_argument(cfg, lr, device),
                    backups=inputs.sources if cfg.get("backups", True) else None,
                    **{k: v for k, v in hyper(cfg, lr).items() if k != "lr"}, **kw)
    return params, state, kw


def snapshot(tensors) -> list:
    return [t.detach().clone() for t in tensors] if tensors is not None else None


def make_inputs(kind, dtype, device, cfg, seed=0) -> Inputs:
    inputs = Inputs.make(kind, dtype, device, seed, scale_of(cfg))
    poison_if_skipped(cfg, inputs.grads)
    return inputs


def check_read_only(inputs: Inputs, before: dict) -> None:
    for name, values in before.items():
        assert_lists_equal(getattr(inputs, name), values, f"the step wrote its read-only input {name}")


# ---- single steps ---------------------------------------------------------------------------
# Every config on the odd sizes in fp32; the core configs (the longest chains, both skip
# paths, sources = params) on every tensor set and dtype. The full product is marked slow.

SGD_CORE = ("nesterov_weight_decay_maximize", "gsam_accum_first_scaled", "no_backups", "found_inf")
ADAM_CORE = ("amsgrad_adamw", "gsam_accum_amsgrad_scaled", "tensor_lr_amsgrad_l2", "no_backups", "found_inf")


def step_cases(configs, core) -> list:
    cases = []
    for config in configs:
        for kind in KINDS:
            for dtype in DTYPES:
                default = (kind == "odd" and dtype == torch.float32) or config in core
                cases.append(pytest.param(config, kind, dtype, id=f"{config}-{kind}-{str(dtype)[6:]}",
                                          marks=() if default else pytest.mark.slow))
    return cases


@functools.lru_cache(maxsize=4)  # the backends of one case run back to back (device,name varies fastest)
def expected_sgd(config, kind, dtype, device):
    cfg, lr = SGD_CONFIGS[config], 0.1
    inputs = make_inputs(kind, dtype, device, cfg)
    state = SgdState.make(cfg, inputs, 0)
    read_only = {n: snapshot(getattr(inputs, n)) for n in ("sources", "grads", "ascent", "accum")}
    exp_p, exp_s, kw = run_sgd(reference, cfg, inputs, state, lr, device)
    budget = sgd_budget(hyper(cfg, lr), kw, inputs.sources, state.bufs, inputs.grads)
    return inputs, state, read_only, exp_p, exp_s, budget


@functools.lru_cache(maxsize=4)
def expected_adam(config, kind, dtype, device):
    cfg, lr = ADAM_CONFIGS[config], 1e-2
    inputs = make_inputs(kind, dtype, device, cfg)
    state = AdamState.make(cfg, inputs, 0, device)
    read_only = {n: snapshot(getattr(inputs, n)) for n in ("sources", "grads", "ascent", "accum")}
    exp_p, exp_s, kw = run_adam(reference, cfg, inputs, state, lr, device)
    counts = [s.item() for s in exp_s.steps]
    budget = None if cfg.get("found_inf") else adam_budget(hyper(cfg, lr), kw, inputs.sources, state.lists(),
                                                           exp_s.lists(), inputs.grads, counts)
    return inputs, state, read_only, exp_p, exp_s, budget


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("config,kind,dtype", step_cases(SGD_CONFIGS, SGD_CORE))
def test_sgd_step_matches_reference(device, name, config, kind, dtype):
    cfg = SGD_CONFIGS[config]
    backend = ops.get_backend(name, device)
    inputs, state, read_only, exp_p, exp_s, budget = expected_sgd(config, kind, dtype, device)
    got_p, got_s, _ = run_sgd(backend, cfg, inputs, state, 0.1, device)
    check_read_only(inputs, read_only)
    if inputs.case.owners:
        inputs.case.check_outside_untouched(got_p)
    if cfg.get("found_inf"):  # skipped: the weights are the sources bit-exactly, the buffers unchanged
        assert_lists_equal(exp_p, inputs.sources, "the reference did not skip")
        assert_lists_equal(got_p, inputs.sources, "a skipped step must leave the parameters equal to the sources")
        assert_lists_equal(got_s.bufs, state.bufs, "a skipped step changed the momentum buffers")
        return
    assert_lists_close(got_p, exp_p, [budget["p"]])
    if state.bufs is not None:
        assert_lists_close(got_s.bufs, exp_s.bufs, [budget["buf"]])


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("config,kind,dtype", step_cases(ADAM_CONFIGS, ADAM_CORE))
def test_adam_step_matches_reference(device, name, config, kind, dtype):
    cfg = ADAM_CONFIGS[config]
    backend = ops.get_backend(name, device)
    inputs, state, read_only, exp_p, exp_s, budget = expected_adam(config, kind, dtype, device)
    got_p, got_s, _ = run_adam(backend, cfg, inputs, state, 1e-2, device)
    check_read_only(inputs, read_only)
    if inputs.case.owners:
        inputs.case.check_outside_untouched(got_p)
    if cfg.get("found_inf"):  # skipped: sources bit-exactly, every state tensor and step count unchanged
        assert_lists_equal(exp_p, inputs.sources, "the reference did not skip")
        assert_lists_equal(got_p, inputs.sources, "a skipped step must leave the parameters equal to the sources")
        for key, values in state.lists().items():
            assert_lists_equal(got_s.lists()[key], values, f"a skipped step changed {key}")
        assert [s.item() for s in got_s.steps] == [s.item() for s in state.steps], "a skipped step was counted"
        return
    assert [s.item() for s in got_s.steps] == [s.item() + 1 for s in state.steps]
    assert_lists_close(got_p, exp_p, [budget["p"]])
    assert_lists_close(got_s.m, exp_s.m, [budget["m"]])
    assert_lists_close(got_s.v, exp_s.v, [budget["v"]])
    if cfg.get("amsgrad"):
        assert_lists_close(got_s.vmax, exp_s.vmax, [budget["v"] + flat(state.vmax).abs()])
