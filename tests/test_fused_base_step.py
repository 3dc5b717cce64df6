"""SAM(fused_base_step=...): the base step taken from SAM's backup instead of after a restore.

Every fused trajectory (7 steps, an LR scheduler changing lr at each) is compared with
the reference: backend='reference', fused_base_step=False and torch.optim with
foreach=False, i.e. an exact restore followed by torch.optim's own step. Parameters and
the base optimizer's state (same keys, tensors close, equal step counts) after every
step, with the trajectory tolerances of fastsam/tolerances.py (fp32: assert_close with
TRAJECTORY_RTOL/ATOL; bf16/fp16: no further from the fp32 trajectory than twice the
reference's own drift). The tests also check that the fused path ran (no restore_ call at
all) and that every fallback says why, once.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam.tolerances import TRAJECTORY_ATOL, TRAJECTORY_RTOL, drift_bound
from tests.conftest import HAS_CUDA, fast_backends

STEPS, BATCH = 7, 24

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum_dampening_l2": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "sgd_nesterov_maximize": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam_l2_amsgrad_maximize": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    "adamw_tensor_lr": (torch.optim.AdamW, dict(lr="tensor", weight_decay=1e-2)),
    # eps = 1e-3 for fp16: with 1e-8, second moments that underflow to 0 make steps of ~100
    # and the fp16 reference itself diverges to nan
    "adamw_amsgrad_eps": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, eps=1e-3)),
}
VARIANTS = {
    "sam": dict(rho=0.05),
    "asam": dict(rho=0.5, adaptive=True, eta=0.01),
    "gsam": dict(rho=0.1, gsam_alpha=0.4),
    "gsam_normalized_asam": dict(rho=0.5, adaptive=True, gsam_alpha=0.4, gsam_normalize_ascent=True),
    "randsam": dict(rho=0.05, randsam=True),
    "obf": dict(rho=0.6, ascent_loss=dict(C=1000.0, gamma=1.0)),
}
LOOPS = ("second_step", "closure", "train_step", "micro_batches", "accumulation_steps")


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    # smooth (no ReLU/BatchNorm kinks), so a 1-ulp difference stays small over 7 steps
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 5))
    return model.to(dtype)


def make_data(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, BATCH, 10, generator=gen).to(dtype),
            torch.randint(0, 5, (STEPS, BATCH), generator=gen))


def _counting_restores(optimizer, counter: list):
    """Make every backend of ``optimizer`` count its restore_ calls into ``counter``."""
    for key, backend in list(optimizer._backends.items()):
        def restore_(*args, _inner=backend.restore_, **kwargs):
            counter.append(1)
            return _inner(*args, **kwargs)
        optimizer._backends[key] = dataclasses.replace(backend, restore_=restore_)


def build(backend: str, variant: str, base: str, fused, dtype=torch.float32, reference=False, device="cpu"):
    settings = dict(VARIANTS[variant])
    obf = settings.pop("ascent_loss", None)
    base_cls, base_kwargs = BASES[base]
    base_kwargs = dict(base_kwargs)
    if base_kwargs.get("lr") == "tensor":
        base_kwargs["lr"] = torch.tensor(1e-2, device=device)
    if reference:
        base_kwargs["foreach"] = False
    if device != "cpu" and base_cls is not torch.optim.SGD:
        base_kwargs["capturable"] = True  # step counts on the device, where the fused kernels read them
    model = make_model(dtype).to(device)
    if settings.get("randsam"):
        settings["generator"] = torch.Generator(device=device).manual_seed(2)
    optimizer = fastsam.SAM(model.parameters(), base_cls, backend=backend, fused_base_step=fused,
                            rounding="nearest", **settings, **base_kwargs)
    return model, optimizer, (fastsam.OutputBiasForgetting(**obf) if obf else None)


def one_step(model, optimizer, loop: str, x, y, ascent_loss, scaler=None):
    if loop == "micro_batches":  # 3 perturbation sub-batches: the fused unperturb chain, then the base step
        fastsam.train_step(model, optimizer, x, y, F.cross_entropy, ascent_loss=ascent_loss, micro_batch=8)
    elif loop == "accumulation_steps":  # 2 calls of 2 sub-batches (8 + 4 examples) each
        for half, step in ((slice(0, 12), False), (slice(12, 24), True)):
            fastsam.train_step(model, optimizer, x[half], y[half], F.cross_entropy, ascent_loss=ascent_loss,
                               micro_batch=8, accumulation_steps=2, step=step)
    elif loop == "train_step" or ascent_loss is not None:
        fastsam.train_step(model, optimizer, x, y, F.cross_entropy, ascent_loss=ascent_loss, scaler=scaler)
    elif loop == "second_step":
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
    else:
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)


def run(backend: str, variant: str, base: str, loop: str, fused, dtype=torch.float32, reference=False, device="cpu"):
    """The state after every step: [(params, [(key, state value)])], and the restore_ count."""
    model, optimizer, ascent_loss = build(backend, variant, base, fused, dtype, reference, device)
    restores: list = []
    _counting_restores(optimizer, restores)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS, eta_min=1e-4)
    x, y = make_data(dtype)
    x, y = x.to(device), y.to(device)
    history = []
    for step in range(STEPS):
        one_step(model, optimizer, loop, x[step], y[step], ascent_loss)
        scheduler.step()
        history.append(snapshot(model, optimizer))
    return history, len(restores)


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in sorted(optimizer.base_optimizer.state[p].items()):
                state.append((key, value.detach().clone()))
    return params, state


def assert_same_history(actual, expected):
    for step, ((p_a, s_a), (p_e, s_e)) in enumerate(zip(actual, expected)):
        for a, e in zip(p_a, p_e):
            torch.testing.assert_close(a, e, rtol=TRAJECTORY_RTOL, atol=TRAJECTORY_ATOL,
                                       msg=lambda m: f"step {step}: {m}")
        assert [k for k, _ in s_a] == [k for k, _ in s_e], f"step {step}: the state's keys differ from torch.optim's"
        for (key, a), (_, e) in zip(s_a, s_e):
            assert a.dtype == e.dtype and a.device == e.device, f"step {step} {key}: {a.dtype} vs {e.dtype}"
            if key == "step":
                assert torch.equal(a, e), f"step {step}: Adam's step count {a} vs {e}"
            else:
                torch.testing.assert_close(a, e, rtol=TRAJECTORY_RTOL, atol=TRAJECTORY_ATOL,
                                           msg=lambda m: f"step {step} {key}: {m}")


_expected_cache: dict = {}


def expected(variant, base, loop, dtype=torch.float32):
    key = (variant, base, loop, dtype)
    if key not in _expected_cache:
        _expected_cache[key] = run("reference", variant, base, loop, False, dtype, reference=True)[0]
    return _expected_cache[key]


def _cases():
    """Every base x variant x loop on the cpp backend; on the others every base and loop with SAM and GSAM."""
    cases = []
    for name in fast_backends("cpu"):
        for base in BASES:
            for variant in VARIANTS:
                for loop in LOOPS:
                    if variant == "obf" and loop not in ("train_step", "micro_batches", "accumulation_steps"):
                        continue  # OBF's ascent loss needs the pass runner
                    if name != "cpp" and variant not in ("sam", "gsam"):
                        continue
                    if name == "triton" and loop != "second_step":
                        continue  # interpreted: keep it short
                    cases.append(pytest.param(name, base, variant, loop, id=f"{name}-{base}-{variant}-{loop}"))
    cases += [pytest.param("reference", base, "gsam", "second_step", id=f"reference-{base}-gsam-second_step")
              for base in BASES]
    return cases


@pytest.mark.parametrize("backend,base,variant,loop", _cases())
def test_fused_trajectory_matches_torch_optim(backend, base, variant, loop):
    actual, restores = run(backend, variant, base, loop, True)
    assert restores == 0, "fused_base_step=True restored the weights separately: the fused step did not run"
    assert_same_history(actual, expected(variant, base, loop))


def _cuda_cases():
    if not HAS_CUDA:
        return [pytest.param("none", id="cuda", marks=[pytest.mark.gpu,
                                                         pytest.mark.skip(reason="no CUDA device on this machine")])]
    return [pytest.param(name, id=f"cuda-{name}", marks=pytest.mark.gpu) for name in fast_backends("cuda")]


@pytest.mark.parametrize("backend", _cuda_cases())
@pytest.mark.parametrize("base", ["sgd_nesterov_maximize", "sgd_momentum_dampening_l2", "adam_l2_amsgrad_maximize",
                                  "adamw_tensor_lr"])
@pytest.mark.parametrize("variant", ["sam", "gsam", "asam"])
@pytest.mark.parametrize("loop", ["second_step", "train_step", "micro_batches"])
def test_fused_trajectory_matches_torch_optim_on_cuda(backend, base, variant, loop):
    """On CUDA (fused_base_step=True; Adam with capturable=True keeps its step counts there)."""
    actual, restores = run(backend, variant, base, loop, True, device="cuda")
    assert restores == 0
    assert_same_history(actual, run("reference", variant, base, loop, False, reference=True, device="cuda")[0])


@pytest.mark.parametrize("base", ["sgd_momentum_dampening_l2", "adamw_amsgrad_eps"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_low_precision_tracks_fp32(base, dtype):
    """bf16/fp16 parameters: fp32 math rounded once may differ from torch's step (which rounds
    after every operation) but must not drift from the fp32 trajectory more than twice as far."""
    fp32 = expected("sam", base, "second_step")[-1]
    ref = expected("sam", base, "second_step", dtype)[-1]
    got, restores = run("cpp", "sam", base, "second_step", True, dtype)
    assert restores == 0
    got = got[-1]
    pairs = list(zip(got[0], ref[0], fp32[0]))
    pairs += [(g, r, f) for (kg, g), (_, r), (_, f) in zip(got[1], ref[1], fp32[1]) if kg != "step"]
    for g, r, f in pairs:
        assert g.dtype == r.dtype
        ref_err = (r.float() - f).abs().max().item()
        got_err = (g.float() - f).abs().max().item()
        assert got_err <= drift_bound(ref_err, f.abs().max().item(), dtype), (got_err, ref_err)


def test_auto_fuses_with_cpp_only():
    """'auto' fuses where it was measured faster: cpp; foreach's composition measured slower
    than torch's fused step, and reference stays torch.optim's own step."""
    _, restores = run("cpp", "sam", "adamw_amsgrad", "second_step", "auto")
    assert restores == 0
    for backend in ("reference", "foreach"):
        _, restores = run(backend, "sam", "adamw_amsgrad", "second_step", "auto")
        assert restores == STEPS
    _, restores = run("cpp", "sam", "adamw_amsgrad", "second_step", False)
    assert restores == STEPS


def _recording_calls(optimizer, calls: list):
    for key, backend in list(optimizer._backends.items()):
        replaced = {}
        for name in ("restore_", "accumulate_", "restore_accumulate_", "restore_gsam_reduce", "gsam_reduce",
                     "gsam_combine_", "gsam_combine_accumulate_", "sgd_step_", "adam_step_"):
            def op(*args, _inner=getattr(backend, name), _name=name, **kwargs):
                calls.append(_name)
                return _inner(*args, **kwargs)
            replaced[name] = op
        optimizer._backends[key] = dataclasses.replace(backend, **replaced)


@pytest.mark.parametrize("variant,expected_calls", [
    ("sam", ["restore_accumulate_"] * 2 + ["adam_step_"]),
    ("gsam", ["restore_gsam_reduce", "gsam_combine_accumulate_"] * 2 + ["gsam_reduce", "adam_step_"]),
])
def test_sub_batches_take_the_fewest_sweeps(variant, expected_calls):
    """docs/DESIGN.md §9: each earlier sub-batch's restore, GSAM combination and accumulation in
    one sweep (SAM) or two (GSAM, which needs a global reduction first); the last sub-batch's
    restore, combination and accumulation are all inside the base step's sweep."""
    model, optimizer, _ = build("cpp", variant, "adam", True)
    calls: list = []
    _recording_calls(optimizer, calls)
    x, y = make_data()
    fastsam.train_step(model, optimizer, x[0], y[0], F.cross_entropy, micro_batch=8)
    assert calls == expected_calls
    assert all(p.grad is None for p in model.parameters()), \
        "after a fused accumulating step .grad must not hold the last sub-batch's gradient as if it were the step's"


