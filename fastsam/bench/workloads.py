"""Benchmark workloads: the parameter shapes of real models, generated in code (no downloads).

A workload is only a list of tensor shapes; ``TensorSet`` fills it with the buffers one SAM
sub-step touches (weights, gradients, backups, GSAM ascent copies, an accumulator). The
large models measure bandwidth; ``tiny`` (thousands of small tensors) measures launch and
per-tensor overhead, which is where per-tensor loops lose most.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision ResNet-50 (v1.5): 161 tensors, 25,557,032 parameters."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out = planes * 4
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (out, planes, 1, 1), (out,), (out,)]
            if block == 0:  # projection shortcut
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


def vit_b16_shapes() -> list[tuple[int, ...]]:
    """ViT-B/16 at 224 px with a 1000-class head: 152 tensors, 86,567,656 parameters."""
    d, mlp, tokens = 768, 3072, 197
    shapes: list[tuple[int, ...]] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, tokens, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [(d,), (d,), (1000, d), (1000,)]
    return shapes


def gpt2_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M, output layer tied to the embedding): 148 tensors, 124,439,808 parameters."""
    d, mlp = 768, 3072
    shapes: list[tuple[int, ...]] = [(50257, d), (1024, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, mlp), (mlp,), (mlp, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


# Sizes cycled through by the launch-bound set: odd and even, 1 element to a few thousand.
_TINY_SIZES = (1, 3, 16, 64, 100, 128, 257, 512, 1000, 2048, 4097)


def tiny_shapes(count: int = 4096) -> list[tuple[int, ...]]:
    """``count`` small tensors (1 to 4097 elements, 748 on average): per-tensor overhead dominates."""
    return [(_TINY_SIZES[i % len(_TINY_SIZES)],) for i in range(count)]


def mini_shapes() -> list[tuple[int, ...]]:
    """A toy model for smoke tests: 8 tensors, 7,818 parameters."""
    return [(32, 3, 3, 3), (32,), (64, 32), (64,), (64, 64), (64,), (10, 64), (10,)]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    make_shapes: Callable[[], list]
    default: bool = True

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return self.make_shapes()

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("resnet50", "ResNet-50 parameters (161 tensors, 25.6M)", resnet50_shapes),
    Workload("vit_b16", "ViT-B/16 parameters (152 tensors, 86.6M)", vit_b16_shapes),
    Workload("gpt2", "GPT-2 124M parameters (148 tensors, 124.4M)", gpt2_shapes),
    Workload("tiny", "4096 tiny tensors (3.1M): launch/per-tensor overhead", tiny_shapes),
    Workload("mini", "toy model for smoke tests (8 tensors, 7.8k)", mini_shapes, default=False),
)}

DEFAULT_WORKLOADS = [name for name, w in WORKLOADS.items() if w.default]


class TensorSet:
    """The buffers one SAM sub-step touches, for every tensor of a workload.

    ``params`` (weights), ``grads`` (ascent / descent gradient), ``backups``, ``ascent``
    (GSAM's copy of the ascent gradient) and ``accum`` (sub-batch accumulator), all of the
    workload's shapes, on one device and dtype, filled with seeded random values of
    realistic magnitude (weights ~0.02, gradients ~1e-3).
    """

    def __init__(self, workload: Workload, device, dtype: torch.dtype, seed: int = 0):
        self.workload = workload
        self.device = torch.device(device)
        self.dtype = dtype
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shapes = workload.shapes

        # Random values are drawn once on the CPU (one large draw is much faster than
        # thousands of small ones, and one draw serves every buffer) and copied into
        # separately allocated tensors, so alignment is what a real model's would be.
        total = sum(_numel(s) for s in shapes)
        flat = torch.randn(total + 2, generator=gen)

        def filled(scale: float, shift: int) -> list[torch.Tensor]:
            out, offset = [], shift
            for s in shapes:
                n = _numel(s)
                t = torch.empty(s, device=self.device, dtype=dtype)
                t.copy_((flat[offset:offset + n] * scale).view(s))
                out.append(t)
                offset += n
            return out

        self.params = filled(0.02, 0)
        self.grads = filled(1e-3, 1)
        self.ascent = filled(1e-3, 2)
        # Backups start equal to the weights, so that restore_ timed on its own writes
        # real weights (never uninitialised memory, which could hold NaNs or denormals).
        self.backups = [p.clone() for p in self.params]
        self.accum = [torch.zeros_like(p) for p in self.params]

    def parameters(self) -> list[torch.nn.Parameter]:
        """New ``nn.Parameter`` objects on the storage of ``params``, each with ``.grad`` = the
        matching gradient: what ``fastsam.SAM`` is given when the optimizer itself is timed."""
        out = []
        for p, g in zip(self.params, self.grads):
            param = torch.nn.Parameter(p)
            param.grad = g
            out.append(param)
        return out

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def element_size(self) -> int:
        return self.params[0].element_size() if self.params else 0


def parse_workloads(spec) -> list[str]:
    """Workload names from a comma-separated string ('all' = every default workload)."""
    if spec is None:
        return list(DEFAULT_WORKLOADS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(DEFAULT_WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"unknown workload {', '.join(map(repr, unknown)) or repr(spec)}; "
                         f"choose from {', '.join(WORKLOADS)} (or 'all')")
    return names
