"""Checkpoints in torch.optim's layout: torch.distributed.checkpoint's state_dict API,
torch.load(weights_only=True), plain torch.optim checkpoints both ways, fastsam 0.1's format.

Every round trip is judged the same way: train, checkpoint, train on; a fresh model and
optimizer load the checkpoint and train on the same data; both must end bit-identical.
(The two-rank FSDP2 round trip is in tests/test_distributed_steps.py.)
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import fastsam

SETTINGS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw-gsam-lr-rho": (torch.optim.AdamW, dict(lr=1e-2, gsam_alpha=0.3, rho_schedule="lr")),
    "randsam": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, randsam=True)),
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def make_opt(model, name, generator_seed=3):
    base, kwargs = SETTINGS[name]
    kwargs = dict(kwargs)
    if kwargs.get("randsam"):
        kwargs["generator"] = torch.Generator().manual_seed(generator_seed)
    return fastsam.SAM(model.parameters(), base, rho=0.1, **kwargs)


def data(n=6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)) for _ in range(n)]


def train(model, opt, batches, scheduler=None):
    for x, y in batches:
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=4)
        if scheduler is not None:
            scheduler.step()


def assert_same(a, b):
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_distributed_checkpoint_state_dict_round_trip(name):
    """torch.distributed.checkpoint.state_dict works as for any torch.optim optimizer
    (it raised KeyError: 'state' on fastsam 0.1's layout)."""
    batches = data()
    model = make_model()
    opt = make_opt(model, name)
    train(model, opt, batches[:3])
    model_sd = copy.deepcopy(get_model_state_dict(model))
    optim_sd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert set(optim_sd) == {"state", "param_groups"}
    assert "0.weight" in optim_sd["state"]  # keyed by parameter name, as DCP does for torch.optim
    train(model, opt, batches[3:])

    resumed = make_model()
    resumed_opt = make_opt(resumed, name, generator_seed=99)  # a different RNG state, overwritten by the load
    set_model_state_dict(resumed, model_sd)
    set_optimizer_state_dict(resumed, resumed_opt, optim_sd)
    train(resumed, resumed_opt, batches[3:])
    assert_same(model, resumed)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_torch_load_weights_only(name):
    batches = data()
    model = make_model()
    opt = make_opt(model, name)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    train(model, opt, batches[:3], sched)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    train(model, opt, batches[3:], sched)

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)  # only tensors and plain containers inside
    resumed = make_model()
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = make_opt(resumed, name, generator_seed=99)
    resumed_opt.load_state_dict(ckpt["opt"])
    resumed_sched = torch.optim.lr_scheduler.CosineAnnealingLR(resumed_opt, T_max=6)
    resumed_sched.load_state_dict(ckpt["sched"])
    train(resumed, resumed_opt, batches[3:], resumed_sched)
    assert_same(model, resumed)


def test_fastsam_01_checkpoints_still_load():
    """Format 1 was {"base": base state_dict, "fastsam": {"format": 1, "generator_state": ...}}."""
    batches = data()
    model = make_model()
    opt = make_opt(model, "randsam")
    train(model, opt, batches[:3])
    old = {"base": copy.deepcopy(opt.base_optimizer.state_dict()),
           "fastsam": {"format": 1, "generator_state": opt.generator.get_state()}}
    train(model, opt, batches[3:])

    resumed = make_model()
    opt_for_weights = make_opt(resumed, "randsam")
    train(resumed, opt_for_weights, batches[:3])  # the same weights as at the checkpoint
    resumed_opt = make_opt(resumed, "randsam", generator_seed=99)
    resumed_opt.load_state_dict(old)
    train(resumed, resumed_opt, batches[3:])
    assert_same(model, resumed)


def test_unknown_checkpoint_formats_are_refused_clearly():
    opt = make_opt(make_model(), "sgd")
    with pytest.raises(ValueError, match="unknown fastsam checkpoint format 7"):
        opt.load_state_dict({"base": {}, "fastsam": {"format": 7}})
    sd = opt.state_dict()
    sd["param_groups"][0]["fastsam"]["format"] = 9
    with pytest.raises(ValueError, match="unknown fastsam checkpoint format 9"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        opt.load_state_dict({"weights": 1})


def test_checkpoints_move_to_and_from_plain_torch_optim():
    batches = data()
    model = make_model()
    opt = make_opt(model, "sgd")
    train(model, opt, batches[:2])
    plain = torch.optim.SGD(make_model().parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), plain.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"])
    # and back: a torch.optim checkpoint (no SAM keys) into SAM keeps SAM's own settings as constructed
    own = make_model()
    own_opt = torch.optim.SGD(own.parameters(), lr=0.05, momentum=0.9)
    x, y = batches[2]
    F.cross_entropy(own(x), y).backward()
    own_opt.step()
    fresh = make_model()
    sam = fastsam.SAM(fresh.parameters(), torch.optim.SGD, rho=0.25, lr=0.05, momentum=0.9)
    sam.load_state_dict(copy.deepcopy(own_opt.state_dict()))
    assert sam.param_groups[0]["rho"] == 0.25
    for p, q in zip(fresh.parameters(), own.parameters()):
        assert torch.equal(sam.state[p]["momentum_buffer"], own_opt.state[q]["momentum_buffer"])


def test_state_is_the_base_optimizers():
    """Tools that look at optimizer.state (DCP, LR schedulers, trainers) see the real state."""
    model = make_model()
    opt = make_opt(model, "sgd")
    train(model, opt, data(1))
    assert opt.state is opt.base_optimizer.state
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