@pytest.mark.parametrize("weight", [None, 0.25], ids=["whole_batch", "accumulating"])
def test_a_deferred_restore_is_settled_if_no_base_step_follows(weight):
    """A sub-step told that the base step follows (``then_base_step``, train_step's promise)
    leaves its restore (and accumulation) to that step. If another sub-step comes first, the
    deferred work is done before it touches the gradients or the weights, and the result is
    the unfused one."""
    from fastsam.passes import Pass
    x, y = make_data()
    results = []
    for fused in (True, False):
        model, optimizer, _ = build("cpp", "gsam", "sgd_momentum_dampening_l2", fused)

        def run_pass(kind, scale=1.0, sync=False, i=None):
            loss = F.cross_entropy(model(x[i]), y[i]) * scale
            loss.backward()
            return loss.detach()
        optimizer.sub_step(lambda *a, **k: run_pass(*a, i=0, **k), weight=0.25)
        optimizer._sam_sub_step(lambda *a, **k: run_pass(*a, i=1, **k), weight=weight, then_base_step=True)
        assert optimizer.is_perturbed is False
        # (whole batch: the next sub-step's zero_grad drops that gradient, deferred or not)
        optimizer.sub_step(lambda *a, **k: run_pass(*a, i=2, **k), weight=0.5)
        optimizer.load_accumulated_grads()
        optimizer.base_step()
        results.append(snapshot(model, optimizer))
    assert_same_history([results[0]], [results[1]])


