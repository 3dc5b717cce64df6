"""fastsam: a fast, complete sharpness-aware minimisation (SAM) optimizer family for PyTorch.

SAM, ASAM, GSAM, output-bias forgetting (OBF), RandSAM and perturbation sub-batches, with
the per-step bookkeeping (global norm, perturbation, exact restore, GSAM decomposition,
accumulation) run by interchangeable backends of one ops contract (``fastsam.ops``); and the
efficient variants that bring SAM close to the base optimizer's cost (``SAM(schedule=...)``
with ``fastsam.schedules``, LookSAM, MomentumSAM, FriendlySAM, ESAM, SAM-ON's
``normalization_params``).
"""

from fastsam._version import __version__
from fastsam.batchnorm import disable_running_stats, enable_running_stats, frozen_running_stats
from fastsam.losses import OutputBiasForgetting
from fastsam.ops import BackendUnavailableError, available_backends
from fastsam.optimizer import SAM
from fastsam.passes import Pass, SubStepResult
from fastsam.schedules import lr_proportional_rho
from fastsam.training import StepOutput, train_step
from fastsam import schedules
from fastsam.variants.esam import ESAM
from fastsam.variants.friendly import FriendlySAM
from fastsam.variants.looksam import LookSAM
from fastsam.variants.momentum import MomentumSAM
from fastsam.variants.normalization import normalization_params

__all__ = [
    "SAM",
    "Pass",
    "SubStepResult",
    "OutputBiasForgetting",
    "train_step",
    "StepOutput",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_running_stats",
    "available_backends",
    "BackendUnavailableError",
    "lr_proportional_rho",
    "verify",
    "schedules",
    "LookSAM",
    "MomentumSAM",
    "FriendlySAM",
    "ESAM",
    "normalization_params",
]


def __getattr__(name: str):
    # fastsam.verify (the function and `python -m fastsam.verify`) and fastsam.integrations
    # load on first use: neither is needed to train, and the integrations import trainers.
    if name in ("verify", "integrations", "tolerances"):
        import importlib

        return importlib.import_module(f"fastsam.{name}")
    raise AttributeError(f"module 'fastsam' has no attribute {name!r}")
