"""The optimizer's contract with its users: construction, checkpoints, schedulers, BatchNorm
helpers, backend selection, and the errors that say what to do."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam import ops


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8, bias=False), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))


def batches(n=10):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def build(model, **kwargs):
    base = kwargs.pop("base", torch.optim.SGD)
    settings = dict(rho=0.1, lr=0.05, **(dict(momentum=0.9) if base is torch.optim.SGD else {}))
    settings.update(kwargs)
    return fastsam.SAM(model.parameters(), base, **settings)


def train(model, opt, data, scheduler=None, **kwargs):
    for x, y in data:
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=8, **kwargs)
        if scheduler is not None:
            scheduler.step()


def assert_models_equal(a, b):
    for x, y in zip(list(a.parameters()) + list(a.buffers()), list(b.parameters()) + list(b.buffers())):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(base=torch.optim.AdamW, weight_decay=0.01, gsam_alpha=0.3, rho_schedule="lr"),
    dict(randsam=True, generator=torch.Generator().manual_seed(3)),
], ids=["sgd", "adamw-gsam", "randsam"])
def test_state_dict_round_trip_resumes_bit_exactly(kwargs, tmp_path):
    data = batches(7)
    model = make_model()
    opt = build(model, **copy.deepcopy(kwargs))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    train(model, opt, data[:3], sched)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
               tmp_path / "ckpt.pt")
    train(model, opt, data[3:], sched)

    resumed = make_model()
    opt2 = build(resumed, **copy.deepcopy(kwargs))
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=7)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train(resumed, opt2, data[3:], sched2)
    assert_models_equal(model, resumed)


def test_state_dict_holds_base_state_and_sam_settings():
    model = make_model()
    opt = build(model, rho=0.07, adaptive="after_norm")
    train(model, opt, batches(1))
    sd = opt.state_dict()
    # torch.optim's layout: the base optimizer's state and groups, SAM's settings in the groups
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["rho"] == 0.07
    assert sd["param_groups"][0]["adaptive"] == "after_norm"
    assert sd["param_groups"][0]["fastsam"]["format"] == 2
    assert all("momentum_buffer" in s for s in sd["state"].values())
    assert len(sd["state"]) == len(list(model.parameters()))


def test_checkpoint_while_perturbed_is_refused():
    model = make_model()
    opt = build(model)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.load_state_dict({"base": {}, "fastsam": {}})
    opt.second_step()
    opt.state_dict()


def test_lr_scheduler_on_sam_drives_the_base_optimizer():
    model = make_model()
    opt = build(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    train(model, opt, batches(2), sched)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.01)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_no_scheduler_warning_after_train_step(recwarn):
    model = make_model()
    opt = build(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    train(model, opt, batches(1), sched)
    assert not [w for w in recwarn.list if "lr_scheduler.step()" in str(w.message)]


def test_base_optimizer_instance_is_adopted():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = fastsam.SAM(None, base, rho=0.1)
    reference = make_model()
    ref_opt = build(reference)
    data = batches(2)
    train(model, opt, data)
    train(reference, ref_opt, data)
    assert_models_equal(model, reference)
    assert opt.base_optimizer is base
    with pytest.raises(TypeError, match="cannot be applied"):
        fastsam.SAM(None, base, lr=0.1)
    with pytest.raises(ValueError, match="exactly the parameters"):
        fastsam.SAM(list(model.parameters())[:1], base)


def test_add_param_group_gets_sam_defaults():
    model = make_model()
    opt = fastsam.SAM(model[0].parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    opt.add_param_group({"params": model[3].parameters(), "adaptive": True})
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["adaptive"] is True
    assert opt.param_groups[1]["lr"] == 0.1 and len(opt.base_optimizer.param_groups) == 2


def test_base_optimizer_with_clashing_keys_is_refused():
    with pytest.raises(ValueError, match=r"\['rho'\]"):
        fastsam.SAM(make_model().parameters(), torch.optim.Adadelta, rho=0.05)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho must be finite and >= 0"),
    (dict(rho=float("nan")), "rho must be finite"),
    (dict(eta=-1.0), "eta must be finite and >= 0"),
    (dict(gsam_alpha=float("inf")), "gsam_alpha must be finite"),
    (dict(adaptive="asam"), "adaptive must be False, True"),
    (dict(adaptive=1), "adaptive must be False, True"),
    (dict(adaptive_scope="weights"), "adaptive_scope must be one of"),
    (dict(rho_schedule="cosine"), "rho_schedule must be one of"),
    (dict(rho_schedule="lr", lr_max=0.01, lr_min=0.01), "lr_max > lr_min"),
    (dict(perturb_eps=-1e-12), "perturb_eps"),
    (dict(backend="nope"), "unknown fastsam backend 'nope'"),
    (dict(generator=torch.Generator()), "only used with randsam"),
])
def test_invalid_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build(make_model(), **kwargs)


def test_invalid_group_setting_changed_later_is_refused_at_step():
    model = make_model()
    opt = build(model)
    opt.param_groups[0]["rho"] = -1.0
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="rho must be finite and >= 0"):
        fastsam.train_step(model, opt, x, y, F.cross_entropy)
    assert not opt.is_perturbed


def test_step_order_errors():
    model = make_model()
    opt = build(model)
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="call first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="call unperturb"):
        opt.base_step()
    with pytest.raises(RuntimeError, match="while the weights are perturbed"):
        opt.step()


def test_unsupported_parameters_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = fastsam.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.first_step()
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = fastsam.SAM([z], torch.optim.SGD, lr=0.1)
    z.grad = torch.ones_like(z)
    with pytest.raises(TypeError, match="complex parameters"):
        opt.first_step()


def test_parameters_on_several_devices_are_refused():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = fastsam.SAM([a, b], torch.optim.SGD, lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    with pytest.raises(ValueError, match="one device"):
        opt.first_step()
    assert torch.equal(a, torch.ones(3))  # nothing was perturbed


def test_several_dtypes_are_grouped():
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = fastsam.SAM([a, b], torch.optim.SGD, rho=1.0, lr=0.1, momentum=0.0)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0], dtype=torch.float64)  # global norm 5
    opt.first_step()
    torch.testing.assert_close(a.detach(), torch.tensor([3.6, 4.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.8], dtype=torch.float64))


def test_backend_auto_reports_its_choice(caplog):
    with caplog.at_level(logging.INFO, logger="fastsam"):
        opt = build(make_model())
    assert opt.backend_for("cpu") == ops.resolve_auto("cpu", torch.float32)
    assert f"chose {opt.backend_for('cpu')!r}" in caplog.text
    assert "reference" not in ops.AUTO_PREFERENCE["cpu"]  # the slow ground truth is never chosen


def test_unavailable_backend_fails_at_construction():
    name = "unavailable-for-test"
    fake = ops.Backend(name, *(lambda *a, **k: None,) * len(ops.OP_NAMES),
                       unavailable_reason=lambda device: "it needs X; install X to use it")
    ops.register_backend(fake)
    try:
        with pytest.raises(ops.BackendUnavailableError, match="install X"):
            build(make_model(), backend=name)
    finally:
        ops._REGISTRY.pop(name)


def test_backend_refuses_a_dtype_it_does_not_support():
    name = "fp32-only-for-test"
    ops.register_backend(ops.Backend(name, *(lambda *a, **k: None,) * len(ops.OP_NAMES),
                                     unavailable_reason=lambda device: None, dtypes=(torch.float32,)))
    try:
        with pytest.raises(ops.BackendUnavailableError, match="does not support torch.float64"):
            build(make_model().double(), backend=name)
    finally:
        ops._REGISTRY.pop(name)


def test_batchnorm_helpers_freeze_statistics_exactly():
    bns = [torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4, momentum=None),
           torch.nn.BatchNorm1d(4, track_running_stats=False)]
    model = torch.nn.Sequential(*bns)
    model(torch.randn(8, 4))
    before = copy.deepcopy(list(model.buffers()))
    with fastsam.frozen_running_stats(model):
        out = model(torch.randn(8, 4) * 5 + 3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert [bn.track_running_stats for bn in bns] == [True, True, False]
    # frozen layers still normalise with the batch statistics
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    fastsam.disable_running_stats(model)
    fastsam.disable_running_stats(model)  # idempotent: the saved flag is the original
    fastsam.enable_running_stats(model)
    assert [bn.track_running_stats for bn in bns] == [True, True, False]
    model(torch.randn(8, 4))
    assert not torch.equal(before[0], bns[0].running_mean)
