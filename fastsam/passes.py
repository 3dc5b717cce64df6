"""The pass protocol: how a SAM method asks the training code for forward/backward passes.

A SAM-family step is a sequence of passes of the model over one (sub-)batch at one set
of weights. The method (``SAM.sub_step`` and its variants) decides which passes to run and
where the weights are; the code that knows the model (``fastsam.train_step``, the
Lightning and Hugging Face integrations, a hand-written loop) runs them. It does so by
handing the method a *pass runner*, a callable::

    run_pass(kind: Pass, *, scale: float = 1.0, sync: bool = False) -> Tensor

which runs one forward pass on the sub-batch, computes the loss that ``kind`` names and,
unless ``kind`` is ``Pass.LOSS``, calls backward on ``scale * loss`` (through the AMP
scaler when there is one), so that the gradient *accumulates* into ``.grad``. It returns
the training loss of that pass (detached). ``sync`` asks for data-parallel gradient
synchronisation in this backward (DistributedDataParallel outside ``no_sync``); without it
a DDP model must run the backward under ``no_sync()``. Runners that are not data-parallel
ignore ``sync``.

Optional capabilities, which a runner advertises with attributes:

* ``ascent_is_plain = True``: ``Pass.ASCENT``'s backward is the training loss's (there is
  no separate ascent loss). A method that needs the training-loss gradient first (AE-SAM's
  gate) then uses it as the ascent direction; without the attribute it runs
  ``Pass.ASCENT`` as a second pass on the steps it perturbs.
* ``supports_selection = True``: the runner also takes ``subset`` (a 1-d index tensor: the
  pass uses only those examples of its sub-batch, the loss being their mean) and
  ``per_sample=True`` (it then returns ``(loss, per-example training losses)``; with
  ``Pass.DESCENT`` that pass is a forward only, without gradient, at the current weights,
  with BatchNorm statistics frozen). ESAM's data selection needs it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from torch import Tensor


class Pass(enum.Enum):
    """The kinds of pass a method may ask for."""

    #: at the clean weights: backward of the *ascent* loss (e.g. OBF's, else the training
    #: loss); its outputs and training loss are the step's reported ones.
    ASCENT = "ascent"
    #: at the perturbed weights: backward of the training loss, with BatchNorm running
    #: statistics frozen (they come from the clean passes only).
    DESCENT = "descent"
    #: at the clean weights: backward of the training loss (a step without perturbation).
    PLAIN = "plain"
    #: at the clean weights: forward and training loss only, no backward (RandSAM's
    #: ascent direction is noise, so only the reported loss is needed).
    LOSS = "loss"


@dataclasses.dataclass
class SubStepResult:
    """What one ``SAM.sub_step`` did.

    ``loss``: training loss at the clean weights. ``perturbed_loss``: training loss at the
    perturbed weights (None when nothing was perturbed). ``skipped``: the ascent gradients
    were inf/nan (``skip_nonfinite``): nothing was perturbed, no further pass ran, and
    ``.grad`` keeps the non-finite values so that a GradScaler skips the step.
    ``synced``: the step's gradients were synchronised inside the final backward (DDP's
    own all-reduce); when False under data parallelism the caller averages them.
    """

    loss: Tensor
    perturbed_loss: Optional[Tensor] = None
    skipped: bool = False
    synced: bool = False
