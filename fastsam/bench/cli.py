"""fastsam-bench / python -m fastsam.bench: throughput of fastsam's ops on real model shapes.

The main job of the project. It discovers the backends through fastsam.ops (whatever is
registered and can run on the device), times each op and each SAM sub-step on parameter
shapes generated in code, and reports time, achieved bandwidth, % of a copy bandwidth
measured in the same run, and speed-ups over the reference and foreach backends.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional

import torch

from fastsam import ops
from fastsam.bench import e2e as e2e_mod
from fastsam.bench import engine, report
from fastsam.bench import full_step as full_step_mod
from fastsam.bench import host as host_mod
from fastsam.bench import peers as peers_mod
from fastsam.bench import plot as plot_mod
from fastsam.bench import results as results_mod
from fastsam.bench import variants as variants_mod
from fastsam.bench.env import environment, load_average
from fastsam.bench.workloads import WORKLOADS, parse_workloads

PROG = "fastsam-bench"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# On the CPU the reference backend (a per-tensor loop written for clarity) needs seconds
# per op on 100M parameters; by default it is timed only on workloads up to this size there.
CPU_REFERENCE_MAX_PARAMS = 30_000_000

DESCRIPTION = """\
Throughput of fastsam's SAM bookkeeping, per backend, on the parameter shapes of real models.

What is measured (ops mode, the default): for each workload and each backend, the six ops
of a SAM sub-step (sumsq, perturb_, restore_, gsam_reduce, gsam_combine_, accumulate_), a
SAM sub-step (sumsq + perturb_ + restore_), a GSAM sub-step (+ the ascent copy,
gsam_reduce, gsam_combine_), and the efficient variants' ops and cheap steps
(fastsam.bench.variants), each against its own byte floor; --full-step adds whole SAM steps
with the base step, restore_ + torch's step against fastsam's fused step. Each is warmed up, then timed call by call
(CUDA events on a GPU, with the L2 cache flushed before each call; perf_counter on the CPU);
the table shows the median and the spread (p80 - p20) / median. Bandwidth counts only the
bytes that must move (a SAM sub-step: 28N bytes for N fp32 parameters) and is shown as a %
of a large device-to-device copy measured in the same run. Speed-ups are over the
'reference' and 'foreach' backends (and, with --peers, the best peer).

Host time (items optimizer_substep and kernels_substep): one SAM sub-step through
fastsam.SAM (first_step + second_step with a no-op base optimizer, on nn.Parameters with
.grad set) against the same sub-step's kernels called directly (fastsam._C for cpp/cuda),
timed interleaved; the ratio, host time (CPU: optimizer - kernels; GPU: time to queue one
sub-step) as a % of the sub-step, and the goals of issue 13 next to them.

--peers: also time three peer baselines on the SAM and GSAM sub-steps, on the same
tensors: the per-tensor loop of the widely used single-file SAM wrapper, the foreach code
of the Forget-Sharpness paper, and a best-effort foreach sub-step (fewest passes, no
allocations); see fastsam/bench/peers.py. On a memory-bound CPU a fused backend can beat
the best of them by at most ~32N/28N bytes on the large workloads.

End-to-end mode (--e2e): training steps per second of a small ResNet and a small ViT
(built in code, random CIFAR-shaped data) with the base optimizer alone and with
fastsam.SAM on each backend, perturbation sub-batches of 64 and of the whole batch, and the
share of step time spent outside forward/backward.

Defaults: CUDA if available, else CPU; every available backend (on the CPU, triton's
interpreter mode is left out unless named); workloads resnet50, vit_b16, gpt2, tiny; fp32;
every item. On the CPU the reference backend is timed only on workloads up to 30M
parameters unless --full is given. A default CPU run takes minutes: measured on a shared
2-core machine under load 5-8, about 5 min for the ops and 5 for --e2e with two threads, 2
and 1 with --threads 1 (on a busy CPU, two threads waiting on each other are slow and
erratic); the host items and --peers add to that. The big workloads allocate 1-3 GB each.
--quick, --workloads and --items shorten a run.
"""

EPILOG = """\
examples:
  python -m fastsam.bench                                  # everything available, best device
  python -m fastsam.bench --device cpu --workloads resnet50,tiny --json r.json --csv r.csv --plot r.png
  python -m fastsam.bench --quick --workloads mini         # smoke run, seconds
  python -m fastsam.bench --peers --items sam_substep,gsam_substep   # fastsam against the peers
  python -m fastsam.bench --items optimizer_substep,kernels_substep --workloads resnet50,tiny   # host time
  python -m fastsam.bench --e2e --json e2e.json --plot e2e.png
  python -m fastsam.bench.report r.json                    # print a saved run again
  python -m fastsam.bench.plot r.json r.png                # plot a saved run again
