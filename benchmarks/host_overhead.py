"""Host time per call of each backend, next to back-to-back wall time (GPU diagnostics).

    python benchmarks/host_overhead.py [--device cuda] [--workloads resnet50,tiny] [--calls 50]

The bench CLI times each call with CUDA events after an L2 flush. When a backend's
Python/C++ work per call (validating lists, building launches) takes longer than its
kernels, that number measures the host, not the GPU. This script shows which it is: for a
SAM and a GSAM sub-step it reports the host time to enqueue one call (``calls`` calls
queued without synchronising, divided by ``calls``) and the wall time per call of the same
calls back to back including the final synchronisation. Where host ~ wall, the backend is
host-bound on that workload; where wall > host, the GPU is the limit. Medians of 5 rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastsam
from fastsam import ops
from fastsam.bench.engine import make_call
from fastsam.bench.workloads import WORKLOADS, TensorSet, parse_workloads


def measure(fn, calls: int, sync) -> tuple[float, float]:
    """(host us per call, wall us per call) for ``calls`` back-to-back calls of ``fn``."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    queued = time.perf_counter()
    sync()
    done = time.perf_counter()
    return (queued - start) / calls * 1e6, (done - start) / calls * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="resnet50,tiny")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--backends", help="comma-separated (default: every available one but reference)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = [n for n in fastsam.available_backends(device) if n != "reference"]
    if args.backends:
        wanted = args.backends.split(",")
        missing = sorted(set(wanted) - set(names))
        if missing:
            parser.error(f"backends not available on {device}: {', '.join(missing)} (available: {', '.join(names)})")
        names = wanted
    print(f"host vs wall time per call, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {args.calls} calls x 5 rounds, medians")
    print(f"{'workload':<10} {'item':<13} {'backend':<8} {'host us':>9} {'wall us':>9}")
    for workload in parse_workloads(args.workloads):
        ts = TensorSet(WORKLOADS[workload], device, torch.float32)
        for item in ("sam_substep", "gsam_substep"):
            for name in names:
                fn = make_call(item, ops.get_backend(name, device, torch.float32), ts)
                measure(fn, 5, sync)  # warm-up (and Triton's first compilation)
                rounds = [measure(fn, args.calls, sync) for _ in range(5)]
                host = statistics.median(r[0] for r in rounds)
                wall = statistics.median(r[1] for r in rounds)
                print(f"{workload:<10} {item:<13} {name:<8} {host:9.1f} {wall:9.1f}", flush=True)
        del ts


if __name__ == "__main__":
    main()
