"""DDP and FSDP2 (fully_shard) with 2 CPU processes on the gloo backend.

Each test spawns two ranks that train with fastsam.train_step and save their final
weights; the main process then checks that the ranks agree bit for bit and that they
equal a single-process computation of the same math written out with plain autograd:

* DDP: every replica perturbs on its own data (no gradient sync in any pass) and the
  accumulated descent gradients are averaged once per step.
* FSDP: gradients are reduce-scattered in every backward, so each sub-step uses the
  gradient of the union of the ranks' sub-batches; the norm is global over the shards.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastsam

WORLD, STEPS, LOCAL_BATCH, MICRO, RHO, LR = 2, 3, 12, 4, 0.1, 0.1

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without distributed gloo support")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()


def rank_data(rank: int, step: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return (torch.randn(LOCAL_BATCH, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (LOCAL_BATCH,), generator=gen))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = [("ddp", 0.0), ("ddp", 0.3), ("fsdp", 0.0), ("fsdp", 0.3)]


def train_rank(rank: int, mode: str, gsam: float):
    model = make_model()
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, gsam_alpha=gsam)
    for step in range(STEPS):
        x, y = rank_data(rank, step)
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=MICRO)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return [p.detach().clone() for p in params]


def worker(rank: int, port: int, out_dir: str):
    # One process group for every configuration: spawning ranks costs ~10 s each time.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {f"{mode}-{gsam}": train_rank(rank, mode, gsam) for mode, gsam in CONFIGS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def sam_direction(model, sub_batches, gsam: float):
    """Sum over sub-batches of weight * (GSAM-combined) descent gradient, computed by hand.

    ``sub_batches`` is a list of (weight, [(x, y), ...]): the loss of a sub-step is the mean
    over its parts of each part's mean loss (FSDP's average over ranks).
    """
    params = list(model.parameters())

    def grad_at(shift):
        with torch.no_grad():
            for p, s in zip(params, shift):
                p.add_(s)
        loss = sum(F.cross_entropy(model(x), y) for x, y in parts) / len(parts)
        g = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, s in zip(params, shift):
                p.sub_(s)
        return g

    total = [torch.zeros_like(p) for p in params]
    for weight, parts in sub_batches:
        g = grad_at([torch.zeros_like(p) for p in params])
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        gp = grad_at([RHO * gi / (norm + 1e-12) for gi in g])
        if gsam:
            gp_norm = torch.sqrt(sum((x ** 2).sum() for x in gp))
            h = [x / (gp_norm + 1e-12) for x in gp]
            along = sum((a * b).sum() for a, b in zip(g, h))
            gp = [x - gsam * (a - along * b) for x, a, b in zip(gp, g, h)]
        total = [t + weight * x for t, x in zip(total, gp)]
    return total


def expected_weights(mode: str, gsam: float):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    n_sub = LOCAL_BATCH // MICRO
    for step in range(STEPS):
        data = [rank_data(r, step) for r in range(WORLD)]
        split = [list(zip(torch.split(x, MICRO), torch.split(y, MICRO))) for x, y in data]
        if mode == "ddp":  # each replica on its own: average of the replicas' directions
            directions = [sam_direction(model, [(1 / n_sub, [split[r][k]]) for k in range(n_sub)], gsam)
                          for r in range(WORLD)]
            direction = [sum(parts) / WORLD for parts in zip(*directions)]
        else:  # every sub-step sees the union of the ranks' sub-batches
            direction = sam_direction(model, [(1 / n_sub, [split[r][k] for r in range(WORLD)])
                                              for k in range(n_sub)], gsam)
        for p, d in zip(model.parameters(), direction):
            p.grad = d
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("mode,gsam", CONFIGS)
def test_two_ranks_match_single_process_math(mode, gsam, rank_results):
    ranks = [results[f"{mode}-{gsam}"] for results in rank_results]
    for a, b in zip(*ranks):
        assert torch.equal(a, b), "ranks disagree"
    for got, want in zip(ranks[0], expected_weights(mode, gsam)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
