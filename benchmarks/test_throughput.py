"""pytest-benchmark cases: each op and sub-step per (workload, backend), and whole training steps.

Groups are one (workload, item) or one model, so pytest-benchmark's table compares the
backends side by side. ``extra_info`` carries the bytes moved (docs/DESIGN.md's floor), the
achieved GB/s and the % of the session's measured copy bandwidth. Timing here is
pytest-benchmark's host clock around a synchronised call (the CLI uses CUDA events on a
GPU, so on small GPU workloads the CLI's numbers are the tighter ones).
"""

from __future__ import annotations

import math

import torch

from fastsam import ops
from fastsam.bench import e2e, engine


def _benchmark(benchmark, timer, fn, group: str):
    rounds, _ = timer.calibrate(fn)  # warms up; the CLI's choice of repetitions

    def synced():
        fn()
        timer.sync()
    benchmark.group = group
    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=0, iterations=1)
    return benchmark.stats.stats.median if benchmark.stats is not None else None


def test_op(benchmark, sel, timer, copy_bandwidth, tensor_sets, workload, backend_name, item):
    ts = tensor_sets(workload)
    backend = ops.get_backend(backend_name, sel.device)
    fn = engine.make_call(item, backend, ts)
    nbytes = engine.bytes_moved(item, ts.numel, ts.element_size)
    benchmark.extra_info.update(workload=workload, backend=backend_name, item=item, dtype=sel.dtype_name,
                                params=ts.numel, tensors=len(ts.params), bytes=nbytes,
                                copy_GBps=copy_bandwidth["GBps"])
    median_s = _benchmark(benchmark, timer, fn, f"{workload} {item} ({sel.dtype_name})")
    if median_s is not None:
        row = engine.derive({"bytes": nbytes, "median_ms": median_s * 1e3}, copy_bandwidth["GBps"])
        benchmark.extra_info.update(GBps=row["GBps"], pct_copy_bw=row["pct_copy_bw"])

    # What was timed did its job: weights finite, and a full sub-step leaves them restored.
    assert all(torch.isfinite(p).all() for p in (ts.params[0], ts.params[-1]))
    if item == "sam_substep":
        assert torch.equal(ts.params[0], ts.backups[0]) and torch.equal(ts.params[-1], ts.backups[-1])
    if item == "sumsq":
        total = fn()
        assert total.dtype == torch.float32 and math.isfinite(total.item()) and total.item() > 0


def test_train_step(benchmark, sel, timer, model_name, kind, backend_name, micro_batch):
    settings = e2e.E2ESettings.for_device(sel.device)
    x, y = e2e.make_data(settings, sel.device, sel.dtype)
    step, model, _ = e2e.make_step(e2e.MODELS[model_name], kind, backend_name, micro_batch, settings,
                                   sel.device, sel.dtype, x, y)
    benchmark.extra_info.update(model=model_name, optimizer=kind, backend=backend_name, batch=settings.batch,
                                micro_batch=micro_batch, image=settings.image)
    for _ in range(settings.warmup_steps):
        step()
    timer.sync()

    def synced():
        step()
        timer.sync()
    benchmark.group = f"e2e {model_name} (batch {settings.batch})"
    benchmark.pedantic(synced, rounds=settings.steps, warmup_rounds=0, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["steps_per_s"] = 1.0 / benchmark.stats.stats.median
    assert all(torch.isfinite(p).all() for p in model.parameters())
