"""fastsam.train_step in a plain PyTorch loop: SAM with perturbation sub-batches.

    python examples/train_step.py --steps 20 [--variant sam|asam|gsam|obf|randsam]
"""

import argparse

import torch
import torch.nn.functional as F

import fastsam

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--variant", default="sam", choices=["sam", "asam", "gsam", "obf", "randsam"])
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
settings = {"sam": dict(rho=0.05), "asam": dict(rho=0.5, adaptive=True, eta=0.01),
            "gsam": dict(rho=0.1, gsam_alpha=0.4, rho_schedule="lr", rho_min=0.01), "obf": dict(rho=0.6),
            "randsam": dict(rho=0.05, randsam=True)}[args.variant]
optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **settings)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
ascent_loss = fastsam.OutputBiasForgetting(C=5, gamma=1.0) if args.variant == "obf" else None

w = torch.randn(20, 5)
for step in range(args.steps):
    x = torch.randn(128, 20)
    y = (x @ w).argmax(-1)
    out = fastsam.train_step(model, optimizer, x, y, F.cross_entropy, ascent_loss=ascent_loss, micro_batch=32,
                             max_grad_norm=5.0)
    scheduler.step()
    print(f"step {step}: loss {out.loss.item():.4f}, at w + eps {out.perturbed_loss.item():.4f}")