def test_rho_zero_group_steps_from_its_weights():
    """A group with rho = 0 is not perturbed: the fused step takes it from its own weights,
    the other group from the backup; both as torch.optim after an exact restore."""
    histories = []
    for backend, fused in (("cpp", True), ("reference", False)):
        model = make_model()
        groups = [{"params": list(model[0].parameters()), "rho": 0.0},
                  {"params": [p for m in model[1:] for p in m.parameters()]}]
        optimizer = fastsam.SAM(groups, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend,
                                fused_base_step=fused, rounding="nearest", **({} if fused else {"foreach": False}))
        restores: list = []
        _counting_restores(optimizer, restores)
        x, y = make_data()
        history = []
        for step in range(STEPS):
            one_step(model, optimizer, "second_step", x[step], y[step], None)
            history.append(snapshot(model, optimizer))
        assert restores == ([] if fused else [1] * STEPS)
        histories.append(history)
    assert_same_history(*histories)


def test_invalid_mode():
    with pytest.raises(ValueError, match="fused_base_step must be"):
        fastsam.SAM(make_model().parameters(), torch.optim.SGD, lr=0.1, fused_base_step="yes")


# ---- GradScaler ---------------------------------------------------------------------------

def _poison_gradient(model, call: int, value=float("inf")):
    """Replace the gradient of model[0].weight by ``value`` at its ``call``-th backward (1 is the
    first sub-batch's ascent pass, 2 its descent pass, 3 the second sub-batch's ascent pass, ...)."""
    calls = []

    def poison(g):
        calls.append(1)
        return torch.full_like(g, value) if len(calls) == call else g
    return model[0].weight.register_hook(poison)


