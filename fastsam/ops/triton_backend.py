"""Triton backend: the ops contract as pointer-table multi-tensor kernels (fastsam/ops/triton_kernels.py).

Host side: for each call, a table of element offsets (a row per tensor, a column per
role: params, grads, backups, ...) from one base tensor per role, and a launch plan
mapping programs to (tensor, block) chunks and tail "lanes" (`build_plan`). Both are
built once and cached, keyed on the tensors' addresses, byte sizes, dtypes and layouts
(read in one C++ pass by fastsam._C where it is built: `_key`), so a new
gradient tensor costs a new table (a small host-to-device copy from pinned memory) and
reuses the plan. One launch per op (reductions add one launch that sums the partials in
a fixed order); data-dependent scalars are read by the kernels from 0-d device tensors,
so nothing here waits for the GPU. Tensors that cannot be walked as one flat range with
their partners (strided views) go through contiguous temporaries that are copied back.

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before the
kernels were defined (that is, before importing fastsam), which is how CI tests it.
Importing this module does not import triton; the first availability check or op does.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastsam.ops import backend_from_functions, check_exponents, step_args

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_T = torch.Tensor
_nbytes = _T.nbytes.__get__  # unbound getter: map(_nbytes, tensors) gives each tensor's byte size


# -- configuration ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Sizes of the launches.

    ``block_bytes``: bytes of the first role's dtype that a chunk program covers (4096
    fp32 or 8192 bf16/fp16 elements on a GPU: per thread of 8 warps, four 128-bit
    accesses per tensor). ``lanes``: elements per lane program (1024 on a GPU: lanes
    gather 64-bit pointers, and 4096 of them took 181 registers per thread in perturb_
    against 64 with 1024, by ptxas for sm_90; None: as many as a block).
    ``min_block_bytes``: if set, lists with fewer elements than a block get a smaller
    power-of-two block, down to this size; the interpreter pays per program and per lane
    (masked lanes too), so there blocks are large and shrink for small lists, while on a
    GPU they stay fixed (each size is another compilation).
    ``final_block``: lanes of the program that sums the partials.
    """

    block_bytes: int
    num_warps: int
    lanes: Optional[int] = None
    min_block_bytes: Optional[int] = None
    final_block: int = 1024

    def blocking(self, dtype: torch.dtype, numel: Optional[int] = None) -> tuple[int, int]:
        """(elements per chunk program, lanes per lane program) for a list of ``dtype``."""
        block = max(1, self.block_bytes // dtype.itemsize)
        if self.min_block_bytes is not None and numel is not None:
            fitting = 1 << max(0, numel - 1).bit_length()  # the power of two that holds numel
            block = max(self.min_block_bytes // dtype.itemsize, min(block, fitting))
        return block, min(block, self.lanes) if self.lanes else block


GPU_CONFIG = LaunchConfig(block_bytes=16384, num_warps=8, lanes=1024)
INTERPRETER_CONFIG = LaunchConfig(block_bytes=262144, num_warps=4, min_block_bytes=64)
_config_override: Optional[LaunchConfig] = None
_default_config: Optional[LaunchConfig] = None


def _env_config(base: LaunchConfig) -> LaunchConfig:
    """``base`` with FASTSAM_TRITON_{BLOCK_BYTES,NUM_WARPS,LANES} applied (for tuning on a GPU)."""
    changes = {}
    for field, var in (("block_bytes", "FASTSAM_TRITON_BLOCK_BYTES"), ("num_warps", "FASTSAM_TRITON_NUM_WARPS"),
                       ("lanes", "FASTSAM_TRITON_LANES")):
        if os.environ.get(var):
            value = int(os.environ[var])
            if value <= 0 or value & (value - 1):
                raise ValueError(f"{var} must be a power of two; got {value}")
            changes[field] = value
    return dataclasses.replace(base, **changes)


def launch_config() -> LaunchConfig:
    """The sizes in use: the override, else the interpreter's or the GPU's defaults (read once)."""
    global _default_config
    if _config_override is not None:
        return _config_override
    if _default_config is None:
        _default_config = _env_config(INTERPRETER_CONFIG if interpreted() else GPU_CONFIG)
    return _default_config


@contextlib.contextmanager
def override_launch_config(config: LaunchConfig):
    """Use ``config`` inside the block (tests use tiny blocks to get many programs from few elements)."""
    global _config_override
    previous, _config_override = _config_override, config
    try:
        yield
    finally:
        _config_override = previous


# -- availability -------------------------------------------------------------------------

_kernels_module = None
_kernels_error: Optional[BaseException] = None


def _kernels():
    """fastsam.ops.triton_kernels, imported on first use (that import defines the kernels)."""
    global _kernels_module, _kernels_error
    if _kernels_module is None and _kernels_error is None:
        try:
            from fastsam.ops import triton_kernels
            _kernels_module = triton_kernels
        except ImportError as error:
            _kernels_error = error
    if _kernels_error is not None:
        raise _kernels_error
    return _kernels_module


def interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_kernels().perturb_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device) -> Optional[str]:
    device = torch.device(device)
    try:
        _kernels()
    except ImportError as error:
        if getattr(error, "name", None) == "triton":
            return "triton is not installed; pip install triton (the CUDA build of torch installs it)"
        return f"triton could not be imported ({error}); reinstall the triton that matches torch"
    if device.type == "cuda":
        if interpreted():
            return ("the Triton kernels were defined in interpreter mode (TRITON_INTERPRET=1), which runs "
                    "them on CPU tensors only; unset TRITON_INTERPRET before importing fastsam to run them on the GPU")
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.version.hip is None and torch.cuda.get_device_capability(index) < (7, 0):
            return f"Triton needs an NVIDIA GPU of compute capability 7.0 or newer; {device} is older"
        return None
    if device.type == "cpu":
        if interpreted():
            return None
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return ("TRITON_INTERPRET was set after fastsam's Triton kernels had been defined; "
                    "set TRITON_INTERPRET=1 before importing fastsam")
        return ("Triton kernels run on CUDA GPUs; to run them on CPU tensors (slowly, for tests) "
                "set TRITON_INTERPRET=1 before importing fastsam")
    return f"Triton kernels run on CUDA GPUs (and on CPU under TRITON_INTERPRET=1), not on {device.type}"


# -- launch plans ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """Which program covers which elements, for tensors of ``numels`` elements.

    Program ``p < n_chunks`` covers elements ``[k*block, (k+1)*block)`` of tensor ``t``
    with ``t, k = chunk_tensor[p], chunk_index[p]`` (always a full block). The remaining
    programs cover ``lanes`` lanes each: program ``p`` lanes ``(p - n_chunks) * lanes + j``,
    and lane ``l`` is element ``lane_element[l]`` of tensor ``lane_tensor[l]``. The lanes
    are the tails shorter than a block and whole tensors smaller than one, packed back to
    back, so tiny tensors share programs.
    """

    block: int
    lanes: int
    numels: tuple
    chunk_tensor: Tensor
    chunk_index: Tensor
    lane_tensor: Tensor
    lane_element: Tensor

    @property
    def n_chunks(self) -> int:
        return self.chunk_tensor.numel()

    @property
    def n_lanes(self) -> int:
        return self.lane_tensor.numel()

    @property
    def n_programs(self) -> int:
        return self.n_chunks + -(-self.n_lanes // self.lanes)


def build_plan(numels: Sequence[int], block: int, lanes: Optional[int] = None) -> Plan:
    """The launch plan for tensors of ``numels`` elements (host tensors, int64)."""
    lanes = block if lanes is None else lanes
    if block <= 0 or lanes <= 0:
        raise ValueError(f"block and lanes must be positive; got {block} and {lanes}")
    sizes = torch.tensor(list(numels), dtype=torch.int64)
    index = torch.arange(len(sizes), dtype=torch.int64)
    full = sizes // block
    tails = sizes - full * block
    chunk_tensor = torch.repeat_interleave(index, full)
    chunk_index = torch.arange(chunk_tensor.numel(), dtype=torch.int64) - torch.repeat_interleave(
        torch.cumsum(full, 0) - full, full)
    lane_tensor = torch.repeat_interleave(index, tails)
    lane_element = torch.arange(lane_tensor.numel(), dtype=torch.int64) - torch.repeat_interleave(
        torch.cumsum(tails, 0) - tails - full * block, tails)
    return Plan(block, lanes, tuple(numels), chunk_tensor, chunk_index, lane_tensor, lane_element)


@dataclasses.dataclass(frozen=True)
class _DevicePlan:
    arrays: tuple  # chunk_tensor, chunk_index, lane_tensor, lane_element: views of one device tensor
    n_chunks: int
    n_lanes: int
    n_programs: int


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A validated launch for one set of tensors: offsets table, alignment, plan."""

    table: Tensor  # [tensors, roles + 1] int64 element offsets from each role's base tensor, then list positions
    n_roles: int  # columns of the table (the kernels' ROLES): the roles, then the positions
    base_index: int  # index (in the caller's lists) of the base tensor of every role
    aligned: bool  # every address 16-byte aligned: 128-bit accesses are safe
    plan: _DevicePlan


class _Cache:
    """A small LRU map that counts hits and misses (tests read the counts)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        value = self._data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
            self._data.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()
        self.hits = self.misses = 0


_plans = _Cache(64)  # (device, (block, lanes), numels) -> _DevicePlan
_entries = _Cache(256)  # _key(...) -> _Entry


_graph_entries: dict = {}  # entries used while capturing CUDA graphs: kept for the graphs' lifetime


def clear_caches() -> None:
    """Forget cached launches (not those that captured CUDA graphs may replay)."""
    _plans.clear()
    _entries.clear()


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return host
    # from pinned memory, asynchronously: building a table never waits for the GPU
    return host.pin_memory().to(device, non_blocking=True)


def _device_plan(device: torch.device, blocking: tuple, numels: tuple) -> _DevicePlan:
    key = (device, blocking, numels)
    plan = _plans.get(key)
    if plan is None:
        host = build_plan(numels, *blocking)
        parts = (host.chunk_tensor, host.chunk_index, host.lane_tensor, host.lane_element)
        # One upload for the four arrays, each starting 16-byte aligned: a pointer's
        # alignment is part of what Triton compiles for, so keep it the same every time.
        padded = [torch.cat([a, a.new_zeros(a.numel() % 2)]) for a in parts]
        meta = _to_device(torch.cat(padded), device)
        starts = [0]
        for a in padded:
            starts.append(starts[-1] + a.numel())
        arrays = tuple(meta[start:start + a.numel()] for start, a in zip(starts, parts))
        plan = _DevicePlan(arrays, host.n_chunks, host.n_lanes, host.n_programs)
        _plans.put(key, plan)
    return plan


# -- preparing a launch ---------------------------------------------------------------------

@dataclasses.dataclass
class _Launch:
    bases: tuple  # one tensor per role; the table holds element offsets from its address
    entry: _Entry
    device: torch.device
    blocking: tuple  # (block, lanes)
    num_warps: int
    copy_back: list  # (original, temporary) pairs to copy after the kernel
    written: list  # lists of tensors whose version counters the kernel's writes must bump
    temporaries: list = dataclasses.field(default_factory=list)  # alive until the kernel is queued

    @property
    def grid(self) -> tuple:
        return (self.entry.plan.n_programs,)

    def plan_args(self) -> tuple:
        """The arguments every kernel takes after its base tensors."""
        plan = self.entry.plan
        return (self.entry.table, *plan.arrays, plan.n_chunks, plan.n_lanes)

    def sizes(self) -> dict:
        """The kernels' size arguments."""
        block, lanes = self.blocking
        return dict(ROLES=self.entry.n_roles, BLOCK=block, LANES=lanes, ALIGNED=self.entry.aligned,
                    num_warps=self.num_warps)

    def guard(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def finish(self) -> None:
        for original, temporary in self.copy_back:
            original.copy_(temporary)
        for tensors in self.written:  # as in-place torch ops do: autograd then sees the change
            torch.autograd.graph.increment_version(tensors)


def _dense_layout(t: Tensor) -> Optional[tuple]:
    """(size, stride) of each dim (size-1 dims left out) if ``t`` covers one gap-free range of memory.

    Two tensors with the same dense layout hold element (i, j, ...) at the same offset
    from their first address, so they can be walked together as flat ranges.
    """
    dims = tuple((size, stride) for size, stride in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in dims):
        if stride != expected:
            return None
        expected *= size
    return dims


def _walkable(tensors: Sequence[Tensor]) -> bool:
    """Can these same-index tensors be walked element by element as flat memory ranges?"""
    if all(t.is_contiguous() for t in tensors):
        return all(t.data_ptr() % t.element_size() == 0 for t in tensors)
    layouts = {_dense_layout(t) for t in tensors}
    return len(layouts) == 1 and None not in layouts and all(
        t.data_ptr() % t.element_size() == 0 for t in tensors)


def _validate(lists, names, device) -> None:
    for name, ts in zip(names, lists):
        dtype = ts[0].dtype
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the triton backend supports {[str(d) for d in SUPPORTED_DTYPES]} tensors; "
                            f"{name} are {dtype} (use backend='foreach' or 'reference' for them)")
        for i, t in enumerate(ts):
            if t.dtype != dtype:
                raise TypeError(f"{name}[{i}] is {t.dtype} but {name}[0] is {dtype}: a list must share one dtype")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {names[0]}[0] is on {device}")
            if t.numel() != lists[0][i].numel():
                raise ValueError(f"{name}[{i}] has {t.numel()} elements but {names[0]}[{i}] has {lists[0][i].numel()}")


class _Signature:
    """fastsam._C._list_signature's result as a dict key: its hash, and its bytes compared on a hit."""

    __slots__ = ("hash", "bytes")

    def __init__(self, pair):
        self.hash, self.bytes = pair

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return isinstance(other, _Signature) and self.bytes == other.bytes


_UNRESOLVED = object()
_native_signature = _UNRESOLVED  # fastsam._C._list_signature, or None without the extension


def _python_key(lists, device):
    """The cache key in Python: ~100x slower than the C++ one (see csrc/list_signature.cpp)."""
    contiguous = all(all(map(_T.is_contiguous, ts)) for ts in lists)
    layout = None if contiguous else tuple(
        tuple(zip(map(_T.size, ts), map(_T.stride, ts))) for ts in lists)
    return (device, tuple(tuple(t.dtype for t in ts) for ts in lists),
            tuple(tuple(map(_T.data_ptr, ts)) for ts in lists),
            tuple(tuple(map(_nbytes, ts)) for ts in lists), layout)


def _key(lists, device, blocking):
    """What a cached launch must match: every tensor's address, byte size, dtype and layout.

    Computed by the compiled extension's ``_list_signature`` where fastsam._C is built (a
    few microseconds for hundreds of tensors), else in Python. The kernels are Triton's
    either way; only this host-side bookkeeping gets faster.
    """
    global _native_signature
    if _native_signature is _UNRESOLVED:
        from fastsam.ops import compiled
        module = compiled.load_extension()
        _native_signature = getattr(module, "_list_signature", None)
    if _native_signature is None:
        return (blocking, _python_key(lists, device))
    return (blocking, _Signature(_native_signature(lists)))


def _build_entry(lists, device, blocking) -> Optional[_Entry]:
    """Offsets table and plan for lists whose same-index tensors are all walkable."""
    numels = [t.numel() for t in lists[0]]
    keep = [i for i, n in enumerate(numels) if n > 0]
    if not keep:
        return None
    base_index = keep[0]
    columns, aligned = [], True
    for ts in lists:
        base = ts[base_index].data_ptr()
        size = ts[base_index].element_size()
        offsets = [ts[i].data_ptr() - base for i in keep]
        aligned = aligned and base % 16 == 0 and all(o % 16 == 0 for o in offsets)
        columns.append([o // size for o in offsets])
    columns.append(keep)  # the last column: each tensor's position in the caller's lists
    # tensor-major: a tensor's offsets for all roles share a cache line
    table = _to_device(torch.tensor(columns, dtype=torch.int64).t().contiguous(), device)
    plan = _device_plan(device, blocking, tuple(numels[i] for i in keep))
    return _Entry(table, len(columns), base_index, aligned, plan)


def _prepare(lists, names, modes) -> Optional[_Launch]:
    """Validate and plan one launch over ``lists`` (one list per role, same length).

    ``modes[r]`` says how the kernel uses role r: "r" read, "w" written, "rw" both.
    Returns None when there is nothing to do (no elements).
    """
    n = len(lists[0])
    for name, ts in zip(names, lists):
        if len(ts) != n:
            raise ValueError(f"{name} has {len(ts)} tensors but {names[0]} has {n}")
    if n == 0:
        return None
    lists = [ts if isinstance(ts, (list, tuple)) else list(ts) for ts in lists]
    device = lists[0][0].device
    config = launch_config()
    numel = sum(map(_T.numel, lists[0])) if config.min_block_bytes is not None else None
    blocking = config.blocking(lists[0][0].dtype, numel)
    written = [ts for ts, mode in zip(lists, modes) if "w" in mode]
    key = _key(lists, device, blocking)
    entry = _entries.get(key)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if entry is not None:  # these exact tensors (addresses, sizes, dtypes, layouts) were validated before
        if capturing:  # a captured graph replays the table's address: it must outlive the cache
            _graph_entries[id(entry)] = entry
        bases = tuple(ts[entry.base_index] for ts in lists)
        return _Launch(bases, entry, device, blocking, config.num_warps, [], written)
    if capturing:
        raise RuntimeError(
            "the triton backend builds its launch tables outside CUDA graph capture: run the same step once "
            "before capturing it (the usual warm-up), with tensors that stay where they are (strided views "
            "that need temporaries cannot be captured)")

    _validate(lists, names, device)
    copy_back, temporaries = [], []
    if not all(_walkable([ts[i] for ts in lists]) for i in range(n) if lists[0][i].numel()):
        lists = [list(ts) for ts in lists]
        for i in range(n):
            if lists[0][i].numel() == 0 or _walkable([ts[i] for ts in lists]):
                continue
            for ts, mode in zip(lists, modes):
                t = ts[i]
                if t.is_contiguous() and t.data_ptr() % t.element_size() == 0:
                    continue
                temporary = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                if "r" in mode:
                    temporary.copy_(t)
                if "w" in mode:
                    copy_back.append((t, temporary))
                temporaries.append(temporary)
                ts[i] = temporary
    entry = _build_entry(lists, device, blocking)
    if entry is None:
        return None
    if not temporaries:  # they have fresh addresses: no use caching them
        _entries.put(key, entry)
    bases = tuple(ts[entry.base_index] for ts in lists)
    return _Launch(bases, entry, device, blocking, config.num_warps, copy_back, written, temporaries)


def _device_scalar(value: Tensor, device: torch.device, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor (a 0-d device tensor, so the step never waits for the host)")
    if value.device != device:
        value = value.to(device)
    return value.contiguous()


def _sum_partials(launch: _Launch, partials: Tensor, rows: int, shape: tuple) -> Tensor:
    """Phase two of a reduction: ``rows`` sums of the programs' partials, in a fixed order."""
    n = launch.entry.plan.n_programs
    if n == 1:  # one program: its partials are the result
        return partials.view(shape)
    out = torch.empty(shape, dtype=torch.float32, device=launch.device)
    final_block = min(launch_config().final_block, 1 << (n - 1).bit_length())
    _kernels().sum_partials_kernel[(rows,)](partials, out, n, BLOCK=final_block, num_warps=4)
    return out


# -- the ops contract -------------------------------------------------------------------------

def sumsq(tensors: Sequence[Tensor], params: Optional[Sequence[Tensor]] = None, b: int = 0,
          eta: float = 0.0) -> Tensor:
    check_exponents(0, b)
    if b > 0 and params is None:
        raise ValueError("sumsq with b > 0 needs the parameters (T = |w| + eta)")
    lists = (tensors, params) if b else (tensors,)
    launch = _prepare(lists, ("tensors", "params"), ("r", "r"))
    if launch is None:
        device = tensors[0].device if len(tensors) else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=device)
    g_base = launch.bases[0]
    w_base = launch.bases[1] if b else g_base
    with launch.guard():
        partials = torch.empty(launch.grid[0], dtype=torch.float32, device=launch.device)
        _kernels().sumsq_kernel[launch.grid](
            g_base, w_base, *launch.plan_args(), partials, float(eta),
            B=b, **launch.sizes())
        out = _sum_partials(launch, partials, 1, ())
    launch.finish()
    return out


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backups: Sequence[Tensor],
             sumsq: Tensor, rho: float, a: int = 0, b: int = 0, eta: float = 0.0,
             eps: float = 1e-12, ascent: Optional[Sequence[Tensor]] = None,
             ascent_sumsq: Optional[Tensor] = None, seed: Optional[Tensor] = None) -> None:
    check_exponents(a, b)
    has_ascent = ascent is not None
    lists = (params, grads, backups) + ((ascent,) if has_ascent else ())
    launch = _prepare(lists, ("params", "grads", "backups", "ascent"), ("rw", "r", "w", "w"))
    if launch is None:
        return
    sumsq = _device_scalar(sumsq, launch.device, "sumsq")
    normalize = has_ascent and ascent_sumsq is not None
    ascent_sumsq = _device_scalar(ascent_sumsq, launch.device, "ascent_sumsq") if normalize else sumsq
    stochastic = seed is not None and launch.bases[0].dtype != torch.float32
    if stochastic:
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed must be a one-element int64 tensor; got {seed.dtype} of shape {tuple(seed.shape)}")
        seed = _device_scalar(seed, launch.device, "seed")
    w_base, g_base, backup_base = launch.bases[:3]
    ascent_base = launch.bases[3] if has_ascent else w_base
    with launch.guard():
        _kernels().perturb_kernel[launch.grid](
            w_base, g_base, backup_base, ascent_base, *launch.plan_args(), sumsq, ascent_sumsq,
            seed if stochastic else sumsq, float(rho), float(eta), float(eps), A=a, HAS_ASCENT=has_ascent,
            NORMALIZE_ASCENT=normalize, STOCHASTIC=stochastic, **launch.sizes())
    launch.finish()


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    launch = _prepare((params, backups), ("params", "backups"), ("w", "r"))
    if launch is None:
        return
    with launch.guard():
        _kernels().restore_kernel[launch.grid](
            *launch.bases, *launch.plan_args(),
            **launch.sizes())
    launch.finish()


def gsam_reduce(ascent: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    launch = _prepare((ascent, grads), ("ascent", "grads"), ("r", "r"))
    if launch is None:
        device = grads[0].device if len(grads) else torch.device("cpu")
        return torch.zeros(2, dtype=torch.float32, device=device)
    n_programs = launch.grid[0]
    with launch.guard():
        partials = torch.empty(2 * n_programs, dtype=torch.float32, device=launch.device)
        _kernels().gsam_reduce_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), partials, n_programs,
            **launch.sizes())
        out = _sum_partials(launch, partials, 2, (2,))
    launch.finish()
    return out


def gsam_combine_(grads: Sequence[Tensor], ascent: Sequence[Tensor], stats: Tensor, alpha: float,
                  eps: float = 1e-12) -> None:
    launch = _prepare((grads, ascent), ("grads", "ascent"), ("rw", "r"))
    if launch is None:
        return
    stats = _device_scalar(stats, launch.device, "stats")
    with launch.guard():
        _kernels().gsam_combine_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), stats, float(alpha), float(eps),
            **launch.sizes())
    launch.finish()


def accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], scale: float,
                init: bool = False) -> None:
    launch = _prepare((accum, grads), ("accum", "grads"), ("w" if init else "rw", "r"))
    if launch is None:
        return
    with launch.guard():
        _kernels().accumulate_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), float(scale), INIT=bool(init),
            **launch.sizes())
    launch.finish()


# -- fused base steps and the unperturb chain (kernels: fastsam/ops/triton_step_kernels.py) --

_step_kernels_module = None


def _step_kernels():
    """fastsam.ops.triton_step_kernels, imported on first use (after the base kernels)."""
    global _step_kernels_module
    if _step_kernels_module is None:
        _kernels()
        from fastsam.ops import triton_step_kernels
        _step_kernels_module = triton_step_kernels
    return _step_kernels_module


def _step_roles(params, grads, backups, state: list, state_names: list, state_modes: list, ascent, accum):
    """Roles of a step: params (written), sources (backups, or the params), grads, state, [ascent], [accum].

    Without backups the params are their own sources: a strided one's temporary must start as
    a copy of it, since a skipped step (found_inf) writes nothing and the temporary is copied back.
    """
    has_backups = backups is not None
    lists = [params, backups if has_backups else params, grads, *state]
    names = ["params", "backups" if has_backups else "params", "grads", *state_names]
    modes = ["w" if has_backups else "rw", "r", "r", *state_modes]
    roles = {}
    for name, ts in (("ascent", ascent), ("accum", accum)):
        roles[name] = len(lists) if ts is not None else 0
        if ts is not None:
            lists.append(ts)
            names.append(name)
            modes.append("r")
    return lists, names, modes, roles


