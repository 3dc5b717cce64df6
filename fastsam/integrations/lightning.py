"""PyTorch Lightning 2.x: SAM-family training with Lightning's automatic optimization.

Put :class:`SAMMixin` before ``LightningModule`` and return a :class:`fastsam.SAM` from
``configure_optimizers``; the rest of the module stays as it is::

    class Classifier(SAMMixin, L.LightningModule):
        sam_micro_batch = 64                      # perturbation sub-batches (None: the whole batch)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            return loss                           # OBF: {"loss": loss, "ascent_loss": obf(logits, y)}

        def configure_optimizers(self):
            return fastsam.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

How it works. ``training_step`` becomes the loss of one SAM pass: when Lightning calls it
for a batch, the mixin splits the batch into sub-batches and runs ``SAM.sub_step`` on
each (fastsam/passes.py), calling your ``training_step`` once per pass (``self.sam_pass``
says which: ``Pass.ASCENT`` at the clean weights, ``Pass.DESCENT`` at w + eps with
BatchNorm statistics frozen; log in the ascent pass). The descent gradients gather in
SAM's accumulator, weighted by each sub-batch's share of the batch and by
``1 / accumulate_grad_batches``; Lightning's own backward (``LightningModule.backward``,
which the mixin implements) then moves them into ``.grad`` on the accumulation cycle's
last batch, where Lightning unscales (16-mixed), clips (``gradient_clip_val``) and steps,
through ``scaler.step`` when there is a GradScaler. The step goes through the mixin's
``optimizer_step``: if you override that hook, call ``super().optimizer_step(...)``.

Precision: ``"32-true"``, ``"bf16-mixed"`` and ``"16-mixed"`` (the GradScaler: a
sub-batch whose ascent gradients are inf/nan makes the scaler skip the whole step, as in
train_step). ``accumulate_grad_batches`` and ``gradient_clip_val`` work as Lightning
documents them. ``strategy="ddp"``: every SAM pass runs without gradient
synchronisation (each replica perturbs on its own data) and the step's gradient is
averaged once, by DDP's own bucketed all-reduce in Lightning's backward call (the
returned loss is tied to every parameter with a zero gradient for that, see
:class:`_CarryGradients`). Checkpoints (``Trainer(...).fit(ckpt_path=...)``) hold SAM's
state in torch.optim's layout and resume bit-exactly.

Manual optimization (``self.automatic_optimization = False``): call :func:`manual_step`
(``fastsam.train_step`` with Lightning's GradScaler) in your ``training_step``; see its
docstring. Under DDP use automatic optimization.

This module imports nothing from Lightning, so it works with ``lightning.pytorch`` and
``pytorch_lightning`` alike.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import Tensor, nn

from fastsam import distributed
from fastsam.integrations import _common
from fastsam.optimizer import SAM
from fastsam.passes import Pass
from fastsam.training import StepOutput, train_step

__all__ = ["SAMMixin", "manual_step"]


class _CarryGradients(torch.autograd.Function):
    """The loss handed back to Lightning under DDP: its value is the step's loss and its
    backward gives every parameter a zero gradient.

    Lightning runs ``training_step`` inside DDP's forward, and on a synchronising batch
    DDP then expects a backward through the parameters. The SAM passes ran inside that
    forward, so DDP saw none of them; this backward is the one it waits for. Each zero is
    added to the step's gradient already in ``.grad``, and DDP's reducer all-reduces
    ``.grad`` as it does after gradient accumulation: one bucketed all-reduce per step,
    DDP communication hooks included.
    """

    @staticmethod
    def forward(ctx, loss: Tensor, *params: Tensor) -> Tensor:
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        zeros = [torch.zeros((), dtype=dtype, device=device).expand(shape) for shape, dtype, device in ctx.specs]
        return (None, *zeros)


class _PreparedStep:
    """What Lightning's precision plugin steps on a SAM step: ``step(closure)`` runs
    Lightning's closure once (the SAM passes, then ``on_before_optimizer_step`` and
    clipping) and finishes the prepared SAM step (``SAM.step()``, the base optimizer's
    step). A GradScaler unscales and steps it like any optimizer; everything else is SAM's."""

    def __init__(self, sam: SAM):
        self.sam = sam

    @property
    def param_groups(self):
        return self.sam.param_groups

    @property
    def state(self):
        return self.sam.state

    @property
    def defaults(self):
        return self.sam.defaults

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.sam.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sam.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name):
        return getattr(self.__dict__["sam"], name)


