"""Host-time items: one SAM sub-step through ``fastsam.SAM`` against the same sub-step's kernels alone.

``optimizer_substep``: ``SAM(params, NoOpOptimizer, rho, backend=name, check_finite=False)``
on real ``nn.Parameter`` objects whose ``.grad`` are the TensorSet's gradients (set once,
before timing); one repetition is ``first_step()`` then ``second_step()``. The base step
does nothing, so what is timed is SAM's own work: its Python around the kernels, and the
kernels. ``check_finite`` is off because its check is one more pass over the gradients and a
host sync (on a GPU the host would then wait for the device), neither of which the kernels
item makes; with it the ratio would not measure host overhead.

``kernels_substep``: the same sub-step's kernels on the same tensors (the parameters, their
gradients, the TensorSet's backups): for the compiled backends (cpp, cuda) ``fastsam._C``'s
eager entry points ``sumsq``, ``perturb_`` and ``restore_`` called directly, for the others
the backend's own op functions.

From the pair (``summarize``): the ratio optimizer / kernels, and host time as a % of the
optimizer sub-step. On the CPU, whose ops are synchronous, host time is what the optimizer
spends outside the kernels: optimizer - kernels. On a GPU it is the time the host needs to
queue one optimizer sub-step (``Timer.enqueue_times``), next to the device time measured with
CUDA events. ``GOALS`` are the targets of issue 13; ``summarize`` says whether each is met.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from fastsam.bench.workloads import TensorSet

ITEMS = ("optimizer_substep", "kernels_substep")
EPS = 1e-12  # SAM's default perturb_eps


class NoOpOptimizer(torch.optim.Optimizer):
    """A base optimizer whose step does nothing, so that a timed SAM step is SAM's work only."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _uses_compiled_kernels(backend) -> bool:
    from fastsam.ops import compiled
    return backend.perturb_ is compiled.perturb_


def optimizer_call(backend_name: str, params: list, rho: float) -> Callable[[], None]:
    """One SAM sub-step (first_step + second_step) through the public optimizer on ``params``."""
    import fastsam

    opt = fastsam.SAM(params, NoOpOptimizer, rho=rho, backend=backend_name, check_finite=False)

    def optimizer_substep():
        opt.first_step()
        opt.second_step()
    return optimizer_substep


def kernels_call(backend, params: list, grads: list, backups: list, rho: float) -> Callable[[], None]:
    """The same sub-step's kernels called directly on the same lists (see the module docstring)."""
    if _uses_compiled_kernels(backend):
        from fastsam.ops import compiled
        C = compiled.load_extension()
        with torch.no_grad():  # one untimed sub-step: the entry points must take these tensors
            total = C.sumsq(grads, [], 0, 0.0)
            refused = total is NotImplemented or any(
                out is NotImplemented for out in (C.perturb_(params, grads, backups, total, rho, 0, 0.0, EPS, [], None, None),
                                                  C.restore_(params, backups)))
        if refused:
            raise RuntimeError("fastsam._C's eager entry points refused these tensors (NotImplemented), "
                               "so this would not time the kernels alone")

        def compiled_substep():
            with torch.no_grad():  # the parameters require grad; SAM's own steps run under no_grad too
                total = C.sumsq(grads, [], 0, 0.0)
                C.perturb_(params, grads, backups, total, rho, 0, 0.0, EPS, [], None, None)
                C.restore_(params, backups)
        return compiled_substep

    def backend_substep():
        with torch.no_grad():
            total = backend.sumsq(grads)
            backend.perturb_(params, grads, backups, total, rho, eps=EPS)
            backend.restore_(params, backups)
    return backend_substep


def make_calls(backend_name: str, backend, ts: TensorSet, rho: float) -> dict[str, Callable[[], None]]:
    """{item: call} for both host items on one set of parameters (made here, sharing ``ts``'s storage)."""
    params = ts.parameters()
    grads = [p.grad for p in params]
    return {"optimizer_substep": optimizer_call(backend_name, params, rho),
            "kernels_substep": kernels_call(backend, params, grads, ts.backups, rho)}


