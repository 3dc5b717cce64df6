"""PyTorch Lightning: SAMMixin (automatic optimization) and manual_step against fastsam.train_step.

Each case trains a small BatchNorm MLP for 6 steps with Lightning and with
fastsam.train_step on the batches Lightning saw, with the same settings, and requires
the parameters and BatchNorm buffers to be *equal*: the arithmetic is the same, in the
same order (sub-step weights, accumulation, unscale, clip over the optimizer's param
groups, base step). DDP with two gloo processes runs in tests/lightning_ddp_worker.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.integration

from tests import lightning_models as lm  # noqa: E402

lm.quiet()


def fit(model, t=None, ckpt_path=None, data=None, **trainer_kwargs):
    x, y = data if data is not None else lm.dataset()
    t = t or lm.trainer(**trainer_kwargs)
    t.fit(model, lm.loader(x, y), ckpt_path=ckpt_path)
    return t


def assert_same(model, expected):
    for a, b in zip(list(model.net.parameters()) + list(model.net.buffers()),
                    list(expected.parameters()) + list(expected.buffers())):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("variant", list(lm.VARIANTS))
@pytest.mark.parametrize("micro_batch", [None, 3])
def test_automatic_32_true(variant, micro_batch):
    model = lm.Lit(variant, micro_batch)
    fit(model)
    assert len(model.seen) == lm.STEPS
    expected, _ = lm.reference(model.seen, variant, micro_batch)
    assert_same(model, expected)


def test_accumulation_clipping_and_scheduler():
    model = lm.Lit("gsam", 4, scheduler=True)
    fit(model, accumulate_grad_batches=4, gradient_clip_val=0.05)  # 6 batches: steps after 4 and 6
    expected, sam = lm.reference(model.seen, "gsam", 4, k=4, clip=0.05, scheduler=True)
    assert_same(model, expected)
    assert model.trainer.global_step == 2
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == sam.param_groups[0]["lr"] == 0.05


def test_bf16_mixed():
    model = lm.Lit("sam", 4)
    fit(model, precision="bf16-mixed")
    expected, _ = lm.reference(model.seen, "sam", 4, autocast=torch.bfloat16)
    assert_same(model, expected)


@pytest.mark.parametrize("init_scale", [2.0 ** 8, 2.0 ** 18])
def test_16_mixed_with_a_grad_scaler(init_scale):
    """Lightning maps precision="16-mixed" on the CPU to bf16; its MixedPrecision plugin
    passed explicitly runs fp16 autocast and a GradScaler here, the code path of a GPU.
    With a large initial scale the first steps overflow and must be skipped whole."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    model = lm.Lit("sam", 4)
    start = [p.detach().clone() for p in model.net.parameters()]
    fit(model, plugins=[plugin])
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    expected, _ = lm.reference(model.seen, "sam", 4, autocast=torch.float16, scaler=scaler)
    assert_same(model, expected)
    assert plugin.scaler.get_scale() == scaler.get_scale()
    if init_scale > 2.0 ** 16:
        assert scaler.get_scale() < init_scale  # some steps were skipped ...
    else:
        assert scaler.get_scale() == init_scale  # (none here)
    assert any(not torch.equal(a, b) for a, b in zip(model.net.parameters(), start))  # ... not all


def test_manual_optimization_recipe():
    model = lm.ManualLit(variant="obf", micro_batch=4, scheduler=True)
    fit(model)
    expected, _ = lm.reference(model.seen, "obf", 4, scheduler=True)
    assert_same(model, expected)


def test_checkpoint_resume_is_bit_exact(tmp_path):
    """Two epochs straight, against one epoch, a checkpoint, and the second epoch resumed
    from it in a new process state (new module, new Trainer): RandSAM's generator, the
    momentum, the scheduler and the loops all come back."""
    straight = lm.Lit("randsam", 4, scheduler=True)
    fit(straight, max_epochs=2)
    first = lm.Lit("randsam", 4, scheduler=True)
    t = fit(first, max_epochs=1)
    path = str(tmp_path / "epoch1.ckpt")
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)  # SAM's state is in torch.optim's layout
    assert "fastsam" in state["optimizer_states"][0]["param_groups"][0]
    resumed = lm.Lit("randsam", 4, scheduler=True)
    fit(resumed, max_epochs=2, ckpt_path=path)
    for a, b in zip(list(resumed.net.parameters()) + list(resumed.net.buffers()),
                    list(straight.net.parameters()) + list(straight.net.buffers())):
        assert torch.equal(a, b)
    assert resumed.trainer.global_step == straight.trainer.global_step == 2 * lm.STEPS


def test_new_sam_methods_reach_lightning():
    from tests.test_integrations_common import CountingSAM

    class Counting(lm.Lit):
        def configure_optimizers(self):
            self.sam = CountingSAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
            return self.sam

    model = Counting("sam", 3)
    fit(model)
    assert model.sam.sub_steps == lm.STEPS * 3


def test_an_optimizer_step_override_without_super_is_refused():
    class Override(lm.Lit):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure)

    with pytest.raises(RuntimeError, match="super\\(\\).optimizer_step"):
        fit(Override("sam"))


def test_plain_optimizers_train_as_without_the_mixin():
    class Plain(lm.Lit):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Plain("sam", micro_batch=None)
    fit(model)
    net = lm.make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in model.seen:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert_same(model, net)


@pytest.mark.parametrize("variant", ["sam", "gsam"])
def test_ddp_two_processes(tmp_path, variant):
    """strategy="ddp" on 2 gloo processes: ranks identical, one all-reduce per optimizer
    step (DDP's comm hook counts them), and the result of train_step on the union of the
    ranks' batches (which is what per-replica perturbations averaged once per step are)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "tests/lightning_ddp_worker.py", str(tmp_path), variant],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b), "ranks disagree"
    steps = lm.STEPS // 2  # 2 * 48 examples: 6 batches of 8 per rank, 2 accumulated per step
    assert ranks[0]["allreduces"] == ranks[1]["allreduces"] == ranks[0]["optimizer_steps"] == steps
    union = [(torch.cat([ranks[0]["seen"][i][0], ranks[1]["seen"][i][0]]),
              torch.cat([ranks[0]["seen"][i][1], ranks[1]["seen"][i][1]])) for i in range(len(ranks[0]["seen"]))]
    expected, _ = lm.reference(union, variant, micro_batch=4, k=2, batchnorm=False)
    for got, want in zip(ranks[0]["params"], expected.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
