"""Bench items: a full SAM step with its base step, unfused against fused.

A SAM step's bookkeeping around the perturbed forward/backward (sumsq, perturb_) and then:

* ``unfused``: fastsam's ``restore_``, then torch.optim's own step (the class's
  ``step()``, as users run it) with its best implementation on the device: ``fused=True``
  where torch has it for that device, else ``foreach=True``;
* ``fused``: fastsam's ``sgd_step_`` / ``adam_step_`` from the backups (no restore pass);
* ``SAM_unfused`` / ``SAM_fused``: the same step through the optimizer users run,
  ``fastsam.SAM(..., fused_base_step=False / True)`` (``first_step()`` + ``second_step()``,
  ``check_finite=False`` as torch.optim has no such check), host work included;
* ``SAM_accum_unfused`` / ``SAM_accum_fused``: a step of two perturbation sub-batches
  through ``fastsam.SAM``'s sub-steps as ``train_step(micro_batch=...)`` drives them (the
  "backward" assigns the prepared gradients): unfused, each sub-batch restores and
  accumulates in separate sweeps and torch's step runs on the loaded sum; fused, the first
  sub-batch ends with ``restore_accumulate_`` and the last one's restore and accumulation are
  inside the base step.

Both on the same buffers (fastsam.bench.workloads.TensorSet), for SGD with momentum and
AdamW, each measured against its own byte floor (docs/DESIGN.md §9): SGD momentum 48N
unfused vs 40N fused, AdamW 56N vs 48N bytes for N fp32 parameters (two sub-batches: 96N vs
80N and 104N vs 88N). The two variants of a
(workload, optimizer) are timed in alternating rounds (fused, unfused, fused, ...) whose
times are pooled, so that a change in machine load falls on both.

    python -m fastsam.bench.full_step --device cpu --workloads resnet50 --quick --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Callable, Optional

import torch

import fastsam
from fastsam import ops
from fastsam.bench import engine
from fastsam.bench.env import environment
from fastsam.bench.workloads import WORKLOADS, TensorSet

RHO = engine.RHO
OPTIMIZERS = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}
VARIANTS = ("unfused", "fused", "SAM_unfused", "SAM_fused", "SAM_accum_unfused", "SAM_accum_fused")
# each fused speed-up is against its partner
PAIRS = (("unfused", "fused"), ("SAM_unfused", "SAM_fused"), ("SAM_accum_unfused", "SAM_accum_fused"))
DEFAULT_WORKLOADS = ("resnet50", "vit_b16", "gpt2")

# Bytes per parameter, in units of the element size (docs/DESIGN.md §9): sumsq 1 + perturb_ 4,
# then restore_ 2 + the torch step (SGD momentum 5, AdamW 7), or the fused step (5, 7).
UNITS = {
    ("sgd_momentum", "unfused"): 1 + 4 + 2 + 5,
    ("sgd_momentum", "fused"): 1 + 4 + 5,
    ("adamw", "unfused"): 1 + 4 + 2 + 7,
    ("adamw", "fused"): 1 + 4 + 7,
    # two sub-batches, each sumsq 1 + perturb_ 4; unfused: restore_ 2 + accumulate_ 2 (the
    # first overwrites) or 3, then the step; fused: restore_accumulate_ 4 (first), then the
    # step reading the sum too (SGD momentum 6, AdamW 8)
    ("sgd_momentum", "accum_unfused"): 2 * 5 + 2 + 2 + 2 + 3 + 5,
    ("sgd_momentum", "accum_fused"): 2 * 5 + 4 + 6,
    ("adamw", "accum_unfused"): 2 * 5 + 2 + 2 + 2 + 3 + 7,
    ("adamw", "accum_fused"): 2 * 5 + 4 + 8,
}


def item_name(optimizer: str, variant: str) -> str:
    return f"sam_{optimizer}_{variant}"


def bytes_moved(optimizer: str, variant: str, numel: int, element_size: int) -> int:
    """The floor of a full SAM step with that base step, in bytes."""
    return UNITS[(optimizer, variant.replace("SAM_", ""))] * numel * element_size


def torch_step_impl(device: torch.device) -> str:
    """'fused' where torch.optim has fused SGD/AdamW kernels for the device type, else 'foreach'."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return "fused" if device.type in _get_fused_kernels_supported_devices() else "foreach"


