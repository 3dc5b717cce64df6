"""PyTorch Lightning with fastsam: SAMMixin, a fastsam.SAM from configure_optimizers.

    python examples/lightning_train.py --steps 20 [--precision bf16-mixed] [--devices 2]
"""

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import fastsam
from fastsam.integrations.lightning import SAMMixin


class Classifier(SAMMixin, pl.LightningModule):
    sam_micro_batch = 32  # perturbation sub-batches of 32 examples

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 5))
        self.obf = fastsam.OutputBiasForgetting(C=5, gamma=1.0)

    def training_step(self, batch, batch_idx):  # the loss of one SAM pass
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        if self.sam_pass is fastsam.Pass.ASCENT:  # once per sub-batch, at the clean weights
            self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss, "ascent_loss": self.obf(logits, y)}  # OBF; return just `loss` for SAM

    def configure_optimizers(self):
        sam = fastsam.SAM(self.parameters(), torch.optim.SGD, rho=0.6, lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sam, T_max=self.trainer.max_steps)
        return {"optimizer": sam, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(20, 5)
    x = torch.randn(128 * args.steps, 20)
    data = torch.utils.data.TensorDataset(x, (x @ w).argmax(-1))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices, precision=args.precision,
                         strategy="ddp" if args.devices > 1 else "auto", accumulate_grad_batches=2,
                         gradient_clip_val=5.0, logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=64))