def _attached_sam(trainer) -> Optional[SAM]:
    optimizers = getattr(trainer.strategy, "optimizers", None) or []
    if len(optimizers) != 1:
        return None
    sam = _common.unwrap_optimizer(optimizers[0])
    return sam if isinstance(sam, SAM) else None


def _loss_parts(output, kind: Pass) -> tuple[Tensor, Tensor, dict]:
    """(training loss, loss to differentiate, extra items) from what training_step returned."""
    if isinstance(output, Tensor):
        return output, output, {}
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        loss = output["loss"]
        ascent = output.get("ascent_loss")
        objective = ascent if (kind is Pass.ASCENT and ascent is not None) else loss
        return loss, objective, {k: v for k, v in output.items() if k not in ("loss", "ascent_loss")}
    raise TypeError("with SAMMixin, training_step must return the loss tensor or a dict with a 'loss' tensor (and, "
                    f"optionally, an 'ascent_loss' tensor for the ascent pass, e.g. OBF's); got {type(output).__name__}")


def _detached(value):
    return value.detach() if isinstance(value, Tensor) else value


class _LightningPasses(_common.Passes):
    """Passes of one sub-batch through the user's training_step (in Lightning's autocast)."""

    def __init__(self, module, call, sub_batch, args, kwargs, scaler):
        self.module, self.call, self.sub_batch, self.args, self.kwargs = module, call, sub_batch, args, kwargs
        self.scaler = scaler
        self.device_type = next(module.parameters()).device.type
        self.extras: dict = {}
        super().__init__(module, self._compute, self._backward, freeze_bn=module.sam_freeze_bn)

    def _compute(self, kind: Pass):
        module = self.module
        module.sam_pass = kind
        try:
            if torch.is_autocast_cache_enabled():
                torch.clear_autocast_cache()  # casts of the weights go stale when they are perturbed in place
            output = self.call(self.sub_batch, *self.args, **self.kwargs)
        finally:
            module.sam_pass = None
        loss, objective, extras = _loss_parts(output, kind)
        if kind is not Pass.DESCENT:
            self.extras = {k: _detached(v) for k, v in extras.items()}
        return loss, objective

    def _backward(self, objective: Tensor) -> None:
        with _common.autocast_off(self.device_type):
            (self.scaler.scale(objective) if self.scaler is not None else objective).backward()


def _drive(module, call, args: tuple, kwargs: dict):
    """Lightning's call of training_step: the whole SAM step of one batch."""
    if module.sam_pass is not None:  # a pass is running (e.g. a subclass calling super().training_step)
        return call(*args, **kwargs)
    trainer = getattr(module, "_trainer", None)
    sam = _attached_sam(trainer) if trainer is not None and trainer.training else None
    if sam is None or not module.automatic_optimization:
        return call(*args, **kwargs)
    if sam.is_perturbed:
        raise RuntimeError(
            "SAMMixin: training_step was called while the weights are perturbed, i.e. fastsam.SAM.step(closure) is "
            "running Lightning's closure. Your optimizer_step override must call super().optimizer_step(...) "
            "(SAMMixin's), which runs the SAM step.")
    if args:
        batch, rest = args[0], args[1:]
    elif "batch" in kwargs:
        batch, rest = kwargs.pop("batch"), ()
    else:
        raise TypeError("training_step was called without a batch")
    stepping = not trainer.fit_loop._should_accumulate()
    if stepping and not module._fastsam_in_optimizer_step:
        raise RuntimeError(
            "SAMMixin: Lightning ran the optimizer step without SAMMixin.optimizer_step. If you override "
            "optimizer_step, call super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure) in it.")
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    last_passes = []

    def make_passes(piece):
        last_passes[:] = [_LightningPasses(module, call, piece, rest, kwargs, scaler)]
        return last_passes[0]

    done = _common.run_sub_steps(sam, _common.split_batch(batch, module.sam_micro_batch), make_passes,
                                 accumulation_steps=trainer.accumulate_grad_batches, accumulate=True,
                                 skip_nonfinite=scaler is not None)
    module._fastsam_pending = "load" if stepping else "accumulate"
    loss = done.loss
    if stepping and distributed.is_ddp(trainer.strategy.model):
        loss = _CarryGradients.apply(loss, *[p for p in module.parameters() if p.requires_grad])
    module.sam_last_perturbed_loss = done.perturbed_loss
    extras = last_passes[0].extras if last_passes else {}
    return {"loss": loss, **extras} if extras else loss


