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

import contextlib
import dataclasses
import functools
import math
from typing import Optional

import pytest
import torch

from fastsam import ops
from fastsam.ops import compiled, reference
from tests.conftest import (DTYPES, HAS_CUDA, assert_close_scaled, assert_lists_close, assert_lists_equal,
                            backend_cases, fast_backends)
from tests.test_ops import KINDS, Case

GSAM_ALPHA, GSAM_EPS, ACCUM_SCALE, GRAD_SCALE = 0.4, 1e-12, 0.375, 1024.0


# ---- inputs -------------------------------------------------------------------------------

def like(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A tensor with ``p``'s sizes and strides (so views stay views) holding ``values``."""
    t = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
    t.copy_(values.reshape(p.shape))
    return t


class SweepCase:
    """Case's interface on a smaller set, for sweeping every option: odd sizes and one tensor
    over several CPU work items and CUDA chunks (16384 elements each), 44k elements in all."""

    owners: list = []
    outside: list = []

    def __init__(self, dtype: torch.dtype, device: str, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(4097,), (1,), (3,), (0,), (3, 5, 7), (40009,)]
        self.params, self.grads, self.grads2 = ([(torch.randn(s, generator=gen) * scale).to(dtype).to(device)
                                                 for s in shapes] for scale in (1.0, 0.1, 0.1))

    def clone_params(self) -> list:
        return [p.clone() for p in self.params]


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
        case = SweepCase(dtype, device, seed) if kind == "sweep" else Case(kind, dtype, device, seed)
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


@contextlib.contextmanager
def uninitialised_memory_is_nan(on: bool):
    """torch.empty fills with NaN (torch's deterministic mode) while ``on``: a skipped step that
    copies a strided tensor's uninitialised stand-in back then fails every time, not only when
    the allocator hands out dirty memory."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


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
    with uninitialised_memory_is_nan(bool(cfg.get("found_inf"))):
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
    with uninitialised_memory_is_nan(bool(cfg.get("found_inf"))):
        impl.adam_step_(params, inputs.grads, state.m, state.v, state.vmax, state.steps,
                        lr_argument(cfg, lr, device), backups=inputs.sources if cfg.get("backups", True) else None,
                        **{k: v for k, v in hyper(cfg, lr).items() if k != "lr"}, **kw)
    return params, state, kw


def snapshot(tensors) -> list:
    return [t.detach().clone() for t in tensors] if tensors is not None else None


@functools.lru_cache(maxsize=8)
def cached_inputs(kind, dtype, device, scale=1.0, poisoned=False) -> Inputs:
    """Inputs shared by the tests of one tensor set (every test checks that the ops left them alone)."""
    inputs = Inputs.make(kind, dtype, device, 0, scale)
    poison_if_skipped({"found_inf": poisoned}, inputs.grads)
    return inputs


def make_inputs(kind, dtype, device, cfg) -> Inputs:
    return cached_inputs(kind, dtype, device, scale_of(cfg), bool(cfg.get("found_inf")))


def check_read_only(inputs: Inputs, before: dict) -> None:
    for name, values in before.items():
        assert_lists_equal(getattr(inputs, name), values, f"the step wrote its read-only input {name}")


# ---- single steps ---------------------------------------------------------------------------
# Every config on SweepCase in fp32; the core configs (the longest chains, sources = params,
# a skip) on every tensor set of tests/test_ops.py and every dtype. The rest of the product
# is marked slow.

SGD_CORE = ("gsam_accum_first_scaled", "no_backups", "found_inf")
ADAM_CORE = ("gsam_accum_amsgrad_scaled", "no_backups", "found_inf")


def step_cases(configs, core) -> list:
    cases = []
    for config in configs:
        for kind in ("sweep",) + tuple(KINDS):
            for dtype in DTYPES:
                default = (kind == "sweep" and dtype == torch.float32) or (kind != "sweep" and config in core)
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


# ---- trajectories -----------------------------------------------------------------------------
# 7 steps of one op with fresh gradients each step, a learning rate that changes every step
# (as a scheduler would; a tensor lr is updated in place), SAM's backup taken before each
# step and the weights perturbed, and, with a GradScaler, step 3 skipped (found_inf = 1).

TRAJECTORY_STEPS = 7
SKIPPED_STEP = 2
TRAJECTORY_CONFIGS = {
    "sgd_nesterov_weight_decay_scaler": ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-2,
                                                     grad_scale=GRAD_SCALE)),
    "sgd_dampening_gsam_accum_no_backups": ("sgd", dict(momentum=0.9, dampening=0.1, gsam=True, accum=True,
                                                        backups=False, lr_tensor=True)),
    "adamw_amsgrad_scaler": ("adam", dict(amsgrad=True, weight_decay=1e-2, decoupled_weight_decay=True,
                                          grad_scale=GRAD_SCALE)),
    # eps = 1e-3: with fp16 state and eps = 1e-8, second moments that underflow to 0 turn
    # m / (sqrt(v) + eps) into steps of ~100 and the fp16 reference itself drifted by 3.5
    "adam_l2_maximize_tensor_lr_gsam_accum": ("adam", dict(weight_decay=1e-2, maximize=True, lr_tensor=True,
                                                           gsam=True, accum=True, eps=1e-3)),
}


def trajectory_params(dtype, device) -> list:
    """Odd sizes, 64 tiny tensors, a transposed view: small enough for 7 interpreted Triton steps."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(4097,), (1,), (3,), (0,), (3, 5, 7), (20001,)] + [(int(n),) for n in torch.randint(1, 10, (64,),
                                                                                                 generator=gen)]
    params = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    params.append(torch.randn(33, 17, generator=gen).to(dtype).to(device).t())
    return params


