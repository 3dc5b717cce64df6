"""The timing engine shared by the CLI (fastsam.bench.cli) and the pytest-benchmark suite.

How a number is made (in the spirit of triton.testing.do_bench, written for CPU and CUDA):
warm up (at least ``warmup_calls`` calls and ``warmup_s`` seconds, each call synchronised,
which also estimates one call's time), choose the repetitions that fill ``budget_s``
(clamped to ``[min_reps, max_reps]``), then time every repetition on its own: CUDA events
around each call on the GPU, with the L2 cache overwritten before each one (not timed), or
``time.perf_counter`` on the CPU, whose ops are synchronous. Report the median and the 20th
and 80th percentiles. The implementations compared on one item are timed interleaved
(``Timer.measure_many``): each keeps its own number of repetitions, spread evenly over the
whole measurement. Achieved bandwidth counts only the bytes a SAM sub-step must move
(docs/DESIGN.md: 28N bytes per fp32 sub-step) and is compared with a large device-to-device copy
measured by the same engine, on the same device, in the same run.

Besides fastsam's backends, a run can time peer baselines (fastsam.bench.peers: other
implementations' SAM sub-steps, on the same tensors) and the host-time items
(fastsam.bench.host: a sub-step through ``fastsam.SAM`` against its kernels alone).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from typing import Callable, Optional

import torch

from fastsam.bench import host, peers
from fastsam.bench.workloads import TensorSet

# -- what is measured, and how many bytes it must move ---------------------------------------
# Bytes per parameter, in units of the tensors' element size (4 for fp32, 2 for bf16): every
# operand read once and every result written once, nothing else (docs/DESIGN.md, "The floor").
#   sumsq         reads g                                          1
#   perturb_      reads w, g; writes w, backup                     4
#   restore_      reads backup; writes w                           2
#   gsam_reduce   reads g_asc, g_p                                 2
#   gsam_combine_ reads g_p, g_asc; writes g_p                     3
#   accumulate_   reads accum, g; writes accum (init=False)        3
# A SAM sub-step is sumsq + perturb_ + restore_: 1 + 4 + 2 = 7 -> 28N bytes in fp32. A GSAM
# sub-step also writes the ascent copy in perturb_ (+1) and runs gsam_reduce and
# gsam_combine_ (+5): 13 -> 52N bytes, i.e. GSAM adds 24N (docs/DESIGN.md, "The byte floor").


@dataclasses.dataclass(frozen=True)
class Item:
    name: str
    units: int  # bytes per parameter / element size
    description: str


ITEMS: dict[str, Item] = {i.name: i for i in (
    Item("sumsq", 1, "global sum of squares of g"),
    Item("perturb_", 4, "backup <- w; w <- w + rho g/||g||"),
    Item("restore_", 2, "w <- backup"),
    Item("gsam_reduce", 2, "<g_asc, g_p> and ||g_p||^2"),
    Item("gsam_combine_", 3, "g_p <- g_p - alpha g_perp"),
    Item("accumulate_", 3, "accum <- accum + s g"),
    Item("sam_substep", 7, "SAM sub-step: sumsq + perturb_ + restore_"),
    Item("gsam_substep", 13, "GSAM sub-step: sumsq + perturb_(ascent) + restore_ + gsam_reduce + gsam_combine_"),
    Item("optimizer_substep", 7, "SAM sub-step through fastsam.SAM: first_step + second_step, no-op base step"),
    Item("kernels_substep", 7, "the same sub-step's kernels called directly (fastsam._C for cpp/cuda)"),
)}
OP_ITEMS = ("sumsq", "perturb_", "restore_", "gsam_reduce", "gsam_combine_", "accumulate_")
STEP_ITEMS = ("sam_substep", "gsam_substep")
HOST_ITEMS = host.ITEMS
RHO, ALPHA, ACCUM_SCALE = 0.05, 0.1, 0.25


def bytes_moved(item: str, numel: int, element_size: int) -> int:
    """Bytes ``item`` must move for ``numel`` parameters of ``element_size`` bytes (the floor)."""
    return ITEMS[item].units * numel * element_size


def make_call(item: str, backend, ts: TensorSet) -> Callable[[], object]:
    """A no-argument function that runs ``item`` once with ``backend`` on the buffers of ``ts``.

    Repeating a call is safe: perturb_ and accumulate_ on their own drift the values by a
    small amount per call, gsam_combine_ by alpha times the ascent gradient; nothing
    overflows in thousands of calls. Scalars (sumsq, GSAM statistics) that a timed op
    consumes are computed once, before timing, by the same backend.
    """
    if item in HOST_ITEMS:
        return host.make_call(item, backend.name, backend, ts, RHO)
    b, w, g, bk, asc, acc = backend, ts.params, ts.grads, ts.backups, ts.ascent, ts.accum
    if item == "sumsq":
        return lambda: b.sumsq(g)
    if item == "perturb_":
        s = b.sumsq(g)
        return lambda: b.perturb_(w, g, bk, s, RHO)
    if item == "restore_":
        return lambda: b.restore_(w, bk)
    if item == "gsam_reduce":
        return lambda: b.gsam_reduce(asc, g)
    if item == "gsam_combine_":
        stats = b.gsam_reduce(asc, g)
        return lambda: b.gsam_combine_(g, asc, stats, ALPHA)
    if item == "accumulate_":
        return lambda: b.accumulate_(acc, g, ACCUM_SCALE, init=False)
    if item == "sam_substep":
        def sam_substep():
            s = b.sumsq(g)
            b.perturb_(w, g, bk, s, RHO)
            b.restore_(w, bk)
        return sam_substep
    if item == "gsam_substep":
        def gsam_substep():
            s = b.sumsq(g)
            b.perturb_(w, g, bk, s, RHO, ascent=asc)
            b.restore_(w, bk)
            stats = b.gsam_reduce(asc, g)
            b.gsam_combine_(g, asc, stats, ALPHA)
        return gsam_substep
    raise ValueError(f"unknown item {item!r}; choose from {', '.join(ITEMS)}")


# -- timing ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """How long to warm up and how many repetitions to time."""

    warmup_calls: int  # warm up with at least this many calls ...
    warmup_s: float  # ... and for at least this long,
    warmup_cap_s: float  # but stop after this long once min(2, warmup_calls) calls are done
    budget_s: float  # timed repetitions: as many as fill this time,
    min_reps: int  # at least this many,
    max_reps: int  # at most this many,
    max_time_s: float  # and fewer (never below 3) where min_reps would take longer than this
    flush_mib: int  # L2 flush buffer written before each timed call (0 = none)
    copy_mib: int  # size of each buffer of the copy-bandwidth measurement

    @staticmethod
    def for_device(device: torch.device, quick: bool = False) -> "Settings":
        if device.type == "cuda":
            # A per-tensor loop over 4096 tensors (reference on 'tiny') takes ~0.1-2 s per
            # call on a GPU: max_time_s keeps such a measurement to a few seconds.
            if quick:
                return Settings(2, 0.005, 0.2, 0.02, 5, 100, 0.5, 256, 256)
            return Settings(3, 0.025, 0.5, 0.1, 10, 1000, 1.0, 256, 1024)
        # CPU: ops on 100M parameters take seconds here, so few repetitions there (never
        # fewer than 3, for a median and a spread) and no cache flush (a few MiB of flush
        # cannot empty a server CPU's caches; see benchmarks/README.md on the tiny
        # workload). At least 5 repetitions and ~1 s each elsewhere: with 3 the median of a
        # 130 ms reference call moved by 50% between back-to-back runs on a quiet 2-vCPU VM.
        if quick:
            return Settings(1, 0.0, 0.0, 0.02, 2, 20, 1.0, 0, 64)
        return Settings(1, 0.05, 0.5, 1.0, 5, 200, 5.0, 0, 256)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Times of the repetitions of one measurement, in milliseconds."""

    times_ms: tuple

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    def quantile(self, q: float) -> float:
        return quantile(self.times_ms, q)

    @property
    def median_ms(self) -> float:
        return self.quantile(0.5)

    @property
    def p20_ms(self) -> float:
        return self.quantile(0.2)

    @property
    def p80_ms(self) -> float:
        return self.quantile(0.8)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def spread_pct(self) -> float:
        """(p80 - p20) / median, in percent: how much the repetitions disagree."""
        median = self.median_ms
        return 100.0 * (self.p80_ms - self.p20_ms) / median if median > 0 else float("nan")

    def summary(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "min_ms": self.min_ms, "reps": self.reps, "spread_pct": self.spread_pct}


