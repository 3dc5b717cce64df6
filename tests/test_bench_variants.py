"""fastsam.bench.variants: the variants' bench items (byte floors, what each call runs) and the e2e rows."""

from __future__ import annotations

import torch

from fastsam import ops
from fastsam.bench import e2e, engine, variants
from fastsam.bench.workloads import WORKLOADS, TensorSet


def test_byte_floors_count_each_operand_once():
    ts = TensorSet(WORKLOADS["mini"], "cpu", torch.float32)
    n, size = ts.numel, 4
    floors = {item: variants.bytes_moved(item, ts) for item in variants.ITEMS}
    assert floors["looksam_project_"] == 4 * n * size  # reads g_v, g_s, g; writes g_v
    assert floors["looksam_combine_"] == 3 * n * size
    assert floors["friendly_direction_"] == 4 * n * size
    unit = {name: engine.ITEMS[name].units for name in engine.OP_ITEMS}
    assert floors["looksam_reuse"] == (unit["sumsq"] + 3) * n * size
    # SAM sub-step with the ascent copy, the reduction, the projection (init: no read of g_v), ||g_v||^2
    assert floors["looksam_refresh"] == (unit["sumsq"] + unit["perturb_"] + 1 + unit["restore_"]
                                         + unit["gsam_reduce"] + 3 + unit["sumsq"]) * n * size
    assert floors["msam_substep"] == engine.bytes_moved("sam_substep", n, size)
    assert floors["fsam_substep"] == (4 + unit["perturb_"] + unit["restore_"]) * n * size
    kept = sum(ts.params[i].numel() for i in range(0, len(ts.params), 2))
    assert floors["esam_swp_substep"] == 7 * kept * size


class Recording:
    def __init__(self):
        base = ops.get_backend("reference", "cpu")
        self.calls = []
        for op in ops.OP_NAMES:
            setattr(self, op, self._wrap(op, getattr(base, op)))

    def _wrap(self, op, fn):
        def call(*args, **kwargs):
            self.calls.append(op)
            return fn(*args, **kwargs)
        return call


def test_each_item_runs_the_ops_of_its_floor():
    ts = TensorSet(WORKLOADS["mini"], "cpu", torch.float32)
    expected = {
        "looksam_reuse": ["sumsq", "looksam_combine_"],
        "looksam_refresh": ["sumsq", "perturb_", "restore_", "gsam_reduce", "looksam_project_", "sumsq"],
        "msam_substep": ["sumsq", "perturb_", "restore_"],
        "fsam_substep": ["friendly_direction_", "perturb_", "restore_"],
        "esam_swp_substep": ["sumsq", "perturb_", "restore_"],
        "ae_gate": ["sumsq"],
    }
    for item, ops_run in expected.items():
        backend = Recording()
        call = variants.make_call(item, backend, ts)
        backend.calls.clear()  # scalars prepared before timing do not count
        call()
        assert backend.calls == ops_run, item
    weights = [p.clone() for p in ts.params]
    variants.make_call("msam_substep", ops.get_backend("reference", "cpu"), ts)()
    assert all(torch.equal(a, b) for a, b in zip(ts.params, weights))  # perturbed and restored exactly


def test_e2e_rows_for_the_cheap_methods():
    settings = e2e.E2ESettings(batch=8, image=8, warmup_steps=1, steps=1)
    rows = variants.run_e2e(e2e.MODELS["resnet"], torch.device("cpu"), torch.float32, settings,
                            methods=("base", "Every-4", "MSAM"))
    assert [r["method"] for r in rows] == ["base", "Every-4", "MSAM"]
    assert all(r["error"] is None and r["steps_per_s"] > 0 for r in rows)
    assert rows[0]["time_vs_base"] == 1.0