def step_inputs(params: list, t: int, cfg: dict) -> dict:
    """Step t's gradient-like inputs (the same for every implementation and dtype run)."""
    gen = torch.Generator().manual_seed(1000 + t)
    scale = scale_of(cfg)

    def rand(p, s):
        return like(p, (torch.randn(p.shape, generator=gen) * s).to(p.dtype))

    grads = [rand(p, 0.1 * scale) for p in params]
    ascent = [rand(p, 0.1 * scale) for p in params]
    accum = [rand(p, 0.1 * scale) for p in params]
    noise = [rand(p, 0.05) for p in params]
    skipped = "grad_scale" in cfg and t == SKIPPED_STEP
    if skipped:
        grads[0][(0,) * grads[0].dim()] = float("inf")
    return dict(grads=grads, ascent=ascent, accum=accum, noise=noise, skipped=skipped)


def run_trajectory(impl, config: str, dtype, device, upcast_from=None) -> list:
    """[(params, state lists, step counts, budget inputs)] after each step. ``upcast_from``:
    run in fp32 on the values of that dtype's run (the fp32 trajectory of a low-precision run)."""
    kind, cfg = TRAJECTORY_CONFIGS[config]
    data_dtype = upcast_from or dtype
    params = [p.to(dtype) for p in trajectory_params(data_dtype, device)]
    if kind == "sgd":
        state = {"bufs": [torch.zeros_like(p) for p in params]} if cfg.get("momentum") else {"bufs": None}
    else:
        state = {"m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params],
                 "vmax": [torch.zeros_like(p) for p in params] if cfg.get("amsgrad") else None}
        steps = [torch.zeros((), device=device) for _ in params]
    lr_tensor = torch.tensor(0.0, device=device)
    history = []
    for t in range(TRAJECTORY_STEPS):
        lr = (0.1 if kind == "sgd" else 1e-2) * (0.5 + 0.5 * math.cos(math.pi * t / TRAJECTORY_STEPS))
        lr_tensor.fill_(lr)
        x = step_inputs([p.to(data_dtype) for p in params], t, cfg)
        x = {k: [v.to(dtype) for v in vals] if isinstance(vals, list) else vals for k, vals in x.items()}
        sources = [p.clone() for p in params]
        backups = None
        if cfg.get("backups", True):  # SAM: backup <- w, then w is perturbed before the step
            backups = sources
            params = [p + n for p, n in zip(params, x["noise"])]
        kw = {}
        if cfg.get("gsam"):
            kw.update(ascent=x["ascent"], gsam_stats=reference.gsam_reduce(x["ascent"], x["grads"]),
                      alpha=GSAM_ALPHA, gsam_eps=GSAM_EPS)
        if cfg.get("accum"):
            kw.update(accum=x["accum"], accum_scale=ACCUM_SCALE)
        if "grad_scale" in cfg:
            kw.update(grad_scale=torch.tensor(GRAD_SCALE, device=device),
                      found_inf=torch.tensor(float(x["skipped"]), device=device))
        h = hyper(cfg, lr)
        h.pop("lr")
        lr_arg = lr_tensor if cfg.get("lr_tensor") else lr
        before = {k: snapshot(v) for k, v in state.items()}
        if kind == "sgd":
            impl.sgd_step_(params, x["grads"], state["bufs"], lr_arg, backups=backups, first=t == 0, **h, **kw)
        else:
            impl.adam_step_(params, x["grads"], state["m"], state["v"], state["vmax"], steps, lr_arg,
                            backups=backups, **h, **kw)
        history.append(dict(params=snapshot(params), state={k: snapshot(v) for k, v in state.items()},
                            counts=[s.item() for s in steps] if kind == "adam" else None, before=before,
                            sources=sources, grads=x["grads"], kw=kw, lr=lr, first=t == 0, skipped=x["skipped"]))
    return history


