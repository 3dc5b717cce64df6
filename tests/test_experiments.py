"""The experiment command end to end (tiny sizes) and its label corruption.

The default run uses a configuration of a few seconds that still reaches every method,
the m study, rho tuning, sharpness and every output file; the real ``--quick`` smoke run
(about a minute on 2 cores) is marked slow: select it with ``pytest -m slow``.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

# mnist1d, scikit-learn and matplotlib come with the test extra: a missing one fails here
import matplotlib  # noqa: F401
import mnist1d  # noqa: F401
import sklearn  # noqa: F401

from fastsam.experiments import compare
from fastsam.experiments.data import corrupt_labels, load

ALL_CONFIGS = [f"{m} (m=16)" for m in compare.METHODS] + [f"{m} (m=64)" for m in compare.M_STUDY_METHODS]
OUTPUTS = ("results.md", "results.json", "summary.csv", "runs.csv", "test_accuracy_curves.png",
           "accuracy_vs_sharpness.png", "accuracy_vs_cost.png", "m_study.png")


def check_outputs(out, configs, seeds, epochs, tuned, m_study=True):
    expected = [name for name in OUTPUTS if m_study or name != "m_study.png"] + (["tuning.csv"] if tuned else [])
    for name in expected:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    results = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
    assert [row["config"] for row in results["summary"]] == configs
    assert len(results["runs"]) == len(configs) * seeds
    for run in results["runs"]:
        assert len(run["curve"]) == epochs
        assert 0.0 <= run["test_acc"] <= 1.0 and run["train_loss"] > 0
        assert math.isfinite(run["hessian_max_eig"]) and math.isfinite(run["m_sharpness"])
        assert run["wall_ms_per_step"] > 0 and run["cpu_ms_per_step"] > 0
        assert run["grad_evals_per_step"] >= 1.0 and run["forward_evals_per_step"] >= 0.0
    for row in results["summary"]:
        accs = [r["test_acc"] for r in results["runs"] if r["config"] == row["config"]]
        assert row["test_acc_mean"] == pytest.approx(np.mean(accs))
        assert row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1) if seeds > 1 else 0.0)
    with open(os.path.join(out, "summary.csv"), newline="", encoding="utf-8") as handle:
        assert [row["config"] for row in csv.DictReader(handle)] == configs
    table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    for config in configs:
        assert f"| {config} |" in table
    return results


def test_tiny_run_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "out")
    code = compare.main(["--quick", "--out", out, "--epochs", "1", "--seeds", "2", "--n-train", "128",
                         "--n-val", "64", "--n-test", "64", "--batch-size", "64", "--micro-batch", "16",
                         "--hessian-examples", "32", "--hessian-iters", "3", "--tune", "--log-every", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"[eval {len(ALL_CONFIGS) * 2}/{len(ALL_CONFIGS) * 2} done" in printed and "tuned rho" in printed and "epoch 1/1" in printed
    results = check_outputs(out, ALL_CONFIGS, seeds=2, epochs=1, tuned=True)
    # tuning: one run per grid entry at m=16 for the four tuned methods; the chosen rho is
    # the best of its grid; GSAM / OBF+GSAM and the m study (m=64) reuse it
    tuning, chosen = results["tuning"], results["meta"]["hyperparameters"]["chosen_rho"]
    assert all(r["micro_batch"] == 16 for r in tuning)
    assert sorted({r["method"] for r in tuning}) == sorted(compare.RHO_GRIDS)
    for method, grid in compare.RHO_GRIDS.items():
        candidates = [r for r in tuning if r["method"] == method]
        assert sorted(r["rho"] for r in candidates) == sorted(grid)
        best = max(r["val_acc"] for r in candidates)
        assert next(r["val_acc"] for r in candidates if r["rho"] == chosen[f"{method} (m=16)"]) == best
    assert chosen["GSAM (m=16)"] == chosen["SAM (m=16)"] and chosen["OBF+GSAM (m=16)"] == chosen["OBF (m=16)"]
    for method in compare.M_STUDY_METHODS:
        assert chosen[f"{method} (m=64)"] == chosen[f"{method} (m=16)"]
    for run in results["runs"]:
        assert run["rho"] == chosen[run["config"]]
    # SGD has no perturbation: its rho is reported as 0
    assert all(r["rho"] == 0.0 for r in results["runs"] if r["method"] == "SGD")


def test_method_subset_without_m_study(tmp_path):
    out = str(tmp_path / "out")
    compare.main(["--quick", "--out", out, "--epochs", "1", "--seeds", "1", "--n-train", "64", "--n-val", "32",
                  "--n-test", "32", "--batch-size", "32", "--methods", "SAM,OBF", "--no-m-study",
                  "--hessian-examples", "16", "--hessian-iters", "2", "--quiet", "--dataset", "digits"])
    results = check_outputs(out, ["SAM (m=16)", "OBF (m=16)"], seeds=1, epochs=1, tuned=False, m_study=False)
    assert not os.path.exists(os.path.join(out, "tuning.csv"))
    assert not os.path.exists(os.path.join(out, "m_study.png"))
    assert results["meta"]["args"]["dataset"] == "digits"


def test_cost_counts_of_the_efficient_methods(tmp_path):
    """Gradient evaluations per step, counted by the experiment, against each method's schedule:
    5 steps of 64 examples in sub-batches of 16."""
    out = str(tmp_path / "out")
    methods = ["SGD", "SAM", f"Every-{compare.EVERY_K}", "LookSAM", "MSAM", "ESAM", "SAM-ON"]
    compare.main(["--quick", "--out", out, "--epochs", "1", "--seeds", "1", "--n-train", "320", "--n-val", "32",
                  "--n-test", "32", "--batch-size", "64", "--methods", ",".join(methods), "--no-m-study",
                  "--hessian-examples", "16", "--hessian-iters", "2", "--quiet"])
    results = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
    cost = {r["method"]: (r["grad_evals_per_step"], r["forward_evals_per_step"]) for r in results["runs"]}
    gamma_share = math.floor(compare.ESAM_GAMMA * 16) / 16
    assert cost == {
        "SGD": (1.0, 0.0), "SAM": (2.0, 0.0), "SAM-ON": (2.0, 0.0), "MSAM": (1.0, 0.0),
        f"Every-{compare.EVERY_K}": ((2 + 1 + 1 + 1 + 2) / 5, 0.0),  # SAM at steps 0 and 4
        "LookSAM": ((2 + 1 + 1 + 1 + 1) / 5, 0.0),  # refresh at step 0 (k = 5)
        "ESAM": (1.0 + gamma_share, 1.0),  # descent on gamma of each sub-batch, selection forward on all
    }


def test_rho_grid_override(tmp_path):
    out = str(tmp_path / "out")
    compare.main(["--quick", "--out", out, "--epochs", "1", "--seeds", "1", "--n-train", "64", "--n-val", "32",
                  "--n-test", "32", "--batch-size", "32", "--methods", "GSAM", "--no-m-study", "--tune",
                  "--rho-grid", "SAM=0.01,0.03", "--hessian-examples", "16", "--hessian-iters", "2", "--quiet"])
    results = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
    # GSAM is tuned on SAM's grid, here replaced
    assert sorted((r["method"], r["rho"]) for r in results["tuning"]) == [("SAM", 0.01), ("SAM", 0.03)]
    assert results["runs"][0]["rho"] in (0.01, 0.03)
    assert results["meta"]["hyperparameters"]["rho_grids"]["SAM"] == [0.01, 0.03]


@pytest.mark.parametrize("entry", ["GSAM=0.1", "SAM=", "SAM=0.1,-1", "SAM=x"])
def test_bad_rho_grid_is_refused(tmp_path, entry):
    with pytest.raises(SystemExit):
        compare.parse_args(["--quick", "--out", str(tmp_path), "--rho-grid", entry])


def test_unknown_method_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--quick", "--out", str(tmp_path), "--methods", "SAM,Adam"])
    assert "unknown methods ['Adam']" in capsys.readouterr().err


def test_corrupt_labels_flips_exactly_the_fraction_to_other_classes():
    rng = np.random.default_rng(0)
    y = np.arange(1000) % 10
    noisy = corrupt_labels(y, 0.3, 10, rng)
    assert (noisy != y).sum() == 300  # every chosen label changes class
    assert set(np.unique(noisy)) == set(range(10))
    counts = np.bincount(noisy[noisy != y], minlength=10)
    assert counts.min() > 10  # spread over the classes, not one target


def test_load_splits_and_keeps_test_clean():
    data = load("mnist1d", 100, 40, 60, label_noise=0.25, seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (100, 40, 60)
    assert tuple(data.train.x.shape) == (100, 1, 40) and data.num_classes == 10
    assert int(data.train.flipped.sum()) == 25 and int(data.val.flipped.sum()) == 10
    assert int(data.test.flipped.sum()) == 0
    again = load("mnist1d", 100, 40, 60, label_noise=0.25, seed=3)
    assert (again.train.x == data.train.x).all() and (again.train.y == data.train.y).all()


@pytest.mark.slow
def test_quick_smoke_run(tmp_path):
    """The CI smoke test of the documented command (about a minute on 2 CPU cores)."""
    out = str(tmp_path / "quick")
    assert compare.main(["--quick", "--out", out]) == 0
    configs = [f"{m} (m=16)" for m in compare.METHODS] + [f"{m} (m=128)" for m in compare.M_STUDY_METHODS]
    check_outputs(out, configs, seeds=compare.QUICK["seeds"], epochs=compare.QUICK["epochs"], tuned=False)
