"""Compare SGD, the SAM family and SAM's efficient variants on small offline data, with sharpness and cost.

Every method trains the same small BatchNorm CNN through ``fastsam.train_step`` with SGD
(momentum, weight decay, cosine lr) as the base optimizer and perturbation sub-batches of
``m`` examples; the baseline accumulates gradients over the same sub-batches, so BatchNorm
sees the same batch sizes. Optionally rho is tuned per method on a (label-noisy) validation
split first. After training: clean test accuracy, training loss, the top Hessian eigenvalue
(power iteration on a fixed set of training examples) and m-sharpness. A second study
varies m (whole batch vs small sub-batches). Every run also counts its cost: gradient
evaluations (examples through a forward/backward, per step, in units of the batch) and
forward-only evaluations, and the CPU time per step. Writes tables and plots into ``--out``.

    python -m fastsam.experiments.compare --quick --out /tmp/fastsam-quick
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

import fastsam
from fastsam.experiments import data as data_mod
from fastsam.sharpness import hessian_top_eigenvalue, m_sharpness

# -- methods ------------------------------------------------------------------------------

GSAM_ALPHA = 0.01  # docs/ALGORITHMS.md §3: the ResNet reference (our model is a small BN convnet)
GSAM_RHO_MIN_FRACTION = 0.5  # GSAM's rho falls with the lr from rho_max to rho_max / 2
ASAM_ETA = 0.01  # the ASAM authors' default
OBF_C, OBF_GAMMA = 1000.0, 1e-12  # docs/ALGORITHMS.md §4: reference for convnets trained from scratch

# The efficient variants (docs/ALGORITHMS.md §9), at the settings their papers recommend, sized
# to cost about 1.2-1.5x SGD's gradient evaluations where the method has a knob for it.
EVERY_K = 4  # a SAM step every 4th step: 1.25 gradient evaluations per step
RST_P = 0.25  # RST / SS-SAM: Bernoulli(0.25) per step: 1.25 on average
LOOKSAM_K, LOOKSAM_ALPHA = 5, 0.7  # LookSAM's defaults: 1.2
# alpha rescales the stored orthogonal component to alpha ||g||; measured here, ||g_v|| / ||g_s||
# at refresh steps is about 0.15 (0.29 at the first refresh), so 0.7 overstates it ~5x: also run
# 0.2, the value Momentum-SAM's authors used for their LookSAM baseline
LOOKSAM_SMALL_ALPHA = 0.2
FSAM_SIGMA, FSAM_LAMBDA = 1.0, 0.9  # Friendly SAM's defaults
ESAM_BETA, ESAM_GAMMA = 0.6, 0.5  # ESAM's CIFAR settings; ESAM-SWP: the weight perturbation alone (gamma = 1)
EFFICIENT_METHODS = (f"Every-{EVERY_K}", f"RST-{RST_P:g}", "AE-SAM", "LookSAM", f"LookSAM-a{LOOKSAM_SMALL_ALPHA:g}",
                     "MSAM", "F-SAM", "ESAM", "ESAM-SWP", "SAM-ON", "SAM-ON-ASAM")
METHODS = ("SGD", "SAM", "ASAM", "GSAM", "OBF", "OBF+GSAM", "RandSAM") + EFFICIENT_METHODS
# method -> rho candidates for tuning (the first is the default without tuning, e.g. in
# --quick). ASAM's rho lives on the scale of |w|-weighted steps (docs/ALGORITHMS.md §2: ~10x SAM's);
# RandSAM's noise direction needs a larger radius to change the loss at all.
RHO_GRIDS = {
    "SAM": (0.05, 0.1, 0.2),
    "ASAM": (0.5, 1.0, 2.0),
    "OBF": (0.05, 0.1, 0.2),
    "RandSAM": (0.5, 1.0, 2.0),
    # Momentum-SAM's radius lives on another scale (its papers' runs: rho = 3 against SAM's 0.2),
    # and SAM-ON perturbs only the normalisation layers (its paper: larger rho than SAM's)
    "MSAM": (1.0, 0.3, 3.0),
    "SAM-ON": (0.5, 0.1, 2.0),
    # SAM-ON's recommended form: elementwise ASAM on the normalisation layers, with a large rho
    "SAM-ON-ASAM": (3.0, 1.0, 10.0),
}
# GSAM takes SAM's rho as its rho_max and OBF+GSAM takes OBF's (as the GSAM paper builds on
# SAM's radius); the efficient variants of SAM's own direction take SAM's: this keeps the
# tuning budget at seven grids.
RHO_FROM = {"GSAM": "SAM", "OBF+GSAM": "OBF",
            **{m: "SAM" for m in EFFICIENT_METHODS if m not in ("MSAM", "SAM-ON", "SAM-ON-ASAM")}}


def rho_source(method: str) -> Optional[str]:
    """The method whose rho grid (and tuned rho) ``method`` uses; None for SGD."""
    source = RHO_FROM.get(method, method)
    return source if source in RHO_GRIDS else None


M_STUDY_METHODS = ("SGD", "SAM", "OBF")  # rerun with m = the whole batch


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: a method with its perturbation sub-batch size, radius and seed."""

    method: str
    micro_batch: int
    rho: float
    seed: int
    purpose: str  # "tune" or "eval"

    @property
    def config(self) -> str:
        return config_name(self.method, self.micro_batch)