@functools.lru_cache(maxsize=6)
def reference_trajectory(config, dtype, device, upcast_from=None):
    return run_trajectory(reference, config, dtype, device, upcast_from)


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("config", list(TRAJECTORY_CONFIGS))
def test_trajectory_matches_reference_fp32(device, name, config):
    kind, cfg = TRAJECTORY_CONFIGS[config]
    expected = reference_trajectory(config, torch.float32, device)
    actual = run_trajectory(ops.get_backend(name, device), config, torch.float32, device)
    carried = None
    for t, (got, exp) in enumerate(zip(actual, expected)):
        if exp["skipped"]:  # weights restored, nothing counted or changed; the budget carries on unchanged
            for run in (got, exp):
                assert_lists_equal(run["params"], run["sources"], f"step {t}: a skipped step changed the weights")
                for key, values in run["before"].items():
                    if values is not None:
                        assert_lists_equal(run["state"][key], values, f"step {t}: a skipped step changed {key}")
            if kind == "adam":
                assert got["counts"] == exp["counts"] == expected[t - 1]["counts"]
            continue
        h = {**hyper(cfg, exp["lr"]), "first": exp["first"]}
        if kind == "sgd":
            carried = sgd_budget(h, exp["kw"], exp["sources"], exp["before"]["bufs"], exp["grads"], carried)
            pairs = [("params", got["params"], exp["params"], carried["p"])]
            if exp["state"]["bufs"] is not None:
                pairs.append(("bufs", got["state"]["bufs"], exp["state"]["bufs"], carried["buf"]))
        else:
            assert got["counts"] == exp["counts"], f"step {t}: step counts"
            after = {"m": exp["state"]["m"], "v": exp["state"]["v"], "vmax": exp["state"]["vmax"]}
            carried = adam_budget(h, exp["kw"], exp["sources"], exp["before"], after, exp["grads"], exp["counts"],
                                  carried)
            pairs = [("params", got["params"], exp["params"], carried["p"]),
                     ("exp_avg", got["state"]["m"], exp["state"]["m"], carried["m"]),
                     ("exp_avg_sq", got["state"]["v"], exp["state"]["v"], carried["v"])]
            if cfg.get("amsgrad"):
                pairs.append(("max_exp_avg_sq", got["state"]["vmax"], exp["state"]["vmax"],
                              carried["v"] + flat(exp["before"]["vmax"]).abs()))
        for what, a, e, magnitude in pairs:
            try:
                assert_lists_close(a, e, [magnitude])
            except AssertionError as error:
                raise AssertionError(f"step {t}, {what}: {error}") from None


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", list(TRAJECTORY_CONFIGS))
def test_trajectory_low_precision_tracks_fp32(device, name, dtype, config):
    """A backend may differ from the reference by roundings, but must not drift from the fp32
    trajectory more than twice as far as the reference itself does (tests/test_trajectories.py)."""
    fp32 = reference_trajectory(config, torch.float32, device, dtype)[-1]
    ref = reference_trajectory(config, dtype, device)[-1]
    got = run_trajectory(ops.get_backend(name, device), config, dtype, device)[-1]
    lists = [("params", got["params"], ref["params"], fp32["params"])]
    lists += [(key, got["state"][key], ref["state"][key], fp32["state"][key])
              for key in ref["state"] if ref["state"][key] is not None]
    for what, g, r, f in lists:
        f, r, g = flat(f), flat(r), flat(g)
        ref_err, got_err = (r - f).abs().max().item(), (g - f).abs().max().item()
        assert got_err <= 2 * ref_err + 2 * torch.finfo(dtype).eps * f.abs().max().item(), \
            f"{what}: drifted {got_err:.3g} from fp32, the reference {ref_err:.3g}"
    if got["counts"] is not None:
        assert got["counts"] == ref["counts"]


# ---- the unperturb chain ----------------------------------------------------------------------

