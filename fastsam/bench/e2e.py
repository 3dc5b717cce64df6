"""End-to-end mode: whole training steps of small real models, base optimizer vs SAM per backend.

Two models are built in code: a small ResNet (BatchNorm, 3 stages of basic blocks) and a
small ViT (patch embedding + pre-norm transformer encoder), on CIFAR-shaped random data.
For each model this times ``fastsam.train_step`` with the base optimizer alone and with
``fastsam.SAM`` on every backend, perturbation sub-batches of 64 examples and of the whole
batch. The share of step time spent outside forward/backward is
``1 - t(the same forward/backward passes alone) / t(step)``: the optimizer's overhead
(bookkeeping, base step, and whatever the training loop adds around them).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

import fastsam
from fastsam.bench.engine import Timer, Timing


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: 3 stages of ``blocks`` basic blocks, widths w, 2w, 4w."""

    def __init__(self, num_classes: int = 10, width: int = 32, blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SmallViT(nn.Module):
    """A small ViT (32 px images by default): 4 px patches, class token, pre-norm encoder, linear head."""

    def __init__(self, num_classes: int = 10, image: int = 32, patch: int = 4, dim: int = 128,
                 depth: int = 4, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[int], nn.Module]  # image size -> model
    base: Callable[[], tuple]  # -> (optimizer class, kwargs)


MODELS = {
    "resnet": ModelSpec("resnet", lambda image: SmallResNet(),
                        lambda: (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4))),
    "vit": ModelSpec("vit", lambda image: SmallViT(image=image),
                     lambda: (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05))),
}


@dataclasses.dataclass(frozen=True)
class E2ESettings:
    batch: int
    image: int  # side of the square input images
    warmup_steps: int
    steps: int

    @staticmethod
    def for_device(device: torch.device, quick: bool = False) -> "E2ESettings":
        if device.type == "cuda":
            return E2ESettings(256, 32, 3, 10) if quick else E2ESettings(256, 32, 5, 30)
        # CPU: 16 px images keep a default run to a few minutes on 2 cores; the GPU's
        # 32 px numbers are the ones that speak for real training.
        return E2ESettings(128, 8, 1, 2) if quick else E2ESettings(128, 16, 1, 3)


MICRO_BATCH = 64


def _fresh_model(spec: ModelSpec, image: int, device, dtype):
    torch.manual_seed(0)
    return spec.build(image).to(device=device, dtype=dtype).train()


def _passes_only(model: nn.Module, x, y, sizes: list[int], passes: int) -> Callable[[], None]:
    """The forward/backward passes of a step (``passes`` per sub-batch), without any optimizer."""
    xs, ys = torch.split(x, sizes), torch.split(y, sizes)

    def run():
        for xi, yi in zip(xs, ys):
            for _ in range(passes):
                for p in model.parameters():
                    p.grad = None
                F.cross_entropy(model(xi), yi).backward()
    return run


