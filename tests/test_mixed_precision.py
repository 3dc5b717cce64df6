"""Mixed precision: bf16 autocast, fp16 with a GradScaler (CPU autocast here; the same code
path runs on CUDA), pure bf16 parameters, and inf/nan handling with and without a scaler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam

STEPS = 12


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def data(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 32, 8, generator=gen)
    w = torch.randn(8, 4, generator=gen)
    return x.to(dtype), (x @ w).argmax(-1)  # learnable labels, so the loss really falls


def train(model, opt, dtype=torch.float32, **kwargs):
    x, y = data(dtype)
    losses = []
    for step in range(STEPS):
        out = fastsam.train_step(model, opt, x[step], y[step], F.cross_entropy, micro_batch=16, **kwargs)
        losses.append(out.loss.item())
    return losses


def sam(model, **kwargs):
    return fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.2, momentum=0.9, **kwargs)


def relative_distance(model, reference):
    num = sum(((p.float() - q.float()) ** 2).sum() for p, q in zip(model.parameters(), reference.parameters()))
    den = sum((q.float() ** 2).sum() for q in reference.parameters())
    return (num / den).sqrt().item()


@pytest.fixture(scope="module")
def fp32_run():
    model = make_model()
    losses = train(model, sam(model))
    assert losses[-1] < 0.8 * losses[0]  # the reference run learns
    return model, losses


@pytest.mark.parametrize("mode", ["bf16-autocast", "fp16-autocast-scaler", "bf16-params"])
def test_low_precision_run_tracks_fp32(fp32_run, mode):
    reference, ref_losses = fp32_run
    if mode == "bf16-params":
        model = make_model(torch.bfloat16)
        losses = train(model, sam(model), dtype=torch.bfloat16)
    elif mode == "bf16-autocast":
        model = make_model()
        losses = train(model, sam(model), autocast=torch.bfloat16)
    else:
        model = make_model()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        losses = train(model, sam(model), autocast=torch.float16, scaler=scaler)
        assert scaler.get_scale() >= 2.0 ** 12  # no overflow on this problem
    # Within 4 units of the format's precision (bf16: 2^-8, fp16: 2^-11) of the fp32 weights
    # after 12 steps; plain SGD without SAM ends 0.096 away (measured), far outside.
    precision = 2.0 ** -11 if mode.startswith("fp16") else 2.0 ** -8
    assert relative_distance(model, reference) < 4 * precision
    assert abs(losses[-1] - ref_losses[-1]) < 0.02 * ref_losses[0]


def poisoned_loss(at_call: int, counter: list):
    """cross_entropy that returns inf on its ``at_call``-th call (counting from 0)."""
    def loss_fn(out, y):
        counter.append(1)
        loss = F.cross_entropy(out.float(), y)
        return loss * float("inf") if len(counter) - 1 == at_call else loss
    return loss_fn


@pytest.mark.parametrize("where", ["ascent", "descent"])
def test_scaler_skips_steps_with_inf_without_touching_weights(where):
    model = make_model()
    opt = sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = data()
    fastsam.train_step(model, opt, x[0], y[0], F.cross_entropy, scaler=scaler, autocast=torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    # calls per sub-step: ascent forward (1), perturbed forward (2); poison the 2nd sub-batch
    counter = []
    out = fastsam.train_step(model, opt, x[1], y[1], poisoned_loss(2 if where == "ascent" else 3, counter),
                             micro_batch=16, scaler=scaler, autocast=torch.float16)
    assert not out.stepped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m)
               for p, m in zip(model.parameters(), momentum))
    assert scaler.get_scale() == 2.0 ** 9  # backed off once, as usual
    assert not opt.is_perturbed and not opt.accumulating
    out = fastsam.train_step(model, opt, x[2], y[2], F.cross_entropy, micro_batch=16, scaler=scaler,
                             autocast=torch.float16)
    assert out.stepped and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hand_written_loop_with_scaler():
    """The README's recipe for loops that call first_step/second_step themselves."""
    model = make_model()
    opt = sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    for step, poison in enumerate([False, True]):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x[step]), y[step]) * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        if opt.first_step(zero_grad=True, skip_nonfinite=True):
            with fastsam.frozen_running_stats(model), torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x[step]), y[step])
            scaler.scale(loss).backward()
            opt.unperturb()
        opt.base_step(scaler)
        scaler.update()
        opt.zero_grad()
        if step == 0:
            assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the inf step was skipped
    assert scaler.get_scale() == 2.0 ** 9


def test_nonfinite_gradients_without_scaler_raise_and_leave_weights_unchanged():
    model = make_model()
    opt = sam(model)
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="inf or nan"):
        fastsam.train_step(model, opt, x[0], y[0], poisoned_loss(1, []))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.is_perturbed
    fastsam.train_step(model, opt, x[0], y[0], F.cross_entropy)  # and training goes on
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_check_finite_off_lets_nan_through_like_torch_optim():
    model = make_model()
    opt = sam(model, check_finite=False)
    x, y = data()
    fastsam.train_step(model, opt, x[0], y[0], poisoned_loss(1, []))
    assert any(torch.isnan(p).any() for p in model.parameters())


def test_scaler_skip_in_an_accumulation_call_skips_the_whole_cycle():
    """A GradScaler skip in a step=False call must not finish the step there (base step,
    scaler.update()); the cycle's later calls must not step on a partial gradient."""
    model = make_model()
    opt = sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = data()
    fastsam.train_step(model, opt, x[0], y[0], F.cross_entropy, micro_batch=16, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    counter = []
    first = fastsam.train_step(model, opt, x[1], y[1], poisoned_loss(0, counter), micro_batch=16, scaler=scaler,
                               accumulation_steps=2, step=False)
    assert scaler.get_scale() == 2.0 ** 10  # nothing finished inside the cycle
    second = fastsam.train_step(model, opt, x[2], y[2], F.cross_entropy, micro_batch=16, scaler=scaler,
                                accumulation_steps=2, step=True)
    assert not first.stepped and not second.stepped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m)
               for p, m in zip(model.parameters(), momentum))
    assert scaler.get_scale() == 2.0 ** 9  # backed off once, for the cycle
    assert not opt.is_perturbed and not opt.accumulating
    for i in range(2):  # the next cycle steps
        out = fastsam.train_step(model, opt, x[3 + i], y[3 + i], F.cross_entropy, micro_batch=16, scaler=scaler,
                                 accumulation_steps=2, step=(i == 1))
    assert out.stepped and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hand_written_gsam_loop_with_scaler_follows_the_unscaled_trajectory():
    """The README's AMP recipe with GSAM: the loss scale cancels in the normalised
    perturbation and is linear in GSAM's combination, so a scaled run (no overflow) follows
    the unscaled one."""
    x, y = data()
    runs = []
    for scaled in (False, True):
        model = make_model()
        opt = sam(model, gsam_alpha=0.4)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=scaled)
        for step in range(6):
            scaler.scale(F.cross_entropy(model(x[step]), y[step])).backward()
            assert opt.first_step(zero_grad=True, skip_nonfinite=True)
            with fastsam.frozen_running_stats(model):
                scaler.scale(F.cross_entropy(model(x[step]), y[step])).backward()
            opt.unperturb()
            opt.base_step(scaler if scaled else None)
            scaler.update()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for unscaled, scaled in zip(*runs):
        torch.testing.assert_close(scaled, unscaled, rtol=1e-6, atol=1e-7)
    reference = make_model()
    assert not all(torch.allclose(a, b) for a, b in zip(runs[0], reference.parameters()))  # it trained
