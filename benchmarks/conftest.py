"""pytest-benchmark suite over fastsam's ops and training steps (not part of the default test run).

Run:  pytest benchmarks --benchmark-only [--fastsam-device cuda] [--fastsam-workloads all]
Every case is built and timed with the CLI's own code (fastsam.bench.engine / e2e /
workloads), so the two cannot drift apart; only the statistics and tables are
pytest-benchmark's. Options (or environment variables of the same meaning):
  --fastsam-device    FASTSAM_BENCH_DEVICE     cpu | cuda | cuda:N (default: cuda if available)
  --fastsam-backends  FASTSAM_BENCH_BACKENDS   comma-separated (default: every available one)
  --fastsam-workloads FASTSAM_BENCH_WORKLOADS  comma-separated or 'all' (default: all on CUDA,
                                               resnet50,tiny on the CPU, to stay within minutes)
  --fastsam-dtype     FASTSAM_BENCH_DTYPE      fp32 | bf16
  --fastsam-threads   FASTSAM_BENCH_THREADS    CPU threads for torch (default: torch's choice)
"""

from __future__ import annotations

import os

# test_throughput.py reuses the tolerance helpers of tests/conftest.py, which would turn on
# Triton's interpreter where there is no GPU: benchmarks never do that unless asked.
os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest
import torch

from fastsam.bench import cli, e2e, engine
from fastsam.bench.workloads import WORKLOADS, TensorSet, parse_workloads

CPU_DEFAULT_WORKLOADS = "resnet50,tiny"
OPTIONS = ("device", "backends", "workloads", "dtype", "threads")


def pytest_addoption(parser):
    group = parser.getgroup("fastsam", "fastsam benchmark selection")
    for name in OPTIONS:
        group.addoption(f"--fastsam-{name}", default=None,
                        help=f"(env FASTSAM_BENCH_{name.upper()}) see benchmarks/conftest.py")


def _option(config, name: str):
    value = config.getoption(f"--fastsam-{name}")
    return value if value is not None else os.environ.get(f"FASTSAM_BENCH_{name.upper()}")


class Selection:
    """Device, dtype, backends and workloads of this session, validated like the CLI's."""

    def __init__(self, config):
        try:
            self.device = cli.resolve_device(_option(config, "device"))
            dtype_name = _option(config, "dtype") or "fp32"
            if dtype_name not in cli.DTYPES:
                raise cli.UsageError(f"unknown dtype {dtype_name!r}; choose {' or '.join(cli.DTYPES)}")
            self.dtype_name, self.dtype = dtype_name, cli.DTYPES[dtype_name]
            self.backends, self.notes = cli.select_backends(_option(config, "backends"), self.device, self.dtype)
            spec = _option(config, "workloads")
            if spec is None and self.device.type == "cpu":
                spec = CPU_DEFAULT_WORKLOADS
            self.workloads = parse_workloads(spec)
            threads = _option(config, "threads")
            if threads is not None:
                if not threads.isdigit() or int(threads) < 1:
                    raise cli.UsageError(f"--fastsam-threads must be a positive integer; got {threads!r}")
                torch.set_num_threads(int(threads))
        except (cli.UsageError, ValueError) as exc:
            raise pytest.UsageError(f"fastsam benchmarks: {exc}") from None

    def op_cases(self) -> list:
        cases = []
        for w in self.workloads:
            for b in self.backends:
                if (self.device.type == "cpu" and b == "reference"
                        and WORKLOADS[w].numel > cli.CPU_REFERENCE_MAX_PARAMS):
                    continue  # as in the CLI: seconds per call on the CPU
                cases += [pytest.param(w, b, item, id=f"{w}-{item}-{b}") for item in engine.ITEMS]
        return cases

    def e2e_cases(self) -> list:
        settings = e2e.E2ESettings.for_device(self.device)
        cases = [pytest.param(m, "base", "-", settings.batch, id=f"{m}-base") for m in e2e.MODELS]
        cases += [pytest.param(m, "sam", b, mb, id=f"{m}-sam-{b}-m{mb}")
                  for m in e2e.MODELS for mb in e2e.micro_batches(settings) for b in self.backends]
        return cases


def pytest_configure(config):
    # Validate the selection up front, so a bad option is one clear usage error.
    config._fastsam_selection = None
    config._fastsam_selection = Selection(config)


def selection(config) -> Selection:
    if config._fastsam_selection is None:
        config._fastsam_selection = Selection(config)
    return config._fastsam_selection


def pytest_generate_tests(metafunc):
    sel = selection(metafunc.config)
    if metafunc.definition.name == "test_op":
        metafunc.parametrize("workload, backend_name, item", sel.op_cases())
    elif metafunc.definition.name == "test_train_step":
        metafunc.parametrize("model_name, kind, backend_name, micro_batch", sel.e2e_cases())


@pytest.fixture(scope="session")
def sel(request) -> Selection:
    return selection(request.config)


@pytest.fixture(scope="session")
def timer(sel) -> engine.Timer:
    return engine.Timer(sel.device)


@pytest.fixture(scope="session")
def copy_bandwidth(timer) -> dict:
    """The large-copy bandwidth of this device, measured once per session by the CLI's engine."""
    return timer.copy_bandwidth()


@pytest.fixture(scope="session")
def tensor_sets(sel):
    """TensorSet of a workload; only the latest one is kept (cases run workload by workload)."""
    cache: dict = {}

    def get(name: str) -> TensorSet:
        if name not in cache:
            cache.clear()
            if sel.device.type == "cuda":
                torch.cuda.empty_cache()
            cache[name] = TensorSet(WORKLOADS[name], sel.device, sel.dtype)
        return cache[name]
    return get
