"""Freeze BatchNorm running statistics during SAM's perturbed passes (docs/ALGORITHMS.md §6).

Running statistics must come from the unperturbed forward only. Turning
``track_running_stats`` off for the perturbed pass makes BatchNorm normalise with batch
statistics (as in any training forward) while leaving ``running_mean``, ``running_var``
and ``num_batches_tracked`` untouched bit for bit, whatever the module's momentum (the
"momentum = 0" trick of other SAM code still counts batches and breaks momentum=None).
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

_SAVED = "_fastsam_saved_track_running_stats"


def _norm_layers(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, _NormBase))


def disable_running_stats(model: nn.Module) -> None:
    """Stop every BatchNorm-like layer of ``model`` from updating its running statistics."""
    for module in _norm_layers(model):
        if not hasattr(module, _SAVED):
            setattr(module, _SAVED, module.track_running_stats)
        module.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` (layers that never tracked stats stay as they were)."""
    for module in _norm_layers(model):
        if hasattr(module, _SAVED):
            module.track_running_stats = getattr(module, _SAVED)
            delattr(module, _SAVED)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module):
    """``with frozen_running_stats(model): ...`` runs the block with running statistics frozen."""
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
