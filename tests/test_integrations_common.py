"""The integrations' shared parts, without any trainer library (default run).

* ``import fastsam`` and ``import fastsam.integrations`` import no trainer library.
* The shared sub-step loop (fastsam/integrations/_common.py) with a plain pass runner
  gives exactly fastsam.train_step's parameters, over accumulation, sub-batches, GSAM and
  OBF, and it calls ``sub_step`` of a SAM subclass (how new SAM methods reach every
  integration).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam.integrations import _common
from fastsam.passes import Pass

TRAINERS = ("pytorch_lightning", "lightning", "transformers", "accelerate", "timm")


def test_import_fastsam_imports_no_trainer():
    code = ("import sys, fastsam, fastsam.integrations, fastsam.verify; "
            f"print([m for m in {TRAINERS!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_split_batch():
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    pieces = _common.split_batch({"x": x, "y": y}, 2)
    assert [share for _, share in pieces] == [0.4, 0.4, 0.2]
    assert torch.equal(torch.cat([p["x"] for p, _ in pieces]), x)
    assert _common.split_batch(("anything", 3), None) == [(("anything", 3), 1.0)]
    with pytest.raises(ValueError, match="same examples along dim 0"):
        _common.split_batch((x, y[:4]), 2)
    with pytest.raises(TypeError):
        _common.split_batch((x, "labels"), 2)


class CountingSAM(fastsam.SAM):
    """A SAM method in the making: integrations must reach its sub_step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sub_steps = 0

    def sub_step(self, run_pass, **kwargs):
        self.sub_steps += 1
        return super().sub_step(run_pass, **kwargs)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8, bias=False), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))


def data(steps=6, batch=12):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(steps, batch, 5, generator=gen), torch.randint(0, 3, (steps, batch), generator=gen)


SETTINGS = {"sam": dict(rho=0.1), "gsam": dict(rho=0.1, gsam_alpha=0.4), "obf": dict(rho=0.3),
            "randsam": dict(rho=0.1, randsam=True)}


def optimizer(cls, model, variant):
    kwargs = dict(SETTINGS[variant])
    if kwargs.get("randsam"):
        kwargs["generator"] = torch.Generator().manual_seed(3)
    # unfused: the loops are compared bitwise, and the integrations' trainers step after the
    # restore (fused, train_step's GSAM step differs from it by roundings)
    return cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, fused_base_step=False, **kwargs)


@pytest.mark.parametrize("variant", list(SETTINGS))
@pytest.mark.parametrize("micro_batch,k", [(None, 1), (4, 1), (5, 2)])
def test_shared_loop_equals_train_step(variant, micro_batch, k):
    x, y = data()
    obf = fastsam.OutputBiasForgetting(C=5.0, gamma=0.5) if variant == "obf" else None
    expected = make_model()
    opt = optimizer(fastsam.SAM, expected, variant)
    for i in range(len(x)):
        fastsam.train_step(expected, opt, x[i], y[i], F.cross_entropy, ascent_loss=obf, micro_batch=micro_batch,
                           accumulation_steps=k, step=i % k == k - 1)

    model = make_model()
    sam = optimizer(CountingSAM, model, variant)

    def make_passes(piece):
        xs, ys = piece

        def compute(kind):
            out = model(xs)
            loss = F.cross_entropy(out, ys)
            return loss, (obf(out, ys) if kind is Pass.ASCENT and obf is not None else loss)

        return _common.Passes(model, compute, lambda t: t.backward())

    for i in range(len(x)):
        last = i % k == k - 1
        _common.run_sub_steps(sam, _common.split_batch((x[i], y[i]), micro_batch), make_passes,
                              accumulation_steps=k, sync_last=last)
        if last:
            _common.load_and_average(sam, model, synced=False)
            sam.step()
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.buffers(), expected.buffers()):
        assert torch.equal(a, b)
    sub_batches = len(_common.split_batch(x[0], micro_batch))
    assert sam.sub_steps == len(x) * sub_batches