def _optional_device_scalar(value: Optional[Tensor], device, name: str) -> Optional[Tensor]:
    return _device_scalar(value, device, name).float() if value is not None else None


def _step_scalars(launch, lr, grad_scale, found_inf, gsam_stats) -> tuple:
    device = launch.device
    lr_t = _optional_device_scalar(lr, device, "lr") if isinstance(lr, Tensor) else None
    return (lr_t, _optional_device_scalar(grad_scale, device, "grad_scale"),
            _optional_device_scalar(found_inf, device, "found_inf"),
            _optional_device_scalar(gsam_stats, device, "gsam_stats"))


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Optional[Sequence[Tensor]],
              lr, weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
              nesterov: bool = False, maximize: bool = False, first: bool = False,
              backups: Optional[Sequence[Tensor]] = None, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None, ascent: Optional[Sequence[Tensor]] = None,
              gsam_stats: Optional[Tensor] = None, alpha: float = 0.0, gsam_eps: float = 1e-12,
              accum: Optional[Sequence[Tensor]] = None, accum_scale: float = 1.0) -> None:
    step_args.check_sgd(params, lr, momentum, dampening, nesterov, momentum_buffers)
    step_args.check_chain(ascent, gsam_stats)
    has_momentum = momentum != 0.0
    lists, names, modes, roles = _step_roles(
        params, grads, backups, [momentum_buffers] if has_momentum else [], ["momentum_buffers"],
        # a first step's buffers are written whole, unless it may be skipped (found_inf): then
        # they stay as they were, and a strided one's temporary must start as a copy
        ["w" if first and found_inf is None else "rw"], ascent, accum)
    launch = _prepare(lists, names, modes)
    if launch is None:
        return
    lr_t, scale_t, found_t, stats_t = _step_scalars(launch, lr, grad_scale, found_inf, gsam_stats)
    b = launch.bases
    unused = b[0]
    with launch.guard():
        _step_kernels().sgd_step_kernel[launch.grid](
            b[0], b[1], b[2], b[3] if has_momentum else unused, b[roles["ascent"]], b[roles["accum"]],
            *launch.plan_args(),
            *(t if t is not None else unused for t in (lr_t, scale_t, found_t, stats_t)),
            0.0 if lr_t is not None else float(lr), float(weight_decay), float(momentum), 1.0 - float(dampening),
            float(alpha), float(gsam_eps), float(accum_scale),
            BUF=3 if has_momentum else 0, ASCENT=roles["ascent"], ACCUM_ROLE=roles["accum"],
            GSAM=ascent is not None, ACCUM=accum is not None, GRAD_SCALE=scale_t is not None,
            MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0.0, MOMENTUM=has_momentum,
            FIRST=bool(first), NESTEROV=bool(nesterov), LR_TENSOR=lr_t is not None, FOUND_INF=found_t is not None,
            HAS_BACKUPS=backups is not None, **launch.sizes())
    launch.finish()


