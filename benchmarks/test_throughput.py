"""pytest-benchmark cases: each op and sub-step per (workload, backend), and whole training steps.

Groups are one (workload, item) or one model, so pytest-benchmark's table compares the
backends side by side. ``extra_info`` carries the bytes moved (docs/DESIGN.md's floor), the
achieved GB/s and the % of the session's measured copy bandwidth. Timing here is
pytest-benchmark's host clock around a synchronised call (the CLI uses CUDA events on a
GPU, so on small GPU workloads the CLI's numbers are the tighter ones).

After timing, each op case runs its call once more with every op checked against
``reference`` on the same inputs (``LockstepCheck``), and all buffers must be finite: a
backend that times fast because it skips work fails here.
"""

from __future__ import annotations

import inspect

import torch

from fastsam import ops
from fastsam.bench import e2e, engine
from fastsam.ops import reference
from tests.conftest import assert_close_scaled, tolerance

BUFFERS = ("params", "grads", "backups", "ascent", "accum")
WRITES = {"perturb_": ("params", "backups", "ascent"), "restore_": ("params",), "gsam_combine_": ("grads",),
          "accumulate_": ("accum",)}  # the list arguments each op writes


class LockstepCheck:
    """Runs what was timed once more, each op checked against ``reference`` as it happens.

    ``backend_ops()`` is a Backend whose ops run the timed backend's op on the TensorSet's
    buffers, then the reference op on a mirror copy of them (same inputs: the mirror is
    brought level after every op), and compare what each op wrote or returned: sumsq and
    GSAM statistics, the perturbed weights and ascent copy, exact backups and restores,
    combined gradients and accumulators. A backend whose op does nothing, or half its job,
    fails here, where comparing the buffers after a whole sub-step could not tell.
    """

    def __init__(self, backend: ops.Backend, ts):
        self.backend, self.ts = backend, ts
        self.mirror = {name: [t.clone() for t in getattr(ts, name)] for name in BUFFERS}
        self._mirror_of = {id(getattr(ts, name)): self.mirror[name] for name in BUFFERS}
        self.checked: list[str] = []

    def backend_ops(self) -> ops.Backend:
        return ops.backend_from_functions(f"checked {self.backend.name}", {
            op: (lambda *args, _op=op, **kwargs: self._run(_op, args, kwargs)) for op in ops.OP_NAMES})

    def _run(self, op: str, args, kwargs):
        out = getattr(self.backend, op)(*args, **kwargs)
        signature = inspect.signature(getattr(reference, op))
        mine = signature.bind(*args, **kwargs).arguments
        ref = {name: self._mirror_of.get(id(value), value) for name, value in mine.items()}
        getattr(self, "_check_" + op.rstrip("_"))(out, mine, ref)
        for name in WRITES.get(op, ()):  # level again, so that every op is compared on the same inputs
            if ref.get(name) is not None:
                torch._foreach_copy_(ref[name], mine[name])
        self.checked.append(op)
        return out

    def _check_sumsq(self, out, mine, ref):
        assert_close_scaled(out, reference.sumsq(**ref), 0.0, self.ts.dtype, reduction=True)
        # and each tensor alone: a lost tensor is below the tolerance of a sum over thousands
        params = ref.get("params")
        for i, g in enumerate(ref["tensors"]):
            one = dict(ref, tensors=[g], params=None if params is None else [params[i]])
            assert_close_scaled(self.backend.sumsq(**one), reference.sumsq(**one), 0.0, self.ts.dtype,
                                reduction=True, describe=lambda _, i=i: f"tensor {i} alone")

    def _check_perturb(self, out, mine, ref):
        reference.perturb_(**ref)
        assert_equal_per_tensor(mine["backups"], ref["backups"], "perturb_ must back up the weights bit-exactly")
        w0 = ref["backups"]
        assert_close_per_tensor(mine["params"], ref["params"], [w.abs() + (e - w).abs() for w, e in zip(w0, ref["params"])],
                           self.ts.dtype)
        if ref.get("ascent") is not None:
            assert_close_per_tensor(mine["ascent"], ref["ascent"], [e.abs() for e in ref["ascent"]], self.ts.dtype)

    def _check_restore(self, out, mine, ref):
        reference.restore_(**ref)
        assert_equal_per_tensor(mine["params"], ref["params"], "restore_ must copy the backups bit-exactly")

    def _check_gsam_reduce(self, out, mine, ref):
        abs_dot = sum((a.double() * g.double()).abs().sum() for a, g in zip(ref["ascent"], ref["grads"]))
        expected = reference.gsam_reduce(**ref)
        assert_close_scaled(out[0], expected[0], abs_dot, self.ts.dtype, reduction=True)
        assert_close_scaled(out[1], expected[1], 0.0, self.ts.dtype, reduction=True)

    def _check_gsam_combine(self, out, mine, ref):
        alpha = ref["alpha"]
        before = [g.abs() + alpha * a.abs() for g, a in zip(ref["grads"], ref["ascent"])]
        reference.gsam_combine_(**ref)
        # |<g_asc, h> h| <= |g_orth| + |g_asc|: twice the operands and the result bound every rounding
        assert_close_per_tensor(mine["grads"], ref["grads"], [2 * (b + e.abs()) for b, e in zip(before, ref["grads"])],
                           self.ts.dtype)

    def _check_accumulate(self, out, mine, ref):
        scale, init = ref["scale"], ref.get("init", False)
        before = [(0.0 if init else acc.abs()) + abs(scale) * g.abs() for acc, g in zip(ref["accum"], ref["grads"])]
        reference.accumulate_(**ref)
        assert_close_per_tensor(mine["accum"], ref["accum"], before, self.ts.dtype)


def assert_close_per_tensor(actuals, expecteds, magnitudes, dtype):
    """tests.conftest.assert_close_scaled's bound, |a - e| <= tol * (|e| + magnitude) + step,
    evaluated on the tensors' device in fp32 one tensor at a time (workloads of 10^8 elements
    would otherwise be moved to the host in float64); a failing tensor is then compared by
    assert_close_scaled itself, for its message."""
    tol = tolerance(dtype)
    info = torch.finfo(dtype)
    step = max(1e-30, info.smallest_normal * info.eps)
    for i, (a, e, m) in enumerate(zip(actuals, expecteds, magnitudes)):
        a32, e32 = a.float(), e.float()
        bound = (e32.abs() + (m.float() if isinstance(m, torch.Tensor) else m)) * tol + step
        if bool(((a32 - e32).abs() > bound).any()):
            assert_close_scaled(a, e, m, dtype, describe=lambda flat, i=i: f"tensor {i}, element {flat}")
            raise AssertionError(f"tensor {i} is out of tolerance (at the fp32 bound)")


def assert_equal_per_tensor(actuals, expecteds, message: str):
    for i, (a, e) in enumerate(zip(actuals, expecteds)):
        assert torch.equal(a, e), f"{message} (tensor {i} differs)"


def _all_finite(tensors) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


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

    # What was timed does its job: the same call once more, each op against reference.
    for name in BUFFERS:
        assert _all_finite(getattr(ts, name)), f"{name} holds inf/nan after timing {item}"
    if item == "restore_":  # give restore_ something to undo
        torch._foreach_add_(ts.params, 1.0)
    check = LockstepCheck(backend, ts)
    engine.make_call(item, check.backend_ops(), ts)()
    assert check.checked, f"{item} ran no op"
    for name in BUFFERS:
        assert _all_finite(getattr(ts, name)), f"{name} holds inf/nan after {item}"


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
