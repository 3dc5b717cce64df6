"""SAM-ON (Mueller, Vlaar, Rolnick, Hein, "Normalization Layers Are All That Sharpness-Aware
Minimization Needs", NeurIPS 2023): perturb only the normalisation layers' affine parameters.

:func:`normalization_params` builds the param groups: the normalisation layers' weights and
biases in one group (perturbed; the norm of the perturbation is over them only), every other
parameter in a group with ``rho = 0``, which fastsam skips entirely in the perturbation (no
backup, no kernel, not in the norm). All parameters are then updated with the gradient at the
perturbed point. The authors select the parameters by name ('norm' or 'bn' in it); this
helper selects them by module type, which does not depend on naming. docs/ALGORITHMS.md §9.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

NORMALIZATION_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def normalization_params(model: nn.Module, rho: Optional[float] = None, *, types: tuple = NORMALIZATION_TYPES,
                         others: Optional[dict] = None) -> list[dict]:
    """Param groups for SAM-ON: ``[{"params": normalisation parameters[, "rho": rho]}, {"params": the rest, "rho": 0.0}]``.

    ``types``: the module classes that count as normalisation layers (BatchNorm, InstanceNorm,
    LayerNorm, GroupNorm, RMSNorm by default). ``rho`` (optional) sets the first group's
    radius, else it takes the optimizer's. ``others``: more settings for the second group
    (e.g. ``{"weight_decay": 0.0}``). Parameters that do not require gradients are left out; a
    parameter shared by several modules appears once. The second group is omitted when empty.

        opt = fastsam.SAM(fastsam.normalization_params(model), torch.optim.SGD, rho=0.5, lr=0.1)
    """
    norm, seen = [], set()
    for module in model.modules():
        if isinstance(module, types):
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    norm.append(p)
    if not norm:
        raise ValueError(f"the model has no normalisation layer with trainable parameters (looked for "
                         f"{', '.join(t.__name__ for t in types)}); SAM-ON has nothing to perturb")
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [{"params": norm, **({"rho": float(rho)} if rho is not None else {})}]
    if rest:
        groups.append({"params": rest, **(others or {}), "rho": 0.0})
    return groups
