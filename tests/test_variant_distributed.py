"""The efficient variants under DDP and FSDP2, with 2 CPU processes on the gloo backend.

Every method trains a few train_step steps with perturbation sub-batches on each rank's own
data.

* DDP: the ranks must end with the same weights bit for bit (a variant's state that enters
  the step, LookSAM's g_v, is averaged like the gradients). For the methods whose DDP step is
  the same math as one process holding both ranks' data as sub-batches (schedules, LookSAM,
  Momentum-SAM, SAM-ON), the weights must also equal a single-process train_step on the
  concatenated batch. (Friendly SAM's EMA, AE-SAM's statistics and ESAM's weight masks are
  kept per rank, so those runs are compared between ranks only.)
* FSDP2: every backward reduce-scatters, so sub-step k sees the union of the ranks' k-th
  sub-batches, and every method's state is global: the weights must equal a single-process
  train_step whose sub-batches are those unions (ESAM without data selection, which ranks
  make on their own examples).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastsam
from fastsam import schedules
from tests.test_distributed import LOCAL_BATCH, MICRO, WORLD, free_port, rank_data

STEPS = 5
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without distributed gloo support")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.LayerNorm(10), torch.nn.Tanh(),
                               torch.nn.Linear(10, 3)).double()


def make_optimizer(method: str, model):
    sgd = dict(lr=0.1, momentum=0.9)
    params = model.parameters()
    if method == "every":
        return fastsam.SAM(params, torch.optim.SGD, rho=0.1, schedule=schedules.Every(2), **sgd)
    if method == "random":
        return fastsam.SAM(params, torch.optim.SGD, rho=0.1, **sgd,
                           schedule=schedules.Random(0.5, torch.Generator().manual_seed(3)))
    if method == "adaptive":
        return fastsam.SAM(params, torch.optim.SGD, rho=0.1, schedule=schedules.Adaptive(STEPS), **sgd)
    if method == "looksam":
        return fastsam.LookSAM(params, torch.optim.SGD, rho=0.1, k=2, alpha=0.5, **sgd)
    if method == "msam":
        return fastsam.MomentumSAM(params, torch.optim.SGD, rho=0.5, **sgd)
    if method == "fsam":
        return fastsam.FriendlySAM(params, torch.optim.SGD, rho=0.1, **sgd)
    if method == "esam":
        return fastsam.ESAM(params, torch.optim.SGD, rho=0.1, beta=0.5, gamma=0.5, **sgd,
                            generator=torch.Generator().manual_seed(4))
    if method == "esam_swp":
        return fastsam.ESAM(params, torch.optim.SGD, rho=0.1, beta=0.5, gamma=1.0, **sgd,
                            generator=torch.Generator().manual_seed(4))
    if method == "sam_on":
        module = model.module if hasattr(model, "module") else model
        return fastsam.SAM(fastsam.normalization_params(module), torch.optim.SGD, rho=0.3, **sgd)
    raise ValueError(method)


METHODS = ["every", "random", "adaptive", "looksam", "msam", "fsam", "esam", "sam_on"]
SAME_AS_ONE_PROCESS = ["every", "random", "looksam", "msam", "sam_on"]


def train(method: str, model, batches, micro: int = MICRO, full: bool = False) -> list:
    opt = make_optimizer(method, model)
    for x, y in batches:
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=micro)
    params = [p.full_tensor() if full else p for p in model.parameters()]
    return [p.detach().clone() for p in params]


FSDP_METHODS = ["every", "random", "adaptive", "looksam", "msam", "fsam", "esam_swp", "sam_on"]


def worker(rank: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        batches = [rank_data(rank, step) for step in range(STEPS)]
        for method in METHODS:
            model = torch.nn.parallel.DistributedDataParallel(make_model())
            results[method] = train(method, model, batches)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        for method in FSDP_METHODS:
            model = make_model()
            fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
            weights = train(method, model, batches, full=True)
            results[f"fsdp-{method}"] = weights
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
    out = tmp_path_factory.mktemp("variant-ranks")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_ranks_stay_in_sync(method, rank_results):
    for a, b in zip(rank_results[0][method], rank_results[1][method]):
        assert torch.equal(a, b), "ranks disagree"


@pytest.mark.parametrize("method", SAME_AS_ONE_PROCESS)
def test_ddp_equals_one_process_with_the_ranks_data_as_sub_batches(method, rank_results):
    batches = []
    for step in range(STEPS):
        data = [rank_data(r, step) for r in range(WORLD)]
        batches.append((torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])))
    assert LOCAL_BATCH % MICRO == 0  # every sub-batch lies within one rank's data
    expected = train(method, make_model(), batches)
    for got, want in zip(rank_results[0][method], expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", FSDP_METHODS)
def test_fsdp_equals_one_process_whose_sub_batches_are_the_ranks_unions(method, rank_results):
    batches = []
    for step in range(STEPS):
        data = [rank_data(r, step) for r in range(WORLD)]
        parts = [list(zip(torch.split(x, MICRO), torch.split(y, MICRO))) for x, y in data]
        unions = [(torch.cat([parts[r][k][0] for r in range(WORLD)]), torch.cat([parts[r][k][1] for r in range(WORLD)]))
                  for k in range(LOCAL_BATCH // MICRO)]
        batches.append((torch.cat([x for x, _ in unions]), torch.cat([y for _, y in unions])))
    expected = train(method, make_model(), batches, micro=WORLD * MICRO)
    for rank in range(WORLD):
        for got, want in zip(rank_results[rank][f"fsdp-{method}"], expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
