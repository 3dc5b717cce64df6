"""Hugging Face Trainer: SAMTrainer against fastsam.train_step, on a tiny GPT-2 and a tiny BERT.

Each case trains 6 optimizer steps with SAMTrainer and with train_step on the batches the
Trainer saw, using the optimizer and linear warm-up scheduler the Trainer builds. Where
the arithmetic is the same the parameters must be equal; the Trainer clips over
``model.parameters()`` while train_step clips over the optimizer's groups (the Trainer puts
decayed and undecayed parameters in two groups), so with the Trainer-built optimizer the
gradient norm is summed in another order and the comparison is to 1e-6.
DDP with torchrun (2 gloo processes) runs in tests/hf_ddp_worker.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.integration

from tests import hf_models as hf  # noqa: E402

hf.quiet()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params(model):
    return [p.detach() for p in model.parameters()]


def assert_equal(a, b):
    for x, y in zip(params(a), params(b)):
        assert torch.equal(x, y), (x - y).abs().max()


def assert_close(a, b):
    for x, y in zip(params(a), params(b)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,variant,micro_batch", [
    ("gpt2", "sam", None), ("gpt2", "gsam", 2), ("gpt2", "obf", 2), ("bert", "sam", 2), ("bert", "randsam", None)])
def test_sam_trainer_equals_train_step(tmp_path, kind, variant, micro_batch):
    trainer = hf.make_trainer(kind, variant, tmp_path, micro_batch, user_optimizer=True)
    trainer.train()
    assert len(trainer.seen) == 6
    assert_equal(trainer.model, hf.reference(kind, variant, trainer, micro_batch, user_optimizer=True))


def test_trainer_built_optimizer_accumulation_and_clipping(tmp_path):
    trainer = hf.make_trainer("gpt2", "sam", tmp_path, 2, gradient_accumulation_steps=2, max_grad_norm=0.1)
    trainer.train()
    assert len(trainer.seen) == 12 and trainer.state.global_step == 6
    assert len(trainer.optimizer.param_groups) == 2  # weight decay off for biases and LayerNorm
    assert_close(trainer.model, hf.reference("gpt2", "sam", trainer, 2))


def test_bf16(tmp_path):
    trainer = hf.make_trainer("bert", "sam", tmp_path, 2, user_optimizer=True, bf16=True)
    trainer.train()
    assert_equal(trainer.model, hf.reference("bert", "sam", trainer, 2, user_optimizer=True))


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    straight = hf.make_trainer("gpt2", "randsam", tmp_path / "a", 2)
    straight.train()
    first = hf.make_trainer("gpt2", "randsam", tmp_path / "b", 2, save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    shutil.rmtree(tmp_path / "b" / "checkpoint-6")
    resumed = hf.make_trainer("gpt2", "randsam", tmp_path / "b", 2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_equal(resumed.model, straight.model)


def test_new_sam_methods_reach_the_trainer(tmp_path):
    from tests.test_integrations_common import CountingSAM

    trainer = hf.make_trainer("bert", "sam", tmp_path, 2)
    trainer.optimizer = CountingSAM(trainer.model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    trainer.train()
    assert trainer.optimizer.optimizer.sub_steps == 6 * 2  # AcceleratedOptimizer around it


@pytest.mark.parametrize("variant", ["sam", "gsam"])
def test_ddp_with_torchrun(tmp_path, variant):
    """torchrun --nproc_per_node=2 (gloo on the CPU): ranks identical, and equal to train_step on
    the union of the ranks' batches (per-replica perturbations, averaged once per step)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "tests/hf_ddp_worker.py", str(tmp_path), variant],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b), "ranks disagree"
    union = [{key: torch.cat([ranks[0]["seen"][i][key], ranks[1]["seen"][i][key]]) for key in ranks[0]["seen"][i]}
             for i in range(len(ranks[0]["seen"]))]
    trainer = hf.make_trainer("gpt2", variant, tmp_path / "ref", 2, user_optimizer=True, max_steps=4)
    expected = hf.reference("gpt2", variant, trainer, 2, user_optimizer=True, union=union)
    for got, want in zip(ranks[0]["params"], params(expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