def quantile(values, q: float) -> float:
    """The q-quantile of ``values`` with linear interpolation (numpy's default method)."""
    data = sorted(values)
    if not data:
        raise ValueError("quantile of no values")
    pos = q * (len(data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class Timer:
    """Times no-argument functions on one device (see the module docstring)."""

    def __init__(self, device, settings: Optional[Settings] = None, quick: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.settings = settings or Settings.for_device(self.device, quick)
        self._flush = None
        if self.device.type == "cuda" and self.settings.flush_mib:
            self._flush = torch.empty(self.settings.flush_mib << 20, dtype=torch.uint8, device=self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _synced_call_s(self, fn) -> float:
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def calibrate(self, fn: Callable[[], object]) -> tuple[int, float]:
        """Warm ``fn`` up; return (repetitions to time, estimated seconds per call).

        The first call may include one-off work (a JIT compile, first-touch page faults):
        where ``warmup_calls`` >= 2 (the GPU settings) at least two calls are made, and
        the estimate comes from the later half of the warm-up calls.
        """
        s = self.settings
        self.sync()
        times: list[float] = []
        started = time.perf_counter()
        while True:
            times.append(self._synced_call_s(fn))
            elapsed = time.perf_counter() - started
            if len(times) < min(2, s.warmup_calls):
                continue
            enough_calls = len(times) >= s.warmup_calls or elapsed >= s.warmup_cap_s
            if (enough_calls and elapsed >= s.warmup_s) or len(times) >= 1000:
                break
        estimate = quantile(times[len(times) // 2:], 0.5)
        reps = int(s.budget_s / estimate) if estimate > 0 else s.max_reps
        reps = max(s.min_reps, min(s.max_reps, reps))
        if estimate > 0 and reps * estimate > s.max_time_s:
            reps = max(min(3, reps), min(reps, int(s.max_time_s / estimate)))
        return reps, estimate

    def measure(self, fn: Callable[[], object], reps: Optional[int] = None) -> Timing:
        """Warm up (unless ``reps`` is given), then time ``reps`` calls one by one."""
        if reps is None:
            reps, _ = self.calibrate(fn)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if self.device.type == "cuda":
                times = self._time_cuda(fn, reps)
            else:
                times = self._time_host(fn, reps)
        finally:
            if gc_was_enabled:
                gc.enable()
        return Timing(tuple(times))

    def measure_many(self, fns: list) -> list:
        """Warm each of ``fns`` up, then time them all in one interleaved sequence: a Timing
        each, or the exception that function raised (the others go on).

        Each keeps the repetitions its own calibration chose; the next call is always the
        one furthest behind on its own repetitions, so every function's calls are spread
        evenly over the whole measurement and a change of machine load falls on all of them
        alike (on a shared 2-core machine, timing backends one after the other moved their
        medians by up to 2x against each other between runs).
        """
        plan: list = []
        for fn in fns:
            try:
                plan.append(self.calibrate(fn)[0])
            except Exception as exc:  # noqa: BLE001 -- reported in that function's row
                plan.append(exc)
        times: list[list[float]] = [[] for _ in fns]
        active = [i for i, p in enumerate(plan) if not isinstance(p, Exception)]
        one = (lambda fn: self._time_cuda(fn, 1)[0]) if self.device.type == "cuda" else (lambda fn: self._time_host(fn, 1)[0])
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            while active:
                i = min(active, key=lambda j: len(times[j]) / plan[j])
                try:
                    times[i].append(one(fns[i]))
                except Exception as exc:  # noqa: BLE001
                    plan[i] = exc
                if isinstance(plan[i], Exception) or len(times[i]) >= plan[i]:
                    active.remove(i)
        finally:
            if gc_was_enabled:
                gc.enable()
        return [p if isinstance(p, Exception) else Timing(tuple(t)) for p, t in zip(plan, times)]

    def enqueue_times(self, fn: Callable[[], object], estimate_ms: float) -> dict:
        """GPU host time: ``fn`` called back to back without waiting for the device.

        host_ms: the time to queue one call (calls queued / their number); wall_ms: the time
        per call including the final wait for the device. ``calls`` fill ~20 ms (1 to 50),
        in 5 rounds (3 in quick mode or where 5 would take over a second); median, p20, p80
        of the rounds' host_ms and the median wall_ms. On the CPU both are the call's time.
        """
        calls = max(1, min(50, int(20.0 / estimate_ms))) if estimate_ms > 0 else 50
        rounds = 3 if self.settings.min_reps < 5 or 5 * calls * estimate_ms > 1e3 else 5
        hosts, walls = [], []
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(rounds):
                self.sync()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                queued = time.perf_counter()
                self.sync()
                done = time.perf_counter()
                hosts.append((queued - start) / calls * 1e3)
                walls.append((done - start) / calls * 1e3)
        finally:
            if gc_was_enabled:
                gc.enable()
        return {"host_ms": quantile(hosts, 0.5), "host_p20_ms": quantile(hosts, 0.2),
                "host_p80_ms": quantile(hosts, 0.8), "wall_ms": quantile(walls, 0.5)}

    def _time_cuda(self, fn, reps: int) -> list[float]:
        with torch.cuda.device(self.device):  # events and flush on the measured device's stream
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            self.sync()
            for start, end in zip(starts, ends):
                if self._flush is not None:
                    self._flush.zero_()
                start.record()
                fn()
                end.record()
            self.sync()
            return [start.elapsed_time(end) for start, end in zip(starts, ends)]

    def _time_host(self, fn, reps: int) -> list[float]:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def copy_bandwidth(self) -> dict:
        """Bandwidth of a large copy on this device: (bytes read + bytes written) / median time."""
        n = (self.settings.copy_mib << 20) // 4
        src = torch.ones(n, dtype=torch.float32, device=self.device)
        dst = torch.zeros_like(src)
        timing = self.measure(lambda: dst.copy_(src))
        moved = 2 * src.numel() * src.element_size()
        del src, dst
        return {"bytes": moved, "GBps": gbps(moved, timing.median_ms), **timing.summary()}


def gbps(nbytes: int, ms: float) -> float:
    """Bytes over milliseconds, in GB/s (10^9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


# -- one workload, every backend ---------------------------------------------------------------

TIMING_KEYS = ("median_ms", "p20_ms", "p80_ms", "min_ms", "reps", "spread_pct")
HOST_TIMING_KEYS = ("host_ms", "host_p20_ms", "host_p80_ms", "wall_ms")
# Every row has every key (None where it does not apply), so JSON and CSV rows line up.
ROW_KEYS = ("workload", "backend", "kind", "item", "dtype", "numel", "tensors", "bytes", *TIMING_KEYS,
            *HOST_TIMING_KEYS, "error", "GBps", "pct_copy_bw", "speedup_vs_reference", "speedup_vs_foreach",
            "best_peer", "speedup_vs_best_peer", *host.SUMMARY_KEYS)


def derive(row: dict, copy_gbps: float) -> dict:
    """Add achieved bandwidth and % of the copy bandwidth to a row with 'bytes' and 'median_ms'."""
    if row.get("median_ms") is None:
        row["GBps"] = row["pct_copy_bw"] = None
        return row
    row["GBps"] = gbps(row["bytes"], row["median_ms"])
    row["pct_copy_bw"] = 100.0 * row["GBps"] / copy_gbps if copy_gbps > 0 else float("nan")
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<base> = median of <base> / median of the row, for the same workload and item;
    best_peer = the fastest peer there and speedup_vs_best_peer = its median / the row's."""
    medians = {(r["workload"], r["item"], r["backend"]): r["median_ms"] for r in rows}
    best: dict = {}
    for r in rows:
        if r.get("kind") == "peer" and r["median_ms"]:
            key = (r["workload"], r["item"])
            if key not in best or r["median_ms"] < best[key][1]:
                best[key] = (r["backend"], r["median_ms"])
    for r in rows:
        mine = r["median_ms"]
        for base in ("reference", "foreach"):
            other = medians.get((r["workload"], r["item"], base))
            r[f"speedup_vs_{base}"] = other / mine if other and mine else None
        peer, peer_ms = best.get((r["workload"], r["item"]), (None, None))
        r["best_peer"] = peer
        r["speedup_vs_best_peer"] = peer_ms / mine if peer_ms and mine else None


def finish_rows(rows: list[dict], device_type: str) -> None:
    """The derived columns of a whole run: speed-ups, best peers, and the host-time summary and goals."""
    add_speedups(rows)
    host.summarize(rows, device_type)


def run_workload(timer: Timer, workload, backends: dict, items, dtype: torch.dtype, copy_gbps: float,
                 progress: Optional[Callable[[str], None]] = None, with_peers: bool = False) -> list[dict]:
    """Measure every item with every backend (and peer) on one workload."""
    return list(iter_workload(timer, workload, backends, items, dtype, copy_gbps, progress, with_peers))


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def iter_workload(timer: Timer, workload, backends: dict, items, dtype: torch.dtype, copy_gbps: float,
                  progress: Optional[Callable[[str], None]] = None, with_peers: bool = False):
    """Yield one row per (item, backend or peer), item by item (an interrupted run keeps the items done).

    On each item, every backend (and, with ``with_peers``, every peer that has that
    sub-step: peer:loop has no GSAM) is timed in one interleaved measurement
    (``Timer.measure_many``), so a change in machine load falls on all of them alike. The
    host items are one such measurement when the first of them is reached: every backend's
    optimizer and kernels sub-steps. A backend that raises does not end the run: its row
    carries ``error`` and no timing, so that one broken kernel cannot lose the other
    backends' numbers.
    """
    ts = TensorSet(workload, timer.device, dtype)
    peer_set = peers.make_peers() if with_peers else {}
    host_items = [i for i in items if i in HOST_ITEMS]

    def new_row(name: str, kind: str, item: str) -> dict:
        row = dict.fromkeys(ROW_KEYS)
        row.update(workload=workload.name, backend=name, kind=kind, item=item,
                   dtype=str(dtype).replace("torch.", ""), numel=ts.numel, tensors=len(ts.params),
                   bytes=bytes_moved(item, ts.numel, ts.element_size))
        return row

    def finished(row: dict) -> dict:
        derive(row, copy_gbps)
        if progress is not None:
            label = f"{workload.name:9s} {row['backend']:16s} {row['item']:17s}"
            if row["error"]:
                progress(f"{label} FAILED: {row['error']}")
            else:
                host_time = f", host {row['host_ms'] * 1e3:.0f} us" if row["host_ms"] is not None else ""
                progress(f"{label} {row['median_ms']:10.3f} ms ({row['pct_copy_bw']:5.1f}% of copy bw, "
                         f"{row['reps']} reps{host_time})")
        return row

    for item in items:
        if item in HOST_ITEMS:
            if item == host_items[0]:
                yield from _host_rows(timer, ts, backends, host_items, new_row, finished)
            continue
        entries = [(new_row(name, "backend", item), lambda b=backend: make_call(item, b, ts))
                   for name, backend in backends.items()]
        entries += [(new_row(name, "peer", item), lambda p=peer_set[name]: peers.make_call(item, p, ts, RHO, ALPHA))
                    for name in (peers.peers_for(item) if with_peers else [])]
        rows, fns = [], []
        for row, make in entries:
            try:
                fns.append(make())
                rows.append(row)
            except Exception as exc:  # recorded in the row; the caller decides the exit status
                row["error"] = _error(exc)
                yield finished(row)
        _fill(rows, timer.measure_many(fns))
        for row in rows:
            yield finished(row)
    del ts, peer_set
    if timer.device.type == "cuda":
        torch.cuda.empty_cache()


def _fill(rows: list[dict], timings: list) -> None:
    for row, timing in zip(rows, timings):
        if isinstance(timing, Exception):
            row["error"] = _error(timing)
        else:
            row.update(timing.summary())


def _host_rows(timer: Timer, ts: TensorSet, backends: dict, items: list, new_row, finished):
    """The host items' rows of every backend, timed in one interleaved measurement (on a GPU
    followed by each call's host time)."""
    rows, fns = [], []
    for backend_name, backend in backends.items():
        mine = [new_row(backend_name, "backend", item) for item in items]
        try:
            calls = host.make_calls(backend_name, backend, ts, RHO)
        except Exception as exc:
            for row in mine:
                row["error"] = _error(exc)
                yield finished(row)
            continue
        rows += mine
        fns += [calls[item] for item in items]
    _fill(rows, timer.measure_many(fns))
    if timer.device.type == "cuda":
        for row, fn in zip(rows, fns):
            if row["error"] is None:
                try:
                    row.update(timer.enqueue_times(fn, row["median_ms"]))
                except Exception as exc:
                    row["error"] = _error(exc)
    for row in rows:
        yield finished(row)