def _increment_steps(steps: list, found_inf: Optional[Tensor]) -> None:
    """torch.optim.Adam's ``step_t += 1`` for every parameter, not when GradScaler skips the step."""
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (found_inf.to(steps[0].device) == 0).to(torch.float32))


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Optional[Sequence[Tensor]], steps: Sequence[Tensor],
               lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
               amsgrad: bool = False, maximize: bool = False, decoupled_weight_decay: bool = False,
               backups: Optional[Sequence[Tensor]] = None, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None, ascent: Optional[Sequence[Tensor]] = None,
               gsam_stats: Optional[Tensor] = None, alpha: float = 0.0, gsam_eps: float = 1e-12,
               accum: Optional[Sequence[Tensor]] = None, accum_scale: float = 1.0) -> None:
    step_args.check_adam(params, lr, beta1, beta2, eps, amsgrad, max_exp_avg_sqs, steps)
    step_args.check_chain(ascent, gsam_stats)
    state, state_names = [exp_avgs, exp_avg_sqs], ["exp_avgs", "exp_avg_sqs"]
    if amsgrad:
        state.append(max_exp_avg_sqs)
        state_names.append("max_exp_avg_sqs")
    lists, names, modes, roles = _step_roles(params, grads, backups, state, state_names, ["rw"] * len(state),
                                             ascent, accum)
    launch = _prepare(lists, names, modes)
    steps = list(steps)
    if launch is None:  # nothing to update, but torch counts the step of empty parameters too
        if steps:
            _increment_steps(steps, found_inf)
        return
    lr_t, scale_t, found_t, stats_t = _step_scalars(launch, lr, grad_scale, found_inf, gsam_stats)
    _increment_steps(steps, found_t)
    # per-tensor scalars from the (incremented) counts, as torch computes them (adam_scalars in
    # csrc/base_step_math.h): double from a float lr, fp32 tensor ops with a tensor lr
    kept = steps if launch.entry.table.shape[0] == len(steps) else [s for s, p in zip(steps, params) if p.numel()]
    counts = torch.stack([s.reshape(()) for s in kept]).double()
    bc1 = 1.0 - beta1 ** counts
    if lr_t is not None:
        neg_step_size = -(lr_t / bc1.float())
        decay_t = 1.0 - lr_t * weight_decay
    else:
        neg_step_size = (-(float(lr) / bc1)).float()
        decay_t = None
    per_tensor = torch.stack([neg_step_size, (1.0 - beta2 ** counts).sqrt().float()]).contiguous()
    b = launch.bases
    unused = b[0]
    with launch.guard():
        _step_kernels().adam_step_kernel[launch.grid](
            b[0], b[1], b[2], b[3], b[4], b[5] if amsgrad else unused, b[roles["ascent"]], b[roles["accum"]],
            *launch.plan_args(), per_tensor, len(kept),
            *(t if t is not None else unused for t in (decay_t, scale_t, found_t, stats_t)),
            1.0 - float(lr) * weight_decay if lr_t is None else 0.0, float(weight_decay), 1.0 - beta1, beta2,
            1.0 - beta2, float(eps), float(alpha), float(gsam_eps), float(accum_scale),
            VMAX=5 if amsgrad else 0, ASCENT=roles["ascent"], ACCUM_ROLE=roles["accum"],
            GSAM=ascent is not None, ACCUM=accum is not None, GRAD_SCALE=scale_t is not None,
            MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0.0, DECOUPLED=bool(decoupled_weight_decay),
            AMSGRAD=bool(amsgrad), SMALL_LERP_WEIGHT=abs(1.0 - beta1) < 0.5, DECAY_TENSOR=decay_t is not None,
            FOUND_INF=found_t is not None, HAS_BACKUPS=backups is not None, **launch.sizes())
    launch.finish()