def make_call(item: str, backend_name: str, backend, ts: TensorSet, rho: float) -> Callable[[], None]:
    if item not in ITEMS:
        raise ValueError(f"unknown host item {item!r}; choose from {', '.join(ITEMS)}")
    return make_calls(backend_name, backend, ts, rho)[item]


# -- the goals and the summary --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Goal:
    """A target for one (device type, workload, backend): ``metric`` of its optimizer row <= ``limit``.

    metric: "ratio" (optimizer / kernels), "host_pct" (host time, % of the optimizer
    sub-step), "host_us" (host time per sub-step, microseconds), "host_vs_cuda" (host time
    over the cuda backend's on the same workload).
    """

    device_type: str
    workload: str
    backend: str
    metric: str
    limit: float

    def text(self) -> str:
        return {"ratio": f"optimizer/kernels <= {self.limit:g}",
                "host_pct": f"host <= {self.limit:g}% of the sub-step",
                "host_us": f"host <= {self.limit:g} us per sub-step",
                "host_vs_cuda": f"host <= {self.limit:g}x cuda's"}[self.metric]


GOALS = (
    Goal("cpu", "tiny", "cpp", "ratio", 1.25),
    Goal("cpu", "resnet50", "cpp", "host_pct", 3.0),
    Goal("cuda", "resnet50", "cuda", "host_us", 30.0),
    Goal("cuda", "tiny", "cuda", "host_us", 150.0),
    Goal("cuda", "resnet50", "triton", "host_vs_cuda", 1.5),
    Goal("cuda", "tiny", "triton", "host_vs_cuda", 1.5),
)

SUMMARY_KEYS = ("optimizer_vs_kernels", "host_overhead_ms", "host_pct", "goal", "goal_met")


def summarize(rows: list[dict], device_type: str) -> None:
    """Add SUMMARY_KEYS to every optimizer_substep row that has its kernels_substep partner.

    host_overhead_ms: CPU, optimizer - kernels medians; GPU, the optimizer row's host_ms.
    """
    by_key = {(r["workload"], r["backend"], r["item"]): r for r in rows}
    host = {}
    for r in rows:
        if r["item"] != "optimizer_substep":
            continue
        for key in SUMMARY_KEYS:
            r[key] = None
        kernels = by_key.get((r["workload"], r["backend"], "kernels_substep"))
        if kernels is None or not r.get("median_ms") or not kernels.get("median_ms"):
            continue
        r["optimizer_vs_kernels"] = r["median_ms"] / kernels["median_ms"]
        r["host_overhead_ms"] = (r.get("host_ms") if device_type == "cuda"
                                 else r["median_ms"] - kernels["median_ms"])
        if r["host_overhead_ms"] is not None:
            r["host_pct"] = 100.0 * r["host_overhead_ms"] / r["median_ms"]
        host[(r["workload"], r["backend"])] = r["host_overhead_ms"]
    for goal in GOALS:
        if goal.device_type != device_type:
            continue
        r = by_key.get((goal.workload, goal.backend, "optimizer_substep"))
        if r is None:
            continue
        r["goal"] = goal.text()
        value = _goal_value(goal, r, host)
        r["goal_met"] = None if value is None else bool(value <= goal.limit)


def _goal_value(goal: Goal, row: dict, host: dict) -> Optional[float]:
    if goal.metric == "ratio":
        return row["optimizer_vs_kernels"]
    if goal.metric == "host_pct":
        return row["host_pct"]
    if goal.metric == "host_us":
        return None if row["host_overhead_ms"] is None else 1e3 * row["host_overhead_ms"]
    cuda = host.get((goal.workload, "cuda"))
    return None if row["host_overhead_ms"] is None or not cuda else row["host_overhead_ms"] / cuda