def config_name(method: str, micro_batch: int) -> str:
    return f"{method} (m={micro_batch})"


def build_optimizer(method: str, params, rho: float, hp: dict, seed: int, model=None, total_steps: int = 1):
    """(optimizer, ascent_loss) for ``method``; SGD is the plain torch optimizer.

    ``model`` (for SAM-ON's param groups) and ``total_steps`` (AE-SAM's threshold schedule)
    are needed by those methods only.
    """
    base = dict(lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    if method == "SGD":
        return torch.optim.SGD(params, **base), None
    base["backend"] = hp.get("backend", "auto")
    if method in EFFICIENT_METHODS:
        return build_efficient(method, params, rho, base, seed, model, total_steps), None
    obf = method.startswith("OBF")
    options = {}
    if method == "ASAM":
        options = dict(adaptive=True, eta=ASAM_ETA)
    elif method == "GSAM":
        options = dict(gsam_alpha=GSAM_ALPHA, rho_schedule="lr", rho_min=GSAM_RHO_MIN_FRACTION * rho)
    elif method == "OBF+GSAM":
        options = dict(gsam_alpha=GSAM_ALPHA)  # OBF keeps a constant rho (docs/ALGORITHMS.md §4)
    elif method == "RandSAM":
        options = dict(randsam=True, generator=torch.Generator().manual_seed(10_000 + seed))
    elif method not in ("SAM", "OBF"):
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    optimizer = fastsam.SAM(params, torch.optim.SGD, rho=rho, **options, **base)
    ascent = fastsam.OutputBiasForgetting(C=OBF_C, gamma=OBF_GAMMA) if obf else None
    return optimizer, ascent


def build_efficient(method: str, params, rho: float, base: dict, seed: int, model, total_steps: int):
    sgd = torch.optim.SGD
    if method == f"Every-{EVERY_K}":
        return fastsam.SAM(params, sgd, rho=rho, schedule=fastsam.schedules.Every(EVERY_K), **base)
    if method == f"RST-{RST_P:g}":
        schedule = fastsam.schedules.Random(RST_P, generator=torch.Generator().manual_seed(20_000 + seed))
        return fastsam.SAM(params, sgd, rho=rho, schedule=schedule, **base)
    if method == "AE-SAM":
        return fastsam.SAM(params, sgd, rho=rho, schedule=fastsam.schedules.Adaptive(total_steps), **base)
    if method == "LookSAM":
        return fastsam.LookSAM(params, sgd, rho=rho, k=LOOKSAM_K, alpha=LOOKSAM_ALPHA, **base)
    if method == f"LookSAM-a{LOOKSAM_SMALL_ALPHA:g}":
        return fastsam.LookSAM(params, sgd, rho=rho, k=LOOKSAM_K, alpha=LOOKSAM_SMALL_ALPHA, **base)
    if method == "MSAM":
        return fastsam.MomentumSAM(params, sgd, rho=rho, **base)
    if method == "F-SAM":
        return fastsam.FriendlySAM(params, sgd, rho=rho, sigma=FSAM_SIGMA, lmbda=FSAM_LAMBDA, **base)
    if method in ("ESAM", "ESAM-SWP"):
        return fastsam.ESAM(params, sgd, rho=rho, beta=ESAM_BETA, gamma=ESAM_GAMMA if method == "ESAM" else 1.0,
                            generator=torch.Generator().manual_seed(30_000 + seed), **base)
    if method == "SAM-ON":
        return fastsam.SAM(fastsam.normalization_params(model), sgd, rho=rho, **base)
    if method == "SAM-ON-ASAM":
        return fastsam.SAM(fastsam.normalization_params(model), sgd, rho=rho, adaptive=True, eta=ASAM_ETA, **base)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


class CostCounter:
    """Examples that went through the model with gradients (forward + backward) and without (forward only)."""

    def __init__(self, model):
        self.grad_examples = self.forward_examples = 0
        self.counting = False
        model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.counting:
            n = int(inputs[0].shape[0])
            if torch.is_grad_enabled():
                self.grad_examples += n
            else:
                self.forward_examples += n


# -- one run ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, split: data_mod.Split, batch: int = 1000) -> dict:
    """Loss on the training labels, accuracy on them and on the clean labels, memorised noise."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(split.x[i:i + batch]) for i in range(0, len(split), batch)])
    model.train(was_training)
    pred = logits.argmax(1)
    flipped = split.flipped
    return {
        "loss": float(F.cross_entropy(logits, split.y)),
        "acc": float((pred == split.y).float().mean()),
        "clean_acc": float((pred == split.y_clean).float().mean()),
        # share of the corrupted examples predicted as their corrupted label
        "memorised": float((pred[flipped] == split.y[flipped]).float().mean()) if flipped.any() else float("nan"),
    }


def train_one(spec: RunSpec, dataset: data_mod.Dataset, hp: dict, log_prefix: str = "") -> dict:
    torch.set_num_threads(hp["threads"])
    torch.manual_seed(spec.seed)
    model = data_mod.make_model(dataset, hp["width"])
    train = dataset.train
    n, batch = len(train), hp["batch_size"]
    steps_per_epoch = n // batch  # drop the last partial batch: every step sees B examples
    total_steps = hp["epochs"] * steps_per_epoch
    optimizer, ascent = build_optimizer(spec.method, model.parameters(), spec.rho, hp, spec.seed, model, total_steps)
    cost = CostCounter(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    order = torch.Generator().manual_seed(spec.seed)
    selection = dataset.val if spec.purpose == "tune" else dataset.test
    curve, wall, cpu = [], 0.0, 0.0
    for epoch in range(1, hp["epochs"] + 1):
        model.train()
        perm = torch.randperm(n, generator=order)
        t0, c0 = time.perf_counter(), time.process_time()
        cost.counting = True
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            fastsam.train_step(model, optimizer, train.x[idx], train.y[idx], F.cross_entropy,
                               ascent_loss=ascent, micro_batch=spec.micro_batch)
            schedule.step()
        cost.counting = False
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        stats = evaluate(model, selection)
        curve.append(stats["clean_acc"] if spec.purpose == "eval" else stats["acc"])
        if hp["verbose"] and (epoch % hp["log_every"] == 0 or epoch == hp["epochs"]):
            what = "test" if spec.purpose == "eval" else "val"
            print(f"{log_prefix}{spec.config} rho={spec.rho:g} seed={spec.seed} epoch {epoch}/{hp['epochs']}: "
                  f"{what} acc {100 * curve[-1]:.1f}%", flush=True)
    result = {**dataclasses.asdict(spec), "config": spec.config, "curve": curve,
              "wall_ms_per_step": 1000 * wall / total_steps, "cpu_ms_per_step": 1000 * cpu / total_steps,
              "grad_evals_per_step": cost.grad_examples / (total_steps * batch),
              "forward_evals_per_step": cost.forward_examples / (total_steps * batch)}
    if spec.purpose == "tune":
        result["val_acc"] = curve[-1]
        return result

    train_stats, test_stats = evaluate(model, train), evaluate(model, dataset.test)
    # sharpness on a fixed set of training examples (the first ones, with their training labels)
    k = min(hp["hessian_examples"], n)
    x_fixed, y_fixed = train.x[:k], train.y[:k]
    eig = hessian_top_eigenvalue(model, F.cross_entropy, x_fixed, y_fixed, iters=hp["hessian_iters"],
                                 tol=hp["hessian_tol"])
    msharp = m_sharpness(model, F.cross_entropy, x_fixed, y_fixed, rho=hp["msharp_rho"], m=hp["msharp_m"])
    result.update(test_acc=test_stats["clean_acc"], train_loss=train_stats["loss"], train_acc=train_stats["acc"],
                  train_memorised=train_stats["memorised"], hessian_max_eig=eig.eigenvalue,
                  hessian_iters=eig.iterations, hessian_converged=eig.converged, m_sharpness=msharp)
    return result


def _worker(args):
    spec, dataset, hp, prefix = args
    return train_one(spec, dataset, hp, prefix)


def run_all(specs: list[RunSpec], dataset, hp: dict, jobs: int, label: str) -> list[dict]:
    """Run specs (in parallel processes when jobs > 1), printing progress; results in spec order."""
    results: list[Optional[dict]] = [None] * len(specs)
    start = time.perf_counter()
    tasks = [(spec, dataset, hp, f"[{label} {i + 1}/{len(specs)}] ") for i, spec in enumerate(specs)]

    def report(i, result):
        results[i] = result
        done = sum(r is not None for r in results)
        score = result.get("test_acc", result.get("val_acc"))
        what = "test" if "test_acc" in result else "val"
        extra = (f", lambda_max {result['hessian_max_eig']:.3g}" if "hessian_max_eig" in result else "")
        print(f"[{label} {done}/{len(specs)} done, {time.perf_counter() - start:.0f}s] {specs[i].config} "
              f"rho={specs[i].rho:g} seed={specs[i].seed}: {what} acc {100 * score:.2f}%{extra}, "
              f"{result['wall_ms_per_step']:.1f} ms/step", flush=True)

    if jobs <= 1:
        for i, task in enumerate(tasks):
            report(i, _worker(task))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {pool.submit(_worker, task): i for i, task in enumerate(tasks)}
            for future in concurrent.futures.as_completed(futures):
                report(futures[future], future.result())
    return results


# -- the study ----------------------------------------------------------------------------

QUICK = dict(n_train=768, n_val=256, n_test=512, epochs=3, seeds=2, hessian_examples=256,
             hessian_iters=20, tune=False)
# The full study: 44 minutes of wall time with --jobs 2 on 2 shared, loaded cores
# (docs/EXPERIMENTS.md: 36 (SGD) to 83 (OBF+GSAM) ms of CPU time per step at m=16).
FULL = dict(n_train=4000, n_val=1000, n_test=2000, epochs=20, seeds=3, hessian_examples=512,
            hessian_iters=100, tune=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastsam.experiments.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size (about a minute on 2 cores): {QUICK}")
    parser.add_argument("--out", default="experiment-results", help="output folder")
    parser.add_argument("--dataset", choices=("mnist1d", "digits"), default="mnist1d")
    parser.add_argument("--label-noise", type=float, default=0.25,
                        help="fraction of training/validation labels replaced by another class")
    parser.add_argument("--n-train", type=int, help=f"training examples (full {FULL['n_train']})")
    parser.add_argument("--n-val", type=int, help=f"validation examples (full {FULL['n_val']})")
    parser.add_argument("--n-test", type=int, help=f"test examples (full {FULL['n_test']})")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (full {FULL['epochs']})")
    parser.add_argument("--seeds", type=int, help=f"seeds per configuration (full {FULL['seeds']})")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16, help="perturbation sub-batch size m")
    parser.add_argument("--no-m-study", dest="m_study", action="store_false",
                        help=f"skip rerunning {','.join(M_STUDY_METHODS)} with m = the whole batch")
    tune = parser.add_mutually_exclusive_group()
    tune.add_argument("--tune", dest="tune", action="store_true", default=None,
                      help="pick rho per configuration from its grid by validation accuracy (full: on)")
    tune.add_argument("--no-tune", dest="tune", action="store_false", help="use each grid's first rho")
    parser.add_argument("--rho-grid", action="append", default=[], metavar="METHOD=R1,R2,...",
                        help="replace a method's rho grid (repeatable); defaults: "
                             + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in RHO_GRIDS.items()))
    parser.add_argument("--tune-seed", type=int, default=100, help="seed of the tuning runs (not an eval seed)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv layer")
    parser.add_argument("--hessian-examples", type=int, help="fixed training examples for sharpness")
    parser.add_argument("--hessian-iters", type=int, help="power iterations (full 100)")
    parser.add_argument("--hessian-tol", type=float, default=1e-4)
    parser.add_argument("--msharp-m", type=int, default=16, help="m of the reported m-sharpness")
    parser.add_argument("--msharp-rho", type=float, default=0.05, help="rho of the reported m-sharpness")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1 is fastest for this model size: thread "
                             "start-up costs more than it saves on 16-example sub-batches)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    parser.add_argument("--backend", default="auto", help="fastsam backend of the SAM-family optimizers")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data and of the label noise")
    parser.add_argument("--log-every", type=int, default=10, help="epochs between progress lines of a run")
    parser.add_argument("--quiet", action="store_true", help="only one line per finished run")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rho_grids = {k: list(v) for k, v in RHO_GRIDS.items()}
    for entry in args.rho_grid:
        method, _, values = entry.partition("=")
        if method not in RHO_GRIDS:
            parser.error(f"--rho-grid: {method!r} has no grid of its own; choose from {','.join(RHO_GRIDS)}")
        try:
            grid = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            grid = []
        if not grid or any(not (v >= 0 and math.isfinite(v)) for v in grid):
            parser.error(f"--rho-grid {entry!r}: expected METHOD=R1,R2,... with finite rho >= 0")
        args.rho_grids[method] = grid
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be >= 1")
    if args.n_train < args.batch_size:
        parser.error("--n-train must hold at least one batch")
    return args


def configurations(args) -> list[tuple[str, int]]:
    """(method, m) pairs: every method at --micro-batch, plus the m study at the whole batch."""
    configs = [(method, args.micro_batch) for method in args.methods]
    if args.m_study and args.micro_batch != args.batch_size:
        configs += [(method, args.batch_size) for method in M_STUDY_METHODS if method in args.methods]
    return configs


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    hp = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, width=args.width,
              batch_size=args.batch_size, epochs=args.epochs, threads=args.threads,
              hessian_examples=args.hessian_examples, hessian_iters=args.hessian_iters,
              hessian_tol=args.hessian_tol, msharp_m=args.msharp_m, msharp_rho=args.msharp_rho,
              verbose=not args.quiet, log_every=args.log_every, backend=args.backend)
    print(f"fastsam experiments: {args.dataset}, {args.n_train}/{args.n_val}/{args.n_test} examples, "
          f"label noise {args.label_noise:g}, {args.epochs} epochs, {args.seeds} seeds, "
          f"B={args.batch_size}, m={args.micro_batch}, tune={args.tune}, jobs={args.jobs}", flush=True)
    dataset = data_mod.load(args.dataset, args.n_train, args.n_val, args.n_test, args.label_noise, args.data_seed)
    configs = configurations(args)

    tuning: list[dict] = []
    sources = list(dict.fromkeys(rho_source(method) for method in args.methods if rho_source(method)))
    rho = {source: args.rho_grids[source][0] for source in sources}
    if args.tune:  # at the main m only; the m study reuses that rho (same radius, other m)
        # a one-point grid (--rho-grid METHOD=R) fixes rho: nothing to tune there
        specs = [RunSpec(source, args.micro_batch, candidate, args.tune_seed, "tune")
                 for source in sources if len(args.rho_grids[source]) > 1 for candidate in args.rho_grids[source]]
        tuning = run_all(specs, dataset, hp, args.jobs, "tune")
        for source in sources:  # highest validation accuracy; ties go to the smaller rho
            if len(args.rho_grids[source]) == 1:
                continue
            best = max((r for r in tuning if r["method"] == source), key=lambda r: (r["val_acc"], -r["rho"]))
            rho[source] = best["rho"]
        print("tuned rho: " + ", ".join(f"{source} {value:g}" for source, value in rho.items()), flush=True)
    chosen = {(method, m): rho[rho_source(method)] if rho_source(method) else 0.0 for method, m in configs}

    specs = [RunSpec(method, m, chosen[(method, m)], seed, "eval")
             for method, m in configs for seed in range(args.seeds)]
    runs = run_all(specs, dataset, hp, args.jobs, "eval")

    from fastsam.experiments import report
    meta = dict(command="python -m fastsam.experiments.compare " + " ".join(argv if argv is not None else sys.argv[1:]),
                args=vars(args), hyperparameters=dict(
                    base="SGD", lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                    schedule="cosine to 0 per step", gsam_alpha=GSAM_ALPHA,
                    gsam_rho_min_fraction=GSAM_RHO_MIN_FRACTION, asam_eta=ASAM_ETA, obf_C=OBF_C,
                    obf_gamma=OBF_GAMMA, rho_grids=args.rho_grids, rho_from=RHO_FROM,
                    every_k=EVERY_K, rst_p=RST_P, ae_sam="Adaptive(total_steps): delta 0.9, lambda1 -1, lambda2 1",
                    looksam_k=LOOKSAM_K, looksam_alpha=LOOKSAM_ALPHA, looksam_small_alpha=LOOKSAM_SMALL_ALPHA, fsam_sigma=FSAM_SIGMA, fsam_lambda=FSAM_LAMBDA,
                    esam_beta=ESAM_BETA, esam_gamma=ESAM_GAMMA,
                    chosen_rho={config_name(*k): v for k, v in chosen.items()}),
                machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                             cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                             fastsam=fastsam.__version__,
                             sam_backend=fastsam.SAM([torch.zeros(1, requires_grad=True)], torch.optim.SGD, lr=0.1,
                                                     backend=args.backend).backend_for("cpu")),
                total_seconds=None)
    meta["total_seconds"] = time.perf_counter() - started
    paths = report.write(args.out, runs, tuning, configs, meta)
    print(f"done in {meta['total_seconds']:.0f}s; wrote " + ", ".join(sorted(paths)), flush=True)
    print(open(os.path.join(args.out, "results.md"), encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
