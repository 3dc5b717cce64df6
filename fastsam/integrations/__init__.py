"""fastsam inside other people's training loops: PyTorch Lightning, Hugging Face, accelerate, timm.

Each integration is a submodule, imported on first use, so ``import fastsam`` never
imports a trainer library::

    from fastsam.integrations.lightning import SAMMixin        # pip install fastsam[lightning]
    from fastsam.integrations.transformers import SAMTrainer   # pip install fastsam[transformers]
    from fastsam.integrations.accelerate import sam_sub_steps  # pip install fastsam[transformers]
    from fastsam.integrations.timm import create_sam           # pip install timm

All of them run a SAM step through ``SAM.sub_step`` and a pass runner
(fastsam/passes.py), as ``fastsam.train_step`` does: a SAM variant that overrides
``sub_step`` works in every integration without new code.
"""

from __future__ import annotations

import importlib

SUBMODULES = ("lightning", "transformers", "accelerate", "timm")


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(SUBMODULES))
