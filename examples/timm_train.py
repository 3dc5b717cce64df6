"""fastsam in a timm train.py-style loop: timm model, timm optimizer settings, timm scheduler, EMA.

    python examples/timm_train.py --steps 10 [--model resnet18] [--amp]

The changes against timm's train.py: the optimizer is ``create_sam`` (timm's
create_optimizer_v2 wrapped in fastsam.SAM, so the param groups keep weight decay off for
biases and norms), and the forward/backward/step of each batch is one
``fastsam.train_step`` (its scaler replaces timm's NativeScaler, its max_grad_norm
timm's --clip-grad). Everything else (Mixup, schedulers, EMA, checkpoints) stays.
"""

import argparse

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import fastsam
from fastsam.integrations.timm import create_sam

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="test_vit")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--micro-batch", type=int, default=8, help="SAM perturbation sub-batches")
parser.add_argument("--amp", action="store_true", help="bf16 autocast")
args = parser.parse_args()

torch.manual_seed(0)
model = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=32) if "vit" in args.model else \
    timm.create_model(args.model, pretrained=False, num_classes=10)
optimizer = create_sam(model, "sgd", lr=0.05, weight_decay=5e-4, momentum=0.9, rho=0.05)
scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.steps, warmup_epochs=1,
                                   step_on_epochs=False, updates_per_epoch=1)
ema = ModelEmaV3(model, decay=0.99)
mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
criterion = SoftTargetCrossEntropy()

for step in range(args.steps):
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    x, y = mixup(x, y)  # soft targets: train_step splits them along dim 0 with the inputs
    out = fastsam.train_step(model, optimizer, x, y, criterion, micro_batch=args.micro_batch, max_grad_norm=5.0,
                             autocast=torch.bfloat16 if args.amp else None)
    scheduler.step_update(num_updates=step + 1)
    ema.update(model, step=step)
    print(f"step {step}: loss {out.loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.4f}")
