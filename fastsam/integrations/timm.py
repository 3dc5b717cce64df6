"""timm: SAM around the optimizer timm's ``train.py`` builds.

::

    model = timm.create_model("resnet50", pretrained=False, num_classes=100)
    optimizer = create_sam(model, opt="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, rho=0.05)
    for x, y in loader:
        out = fastsam.train_step(model, optimizer, x, y, loss_fn, micro_batch=64)
        scheduler.step_update(num_updates)   # timm schedulers set the lr of SAM's (the base's) groups

:func:`create_sam` calls ``timm.optim.create_optimizer_v2`` with your arguments, so the
param groups are timm's: no weight decay on biases, norm weights (every 1-d parameter) and
``model.no_weight_decay()``, layer-wise lr decay if asked. fastsam.SAM then adopts that
optimizer instance (its groups and state). A timm ``train.py``-style loop is in
examples/timm_train.py.
"""

from __future__ import annotations

from typing import Optional

import timm.optim
from torch import nn

from fastsam.optimizer import SAM

__all__ = ["create_sam"]


def create_sam(model: nn.Module, opt: str = "sgd", *, rho: float = 0.05, sam_kwargs: Optional[dict] = None,
               **timm_kwargs) -> SAM:
    """``fastsam.SAM(None, timm.optim.create_optimizer_v2(model, opt, **timm_kwargs), rho=rho, **sam_kwargs)``."""
    base = timm.optim.create_optimizer_v2(model, opt=opt, **timm_kwargs)
    return SAM(None, base, rho=rho, **(sam_kwargs or {}))
