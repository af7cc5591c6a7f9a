"""Timing primitives shared by the kernel and model benchmarks.

* CUDA kernels: :func:`triton.testing.do_bench` (L2 flushed between runs, CUDA events), median and
  20/80 % quantiles.
* CUDA latency: one CUDA event pair per run, synchronised after each run (a request is served
  before the next starts, so CPU launch overhead counts, as it does for a user at batch 1),
  ``runs`` samples after ``warmup`` runs (P50/P95/P99).
* CPU: synchronous wall clock (``time.perf_counter``) with the same statistics; only ever used for
  smoke runs at tiny sizes and labelled as CPU everywhere.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def percentile(samples: List[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of ``samples``."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("percentile of no samples")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bench_kernel(fn: Callable[[], object], device: str, warmup_ms: int = 25, rep_ms: int = 100,
                 cpu_reps: int = 5) -> Dict[str, float]:
    """``{"time_ms": median, "p20_ms", "p80_ms"}`` of one call of ``fn``."""
    if str(device).startswith("cuda"):
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                quantiles=[0.5, 0.2, 0.8])
        return {"time_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80)}
    fn()  # warm-up (first-call costs: allocation, compilation)
    samples = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"time_ms": statistics.median(samples), "p20_ms": percentile(samples, 20),
            "p80_ms": percentile(samples, 80)}


def latency_samples(fn: Callable[[], object], device: str, runs: int, warmup: int) -> List[float]:
    """Per-run latency in ms of ``fn`` (synchronised), after ``warmup`` untimed runs."""
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
            e.synchronize()  # one request at a time: launch overhead counts, no queueing
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def latency_stats(samples: List[float]) -> Dict[str, float]:
    return {"p50_ms": percentile(samples, 50), "p95_ms": percentile(samples, 95),
            "p99_ms": percentile(samples, 99), "mean_ms": statistics.fmean(samples)}


def measured_copy_gbps(device: str, nbytes: int = 1 << 30) -> Optional[float]:
    """Device-to-device copy bandwidth (read + write bytes / time), for GPUs not in the peak
    table. The buffer (1 GiB default) is far larger than any L2."""
    if not str(device).startswith("cuda"):
        return None
    import triton.testing

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def reset_peak_memory(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> Optional[float]:
    """Peak allocated CUDA memory since the last reset (None on CPU: not measured)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def progress(iterable, desc: str, total: Optional[int] = None, enable: bool = True):
    """Progress over ``iterable``: a tqdm bar on a terminal, plain periodic lines on stderr when
    it is not one (logs); the bare iterable when not ``enable`` or ``TILEFUSE_NO_PROGRESS``."""
    if not enable or os.environ.get("TILEFUSE_NO_PROGRESS"):
        return iterable
    from tilefuse._progress import iterate

    return iterate(iterable, desc, total=total)


@contextlib.contextmanager
def torch_backend_on_cpu(device: str):
    """On CPU the harness measures the torch reference path (``TILEFUSE_BACKEND=torch``), not
    the Triton interpreter, whatever ``TRITON_INTERPRET`` says; on CUDA nothing changes."""
    if str(device).startswith("cuda"):
        yield
        return
    old = os.environ.get("TILEFUSE_BACKEND")
    os.environ["TILEFUSE_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TILEFUSE_BACKEND", None)
        else:
            os.environ["TILEFUSE_BACKEND"] = old


class Budget:
    """Wall-clock budget of a bench run (``None``/0: unbounded). Work whose turn comes after it is
    spent is reported as skipped in the report's ``errors``, not run."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if not seconds else time.monotonic() + seconds

    def left(self) -> bool:
        return self.end is None or time.monotonic() < self.end

    def skip(self, rep: Dict, where: str) -> bool:
        """True, with ``where`` reported as skipped in ``rep``, once the budget is spent."""
        if self.left():
            return False
        rep["errors"].append({"where": where, "error": "skipped: time budget spent"})
        return True
