"""accelerate with fastsam: sam_sub_steps inside accelerator.accumulate.

    python examples/accelerate_train.py --steps 10
    accelerate launch --num_processes 2 --cpu examples/accelerate_train.py   # DDP
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import fastsam
from fastsam.integrations.accelerate import sam_sub_steps

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
optimizer = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=args.steps)
w = torch.randn(20, 5)
x = torch.randn(64 * 2 * args.steps, 20)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x @ w).argmax(-1)), batch_size=64)
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

for step, (x, y) in enumerate(loader):
    with accelerator.accumulate(model):
        out = sam_sub_steps(accelerator, model, optimizer, x, y, F.cross_entropy, micro_batch=16)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # SAM.step() finishes the prepared SAM step, on the cycle's last batch
        scheduler.step()
        optimizer.zero_grad()
    accelerator.print(f"batch {step}: loss {out.loss.item():.4f}")
