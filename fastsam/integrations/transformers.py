"""Hugging Face ``transformers.Trainer``: :class:`SAMTrainer`, a Trainer that takes SAM steps.

::

    from fastsam.integrations.transformers import SAMTrainer

    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                         sam_kwargs=dict(rho=0.05), micro_batch=16)
    trainer.train()

The Trainer builds its optimizer as usual (``args.optim``, weight decay off for biases and
norm weights, or ``optimizers=(...)``) and SAMTrainer wraps it in :class:`fastsam.SAM`
with ``sam_kwargs`` (``rho``, ``adaptive``, ``gsam_alpha``, ``randsam``, ...); the LR
scheduler the Trainer builds drives the same param groups (and GSAM's rho schedule).
``training_step`` runs one SAM sub-step per sub-batch of ``micro_batch`` sequences
through ``SAM.sub_step`` (the forward and loss are the Trainer's ``compute_loss``, the
backward is ``accelerator.backward``, so bf16/fp16 and the GradScaler are the Trainer's);
the Trainer then clips (``max_grad_norm``), steps the optimizer (``SAM.step()`` finishes
the prepared step, through the GradScaler with fp16), steps the scheduler and saves
checkpoints (SAM's state in torch.optim's layout; ``resume_from_checkpoint`` continues
bit-exactly).

``gradient_accumulation_steps``: each micro-batch's descent gradients are weighted by
1/k and gathered in SAM's accumulator; they are loaded into ``.grad`` on the cycle's last
micro-batch, before the Trainer clips and steps. Each sub-batch's loss is the model's mean
over its own tokens, weighted by the sub-batch's share of the sequences, as in
``fastsam.train_step``: the Trainer's token-count normalisation across accumulated batches
(``num_items_in_batch``) is not used, because SAM's perturbation needs each sub-batch's
own gradient.

DDP (torchrun or ``accelerate launch``): every pass runs under ``no_sync`` except the
step's final descent backward, which synchronises (DDP's own all-reduce, once per
optimizer step); GSAM averages its combined gradients with one all-reduce per parameter
bucket instead (see fastsam/training.py).

``ascent_loss(outputs, inputs) -> Tensor`` (optional) replaces the training loss in the
ascent pass, e.g. OBF on a causal LM:
``lambda out, inp: obf(out.logits[:, :-1], inp["labels"][:, 1:])``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import transformers
from torch import Tensor

from fastsam import distributed
from fastsam.integrations import _common
from fastsam.optimizer import SAM
from fastsam.passes import Pass

__all__ = ["SAMTrainer"]


class SAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose steps are SAM-family steps (see the module docstring).

    Extra arguments: ``sam_kwargs`` (keyword arguments of :class:`fastsam.SAM` besides the
    base optimizer; default ``{"rho": 0.05}``), ``micro_batch`` (sequences per
    perturbation sub-batch; None: the whole per-device batch), ``ascent_loss`` and
    ``freeze_bn`` (BatchNorm statistics frozen in the perturbed pass).
    """

    def __init__(self, *args, sam_kwargs: Optional[dict] = None, micro_batch: Optional[int] = None,
                 ascent_loss: Optional[Callable[[Any, dict], Tensor]] = None, freeze_bn: bool = True, **kwargs):
        self.sam_kwargs = dict(sam_kwargs) if sam_kwargs is not None else {"rho": 0.05}
        self.micro_batch = micro_batch
        self.ascent_loss = ascent_loss
        self.freeze_bn = freeze_bn
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not isinstance(optimizer, SAM):
            optimizer = SAM(None, optimizer, **self.sam_kwargs)
            self.optimizer = optimizer
        return optimizer

    def training_step(self, model, inputs: dict, num_items_in_batch=None) -> Tensor:
        sam = _common.require_sam(self.optimizer, "SAMTrainer")
        if sam.randsam and self.ascent_loss is not None:
            raise ValueError("ascent_loss has no effect with randsam=True (the ascent direction is noise)")
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        accelerator = self.accelerator
        ddp = distributed.is_ddp(model)
        scaler = accelerator.scaler
        steps = self.current_gradient_accumulation_steps

        def make_passes(piece: dict) -> _common.Passes:
            def compute(kind: Pass):
                with self.compute_loss_context_manager():
                    loss, outputs = self.compute_loss(model, dict(piece), return_outputs=True)
                    if self.args.n_gpu > 1:
                        loss = loss.mean()
                    objective = loss
                    if kind is Pass.ASCENT and self.ascent_loss is not None:
                        objective = self.ascent_loss(outputs, piece)
                return loss, objective

            return _common.Passes(model, compute, accelerator.backward,
                                  no_sync=(lambda: accelerator.no_sync(model)) if ddp else None,
                                  freeze_bn=self.freeze_bn)

        done = _common.run_sub_steps(sam, _common.split_batch(inputs, self.micro_batch), make_passes,
                                     accumulation_steps=steps, sync_last=accelerator.sync_gradients, ddp=ddp,
                                     skip_nonfinite=scaler is not None)
        if accelerator.sync_gradients:
            _common.load_and_average(sam, model, done.synced)
        return done.loss.detach() / steps