def _scaled_run(fused, skip_steps, base="adamw_amsgrad", variant="gsam", micro_batch=None, poisoned_call=2):
    model, optimizer, _ = build("cpp" if fused else "reference", variant, base, fused, reference=not fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = make_data()
    history, scales = [], []
    for step in range(STEPS):
        # a descent gradient only: the ascent passes perturb as usual
        handle = _poison_gradient(model, poisoned_call) if step in skip_steps else None
        fastsam.train_step(model, optimizer, x[step], y[step], F.cross_entropy, scaler=scaler, micro_batch=micro_batch)
        if handle is not None:
            handle.remove()
        history.append(snapshot(model, optimizer))
        scales.append(scaler.get_scale())
    return history, scales


@pytest.mark.parametrize("base", ["sgd_momentum_dampening_l2", "adamw_amsgrad"])
def test_grad_scaler_skips_and_unscales_like_torch(base):
    """Steps 0 and 3 have inf descent gradients: skipped (the first one leaves no state behind,
    as torch.optim's skipped step does), the others unscaled inside the fused step."""
    got, got_scales = _scaled_run(True, {0, 3}, base)
    exp, exp_scales = _scaled_run(False, {0, 3}, base)
    assert got_scales == exp_scales and exp_scales[0] < 2.0 ** 8
    assert got[0][1] == [] == exp[0][1], "a skipped first step must not create optimizer state"
    assert_same_history(got, exp)


@pytest.mark.parametrize("variant", ["sam", "gsam"])
@pytest.mark.parametrize("poisoned_call", [2, 6], ids=["first_sub_batch", "last_sub_batch"])
def test_grad_scaler_sees_infs_of_every_sub_batch(variant, poisoned_call):
    """3 sub-batches per step, the last one's accumulation inside the fused step: an inf descent
    gradient of the first sub-batch lives only in the accumulator (.grad holds the last
    sub-batch's) and must still make the scaler skip the step and back off, as unfused."""
    got, got_scales = _scaled_run(True, {1, 4}, "sgd_momentum_dampening_l2", variant, 8, poisoned_call)
    exp, exp_scales = _scaled_run(False, {1, 4}, "sgd_momentum_dampening_l2", variant, 8, poisoned_call)
    assert got_scales == exp_scales and exp_scales[1] < exp_scales[0]
    assert_same_history(got, exp)
    for step in (1, 4):  # skipped: the weights as after the step before
        for a, b in zip(got[step][0], got[step - 1][0]):
            assert torch.equal(a, b)


# ---- failures, checkpoints, fallbacks -----------------------------------------------------------

def test_nonfinite_gradient_leaves_the_weights_unperturbed():
    model, optimizer, _ = build("cpp", "gsam", "adamw_amsgrad", True)
    x, y = make_data()
    one_step(model, optimizer, "second_step", x[0], y[0], None)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = snapshot(model, optimizer)[1]
    optimizer.zero_grad()
    F.cross_entropy(model(x[1]), y[1]).backward()
    optimizer.first_step(zero_grad=True)
    F.cross_entropy(model(x[1]), y[1]).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        optimizer.second_step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b), "the weights were left perturbed (or stepped) after the failure"
    assert not optimizer.is_perturbed
    for (ka, a), (kb, b) in zip(snapshot(model, optimizer)[1], state_before):
        assert ka == kb and torch.equal(a, b)
    one_step(model, optimizer, "second_step", x[2], y[2], None)  # and it trains on


