"""Data-parallel helpers: FSDP2's DTensor shards and DistributedDataParallel.

FSDP2 parameters and gradients are DTensors; fastsam's kernels work on their local shards,
and a sum over parameters (the norm, GSAM's inner products) adds the local partial sums
over the shard group before the square root (docs/ALGORITHMS.md §5). DDP replicas each
perturb on their own data: their passes run without gradient synchronisation, and
gradients are averaged once per step (fastsam.training decides how).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

try:  # FSDP2 parameters are DTensors; the kernels work on their local shards
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor the kernels work on: the local shard of a DTensor (FSDP), else the tensor."""
    return t.to_local() if is_dtensor(t) else t


def like_param(p: Tensor, local_tensor: Tensor) -> Tensor:
    """Wrap a local tensor as a gradient for ``p`` (a DTensor again when ``p`` is one)."""
    if not is_dtensor(p):
        return local_tensor
    return DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def shard_group(p: Tensor):
    """The process group over which ``p``'s local sums must be added (None: ``p`` is whole here)."""
    if not is_dtensor(p):
        return None
    placements = p.placements
    if any(pl.is_partial() for pl in placements):
        raise ValueError("fastsam.SAM cannot work on parameters with Partial placements")
    shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if not shard_dims:
        return None
    if len(shard_dims) > 1:
        raise NotImplementedError("fastsam.SAM supports parameters sharded over one device-mesh dimension "
                                  f"(FSDP, HSDP); got placements {placements}")
    return p.device_mesh.get_group(mesh_dim=shard_dims[0])


def global_sum(groups: list, parts: list[Tensor]) -> Optional[Tensor]:
    """Add partial sums; ``groups[i]`` is the shard group of ``parts[i]`` (None: not sharded).

    Sums over shards are all-reduced over their group first (one collective per group).
    Returns None when there is nothing to add.
    """
    if len(parts) == 1 and groups[0] is None:
        return parts[0]
    total, sharded = None, {}
    for group, part in zip(groups, parts):
        if group is None:
            total = part if total is None else total + part
        else:
            key = id(group)
            _, acc = sharded.get(key, (group, None))
            sharded[key] = (group, part if acc is None else acc + part)
    for group, part in sharded.values():
        part = part.clone()
        torch.distributed.all_reduce(part, group=group)
        total = part if total is None else total + part.to(total.device)
    return total


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def no_sync(model: nn.Module, sync: bool):
    """``model.no_sync()`` for a DDP model unless ``sync``; a null context otherwise."""
    if sync or not is_ddp(model):
        return contextlib.nullcontext()
    return model.no_sync()


def ddp_group(model: nn.Module):
    """The process group a DDP model averages over (DDP keeps it as ``process_group``)."""
    return getattr(model, "process_group", None)


@torch.no_grad()
def all_reduce_mean_(tensors: list[Tensor], group) -> None:
    """Average ``tensors`` over ``group`` in place, one collective each."""
    world = torch.distributed.get_world_size(group)
    for t in tensors:
        torch.distributed.all_reduce(t, group=group)
        t.div_(world)


def any_rank(flag: bool, device: torch.device, group) -> bool:
    """Whether ``flag`` is true on any rank of ``group`` (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, group=group)
    return bool(t.item() > 0)
