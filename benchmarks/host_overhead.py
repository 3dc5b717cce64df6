"""Host time per call of each backend's SAM and GSAM sub-steps, next to back-to-back wall time.

    python benchmarks/host_overhead.py [--device cuda] [--workloads resnet50,tiny] [--backends cuda,triton]

``python -m fastsam.bench`` measures the host time of a SAM sub-step through ``fastsam.SAM``
and of its kernels alone (items optimizer_substep and kernels_substep). This script adds the
same measurement for each backend's ops called directly, for the GSAM sub-step too: the
host time to enqueue one call (calls queued without synchronising, divided by their
number) and the wall time per call of the same calls back to back including the final
synchronisation (``fastsam.bench.engine.Timer.enqueue_times``: medians of 5 rounds). Where
host ~ wall, the backend is host-bound on that workload; where wall > host, the GPU is the
limit. The CLI's CUDA-event times come after an L2 flush, which gives the host a head start.
"""

from __future__ import annotations

import argparse

import torch

import fastsam
from fastsam import ops
from fastsam.bench.engine import Timer, make_call
from fastsam.bench.workloads import WORKLOADS, TensorSet, parse_workloads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="resnet50,tiny")
    parser.add_argument("--backends", help="comma-separated (default: every available one but reference)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    timer = Timer(device)
    names = [n for n in fastsam.available_backends(device) if n != "reference"]
    if args.backends:
        wanted = args.backends.split(",")
        missing = sorted(set(wanted) - set(names))
        if missing:
            parser.error(f"backends not available on {device}: {', '.join(missing)} (available: {', '.join(names)})")
        names = wanted
    print(f"host vs wall time per call, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, medians of 5 rounds")
    print(f"{'workload':<10} {'item':<13} {'backend':<8} {'host us':>9} {'wall us':>9}")
    for workload in parse_workloads(args.workloads):
        ts = TensorSet(WORKLOADS[workload], device, torch.float32)
        for item in ("sam_substep", "gsam_substep"):
            for name in names:
                fn = make_call(item, ops.get_backend(name, device, torch.float32), ts)
                _, estimate_s = timer.calibrate(fn)  # warm-up (and Triton's first compilation)
                times = timer.enqueue_times(fn, estimate_s * 1e3)
                print(f"{workload:<10} {item:<13} {name:<8} {times['host_ms'] * 1e3:9.1f} {times['wall_ms'] * 1e3:9.1f}",
                      flush=True)
        del ts


if __name__ == "__main__":
    main()
