"""Two CPU ranks (gloo): FSDP2 checkpoints through torch.distributed.checkpoint, a GradScaler
skip on one rank inside an accumulation cycle, and DDP communication hooks.

One spawn runs every scenario (starting ranks costs seconds); each rank saves what it saw
and the main process checks it. The process group has a short timeout, so a collective
that one rank issues and the other does not fails the test instead of hanging it.
"""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastsam
from tests.test_distributed import free_port

WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without distributed gloo support")


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).to(dtype)


def batch(rank, step, n=12):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def fsdp_checkpoint(rank):
    """Train, checkpoint with DCP's state_dict API, train on; a fresh FSDP2 model resumes."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def build():
        model = make_model(torch.float64)
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        opt = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, gsam_alpha=0.2)
        return model, opt

    def train(model, opt, steps):
        for step in steps:
            x, y = batch(rank, step)
            fastsam.train_step(model, opt, x.double(), y, F.cross_entropy, micro_batch=4)

    model, opt = build()
    train(model, opt, range(2))
    model_sd = copy.deepcopy(get_model_state_dict(model))
    optim_sd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    train(model, opt, range(2, 4))
    resumed, resumed_opt = build()
    set_model_state_dict(resumed, model_sd)
    set_optimizer_state_dict(resumed, resumed_opt, optim_sd)
    train(resumed, resumed_opt, range(2, 4))
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    again = [p.full_tensor().detach().clone() for p in resumed.parameters()]
    return {"continued": full, "resumed": again}


def scaler_skip_in_cycle(rank):
    """accumulation_steps=2; the first call's ascent loss is inf on rank 1 only."""
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batch(rank, 0)
    fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=4, scaler=scaler)  # a normal step first
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls = []

    def poisoned(out, target):
        calls.append(1)
        loss = F.cross_entropy(out, target)
        return loss * float("inf") if rank == 1 and len(calls) == 3 else loss  # 2nd sub-batch's ascent

    outs = []
    for i in range(2):
        x, y = batch(rank, 1 + i)
        outs.append(fastsam.train_step(model, opt, x, y, poisoned, micro_batch=4, scaler=scaler,
                                       accumulation_steps=2, step=(i == 1)).stepped)
    after_skip = [p.detach().clone() for p in model.parameters()]
    skip_momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    scale_after_skip = scaler.get_scale()
    for i in range(2):  # the next cycle steps normally
        x, y = batch(rank, 3 + i)
        outs.append(fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=4, scaler=scaler,
                                       accumulation_steps=2, step=(i == 1)).stepped)
    return {"before": before, "after_skip": after_skip, "momentum": momentum, "skip_momentum": skip_momentum,
            "scale_after_skip": scale_after_skip, "stepped": outs,
            "final": [p.detach().clone() for p in model.parameters()]}


def comm_hook(rank):
    """A registered DDP communication hook averages SAM's gradients, once per step."""
    hook_calls = []

    def half_average(state, bucket):
        hook_calls.append(1)
        tensor = bucket.buffer().div_(WORLD)
        future = dist.all_reduce(tensor, async_op=True).get_future()
        return future.then(lambda fut: fut.value()[0].mul_(0.5))

    results = {}
    for name, lr, hook in (("hook", 0.2, half_average), ("plain", 0.1, None)):
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        if hook is not None:
            model.register_comm_hook(None, hook)
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=lr, momentum=0.9)
        for step in range(2):
            x, y = batch(rank, step)
            fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=4)
        results[name] = [p.detach().clone() for p in model.parameters()]
    results["hook_calls"] = len(hook_calls)
    return results


def worker(rank: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {"fsdp": fsdp_checkpoint(rank), "skip": scaler_skip_in_cycle(rank), "hook": comm_hook(rank)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_fsdp2_resumes_bit_exactly_through_distributed_checkpoint(ranks):
    for r in ranks:
        for a, b in zip(r["fsdp"]["continued"], r["fsdp"]["resumed"]):
            assert torch.equal(a, b)
    for a, b in zip(ranks[0]["fsdp"]["resumed"], ranks[1]["fsdp"]["resumed"]):
        assert torch.equal(a, b)


def test_scaler_skip_on_one_rank_skips_the_whole_cycle_on_every_rank(ranks):
    for r in ranks:
        skip = r["skip"]
        assert skip["stepped"] == [False, False, False, True]
        assert all(torch.equal(a, b) for a, b in zip(skip["before"], skip["after_skip"]))
        assert all(torch.equal(a, b) for a, b in zip(skip["momentum"], skip["skip_momentum"]))
        assert skip["scale_after_skip"] == 2.0 ** 9  # backed off once, for the whole cycle
        assert not all(torch.equal(a, b) for a, b in zip(skip["after_skip"], skip["final"]))
    for a, b in zip(ranks[0]["skip"]["final"], ranks[1]["skip"]["final"]):
        assert torch.equal(a, b), "ranks disagree after the skipped cycle"


def test_ddp_communication_hook_is_honoured_once_per_step(ranks):
    for r in ranks:
        hook = r["hook"]
        # halving the averaged gradient at lr 0.2 is SGD at lr 0.1, bit for bit (x0.5 is exact)
        for a, b in zip(hook["hook"], hook["plain"]):
            assert torch.equal(a, b)
        assert hook["hook_calls"] == 2  # one bucket, two steps: ascents and early descents ran unsynced
