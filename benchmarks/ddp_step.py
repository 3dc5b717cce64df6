"""Step time and memory of fastsam.train_step under DistributedDataParallel, 2 CPU ranks (gloo).

    python benchmarks/ddp_step.py [--steps 12] [--width 1024] [--layers 8] [--micro 16] [--gsam 0.0]

Each rank trains an MLP of ``layers`` square ``width`` x ``width`` layers (8.4M parameters by
default) on its own random data with perturbation sub-batches of ``micro`` examples, and
reports the median step time (after two warm-up steps) and how much the process's peak
resident memory grew over its size once model and optimizer were built: what the steps
themselves allocate (gradients, SAM's backup and accumulator, a flat copy of all
gradients if the code makes one). Run it against two checkouts (PYTHONPATH=...) to compare
code versions on the same machine, one after the other.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastsam


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(rank: int, port: int, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.Tanh()]
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers, torch.nn.Linear(args.width, 10)))
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, gsam_alpha=args.gsam,
                      backend=args.backend)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    before = peak_rss_mib()
    times = []
    for step in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=args.micro)
        times.append(time.perf_counter() - start)
    results[rank] = dict(median_s=statistics.median(times[2:]), p20=sorted(times[2:])[len(times[2:]) // 5],
                         p80=sorted(times[2:])[4 * len(times[2:]) // 5], rss_before=before,
                         rss_after=peak_rss_mib())
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--gsam", type=float, default=0.0)
    parser.add_argument("--backend", default="auto",
                        help="fastsam backend (foreach runs without the compiled extension, e.g. in an old checkout)")
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, args, results), nprocs=2, join=True)
    params = args.layers * (args.width * args.width + args.width) + args.width * 10 + 10
    print(f"fastsam {fastsam.__file__}: {params / 1e6:.1f}M parameters ({params * 4 / 2**20:.0f} MiB fp32), "
          f"batch {args.batch}, micro {args.micro}, gsam_alpha {args.gsam}, torch {torch.__version__}")
    for rank in sorted(results):
        r = results[rank]
        print(f"rank {rank}: step {r['median_s'] * 1e3:.1f} ms (p20 {r['p20'] * 1e3:.1f}, p80 {r['p80'] * 1e3:.1f}); "
              f"peak RSS {r['rss_before']:.0f} MiB once built, {r['rss_after']:.0f} MiB after the steps "
              f"(+{r['rss_after'] - r['rss_before']:.0f} MiB)")


if __name__ == "__main__":
    main()
