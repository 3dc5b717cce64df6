"""Models, data and reference runs shared by tests/test_lightning.py and its DDP worker."""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

import fastsam

pl = __import__("pytorch_lightning")
from fastsam.integrations.lightning import SAMMixin, manual_step  # noqa: E402

STEPS, BATCH = 6, 8
VARIANTS = {
    "sam": dict(rho=0.1),
    "asam": dict(rho=0.5, adaptive=True, eta=0.01),
    "gsam": dict(rho=0.1, gsam_alpha=0.4),
    "obf": dict(rho=0.3),
    "randsam": dict(rho=0.1, randsam=True),
}
OBF = dict(C=5.0, gamma=0.5)


def quiet():
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def make_net(batchnorm=True):
    torch.manual_seed(0)
    if batchnorm:
        return torch.nn.Sequential(torch.nn.Linear(6, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, 3))
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def dataset(n=STEPS * BATCH, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def make_sam(params, variant, scheduler=False):
    kwargs = dict(VARIANTS[variant])
    if kwargs.get("randsam"):
        kwargs["generator"] = torch.Generator().manual_seed(7)
    # unfused: Lightning is compared bitwise with train_step, and Lightning steps after the
    # restore (fused, train_step's GSAM step differs from that by roundings)
    sam = fastsam.SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, fused_base_step=False,
                      **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=2, gamma=0.5) if scheduler else None
    return sam, sched


class Lit(SAMMixin, pl.LightningModule):
    def __init__(self, variant="sam", micro_batch=None, scheduler=False, batchnorm=True):
        super().__init__()
        self.net = make_net(batchnorm)
        self.variant, self.sam_micro_batch, self.use_scheduler = variant, micro_batch, scheduler
        self.obf = fastsam.OutputBiasForgetting(**OBF) if variant == "obf" else None
        self.seen = []

    def forward(self, x):
        return self.net(x)

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append([t.detach().clone() for t in batch])

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if self.obf is not None:
            return {"loss": loss, "ascent_loss": self.obf(logits, y)}
        return loss

    def configure_optimizers(self):
        sam, sched = make_sam(self.parameters(), self.variant, self.use_scheduler)
        if sched is None:
            return sam
        return {"optimizer": sam, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ManualLit(Lit):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        manual_step(self, x, y, F.cross_entropy, micro_batch=self.sam_micro_batch,
                    ascent_loss=self.obf)
        if self.use_scheduler:
            self.lr_schedulers().step()


def reference(batches, variant="sam", micro_batch=None, k=1, clip=None, scheduler=False, batchnorm=True, **kwargs):
    """fastsam.train_step over ``batches`` with the same settings: the ground truth."""
    net = make_net(batchnorm)
    sam, sched = make_sam(net.parameters(), variant, scheduler)
    obf = fastsam.OutputBiasForgetting(**OBF) if variant == "obf" else None
    for i, (x, y) in enumerate(batches):
        last = i % k == k - 1 or i == len(batches) - 1
        fastsam.train_step(net, sam, x, y, F.cross_entropy, ascent_loss=obf, micro_batch=micro_batch,
                           accumulation_steps=k, step=last, max_grad_norm=clip, **kwargs)
        if last and sched is not None:
            sched.step()
    return net, sam


def trainer(**kwargs):
    settings = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    settings.update(kwargs)
    return pl.Trainer(**settings)


def loader(x, y, batch=BATCH):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