@pytest.mark.parametrize("poisoned_call", [2, 6], ids=["first_sub_batch", "last_sub_batch"])
def test_nonfinite_sub_batch_gradient_leaves_the_weights_unchanged(poisoned_call):
    """Without a scaler, the finite check covers the accumulated sum too, not only .grad."""
    model, optimizer, _ = build("cpp", "sam", "adamw_amsgrad", True)
    x, y = make_data()
    fastsam.train_step(model, optimizer, x[0], y[0], F.cross_entropy, micro_batch=8)
    before = snapshot(model, optimizer)
    handle = _poison_gradient(model, poisoned_call, float("nan"))
    with pytest.raises(FloatingPointError):
        fastsam.train_step(model, optimizer, x[1], y[1], F.cross_entropy, micro_batch=8)
    handle.remove()
    after = snapshot(model, optimizer)
    for a, b in zip(after[0], before[0]):
        assert torch.equal(a, b), "the weights were left perturbed (or stepped) after the failure"
    for (ka, a), (kb, b) in zip(after[1], before[1]):
        assert ka == kb and torch.equal(a, b)
    assert not optimizer.is_perturbed and not optimizer.accumulating
    fastsam.train_step(model, optimizer, x[2], y[2], F.cross_entropy, micro_batch=8)  # and it trains on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_failing_step_op_restores_the_weights():
    model, optimizer, _ = build("cpp", "sam", "sgd_momentum_dampening_l2", True)
    for key, backend in list(optimizer._backends.items()):
        def broken(*args, **kwargs):
            raise RuntimeError("broken step op")
        optimizer._backends[key] = dataclasses.replace(backend, sgd_step_=broken)
    x, y = make_data()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="broken step op"):
        one_step(model, optimizer, "closure", x[0], y[0], None)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    assert not optimizer.is_perturbed