def _driver(step):
    """Wrap a class's own training_step so that Lightning's call of it runs the SAM step."""

    @functools.wraps(step)
    def training_step(self, *args, **kwargs):
        return _drive(self, functools.partial(step, self), args, kwargs)

    training_step._fastsam_driver = True
    return training_step


class SAMMixin:
    """Mixin for a ``LightningModule`` (put it first: ``class M(SAMMixin, L.LightningModule)``)
    that trains with the ``fastsam.SAM`` returned by ``configure_optimizers``
    (see the module docstring). With any other optimizer the module trains as it would
    without the mixin.

    Settings (class or instance attributes): ``sam_micro_batch`` (examples per
    perturbation sub-batch; None: the whole batch; every tensor of the batch must then
    hold the examples along dim 0), ``sam_freeze_bn`` (BatchNorm running statistics
    frozen in the perturbed pass; default True). ``sam_pass`` is the pass your
    ``training_step`` is running for (None outside a SAM step), and
    ``sam_last_perturbed_loss`` the loss at w + eps of the last batch.
    """

    sam_micro_batch: Optional[int] = None
    sam_freeze_bn: bool = True
    sam_pass: Optional[Pass] = None
    sam_last_perturbed_loss: Optional[Tensor] = None
    _fastsam_pending: Optional[str] = None  # "load": load the accumulated gradients in backward
    _fastsam_in_optimizer_step: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_fastsam_driver", False):
            cls.training_step = _driver(step)

    def training_step(self, *args, **kwargs):  # a subclass that does not define its own: drive the next one
        return _drive(self, super().training_step, args, kwargs)

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        pending, self._fastsam_pending = self._fastsam_pending, None
        if pending is None:
            return super().backward(loss, *args, **kwargs)
        if pending == "load":
            sam = _attached_sam(self.trainer)
            if sam is not None and sam.accumulating:
                sam.load_accumulated_grads()
        if loss.requires_grad:  # DDP: the zero-gradient backward that carries the all-reduce
            loss.backward(*args, **kwargs)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        sam = _common.unwrap_optimizer(optimizer)
        if not isinstance(sam, SAM) or not self.automatic_optimization:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._fastsam_in_optimizer_step = True
        try:
            self.trainer.strategy.optimizer_step(_PreparedStep(sam), optimizer_closure, model=self)
        finally:
            self._fastsam_in_optimizer_step = False


def manual_step(module: nn.Module, inputs, targets: Tensor, loss_fn, **train_step_kwargs: Any) -> StepOutput:
    """One SAM step in a LightningModule with manual optimization: ``fastsam.train_step``
    on the module's ``fastsam.SAM`` with Lightning's GradScaler (16-mixed)::

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = fastsam.integrations.lightning.manual_step(self, x, y, F.cross_entropy, micro_batch=64)
            self.log("train_loss", out.loss)
            # step LR schedulers yourself: self.lr_schedulers().step()

    The forward passes run in Lightning's autocast (bf16-mixed, 16-mixed); keyword
    arguments go to train_step (``micro_batch``, ``ascent_loss``, ``max_grad_norm``,
    ``accumulation_steps`` and ``step`` for accumulation, ...). Under a DDP strategy
    Lightning's own forward around training_step would make the next step's ascent
    backward synchronise, so this refuses DDP: train with automatic optimization
    (:class:`SAMMixin`) there.
    """
    trainer = module.trainer
    if distributed.is_ddp(trainer.strategy.model):
        raise RuntimeError("fastsam.integrations.lightning.manual_step does not support DDP strategies (Lightning's "
                           "forward around training_step would synchronise the next ascent pass); use SAMMixin with "
                           "automatic optimization under DDP")
    optimizers = module.optimizers()
    if isinstance(optimizers, (list, tuple)):
        raise TypeError("manual_step needs exactly one optimizer (a fastsam.SAM)")
    sam = _common.require_sam(optimizers, "manual_step")
    if "scaler" not in train_step_kwargs:
        train_step_kwargs["scaler"] = getattr(trainer.precision_plugin, "scaler", None)
    return train_step(module, sam, inputs, targets, loss_fn, **train_step_kwargs)
