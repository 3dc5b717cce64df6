"""SAMTrainer under DDP: run with torchrun --nproc_per_node=2 (for tests/test_transformers.py).

    torchrun --nproc_per_node=2 tests/hf_ddp_worker.py OUTDIR VARIANT

Each rank saves its final parameters and the batches it trained on.
"""

import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from tests import hf_models as hf  # noqa: E402

hf.quiet()


def main(out_dir, variant):
    trainer = hf.make_trainer("gpt2", variant, os.path.join(out_dir, "run"), 2, user_optimizer=True,
                              ddp_backend="gloo", per_device_train_batch_size=2, max_steps=4)
    trainer.train()
    rank = trainer.args.process_index
    torch.save({"params": [p.detach().clone() for p in trainer.model.parameters()], "seen": trainer.seen},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