class FullStep:
    """The state of one (optimizer, variant) on a TensorSet, and a call that runs one step."""

    def __init__(self, optimizer: str, variant: str, backend, ts: TensorSet):
        self.optimizer, self.variant, self.backend, self.ts = optimizer, variant, backend, ts
        cls, self.kwargs = OPTIMIZERS[optimizer]
        self.sam = None
        if variant.startswith("SAM_"):
            fused = variant.endswith("_fused")
            self.impl = "fastsam" if fused else torch_step_impl(ts.device)
            for p, g in zip(ts.params, ts.grads):
                p.requires_grad_(True)
                p.grad = g
            impl = {torch_step_impl(ts.device): True}
            self.sam = fastsam.SAM(ts.params, cls, rho=RHO, backend=backend.name, check_finite=False,
                                   fused_base_step=fused, **self.kwargs, **impl)
        elif variant == "unfused":
            self.impl = torch_step_impl(ts.device)
            for p, g in zip(ts.params, ts.grads):
                p.grad = g
            self.torch_optimizer = cls(ts.params, **self.kwargs, **{self.impl: True})
        else:
            self.impl = "fastsam"
            zeros = lambda: [torch.zeros_like(p) for p in ts.params]  # noqa: E731
            if optimizer == "sgd_momentum":
                self.state = dict(momentum_buffers=zeros())
            else:
                self.state = dict(exp_avgs=zeros(), exp_avg_sqs=zeros(), max_exp_avg_sqs=None,
                                  steps=[torch.zeros((), device=ts.device) for _ in ts.params])

    def _backward(self, kind, **_) -> torch.Tensor:
        """A pass runner's pass (fastsam/passes.py) whose backward assigns the prepared gradients."""
        for p, g in zip(self.ts.params, self.ts.grads):
            p.grad = g
        return self.ts.grads[0].new_zeros(())

    def __call__(self) -> None:
        sam = self.sam
        if sam is not None and "accum" in self.variant:  # what train_step(micro_batch=...) runs
            sam.sub_step(self._backward, weight=0.5)
            sam._sam_sub_step(self._backward, weight=0.5, then_base_step=True)
            if sam.accumulating:  # unfused: the sum goes into .grad for torch's step
                sam.load_accumulated_grads()
            sam.base_step()
            return
        if sam is not None:
            sam.first_step()
            sam.second_step()
            return
        b, ts = self.backend, self.ts
        s = b.sumsq(ts.grads)
        b.perturb_(ts.params, ts.grads, ts.backups, s, RHO)
        if self.variant == "unfused":
            b.restore_(ts.params, ts.backups)
            self.torch_optimizer.step()
        elif self.optimizer == "sgd_momentum":
            k = self.kwargs
            b.sgd_step_(ts.params, ts.grads, self.state["momentum_buffers"], k["lr"], weight_decay=k["weight_decay"],
                        momentum=k["momentum"], backups=ts.backups)
        else:
            k = self.kwargs
            st = self.state
            b.adam_step_(ts.params, ts.grads, st["exp_avgs"], st["exp_avg_sqs"], None, st["steps"], k["lr"],
                         weight_decay=k["weight_decay"], decoupled_weight_decay=True, backups=ts.backups)


def measure_pair(timer: engine.Timer, calls: dict, rounds: int) -> dict:
    """Timings of each call: ``rounds`` alternating measurements of its calibrated repetitions, pooled."""
    reps = {name: timer.calibrate(fn)[0] for name, fn in calls.items()}
    times = {name: [] for name in calls}
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(reversed(list(calls)))):
            times[name] += timer.measure(calls[name], reps[name]).times_ms
    return {name: engine.Timing(tuple(t)) for name, t in times.items()}


def run(device="cpu", workloads=DEFAULT_WORKLOADS, backend: str = "auto", dtype=torch.float32,
        optimizers=tuple(OPTIMIZERS), quick: bool = False, rounds: int = 3,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measure every (workload, optimizer) pair; returns {"environment", "copy", "results"}."""
    timer = engine.Timer(device, quick=quick)
    copy = timer.copy_bandwidth()
    rows = []
    for name in workloads:
        workload = WORKLOADS[name]
        for optimizer in optimizers:
            chosen = ops.get_backend(backend, timer.device, dtype)
            medians = {}
            # one pair at a time (its two variants timed in alternating rounds): four tensor
            # sets of GPT-2 with AdamW state at once exceeded 24 GiB
            for pair in PAIRS:
                ts_by_variant = {v: TensorSet(workload, timer.device, dtype) for v in pair}
                steps = {v: FullStep(optimizer, v, chosen, ts_by_variant[v]) for v in pair}
                with torch.no_grad():
                    timings = measure_pair(timer, steps, rounds)
                for variant in pair:
                    ts = ts_by_variant[variant]
                    row = {"workload": name, "backend": chosen.name, "item": item_name(optimizer, variant),
                           "base_step": (f"torch {steps[variant].impl}" if steps[variant].impl != "fastsam"
                                         else "fastsam fused"),
                           "dtype": str(dtype).replace("torch.", ""), "numel": ts.numel, "tensors": len(ts.params),
                           "bytes": bytes_moved(optimizer, variant, ts.numel, ts.element_size),
                           **timings[variant].summary(), "error": None}
                    engine.derive(row, copy["GBps"])
                    medians[variant] = row["median_ms"]
                    rows.append(row)
                    if progress is not None:
                        progress(f"{name:9s} {row['item']:28s} {row['base_step']:14s} {row['median_ms']:10.3f} ms "
                                 f"(p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}; {row['pct_copy_bw']:5.1f}% of "
                                 f"copy bw, {row['reps']} reps)")
                unfused, fused = pair
                for row in rows[-len(pair):]:
                    row["speedup_fused_vs_unfused"] = medians[unfused] / medians[fused]
                if progress is not None:
                    progress(f"{name:9s} {optimizer:28s} {fused}/{unfused} speed-up "
                             f"{medians[unfused] / medians[fused]:.3f}x")
                del ts_by_variant, steps, timings
                gc.collect()
                if timer.device.type == "cuda":
                    torch.cuda.empty_cache()
    return {"environment": environment(timer.device), "copy": copy, "results": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsam.bench.full_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds per pair (pooled)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    unknown += [o for o in args.optimizers.split(",") if o not in OPTIMIZERS]
    if unknown:
        print(f"unknown workloads/optimizers {unknown}; choose from {list(WORKLOADS)} and {list(OPTIMIZERS)}",
              file=sys.stderr)
        return 2
    out = run(args.device, args.workloads.split(","), args.backend,
              torch.float32 if args.dtype == "fp32" else torch.bfloat16, tuple(args.optimizers.split(",")),
              args.quick, args.rounds, progress=print)
    print(f"copy bandwidth {out['copy']['GBps']:.1f} GB/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