@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_restore_gsam_reduce(device, name, dtype, kind):
    backend = ops.get_backend(name, device)
    inputs = cached_inputs(kind, dtype, device)
    params = inputs.params_before(True)
    stats = backend.restore_gsam_reduce(params, inputs.sources, inputs.ascent, inputs.grads)
    assert_lists_equal(params, inputs.sources, "restore_gsam_reduce must restore the backups bit-exactly")
    if inputs.case.owners:
        inputs.case.check_outside_untouched(params)
    expected = reference.gsam_reduce(inputs.ascent, inputs.grads)
    assert stats.shape == (2,) and stats.dtype == torch.float32 and stats.device.type == device
    abs_dot = (flat(inputs.ascent) * flat(inputs.grads)).abs().sum()
    assert_close_scaled(stats[0], expected[0], abs_dot, dtype, reduction=True)
    assert_close_scaled(stats[1], expected[1], 0.0, dtype, reduction=True)
    again = backend.restore_gsam_reduce(params, inputs.sources, inputs.ascent, inputs.grads)
    assert torch.equal(stats, again), "restore_gsam_reduce is not bitwise repeatable"


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, False])
def test_gsam_combine_accumulate(device, name, dtype, kind, init):
    backend = ops.get_backend(name, device)
    inputs = cached_inputs(kind, dtype, device)
    stats = reference.gsam_reduce(inputs.ascent, inputs.grads)
    grads_before = snapshot(inputs.grads)
    results = []
    for impl in (reference, backend):
        accum = [_view_copy(a) for a in inputs.accum]
        impl.gsam_combine_accumulate_(accum, inputs.grads, inputs.ascent, stats, GSAM_ALPHA, GSAM_EPS, ACCUM_SCALE,
                                      init)
        results.append(accum)
    assert_lists_equal(inputs.grads, grads_before, "gsam_combine_accumulate_ must not write the gradients")
    kw = dict(ascent=inputs.ascent, gsam_stats=stats, alpha=GSAM_ALPHA, gsam_eps=GSAM_EPS)
    magnitude = ACCUM_SCALE * direction_magnitude(kw, inputs.grads) + (0.0 if init else flat(inputs.accum).abs())
    assert_lists_close(results[1], results[0], [magnitude])


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, False])
def test_restore_accumulate(device, name, dtype, kind, init):
    backend = ops.get_backend(name, device)
    inputs = cached_inputs(kind, dtype, device)
    results = []
    for impl in (reference, backend):
        params, accum = inputs.params_before(True), [_view_copy(a) for a in inputs.accum]
        impl.restore_accumulate_(params, inputs.sources, accum, inputs.grads, ACCUM_SCALE, init)
        results.append((params, accum))
        if inputs.case.owners:
            inputs.case.check_outside_untouched(params)
    assert_lists_equal(results[1][0], inputs.sources, "restore_accumulate_ must restore the backups bit-exactly")
    magnitude = ACCUM_SCALE * flat(inputs.grads).abs() + (0.0 if init else flat(inputs.accum).abs())
    assert_lists_close(results[1][1], results[0][1], [magnitude])


@pytest.mark.parametrize("name", ["reference"] + fast_backends("cpu"))
def test_empty_lists_are_no_ops(name):
    backend = ops.get_backend(name, "cpu")
    backend.sgd_step_([], [], None, 0.1)
    backend.adam_step_([], [], [], [], None, [], 0.1)
    assert backend.restore_gsam_reduce([], [], [], []).tolist() == [0.0, 0.0]
    backend.gsam_combine_accumulate_([], [], [], torch.zeros(2), 0.4)
    backend.restore_accumulate_([], [], [], [], 0.5)
    # empty tensors: nothing to update, but Adam still counts their step, as torch does
    empty, steps = [torch.empty(0), torch.empty(2, 0)], [torch.tensor(0.0), torch.tensor(3.0)]
    backend.adam_step_(empty, empty, [torch.empty(0), torch.empty(2, 0)], [torch.empty(0), torch.empty(2, 0)], None,
                       steps, 0.1)
    assert [s.item() for s in steps] == [1.0, 4.0]


# ---- the reference is torch.optim ------------------------------------------------------------

def _torch_optimizer_run(optimizer_cls, kwargs, steps=3):
    """Parameters and state after ``steps`` steps of the torch.optim class, and of reference's op."""
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(s, generator=gen) for s in ((37,), (4, 5), (1,))]
    grads = [[torch.randn(p.shape, generator=gen) * 0.1 for p in init] for _ in range(steps)]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = optimizer_cls(params, foreach=False, **kwargs)
    mine = [p.clone() for p in init]
    if optimizer_cls is torch.optim.SGD:
        bufs = [torch.zeros_like(p) for p in init] if kwargs.get("momentum") else None
    else:
        m, v = [torch.zeros_like(p) for p in init], [torch.zeros_like(p) for p in init]
        vmax = [torch.zeros_like(p) for p in init] if kwargs.get("amsgrad") else None
        counts = [torch.tensor(0.0) for _ in init]
    options = {k: v for k, v in kwargs.items() if k not in ("betas", "lr")}
    for t in range(steps):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.step()
        if optimizer_cls is torch.optim.SGD:
            reference.sgd_step_(mine, grads[t], bufs, kwargs["lr"], first=t == 0, **options)
        else:
            beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
            reference.adam_step_(mine, grads[t], m, v, vmax, counts, kwargs["lr"], beta1, beta2,
                                 decoupled_weight_decay=optimizer_cls is torch.optim.AdamW, **options)
    if optimizer_cls is torch.optim.SGD:
        mine_state = [{"momentum_buffer": b} for b in bufs] if bufs is not None else None
    else:
        mine_state = [dict(step=s, exp_avg=a, exp_avg_sq=b, **({"max_exp_avg_sq": c} if vmax else {}))
                      for s, a, b, c in zip(counts, m, v, vmax or m)]
    return params, opt, mine, mine_state