--csv appends rows to an existing file with the same columns (like Liger-Kernel's benchmark CSVs).
"""


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# The items of the ops mode: the SAM family's (fastsam.bench.engine) and the efficient
# variants' (fastsam.bench.variants), each with its own byte floor.
ALL_ITEMS = {**engine.ITEMS, **variants_mod.ITEMS}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--backends", help="comma-separated backend names (default: every available one)")
    p.add_argument("--workloads", help=f"comma-separated, from {', '.join(WORKLOADS)}; 'all' = the defaults")
    p.add_argument("--items", help=f"comma-separated, from {', '.join(ALL_ITEMS)} (default: all)")
    p.add_argument("--peers", action="store_true",
                   help="also time the peer baselines (other implementations' SAM/GSAM sub-steps) on the same tensors")
    p.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads; default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="few repetitions, for smoke runs (numbers are rough)")
    p.add_argument("--full", action="store_true",
                   help="on the CPU, time the reference backend on every workload (slow: minutes for gpt2)")
    p.add_argument("--full-step", action="store_true",
                   help="also time whole SAM steps with their base step, unfused against fused "
                        f"(SGD momentum, AdamW; on {', '.join(full_step_mod.DEFAULT_WORKLOADS)} unless --workloads "
                        "names others)")
    p.add_argument("--e2e", action="store_true", help="end-to-end training steps instead of the ops")
    p.add_argument("--models", help=f"--e2e models, comma-separated from {', '.join(e2e_mod.MODELS)} (default: all)")
    p.add_argument("--json", metavar="FILE", help="write the results (with machine, versions, date) as JSON")
    p.add_argument("--csv", metavar="FILE", help="append one row per measurement (with machine, versions, date)")
    p.add_argument("--plot", metavar="FILE", help="draw a PNG (needs matplotlib: pip install 'fastsam[plot]')")
    p.add_argument("--list", action="store_true", help="list workloads, items and backends, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


# -- validating the command line ---------------------------------------------------------------

def resolve_device(spec: Optional[str]) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {spec!r}; choose cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {spec!r}; choose cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec!r} requested but CUDA is not available here "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _split(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def _choose(spec: str, known, what: str) -> list[str]:
    """The names of comma-separated ``spec``, each one of ``known``; a usage error names the bad ones."""
    names = _split(spec)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown)) or repr(spec)}; "
                         f"choose from {', '.join(known)}")
    return names


def _available(device: torch.device, notes: list) -> list[str]:
    """ops.available_backends(device); if a registered backend fails to even load, the others
    are still found (and the failure noted), so one broken module cannot stop a whole run."""
    try:
        return ops.available_backends(device)
    except Exception:
        pass
    names = []
    for name in ops.backend_names():
        try:
            ops.get_backend(name, device)
            names.append(name)
        except ops.BackendUnavailableError:
            continue
        except Exception as exc:
            notes.append(f"{name} left out: it failed to load ({type(exc).__name__}: {exc})".splitlines()[0])
    return names


def select_backends(spec: Optional[str], device: torch.device, dtype: torch.dtype) -> tuple[dict, list[str]]:
    """{name: Backend} to time, and notes on the backends left out by default."""
    notes = []
    if spec is None:
        names = _available(device, notes)
        if device.type == "cpu" and "triton" in names:
            names.remove("triton")
            notes.append("triton left out: on the CPU it runs only in the interpreter (TRITON_INTERPRET=1), "
                         "which is for tests, not timing; name it in --backends to time it anyway")
    else:
        names = _split(spec)
        if not names:
            raise UsageError("--backends is empty")
        unknown = [n for n in names if n not in ops.backend_names()]
        if unknown:
            raise UsageError(f"unknown backend {', '.join(map(repr, unknown))}; registered backends: "
                             f"{', '.join(ops.backend_names())}")
    chosen = {}
    for name in dict.fromkeys(names):
        try:
            backend = ops.get_backend(name, device)
        except ops.BackendUnavailableError as exc:
            raise UsageError(str(exc)) from None
        except Exception as exc:  # the backend's module itself is broken
            raise UsageError(f"backend {name!r} failed to load: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        supported = getattr(backend, "dtypes", None)
        if supported is not None and dtype not in supported:
            if spec is not None:
                raise UsageError(f"backend {name!r} does not support {dtype} tensors")
            notes.append(f"{name} left out: it does not support {dtype} tensors")
            continue
        chosen[name] = backend
    if not chosen:
        raise UsageError(f"no backend to time on {device} for {dtype}")
    # reference and foreach first: they are what the others are compared with.
    order = sorted(chosen, key=lambda n: (n not in ("reference", "foreach"), n != "reference"))
    return {n: chosen[n] for n in order}, notes


def _check_output(path: Optional[str], option: str) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: folder {parent} does not exist")


# -- progress ---------------------------------------------------------------------------------

class Progress:
    """'[k/n] message (elapsed)' lines on stderr, so a long run shows it is alive."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.done, self.started = total, quiet, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.done += 1
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"[{self.done:3d}/{self.total}] {message}  ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


# -- the two modes ----------------------------------------------------------------------------

def run_ops(args, device: torch.device, dtype: torch.dtype, backends: dict, notes: list) -> dict:
    try:
        workloads = parse_workloads(args.workloads)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    items = _choose(args.items, ALL_ITEMS, "item") if args.items else list(ALL_ITEMS)
    core_items = [i for i in items if i in engine.ITEMS]
    variant_items = [i for i in items if i in variants_mod.ITEMS]
    peer_names = list(peers_mod.PEERS) if args.peers else []
    if args.peers:
        if not set(items) & set(peers_mod.ITEMS):
            raise UsageError(f"--peers needs the item {' or '.join(peers_mod.ITEMS)} (peers are timed on those only)")
        if "gsam_substep" in items:
            notes += [f"{name} has no GSAM sub-step (its original has none)"
                      for name in peer_names if name not in peers_mod.peers_for("gsam_substep")]
    plan = []
    for w in workloads:
        names = list(backends)
        if (device.type == "cpu" and not args.full and "reference" in names
                and WORKLOADS[w].numel > CPU_REFERENCE_MAX_PARAMS):
            names.remove("reference")
            notes.append(f"reference not timed on {w} ({WORKLOADS[w].numel / 1e6:.0f}M parameters) on the CPU; "
                         "--full times it (slow)")
        plan.append((w, {n: backends[n] for n in names}))
    env = environment(device)
    timer = engine.Timer(device, quick=args.quick)
    peer_rows = sum(len(peers_mod.peers_for(i)) for i in items) if args.peers else 0
    progress = Progress(sum(len(b) for _, b in plan) * len(items) + len(plan) * peer_rows, args.quiet)
    progress.note(f"{PROG}: {env['device_name']}, {args.dtype}, backends {', '.join(backends)}, "
                  f"workloads {', '.join(workloads)}; measuring copy bandwidth")
    copy = timer.copy_bandwidth()
    progress.note(f"copy bandwidth: {copy['GBps']:.1f} GB/s")
    # --full-step: the large models' shapes unless workloads were named
    full_step_workloads = ([] if not args.full_step else workloads if args.workloads
                           else [w for w in workloads if w in full_step_mod.DEFAULT_WORKLOADS])
    full_step_backends = [n for n in backends if n != "reference"]
    # one progress line per variant and one per fused/unfused pair, for each optimizer
    progress.total += (len(full_step_workloads) * len(full_step_backends) * len(full_step_mod.OPTIMIZERS)
                       * (len(full_step_mod.VARIANTS) + len(full_step_mod.PAIRS)))
    rows: list = []
    try:
        for w, wb in plan:
            for row in engine.iter_workload(timer, WORKLOADS[w], wb, core_items, dtype, copy["GBps"], progress,
                                            with_peers=args.peers):
                rows.append(row)
            for row in variants_mod.run_workload(timer, WORKLOADS[w], wb, variant_items, dtype, copy["GBps"],
                                                 progress):
                rows.append({**dict.fromkeys(engine.ROW_KEYS), "kind": "backend", **row})
        for name in full_step_backends:
            if not full_step_workloads:
                break
            measured = full_step_mod.run(device, full_step_workloads, name, dtype, quick=args.quick,
                                         progress=progress)
            rows += [{**row, "kind": "full_step", "copy_GBps": measured["copy"]["GBps"]}
                     for row in measured["results"]]
    except KeyboardInterrupt:  # e.g. a time limit's SIGINT: keep and report what was measured
        notes.append(f"INTERRUPTED after {len(rows)} of {progress.total} measurements: results are partial")
    engine.finish_rows([r for r in rows if r.get("kind") != "full_step"], device.type)
    env["load_average_end"] = load_average()
    return {"fastsam_bench": 1, "kind": "ops", "environment": env,
            "settings": {"dtype": args.dtype, "quick": args.quick, "full": args.full, "workloads": workloads,
                         "items": items, "backends": list(backends), "peers": peer_names,
                         "host_goals": [dataclasses.asdict(g) for g in host_mod.GOALS if g.device_type == device.type],
                         "timer": dataclasses.asdict(timer.settings)},
            "copy_bandwidth": copy, "results": rows, "notes": notes}


def run_e2e(args, device: torch.device, dtype: torch.dtype, backends: dict, notes: list) -> dict:
    models = _choose(args.models, e2e_mod.MODELS, "model") if args.models else list(e2e_mod.MODELS)
    settings = e2e_mod.E2ESettings.for_device(device, args.quick)
    micro = len({min(e2e_mod.MICRO_BATCH, settings.batch), settings.batch})
    env = environment(device)
    progress = Progress(len(models) * (1 + micro * len(backends)), args.quiet)
    progress.note(f"{PROG} --e2e: {env['device_name']}, {args.dtype}, batch {settings.batch} of "
                  f"{settings.image} px images, backends {', '.join(backends)}")
    rows: list = []
    methods = list(variants_mod.E2E_METHODS)
    progress.total += len(models) * len(methods)
    try:
        for m in models:
            rows += e2e_mod.run_model(e2e_mod.MODELS[m], list(backends), device, dtype, settings, progress)
        for m in models:  # the cheap SAM variants against the base optimizer alone (auto backend)
            if methods:
                rows += [{**row, "kind": "method"} for row in variants_mod.run_e2e(
                    e2e_mod.MODELS[m], device, dtype, settings, methods=methods, progress=progress)]
    except KeyboardInterrupt:  # keep the models already measured
        notes.append(f"INTERRUPTED: {len(rows)} of {progress.total} configurations measured; results are partial")
    env["load_average_end"] = load_average()
    return {"fastsam_bench": 1, "kind": "e2e", "environment": env,
            "settings": {"dtype": args.dtype, "quick": args.quick, "models": models, "backends": list(backends),
                         **dataclasses.asdict(settings)},
            "results": rows, "notes": notes}


def list_everything() -> str:
    lines = ["workloads:"]
    lines += [f"  {w.name:9s} {w.description}{'' if w.default else '  (not in the default set)'}"
              for w in WORKLOADS.values()]
    lines += ["items:"] + [f"  {i.name:17s} {i.description} ({i.units} x N x element size bytes)"
                           for i in engine.ITEMS.values()]
    lines += ["efficient variants' items (fastsam.bench.variants; floors per item):"]
    lines += [f"  {i.name:17s} {i.description}" for i in variants_mod.ITEMS.values()]
    lines += ["--full-step items: " + ", ".join(full_step_mod.item_name(o, v) for o in full_step_mod.OPTIMIZERS
                                                for v in full_step_mod.VARIANTS)]
    lines += ["peers (--peers; items " + ", ".join(peers_mod.ITEMS) + "):"]
    lines += [f"  {name:17s} {cls.description}{'' if cls.has_gsam else ' (no GSAM)'}"
              for name, cls in peers_mod.PEERS.items()]
    lines += ["e2e models: " + ", ".join(e2e_mod.MODELS), "backends:"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in ops.backend_names():
        where = []
        for d in devices:
            try:
                ops.get_backend(name, d)
                where.append(f"{d}: available")
            except ops.BackendUnavailableError as exc:
                where.append(f"{d}: unavailable ({exc})")
            except Exception as exc:  # a backend that fails to load is reported, not fatal here
                where.append(f"{d}: fails to load ({type(exc).__name__}: {exc})")
        lines.append(f"  {name:10s} " + "; ".join(where))
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark; 0 on success, 1 if a measurement failed (still reported), 2 on bad usage."""
    try:
        args = build_parser().parse_args(argv)
        if args.list:
            print(list_everything())
            return 0
        device = resolve_device(args.device)
        if args.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {args.dtype!r}; choose {' or '.join(DTYPES)}")
        dtype = DTYPES[args.dtype]
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1; got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.e2e and (args.workloads or args.items or args.full or args.peers or args.full_step):
            raise UsageError("--workloads, --items, --full, --peers and --full-step belong to the ops mode, "
                             "not --e2e (use --models)")
        if args.models and not args.e2e:
            raise UsageError("--models belongs to --e2e")
        for path, option in ((args.json, "--json"), (args.csv, "--csv"), (args.plot, "--plot")):
            _check_output(path, option)
        if args.plot:
            plot_mod.require_matplotlib()  # fail now, not after a long run
        backends, notes = select_backends(args.backends, device, dtype)
        result = (run_e2e if args.e2e else run_ops)(args, device, dtype, backends, notes)
        result["environment"]["command"] = " ".join([PROG] + list(sys.argv[1:] if argv is None else argv))
        # Files first: a reader that closes the pipe early (| head) must not lose them.
        if args.json:
            results_mod.write_json(args.json, result)
        if args.csv:
            results_mod.write_csv(args.csv, result)
        if args.plot and result["results"]:
            plot_mod.plot(result, args.plot)
        try:
            print(report.format_result(result), flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    except (UsageError, plot_mod.PlotUnavailableError, results_mod.ResultsFileError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in result["results"] if r.get("error")]
    if failed:
        print(f"{PROG}: {len(failed)} measurement(s) failed (see FAILED above)", file=sys.stderr)
    interrupted = any(n.startswith("INTERRUPTED") for n in result["notes"])
    if interrupted:
        print(f"{PROG}: interrupted; the results written are partial", file=sys.stderr)
    return 1 if failed or interrupted else 0
