"""fastsam.verify: every backend against ``reference``, on your parameter shapes and device.

::

    python -m fastsam.verify --model torchvision.models:resnet50 --device cuda --json out.json
    python -m fastsam.verify --shapes my_shapes.pt --sam --gsam --obf    # also: fastsam-verify
    report = fastsam.verify(model, variants=["sam", "gsam"])            # from Python; report.ok

For each selected variant (``sam`` by default; every registered one with ``--all``) and
each floating dtype among the parameters, each available backend (or those named with
``--backends``) runs on copies of your parameters, on your device:

* one SAM step (perturb, restore, GSAM combination, base step), compared element by
  element with the ``reference`` backend with the test suite's bounds
  (``fastsam.tolerances.scaled_error``); the restore must give back the weights bit for
  bit (an inexact restore reports an infinite step error);
* a short trajectory (``--steps``, default 5, with a cosine LR schedule that also drives
  GSAM's rho) compared after every step: in fp32 with the suite's trajectory tolerances,
  in bf16/fp16 by how far it drifts from an fp32 run against how far ``reference`` drifts
  (``fastsam.tolerances``);
* the time of one SAM sub-step (norm, perturb, restore), against ``reference``'s.

The gradients are those of a fixed quadratic loss on your parameters (each element has
its own curvature and minimum), so no data or forward pass is needed: the backends only
ever see parameters and gradients. The table gives each check's worst error as a multiple
of its bound (<= 1 passes); the command exits with status 1 if any check fails.

A variant is a name, SAM keyword arguments, a base optimizer and where its ascent
gradient comes from; :func:`register_variant` adds one (a new SAM method registers itself
there and ``--<name>`` selects it).

Triton on a machine without a GPU runs in Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before fastsam's Triton kernels are first defined: the command
does that when you pass ``--interpret``, or name ``triton`` in ``--backends`` on the CPU;
from Python set the variable before importing fastsam. The interpreter is slow: use it
on small models.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import types
from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["verify", "register_variant", "Variant", "VARIANTS", "Report", "main"]


# -- variants --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """A SAM method to check: ``sam_kwargs`` for fastsam.SAM (or ``optimizer_class``'s
    constructor, for a SAM subclass), the base optimizer and its keyword arguments, and
    the ascent gradient: ``"loss"`` (of the training loss) or ``"linear"`` (of a fixed
    linear surrogate, as OBF's ascent loss is linear in the outputs)."""

    name: str
    help: str
    sam_kwargs: dict
    base: type = torch.optim.SGD
    base_kwargs: dict = dataclasses.field(default_factory=lambda: dict(lr=0.05, momentum=0.9))
    ascent: str = "loss"
    optimizer_class: Optional[Callable] = None


VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Add (or replace) a variant; it can then be selected by name (``--<name>`` on the command line)."""
    if variant.ascent not in ("loss", "linear"):
        raise ValueError(f"Variant.ascent must be 'loss' or 'linear'; got {variant.ascent!r}")
    VARIANTS[variant.name] = variant
    return variant


register_variant(Variant("sam", "SAM, rho=0.05, SGD with momentum", dict(rho=0.05)))
register_variant(Variant("asam", "ASAM as published (adaptive=True, eta=0.01), rho=0.5",
                         dict(rho=0.5, adaptive=True, eta=0.01)))
register_variant(Variant("gsam", "GSAM, alpha=0.4, rho following the lr (0.1 -> 0.02)",
                         dict(rho=0.1, gsam_alpha=0.4, rho_schedule="lr", rho_min=0.02)))
register_variant(Variant("randsam", "RandSAM: the ascent direction is seeded Gaussian noise",
                         dict(rho=0.05, randsam=True)))
register_variant(Variant("obf", "OBF's setting (rho=0.6, AdamW) with a linear ascent surrogate; the OBF loss "
                                "itself runs in autograd, not in a backend", dict(rho=0.6),
                         base=torch.optim.AdamW, base_kwargs=dict(lr=1e-3, weight_decay=0.01), ascent="linear"))


# -- the parameters to check ---------------------------------------------------------------

def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def parameter_specs(model_or_params) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every floating parameter: from a module, an iterable of tensors,
    or a dict of name -> tensor or shape (a state dict; shapes become fp32 tensors)."""
    if isinstance(model_or_params, nn.Module):
        items = [(n, p.detach()) for n, p in model_or_params.named_parameters()]
    elif isinstance(model_or_params, dict):
        items = []
        gen = torch.Generator().manual_seed(0)
        for name, value in model_or_params.items():
            if isinstance(value, torch.Tensor):
                items.append((str(name), value.detach()))
            elif isinstance(value, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in value):
                items.append((str(name), 0.1 * torch.randn(tuple(value), generator=gen)))
            else:
                raise TypeError(f"state dict entry {name!r} is neither a tensor nor a shape (a tuple of ints)")
    else:
        items = [(f"param{i}", t.detach()) for i, t in enumerate(model_or_params)]
    floats = [(n, t) for n, t in items if isinstance(t, torch.Tensor) and _is_float(t.dtype)]
    if not floats:
        raise ValueError("no floating-point parameters to verify")
    return floats


class _Problem:
    """A fixed quadratic loss 0.5 * sum h (w - c)^2 on the parameters (its gradient is
    h (w - c), computed in fp32), and a fixed linear surrogate with gradient u."""

    def __init__(self, tensors: list[torch.Tensor], seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.h, self.c, self.u = [], [], []
        for t in tensors:
            shape, device = t.shape, t.device
            self.h.append((0.5 + torch.rand(shape, generator=gen)).to(device))
            self.c.append((0.1 * torch.randn(shape, generator=gen)).to(device))
            self.u.append(torch.randn(shape, generator=gen).to(device))

    def set_grads(self, params: list[torch.Tensor], linear: bool = False) -> None:
        for p, h, c, u in zip(params, self.h, self.c, self.u):
            g = u if linear else h * (p.detach().float() - c)
            p.grad = g.to(p.dtype)


# -- one backend's run ------------------------------------------------------------------------

def _make_sam(variant: Variant, params: list[torch.Tensor], backend: str, seed: int):
    import fastsam

    kwargs = dict(variant.sam_kwargs)
    if kwargs.get("randsam"):
        kwargs["generator"] = torch.Generator(device=params[0].device).manual_seed(seed)
    factory = variant.optimizer_class or fastsam.SAM
    sam = factory(params, variant.base, backend=backend, check_finite=False, **kwargs, **variant.base_kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sam, T_max=10, eta_min=0.0)
    return sam, scheduler


def _fresh(values: list[torch.Tensor], dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    return [v.detach().clone().to(dtype or v.dtype).requires_grad_(True) for v in values]


def _step(sam, params, problem: _Problem, variant: Variant, record: Optional[dict] = None) -> None:
    """One SAM step on the quadratic problem; ``record`` gets the perturbed weights and the
    (GSAM-combined) descent gradients of this step."""
    sam.zero_grad(set_to_none=True)
    problem.set_grads(params, linear=variant.ascent == "linear")
    sam.first_step(zero_grad=True)
    if record is not None:
        record["perturbed"] = [p.detach().clone() for p in params]
    problem.set_grads(params)
    sam.unperturb()
    if record is not None:
        record["restored"] = [p.detach().clone() for p in params]
        record["grads"] = [p.grad.detach().clone() for p in params]
    sam.base_step()


def _trajectory(variant, values, problem, backend, steps, seed, dtype=None) -> list[list[torch.Tensor]]:
    params = _fresh(values, dtype)
    sam, scheduler = _make_sam(variant, params, backend, seed)
    history = []
    for _ in range(steps):
        _step(sam, params, problem, variant)
        scheduler.step()
        history.append([p.detach().clone() for p in params])
    return history


def _worst_step_error(got: dict, want: dict, before: list[torch.Tensor], dtype) -> float:
    """Worst error / bound of the step's perturbed weights, gradients and new weights; inf
    if the restore was not bit-exact (the ops contract: restore_ copies the backup)."""
    from fastsam.tolerances import scaled_error

    if not all(torch.equal(a, w) for a, w in zip(got["restored"], before)):
        return math.inf
    worst = 0.0
    for name in ("perturbed", "grads", "after"):
        for a, e, w in zip(got[name], want[name], before):
            if name == "grads":  # GSAM's combination goes through reductions
                result = scaled_error(a, e, e.abs().max().item() if e.numel() else 0.0, dtype, reduction=True)
            else:
                result = scaled_error(a, e, w.abs() + (e.double() - w.double()).abs().to(e.device), dtype)
            worst = max(worst, result.worst)
    return worst


def _timer_settings(device: torch.device):
    """Short but not single-shot timings: at least 5 repetitions after 2 warm-up calls
    (bench's quick settings take 2, which moved by 2x between runs on a loaded CPU)."""
    from fastsam.bench.engine import Settings

    flush = 256 if device.type == "cuda" else 0
    return Settings(warmup_calls=2, warmup_s=0.02, warmup_cap_s=0.5, budget_s=0.2, min_reps=5, max_reps=200,
                    max_time_s=3.0, flush_mib=flush, copy_mib=64)


def _time_sub_step(variant, values, problem, backend, seed, timer) -> float:
    params = _fresh(values)
    sam, _ = _make_sam(variant, params, backend, seed)

    def sub_step():
        sam.first_step()
        sam.unperturb()

    problem.set_grads(params, linear=variant.ascent == "linear")
    return timer.measure(sub_step).median_ms


# -- the report ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    """What :func:`verify` found: one row per (variant, dtype, backend)."""

    rows: list[dict]
    device: str
    settings: dict

    @property
    def ok(self) -> bool:
        return all(row["ok"] for row in self.rows)

    def table(self) -> str:
        head = ("variant", "dtype", "backend", "params", "step err", "trajectory err", "ms/sub-step",
                "vs reference", "result")
        lines = [head]
        for r in self.rows:
            ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
            speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            step = "-" if r["step_error"] is None else f"{r['step_error']:.3g}"
            traj = "-" if r["trajectory_error"] is None else f"{r['trajectory_error']:.3g}"
            result = "ok" if r["ok"] else ("ERROR: " + r["error"] if r["error"] else "FAIL")
            lines.append((r["variant"], r["dtype"], r["backend"], str(r["numel"]), step, traj, ms, speed, result))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        out.append("errors are worst |got - reference| / bound (<= 1 passes; fastsam.tolerances)")
        return "\n".join(out)

    def to_dict(self) -> dict:
        from fastsam.bench.env import environment

        return {"fastsam_verify": 1, "ok": self.ok, "device": self.device, "settings": self.settings,
                "environment": environment(torch.device(self.device)), "results": self.rows}


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dtype, str(dtype))


def verify(model_or_params, *, variants: Iterable[str] = ("sam",), backends: Optional[Iterable[str]] = None,
           device=None, dtype: Optional[torch.dtype] = None, steps: int = 5, timing: bool = True,
           seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> Report:
    """Check every backend against ``reference`` on these parameters (see the module docstring).

    ``model_or_params``: a module, an iterable of tensors, or a dict of name -> tensor or
    shape. ``device``: where to run (default: where the parameters are). ``dtype``: cast
    the parameters to it (default: keep theirs). ``backends``: names to check (default:
    every available one but ``reference``). Returns a :class:`Report`; ``report.ok`` is
    False if any backend disagrees (or fails to run).
    """
    import fastsam
    from fastsam import ops
    from fastsam.bench.engine import Timer
    from fastsam.tolerances import drift_bound, trajectory_error

    names = list(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; registered: {sorted(VARIANTS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    specs = parameter_specs(model_or_params)
    device = torch.device(device) if device is not None else specs[0][1].device
    tensors = [t.to(device=device, dtype=dtype or t.dtype) for _, t in specs]
    chosen = list(backends) if backends is not None else [b for b in ops.available_backends(device)
                                                          if b != "reference"]
    timer = Timer(device, _timer_settings(device)) if timing else None
    say = progress or (lambda message: None)
    rows = []
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for name in names:
        variant = VARIANTS[name]
        for dt, values in by_dtype.items():
            problem = _Problem(values, seed)
            numel = sum(v.numel() for v in values)
            say(f"{name} {_dtype_name(dt)}: reference")
            want = {}
            ref_params = _fresh(values)
            ref_sam, _ = _make_sam(variant, ref_params, "reference", seed)
            _step(ref_sam, ref_params, problem, variant, want)
            want["after"] = [p.detach().clone() for p in ref_params]
            ref_history = _trajectory(variant, values, problem, "reference", steps, seed)
            fp32_final = None
            if dt in (torch.bfloat16, torch.float16):
                fp32_final = _trajectory(variant, values, problem, "reference", steps, seed, torch.float32)[-1]
            ref_ms = _time_sub_step(variant, values, problem, "reference", seed, timer) if timer else None
            for backend in chosen:
                if backend == "reference":
                    continue
                row = dict(variant=name, dtype=_dtype_name(dt), backend=backend, numel=numel, tensors=len(values),
                           step_error=None, trajectory_error=None, ms=None, reference_ms=ref_ms, speedup=None,
                           ok=False, error=None)
                rows.append(row)
                say(f"{name} {_dtype_name(dt)}: {backend}")
                try:
                    ops.get_backend(backend, device, dt)
                    got = {}
                    params = _fresh(values)
                    sam, _ = _make_sam(variant, params, backend, seed)
                    _step(sam, params, problem, variant, got)
                    got["after"] = [p.detach().clone() for p in params]
                    row["step_error"] = _worst_step_error(got, want, values, dt)
                    history = _trajectory(variant, values, problem, backend, steps, seed)
                    if fp32_final is None:
                        row["trajectory_error"] = max(trajectory_error(a, e) for step_a, step_e in
                                                      zip(history, ref_history) for a, e in zip(step_a, step_e))
                    else:
                        worst = 0.0
                        for g, r, f in zip(history[-1], ref_history[-1], fp32_final):
                            ref_drift = (r.float() - f).abs().max().item() if f.numel() else 0.0
                            got_drift = (g.float() - f).abs().max().item() if f.numel() else 0.0
                            bound = drift_bound(ref_drift, f.abs().max().item() if f.numel() else 0.0, dt)
                            worst = max(worst, got_drift / bound if bound > 0 else (0.0 if got_drift == 0 else math.inf))
                        row["trajectory_error"] = worst
                    if timer:
                        row["ms"] = _time_sub_step(variant, values, problem, backend, seed, timer)
                        row["speedup"] = ref_ms / row["ms"] if row["ms"] > 0 else None
                    row["ok"] = row["step_error"] <= 1.0 and row["trajectory_error"] <= 1.0
                except Exception as exc:  # a backend that cannot run is a failed check, reported
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    settings = dict(variants=names, backends=chosen, steps=steps, seed=seed, timing=timing,
                    dtype=None if dtype is None else _dtype_name(dtype), fastsam=fastsam.__version__)
    return Report(rows, str(device), settings)


# -- the command line -----------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def load_model(path: str, kwargs: Optional[dict] = None) -> nn.Module:
    """``"package.module:attribute"``: the attribute, called with ``kwargs`` unless it is a module already."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like 'package.module:attribute' (e.g. torchvision.models:resnet50); "
                         f"got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for --model {path}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name} has no attribute {attr!r} (--model {path})")
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {path} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsam-verify",
        description="Check every fastsam backend against 'reference' on your model's parameters (one SAM step "
                    "and a short trajectory, with the test suite's tolerances), and time a SAM sub-step.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Python path to a model or a function building one, "
                                        "e.g. torchvision.models:resnet50")
    source.add_argument("--shapes", help="a torch.save'd dict of name -> tensor or shape (tuple of ints)")
    parser.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the --model function")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the parameters to this dtype")
    parser.add_argument("--backends", help="comma-separated backends to check (default: every available one)")
    parser.add_argument("--steps", type=int, default=5, help="trajectory length (default 5)")
    parser.add_argument("--all", action="store_true", help="every registered variant")
    for name, variant in VARIANTS.items():
        parser.add_argument(f"--{name}", action="append_const", const=name, dest="variants", help=variant.help)
    parser.add_argument("--no-timing", action="store_true", help="skip the sub-step timing")
    parser.add_argument("--interpret", action="store_true",
                        help="run triton in Triton's CPU interpreter (sets TRITON_INTERPRET=1; automatic when "
                             "--backends names triton on the CPU)")
    parser.add_argument("--json", help="write the report (with the machine and versions) to this file")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    on_cpu = torch.device(device).type == "cpu"
    if args.interpret or (on_cpu and backends and "triton" in backends):
        if "fastsam.ops.triton_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            parser.error("fastsam's Triton kernels are already defined without the interpreter")
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        if args.model:
            model = load_model(args.model, json.loads(args.model_kwargs))
        else:
            model = torch.load(args.shapes, map_location="cpu", weights_only=True)
            if not isinstance(model, dict):
                raise ValueError(f"--shapes {args.shapes} holds a {type(model).__name__}, not a dict")
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    variants = list(VARIANTS) if args.all else (args.variants or ["sam"])
    report = verify(model, variants=variants, backends=backends, device=device,
                    dtype=DTYPES[args.dtype] if args.dtype else None, steps=args.steps, timing=not args.no_timing,
                    progress=lambda message: print(f"  checking {message}", file=sys.stderr, flush=True))
    print(report.table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    bad = [r for r in report.rows if not r["ok"]]
    print("all backends agree with reference" if not bad else f"{len(bad)} check(s) FAILED")
    return 0 if not bad and report.rows else 1


class _CallableModule(types.ModuleType):
    """``fastsam.verify(model, ...)`` calls :func:`verify` although ``fastsam.verify`` is this module."""

    def __call__(self, *args, **kwargs):
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