@pytest.mark.parametrize("optimizer_cls,kwargs", [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-2, maximize=True)),
    (torch.optim.SGD, dict(lr=torch.tensor(0.1), momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True)),
    (torch.optim.AdamW, dict(lr=1e-2, betas=(0.3, 0.9), weight_decay=1e-2)),
    (torch.optim.AdamW, dict(lr=torch.tensor(1e-2), weight_decay=1e-2, amsgrad=True)),
], ids=["sgd", "sgd_momentum_dampening_wd_maximize", "sgd_nesterov_tensor_lr", "adam_l2_amsgrad_maximize",
        "adamw_large_lerp_weight", "adamw_amsgrad_tensor_lr"])
def test_reference_is_torch_optim_and_keeps_its_state(optimizer_cls, kwargs):
    """The reference's steps equal the torch.optim class bit for bit, in parameters and in the
    state tensors torch keeps under its own keys (so a checkpoint moves between the two)."""
    params, opt, mine, mine_state = _torch_optimizer_run(optimizer_cls, kwargs)
    assert_lists_equal(mine, [p.detach() for p in params], "reference differs from torch.optim")
    if mine_state is None:
        assert all(opt.state[p].get("momentum_buffer") is None for p in params)
        return
    for p, state in zip(params, mine_state):
        assert set(opt.state[p]) == set(state), "state keys differ from torch.optim's"
        for key, value in state.items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("name", fast_backends("cpu"))
def test_state_continues_in_torch_optim(name):
    """State written by a fused backend, loaded into torch.optim.AdamW, steps on like the backend."""
    backend = ops.get_backend(name, "cpu")
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen) for s in ((300,), (7, 3))]
    grads = [[torch.randn(p.shape, generator=gen) * 0.1 for p in init] for _ in range(3)]
    mine = [p.clone() for p in init]
    m, v, vmax = ([torch.zeros_like(p) for p in init] for _ in range(3))
    counts = [torch.tensor(0.0) for _ in init]
    for g in grads[:2]:
        backend.adam_step_(mine, g, m, v, vmax, counts, 1e-2, weight_decay=1e-2, amsgrad=True,
                           decoupled_weight_decay=True, backups=[p.clone() for p in mine])
    params = [torch.nn.Parameter(p.clone()) for p in mine]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, amsgrad=True, foreach=False)
    opt.load_state_dict({"state": {i: dict(step=counts[i].clone(), exp_avg=m[i].clone(), exp_avg_sq=v[i].clone(),
                                           max_exp_avg_sq=vmax[i].clone()) for i in range(len(init))},
                         "param_groups": opt.state_dict()["param_groups"]})
    for p, g in zip(params, grads[2]):
        p.grad = g.clone()
    opt.step()
    backend.adam_step_(mine, grads[2], m, v, vmax, counts, 1e-2, weight_decay=1e-2, amsgrad=True,
                       decoupled_weight_decay=True)
    for p, w in zip(params, mine):
        assert_close_scaled(w, p.detach(), p.detach().abs() + 1e-2)
    assert [opt.state[p]["step"].item() for p in params] == [c.item() for c in counts] == [3.0, 3.0]


# ---- the compiled ops: opcheck, eager entry points, argument errors ---------------------------