def restore_gsam_reduce(params: Sequence[Tensor], backups: Sequence[Tensor], ascent: Sequence[Tensor],
                        grads: Sequence[Tensor]) -> Tensor:
    launch = _prepare((params, backups, ascent, grads), ("params", "backups", "ascent", "grads"),
                      ("w", "r", "r", "r"))
    if launch is None:
        device = grads[0].device if len(grads) else torch.device("cpu")
        return torch.zeros(2, dtype=torch.float32, device=device)
    n_programs = launch.grid[0]
    with launch.guard():
        partials = torch.empty(2 * n_programs, dtype=torch.float32, device=launch.device)
        _step_kernels().restore_gsam_reduce_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), partials, n_programs, **launch.sizes())
        out = _sum_partials(launch, partials, 2, (2,))
    launch.finish()
    return out


def gsam_combine_accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], ascent: Sequence[Tensor],
                             stats: Tensor, alpha: float, eps: float = 1e-12, scale: float = 1.0,
                             init: bool = False) -> None:
    launch = _prepare((accum, grads, ascent), ("accum", "grads", "ascent"), ("w" if init else "rw", "r", "r"))
    if launch is None:
        return
    stats = _device_scalar(stats, launch.device, "stats")
    with launch.guard():
        _step_kernels().gsam_combine_accumulate_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), stats, float(alpha), float(eps), float(scale), INIT=bool(init),
            **launch.sizes())
    launch.finish()


def restore_accumulate_(params: Sequence[Tensor], backups: Sequence[Tensor], accum: Sequence[Tensor],
                        grads: Sequence[Tensor], scale: float, init: bool = False) -> None:
    launch = _prepare((params, backups, accum, grads), ("params", "backups", "accum", "grads"),
                      ("w", "r", "w" if init else "rw", "r"))
    if launch is None:
        return
    with launch.guard():
        _step_kernels().restore_accumulate_kernel[launch.grid](
            *launch.bases, *launch.plan_args(), float(scale), INIT=bool(init), **launch.sizes())
    launch.finish()

# the efficient variants' ops, on this module's launch machinery (imported last: it uses it)
from fastsam.ops.triton_variants import friendly_direction_, looksam_combine_, looksam_project_  # noqa: E402

BACKEND = backend_from_functions("triton", globals(), unavailable_reason, SUPPORTED_DTYPES)
