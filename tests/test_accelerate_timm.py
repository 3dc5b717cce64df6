"""accelerate and timm: the documented loops against fastsam.train_step.

* accelerate: ``sam_sub_steps`` inside ``accelerator.accumulate(model)`` with
  ``accelerator.clip_grad_norm_`` and the prepared optimizer's ``step()``; the accumulation
  weights come from ``accelerator.backward`` (loss / k), so with k and the sub-batch
  shares powers of two the parameters are equal to train_step's.
* timm: a timm model made offline, SAM around ``timm.optim.create_optimizer_v2`` (no weight
  decay for biases and norm weights), trained with train_step and a timm scheduler, must
  equal the same run with those param groups written out by hand, and must differ from a
  run that decays every parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam

pytestmark = pytest.mark.integration
STEPS = 6


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def batches(n=STEPS, size=8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("variant", ["sam", "gsam", "obf"])
def test_accelerate_loop(variant):
    accelerate = pytest.importorskip("accelerate")
    from fastsam.integrations.accelerate import sam_sub_steps

    settings = {"sam": dict(rho=0.1), "gsam": dict(rho=0.1, gsam_alpha=0.4), "obf": dict(rho=0.3)}[variant]
    obf = fastsam.OutputBiasForgetting(C=5.0, gamma=0.5) if variant == "obf" else None
    k, clip = 2, 0.5
    data = batches()

    expected = mlp()
    opt = fastsam.SAM(expected.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **settings)
    for i, (x, y) in enumerate(data):
        fastsam.train_step(expected, opt, x, y, F.cross_entropy, ascent_loss=obf, micro_batch=4,
                           accumulation_steps=k, step=i % k == k - 1, max_grad_norm=clip)

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=k)
    model = mlp()
    sam = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **settings)
    model, optimizer = accelerator.prepare(model, sam)
    for x, y in data:
        with accelerator.accumulate(model):
            out = sam_sub_steps(accelerator, model, optimizer, x, y, F.cross_entropy, ascent_loss=obf, micro_batch=4)
            assert out.perturbed_loss is not None
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(list(model.parameters()) + list(model.buffers()),
                    list(expected.parameters()) + list(expected.buffers())):
        assert torch.equal(a, b)


def test_timm_model_with_timm_optimizer_settings():
    timm = pytest.importorskip("timm")
    from timm.scheduler import CosineLRScheduler

    from fastsam.integrations.timm import create_sam

    def make():
        torch.manual_seed(0)
        return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32)

    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(3)]
    wd = 0.05

    def train(model, sam):
        scheduler = CosineLRScheduler(sam, t_initial=3, warmup_t=1, warmup_lr_init=1e-4)
        for step, (x, y) in enumerate(data):
            fastsam.train_step(model, sam, x, y, F.cross_entropy, micro_batch=2)
            scheduler.step_update(step + 1)
        return [p.detach().clone() for p in model.parameters()]

    model = make()
    sam = create_sam(model, "adamw", lr=1e-3, weight_decay=wd, rho=0.05)
    decays = {id(p): g["weight_decay"] for g in sam.param_groups for p in g["params"]}
    no_decay = {n for n, p in model.named_parameters() if decays[id(p)] == 0.0}
    assert no_decay and all(p.ndim <= 1 or n.split(".")[-1] in model.no_weight_decay()
                            for n, p in model.named_parameters() if n in no_decay)
    got = train(model, sam)

    def by_hand(decay_norms: bool):
        model = make()
        decay = [p for n, p in model.named_parameters() if decay_norms or n not in no_decay]
        rest = [p for n, p in model.named_parameters() if not decay_norms and n in no_decay]
        groups = [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
        return train(model, fastsam.SAM([g for g in groups if g["params"]], torch.optim.AdamW, lr=1e-3, rho=0.05))

    for a, b in zip(got, by_hand(decay_norms=False)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(got, by_hand(decay_norms=True)))