@pytest.mark.parametrize("base", ["sgd_momentum_dampening_l2", "adamw_amsgrad"])
def test_checkpoints_move_between_fused_unfused_and_torch_optim(base):
    """3 fused steps, then the checkpoint resumes an unfused SAM for 4 more: the same trajectory
    as 7 reference steps; and plain torch.optim loads the fused run's state unchanged."""
    x, y = make_data()
    model, fused, _ = build("cpp", "sam", base, True)
    for step in range(3):
        one_step(model, fused, "second_step", x[step], y[step], None)
    saved = fused.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]

    model2, unfused, _ = build("reference", "sam", base, False, reference=True)
    with torch.no_grad():
        for p, w in zip(model2.parameters(), weights):
            p.copy_(w)
    unfused.load_state_dict(saved)
    history = [None] * 3
    for step in range(3, STEPS):
        one_step(model2, unfused, "second_step", x[step], y[step], None)
        history.append(snapshot(model2, unfused))
    model3, reference, _ = build("reference", "sam", base, False, reference=True)
    exp = []
    for step in range(STEPS):
        one_step(model3, reference, "second_step", x[step], y[step], None)
        exp.append(snapshot(model3, reference))
    assert_same_history(history[3:], exp[3:])

    base_cls, base_kwargs = BASES[base]
    plain = base_cls(make_model().parameters(), **base_kwargs)
    plain.load_state_dict(saved)
    params = list(plain.param_groups[0]["params"])
    for p, fused_p in zip(params, model.parameters()):
        for key, value in fused.base_optimizer.state[fused_p].items():
            assert torch.equal(plain.state[p][key], value)


class _Recording(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))


@pytest.fixture
def fastsam_log():
    handler = _Recording()
    logger = logging.getLogger("fastsam")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _train(optimizer, model, steps=3):
    restores: list = []
    _counting_restores(optimizer, restores)
    x, y = make_data()
    for step in range(steps):
        one_step(model, optimizer, "second_step", x[step], y[step], None)
    return len(restores)


def test_unsupported_base_optimizer_falls_back_with_one_warning(fastsam_log):
    model = make_model()
    optimizer = fastsam.SAM(model.parameters(), torch.optim.RMSprop, lr=1e-3, fused_base_step=True)
    assert _train(optimizer, model) == 3
    warnings_ = [m for level, m in fastsam_log if level == logging.WARNING and "unfused" in m]
    assert len(warnings_) == 1 and "RMSprop" in warnings_[0]


def test_step_hooks_fall_back(fastsam_log):
    model = make_model()
    optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, fused_base_step=True)
    calls = []
    optimizer.base_optimizer.register_step_post_hook(lambda *args: calls.append(1))
    assert _train(optimizer, model) == 3
    assert calls == [1, 1, 1], "the hook must run: the step was not torch's"
    assert sum("step hooks" in m for _, m in fastsam_log) == 1


def test_unsupported_option_falls_back(fastsam_log):
    model = make_model()
    optimizer = fastsam.SAM(model.parameters(), torch.optim.Adam, lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.99)),
                            fused_base_step=True)
    assert _train(optimizer, model) == 3
    assert sum("betas" in m for _, m in fastsam_log) == 1


def test_scheduler_attached_to_the_base_optimizer_sees_its_steps(recwarn):
    model = make_model()
    optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, fused_base_step=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer.base_optimizer, step_size=1, gamma=0.5)
    x, y = make_data()
    for step in range(2):
        one_step(model, optimizer, "second_step", x[step], y[step], None)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)], \
        "the scheduler thinks the optimizer never stepped"


@pytest.mark.parametrize("backend", _cuda_cases())
def test_auto_keeps_the_unfused_step_on_cuda(backend):
    """Until a GPU run has measured the fused step there, 'auto' restores and runs torch's step."""
    _, restores = run(backend, "sam", "adamw_tensor_lr", "second_step", "auto", device="cuda")
    assert restores == STEPS
