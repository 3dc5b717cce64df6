"""A torch.compile'd model trains with fastsam, without graph breaks in its forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4))


def train(model, steps=3, **kwargs):
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=8,
                           ascent_loss=fastsam.OutputBiasForgetting(C=4.0))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_trains_like_eager(backend):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = make_model(), make_model()
    train(eager)
    # fullgraph=True turns any graph break in the forward into an error
    train(torch.compile(compiled, backend=backend, fullgraph=True))
    assert not torch._dynamo.utils.counters["graph_break"]
    for a, b in zip(list(eager.parameters()) + list(eager.buffers()),
                    list(compiled.parameters()) + list(compiled.buffers())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
