"""Lightning strategy="ddp" on 2 CPU processes (gloo), for tests/test_lightning.py.

    python tests/lightning_ddp_worker.py OUTDIR VARIANT

Lightning starts rank 1 by running this same command again. Each rank saves its final
parameters, the batches it trained on, and how many gradient all-reduces DDP made (a
communication hook counts them) against how many optimizer steps were taken.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
from tests import lightning_models as lm  # noqa: E402

lm.quiet()


def counting_hook(state, bucket):
    state["allreduces"] += 1
    tensor = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


class CountAllReduces(lm.pl.Callback):
    """Lightning registers DDP communication hooks on CUDA only: register the counter here."""

    def __init__(self):
        self.state = {"allreduces": 0}

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(self.state, counting_hook)


def main(out_dir, variant):
    from pytorch_lightning.strategies import DDPStrategy

    counter = CountAllReduces()
    state = counter.state
    model = lm.Lit(variant, micro_batch=4, batchnorm=False)
    x, y = lm.dataset(n=2 * lm.STEPS * lm.BATCH)
    t = lm.trainer(devices=2, strategy=DDPStrategy(process_group_backend="gloo"), accumulate_grad_batches=2,
                   callbacks=[counter])
    t.fit(model, lm.loader(x, y))
    torch.save({"params": [p.detach().clone() for p in model.net.parameters()], "seen": model.seen,
                "allreduces": state["allreduces"], "optimizer_steps": t.global_step},
               os.path.join(out_dir, f"rank{t.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