TIMING_KEYS = ("median_ms", "p20_ms", "p80_ms", "min_ms", "reps", "spread_pct")


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def make_data(settings: E2ESettings, device, dtype) -> tuple:
    """Seeded random CIFAR-shaped images and labels for 10 classes."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(settings.batch, 3, settings.image, settings.image, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (settings.batch,), generator=gen).to(device)
    return x, y


def micro_batches(settings: E2ESettings) -> list[int]:
    """The perturbation sub-batch sizes compared: 64 examples and the whole batch."""
    return sorted({min(MICRO_BATCH, settings.batch), settings.batch})


def make_step(spec: ModelSpec, kind: str, backend: str, micro_batch: int, settings: E2ESettings,
              device, dtype, x, y) -> tuple[Callable[[], None], nn.Module, torch.optim.Optimizer]:
    """One training step of a fresh model: ``kind`` 'base' (base optimizer alone) or 'sam'."""
    model = _fresh_model(spec, settings.image, device, dtype)
    base_cls, base_kwargs = spec.base()
    if kind == "base":
        optimizer = base_cls(model.parameters(), **base_kwargs)
    else:
        optimizer = fastsam.SAM(model.parameters(), base_cls, rho=0.05, backend=backend, **base_kwargs)
    micro = None if micro_batch == settings.batch else micro_batch

    def step():
        fastsam.train_step(model, optimizer, x, y, F.cross_entropy, micro_batch=micro)
    return step, model, optimizer


def run_model(spec: ModelSpec, backends: list[str], device: torch.device, dtype: torch.dtype,
              settings: E2ESettings, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Rows for one model: the base optimizer alone, then SAM with each backend and sub-batch size.

    Every configuration gets its own freshly initialised model (same seed) and optimizer.
    After warm-up the configurations are timed round-robin, one step each per round, so
    that a change in machine load hits all of them alike instead of one in particular.
    """
    timer = Timer(device)
    x, y = make_data(settings, device, dtype)
    sizes_of = micro_batches(settings)

    # (label, step function, row or None); passes-only runs give the forward/backward time.
    runs: list[tuple] = []
    for m, passes in [(settings.batch, 1)] + [(m, 2) for m in sizes_of]:
        model = _fresh_model(spec, settings.image, device, dtype)
        sizes = [m] * (settings.batch // m) + ([settings.batch % m] if settings.batch % m else [])
        runs.append((("passes", m, passes), _passes_only(model, x, y, sizes, passes), None))
    params = sum(p.numel() for p in model.parameters())
    tensors = sum(1 for _ in model.parameters())
    configs = [("base", "-", settings.batch)] + [("sam", b, m) for m in sizes_of for b in backends]
    rows = []
    base_name = spec.base()[0].__name__
    for kind, backend, m in configs:
        row = {"model": spec.name, "params": params, "tensors": tensors, "optimizer": kind, "base": base_name,
               "backend": backend,
               "batch": settings.batch, "micro_batch": m, "image": settings.image,
               "dtype": str(dtype).replace("torch.", ""), "error": None}
        rows.append(row)
        try:
            step, _, _ = make_step(spec, kind, backend, m, settings, device, dtype, x, y)
        except Exception as exc:  # recorded in the row: one failing backend does not lose the others
            row["error"] = _error(exc)
            continue
        runs.append(((kind, backend, m), step, row))

    times: dict[tuple, list] = {label: [] for label, _, _ in runs}
    failed: dict[tuple, str] = {}

    def attempt(label, fn, row, timed: bool):
        if label in failed:
            return
        try:
            if timed:
                times[label].append(timer.measure(fn, reps=1).times_ms[0])
            else:
                fn()
                timer.sync()
        except Exception as exc:
            failed[label] = _error(exc)
            if row is not None:
                row["error"] = failed[label]
            elif progress is not None:
                progress(f"{spec.name}: forward/backward alone FAILED: {failed[label]}")

    for _ in range(settings.warmup_steps):
        for label, fn, row in runs:
            attempt(label, fn, row, timed=False)
    for _ in range(settings.steps):
        for label, fn, row in runs:
            attempt(label, fn, row, timed=True)

    def summary(label) -> dict:
        if label in failed or not times[label]:
            return {key: None for key in TIMING_KEYS}
        return Timing(tuple(times[label])).summary()

    for row in rows:
        timing = summary((row["optimizer"], row["backend"], row["micro_batch"]))
        passes = 1 if row["optimizer"] == "base" else 2
        fwd_bwd = summary(("passes", row["micro_batch"], passes))["median_ms"]
        step_ms = timing["median_ms"]
        row.update({"steps_per_s": 1e3 / step_ms if step_ms else None, **timing, "fwd_bwd_ms": fwd_bwd,
                    "outside_fwd_bwd_pct": max(0.0, 100.0 * (1.0 - fwd_bwd / step_ms)) if step_ms and fwd_bwd else None})
        if progress is not None:
            label = "base" if row["optimizer"] == "base" else f"SAM/{row['backend']}"
            if row["error"]:
                progress(f"{spec.name:6s} {label:14s} m={row['micro_batch']:<4d} FAILED: {row['error']}")
            else:
                progress(f"{spec.name:6s} {label:14s} m={row['micro_batch']:<4d} {row['steps_per_s']:8.2f} steps/s "
                         f"({row['outside_fwd_bwd_pct'] or 0.0:4.1f}% outside fwd/bwd)")
    base_ms = rows[0]["median_ms"]
    for r in rows:
        r["time_vs_base"] = r["median_ms"] / base_ms if base_ms and r["median_ms"] else None
    return rows