def fused_step_opcheck_cases(device: str, dtype: torch.dtype) -> list[tuple]:
    """(op, args) covering every new torch.ops.fastsam op and its optional arguments
    (tests/test_compiled.py runs them with the other ops' cases)."""
    gen = torch.Generator().manual_seed(8)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    shapes = [(5,), (3, 4), (0,), (70,)]
    w, g, asc, acc, bk = ([randn(*s) for s in shapes] for _ in range(5))
    m, v = [randn(*s) for s in shapes], [randn(*s).abs() for s in shapes]
    strided = [randn(8, 6)[:, ::2], randn(5, 7).t()]
    strided_g, strided_bk = [randn(8, 3), randn(7, 5)], [randn(8, 3), randn(7, 5)]
    zeros = [torch.zeros_like(t) for t in strided]
    one = torch.tensor(1.0, device=device)
    lr_t, scale, no_inf, inf = (torch.tensor(x, device=device) for x in (0.01, 8.0, 0.0, 1.0))
    stats = torch.tensor([0.3, 2.0], device=device)
    steps = lambda n: [torch.tensor(float(i), device=device) for i in range(n)]  # noqa: E731
    f = torch.ops.fastsam
    return [
        (f.sgd_step_, (w, g, [], bk, 0.1, None, 0.0, 0.0, 0.0, False, False, False, None, None, [], None, 0.0,
                       1e-12, [], 1.0)),
        (f.sgd_step_, (w, g, [torch.empty_like(t) for t in w], [], 0.0, lr_t, 1e-2, 0.9, 0.0, True, True, True,
                       scale, no_inf, asc, stats, 0.4, 1e-12, acc, 0.5)),
        (f.sgd_step_, (strided, strided_g, zeros, strided_bk, 0.1, None, 0.0, 0.9, 0.1, False, False, False, scale,
                       inf, [], None, 0.0, 1e-12, [], 1.0)),
        (f.adam_step_, (w, g, m, v, [], steps(len(w)), bk, 1e-2, None, 0.9, 0.999, 1e-8, 1e-2, False, False, True,
                        None, None, [], None, 0.0, 1e-12, [], 1.0)),
        (f.adam_step_, (w, g, m, v, [t.clone() for t in v], steps(len(w)), [], 0.0, lr_t, 0.3, 0.9, 1e-8, 1e-2,
                        True, True, False, scale, no_inf, asc, stats, 0.4, 1e-12, acc, 0.5)),
        (f.adam_step_, (strided, strided_g, zeros, [z.clone() for z in zeros], [], steps(2), strided_bk, 1e-2,
                        None, 0.9, 0.999, 1e-8, 0.0, False, False, False, one, inf, [], None, 0.0, 1e-12, [], 1.0)),
        (f.restore_gsam_reduce, (w, bk, asc, g)),
        (f.restore_gsam_reduce, (strided, strided_bk, strided_g, strided_g)),
        (f.gsam_combine_accumulate_, (acc, g, asc, stats, 0.4, 1e-12, 0.5, True)),
        (f.gsam_combine_accumulate_, (zeros, strided_g, strided_bk, stats, 0.4, 1e-12, 0.5, False)),
        (f.restore_accumulate_, (w, bk, acc, g, 0.5, False)),
        (f.restore_accumulate_, (strided, strided_bk, zeros, strided_g, 0.5, True)),
    ]


needs_ext = pytest.mark.skipif(compiled.extension_error() is not None, reason="fastsam._C is not built")
HAS_CUDA_KERNELS = compiled.extension_error() is None and compiled.cuda_kernels_built() and HAS_CUDA
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA device and the CUDA kernels")]


@needs_ext
def test_opcheck_cases_cover_every_fused_op():
    """test_compiled.py::test_opcheck_every_op runs these; here: they name every new op."""
    ran = {str(op).split(".")[-1] for op, _ in fused_step_opcheck_cases("cpu", torch.float32)}
    assert ran == set(ops.FUSED_STEP_OP_NAMES)


class _NoOps:
    def __getattr__(self, name):
        raise AssertionError(f"torch.ops.fastsam.{name} was called instead of the eager entry point")


def _run_compiled_ops(backend, dtype):
    inputs = Inputs.make("sweep", dtype, "cpu", 3, GRAD_SCALE)
    params = inputs.params_before(True)
    bufs = [torch.zeros_like(p) for p in params]
    m, v, vmax = ([torch.zeros_like(p) for p in params] for _ in range(3))
    steps = [torch.tensor(0.0) for _ in params]
    stats = backend.restore_gsam_reduce(params, inputs.sources, inputs.ascent, inputs.grads)
    chain = dict(ascent=inputs.ascent, gsam_stats=stats, alpha=GSAM_ALPHA, accum=inputs.accum, accum_scale=0.5,
                 grad_scale=torch.tensor(GRAD_SCALE), found_inf=torch.tensor(0.0))
    backend.sgd_step_(params, inputs.grads, bufs, torch.tensor(0.1), momentum=0.9, nesterov=True, first=True,
                      backups=inputs.sources, **chain)
    backend.adam_step_(params, inputs.grads, m, v, vmax, steps, 1e-2, amsgrad=True, weight_decay=1e-2, **chain)
    accum = [a.clone() for a in inputs.accum]
    backend.gsam_combine_accumulate_(accum, inputs.grads, inputs.ascent, stats, 0.4, 1e-12, 0.5)
    backend.restore_accumulate_(params, inputs.sources, accum, inputs.grads, 0.25)
    return [stats] + params + bufs + m + v + vmax + steps + accum


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_entry_points_and_dispatcher_agree_bitwise(monkeypatch, dtype):
    """fastsam._C's eager functions (tensors read from the Python lists) and torch.ops.fastsam
    run the same kernels: the same bits, and version counters bumped like in-place ops."""
    backend = ops.get_backend("cpp", "cpu")
    compiled.load_extension()
    with monkeypatch.context() as m:
        m.setattr(compiled, "_ops", lambda: _NoOps())
        eager = _run_compiled_ops(backend, dtype)
    with monkeypatch.context() as m:
        m.setattr(compiled, "_eager", lambda: None)
        dispatched = _run_compiled_ops(backend, dtype)
    assert len(eager) == len(dispatched)
    assert_lists_equal(eager, dispatched, "the eager entry points and torch.ops differ")
    p = torch.zeros(3)
    version = p._version
    backend.sgd_step_([p], [torch.ones(3)], None, 0.5)
    assert p._version > version and p.tolist() == [-0.5, -0.5, -0.5]


