"""Stochastic rounding of perturbed bf16/fp16 weights, in plain PyTorch (the reference).

Rounding w + eps to the nearest bf16/fp16 value loses every per-element step smaller than
half a unit in the last place of w, and at realistic model sizes that is most of them: the
step rho * g_i / ||g|| shrinks with the square root of the parameter count. With
``perturb_(..., seed=...)`` a bf16/fp16 result is instead rounded to one of the two
representable neighbours of x = w + eps (computed in fp32): the nearest one r, or the
other one o with probability |x - r| / |o - r|, so the rounded perturbation is unbiased.

The random bits of element e of tensor t (its position in the op's list) are a hash of
(seed, t, e), identical in every backend (csrc/math.h has the same functions), so results
do not depend on how a backend splits the work and agree between backends. The element
index follows the tensor's flat walk: memory order when every tensor the op touches at
that list position shares one dense layout (the kernels then walk memory), row-major
order otherwise (they walk contiguous stand-ins). All integers here are uint32 values held
in int64 tensors; products are formed in 16-bit halves so that nothing overflows int64.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
_MASK = 0xFFFFFFFF


def _mul32(x, c: int):
    """x * c mod 2^32, for uint32 values x (int64 tensors or ints) and a constant c."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def fmix32(x):
    """MurmurHash3's 32-bit finaliser (public domain)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def rounding_key(seed: Tensor, t: int, element_high):
    """The hash state shared by the elements of tensor ``t`` (int64 tensor ``seed``, 0-d)."""
    seed = seed.to(torch.int64)
    low, high = seed & _MASK, (seed >> 32) & _MASK
    return fmix32(fmix32(fmix32(fmix32(t ^ 0x9E3779B9) ^ high) ^ low) ^ element_high)


def walk_index(t: Tensor, partners: Sequence[Tensor]) -> Tensor:
    """Each element's index in the kernels' flat walk of ``t`` (int64, shaped like ``t``)."""
    index = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    if t.numel() > 1 and all(_dense(p) and p.stride() == t.stride() for p in (t, *partners)):
        return index.as_strided(t.shape, t.stride())  # memory order
    return index.view(t.shape)


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or torch.empty_like(t, device="meta").stride() == t.stride()


def stochastically_rounded(x: Tensor, dtype: torch.dtype, seed: Tensor, t: int, index: Tensor) -> Tensor:
    """fp32 ``x`` rounded to ``dtype`` (bf16 or fp16) stochastically, as csrc/math.h does it."""
    key = rounding_key(seed, t, (index >> 32) & _MASK)
    bits = fmix32((index & _MASK) ^ key)
    r = x.to(dtype)
    rf = r.float()
    r_bits = r.view(torch.int16).to(torch.int64) & 0xFFFF
    step = torch.where(x.abs() > rf.abs(), 1, -1)
    o_bits = (r_bits & 0x8000) | ((r_bits & 0x7FFF) + step)
    o = torch.where(o_bits >= 0x8000, o_bits - 0x10000, o_bits).to(torch.int16).view(dtype)
    p = (x - rf).abs() / (o.float() - rf).abs()
    u = (bits >> 8).to(torch.float32) * 2.0 ** -24
    keep = (rf == x) | torch.isnan(x) | ~(u < p)
    return torch.where(keep, r, o)