@pytest.mark.parametrize("name", ["reference"] + fast_backends("cpu"))
def test_argument_errors_say_what_is_wrong(name):
    backend = ops.get_backend(name, "cpu")
    w, g = [torch.zeros(3)], [torch.ones(3)]
    errors = (ValueError, RuntimeError)
    with pytest.raises(errors, match="Nesterov momentum requires a momentum and zero dampening"):
        backend.sgd_step_(w, g, [torch.zeros(3)], 0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(errors, match="momentum != 0 needs one momentum buffer per parameter"):
        backend.sgd_step_(w, g, None, 0.1, momentum=0.9)
    with pytest.raises(errors, match="momentum buffers were given but momentum is 0"):
        backend.sgd_step_(w, g, [torch.zeros(3)], 0.1)
    with pytest.raises(errors, match="ascent and gsam_stats go together"):
        backend.sgd_step_(w, g, None, 0.1, ascent=g)
    with pytest.raises(errors, match="amsgrad needs one max_exp_avg_sq per parameter"):
        backend.adam_step_(w, g, [torch.zeros(3)], [torch.zeros(3)], None, [torch.tensor(0.0)], 0.1, amsgrad=True)
    with pytest.raises(errors, match="1-element float32 tensor"):
        backend.adam_step_(w, g, [torch.zeros(3)], [torch.zeros(3)], None, [torch.tensor(0.0, dtype=torch.float64)],
                           0.1)
    with pytest.raises(errors, match="steps has 2 tensors but params has 1"):
        backend.adam_step_(w, g, [torch.zeros(3)], [torch.zeros(3)], None, [torch.tensor(0.0)] * 2, 0.1)
    with pytest.raises(errors, match="betas must be in"):
        backend.adam_step_(w, g, [torch.zeros(3)], [torch.zeros(3)], None, [torch.tensor(0.0)], 0.1, beta1=1.0)
    assert w[0].tolist() == [0.0, 0.0, 0.0], "a refused call changed the weights"


@needs_ext
def test_compiled_list_errors_name_the_list():
    f = torch.ops.fastsam
    a, b = torch.zeros(3), torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has shape \[4\] but params\[0\] has shape \[3\]"):
        f.sgd_step_([a], [a], [b], [], 0.1, None, 0.0, 0.9, 0.0, False, False, False, None, None, [], None, 0.0,
                    1e-12, [], 1.0)
    with pytest.raises(RuntimeError, match="exp_avg_sqs has 2 tensors but params has 1"):
        f.adam_step_([a], [a], [a], [a, a], [], [torch.tensor(0.0)], [], 0.1, None, 0.9, 0.999, 1e-8, 0.0, False,
                     False, False, None, None, [], None, 0.0, 1e-12, [], 1.0)
    with pytest.raises(RuntimeError, match="gsam_stats must have 2 element"):
        f.sgd_step_([a], [a], [], [], 0.1, None, 0.0, 0.0, 0.0, False, False, False, None, None, [a],
                    torch.tensor(1.0), 0.4, 1e-12, [], 1.0)


# ---- GPU only ---------------------------------------------------------------------------------

def _gpu_step_backends():
    return [pytest.param(name, marks=gpu) for name in ("cuda", "triton")]


@pytest.mark.parametrize("name", _gpu_step_backends())
def test_fused_steps_never_synchronise_with_the_host(name):
    device = "cuda"
    backend = ops.get_backend(name, device)
    inputs = Inputs.make("sweep", torch.float32, device, 1, GRAD_SCALE)
    params = inputs.params_before(True)
    bufs, m, v, vmax = ([torch.zeros_like(p) for p in params] for _ in range(4))
    steps = [torch.zeros((), device=device) for _ in params]
    lr, scale, found = (torch.tensor(x, device=device) for x in (0.01, GRAD_SCALE, 0.0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = backend.restore_gsam_reduce(params, inputs.sources, inputs.ascent, inputs.grads)
        chain = dict(ascent=inputs.ascent, gsam_stats=stats, alpha=GSAM_ALPHA, accum=inputs.accum, accum_scale=0.5,
                     grad_scale=scale, found_inf=found)
        backend.sgd_step_(params, inputs.grads, bufs, lr, momentum=0.9, first=True, backups=inputs.sources, **chain)
        backend.adam_step_(params, inputs.grads, m, v, vmax, steps, lr, amsgrad=True, weight_decay=1e-2,
                           decoupled_weight_decay=True, **chain)
        backend.gsam_combine_accumulate_(inputs.accum, inputs.grads, inputs.ascent, stats, 0.4)
        backend.restore_accumulate_(params, inputs.sources, inputs.accum, inputs.grads, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", _gpu_step_backends())
def test_adam_step_in_a_cuda_graph_follows_a_tensor_lr(name):
    """Captured once, replayed with a new lr each time (a scheduler writing the lr tensor):
    the replays follow the reference step for step, step counts included."""
    device = "cuda"
    backend = ops.get_backend(name, device)
    inputs = Inputs.make("sweep", torch.float32, device, 2)
    params = [p.clone() for p in inputs.sources]
    m, v = ([torch.zeros_like(p) for p in params] for _ in range(2))
    steps = [torch.zeros((), device=device) for _ in params]
    lr = torch.tensor(1e-2, device=device)
    expected = [p.clone() for p in params]
    exp_m, exp_v = ([torch.zeros_like(p) for p in params] for _ in range(2))
    exp_steps = [torch.zeros((), device=device) for _ in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture (the triton backend builds its tables here)
        backend.adam_step_(params, inputs.grads, m, v, None, steps, lr, weight_decay=1e-2, decoupled_weight_decay=True)
    torch.cuda.current_stream().wait_stream(stream)
    reference.adam_step_(expected, inputs.grads, exp_m, exp_v, None, exp_steps, 1e-2, weight_decay=1e-2,
                         decoupled_weight_decay=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.adam_step_(params, inputs.grads, m, v, None, steps, lr, weight_decay=1e-2, decoupled_weight_decay=True)
    for value in (5e-3, 2e-3, 1e-3):
        lr.fill_(value)
        graph.replay()
        reference.adam_step_(expected, inputs.grads, exp_m, exp_v, None, exp_steps, value, weight_decay=1e-2,
                             decoupled_weight_decay=True)
    torch.cuda.synchronize()
    assert [s.item() for s in steps] == [s.item() for s in exp_steps] == [4.0] * len(steps)
    assert_lists_close(params, expected, [flat(expected).abs() * 0 + 1e-2])
    assert_lists_close(m, exp_m, [flat(inputs.grads).abs()])


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_ext), pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_steps_with_mixed_layouts(device, dtype):
    """Layouts the compiled kernels must stage (tests/test_compiled.py: layout_cases):
    transposed and channels_last params, an unaligned view, a strided view, a stride-0
    (expanded) gradient; the sources and the state in other layouts again."""
    from tests.test_compiled import layout_cases
    backend = ops.get_backend("cpp" if device == "cpu" else "cuda", device)
    params, grads, _ = layout_cases(device, dtype)
    owners = [_view_copy(p) for p in params]
    backups = [p.detach().clone().contiguous() * 0.5 for p in params]  # contiguous, other values

    def sgd(impl, w, state):
        impl.sgd_step_(w, grads, state, 0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, backups=backups)

    def adam(impl, w, state):
        steps = [torch.tensor(2.0, device=device) for _ in w]
        impl.adam_step_(w, grads, state, [t.clone() for t in state], [t.clone() for t in state], steps, 1e-2,
                        amsgrad=True, backups=backups)

    def state_like(p):  # 2-d state transposed against a contiguous parameter, and the reverse
        t = torch.full(p.shape, 0.01, dtype=dtype, device=device)
        return t.t().contiguous().t() if p.dim() == 2 else t

    for name, run in (("sgd", sgd), ("adam", adam)):
        results = []
        for impl in (reference, backend):
            w = [_view_copy(o) for o in owners]
            state = [state_like(p) for p in params]
            run(impl, w, state)
            results.append((w, state))
        (exp_w, exp_s), (got_w, got_s) = results
        magnitude = flat(backups).abs() + 1.0  # |source| + an update of at most lr * O(1)
        assert_lists_close(got_w, exp_w, [magnitude])
        assert_lists_close(got_s, exp_s, [flat(grads).abs() + 0.01])
        for w, o in zip(got_w, owners):  # nothing written outside the views
            mask = torch.ones(o.untyped_storage().nbytes() // o.element_size(), dtype=torch.bool, device=device)
            mask.as_strided(w.shape, w.stride(), w.storage_offset()).fill_(False)
            whole = lambda t: t.as_strided((mask.numel(),), (1,), 0)  # noqa: E731
            assert torch.equal(whole(w)[mask], whole(o)[mask]), f"{name}: a write escaped a view"


@needs_ext
def test_cpu_restore_gsam_reduce_does_not_depend_on_thread_count():
    backend = ops.get_backend("cpp", "cpu")
    inputs = cached_inputs("odd", torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(backend.restore_gsam_reduce(inputs.params_before(True), inputs.sources, inputs.ascent,
                                                       inputs.grads))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
