"""Microbenchmarks: matmul GFLOPS and memory bandwidth, under two seconds together.

Fixed problem sizes; each figure is the best of several repeats (at least ``MIN_REPEATS``,
then more while the repeat budget lasts, up to a cap), the run least disturbed by other
processes. A BLAS thread that loses its core to another process slows every product ~20x:
``load_avg`` records how busy the machine was. numpy is optional: without it the matmul is a
pure-Python loop on one core, reported as ``method="python"`` so nobody mistakes it for BLAS.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .model import BenchResult

__all__ = ["bench_matmul", "bench_memory", "run_benchmarks", "matmul_method", "numpy_or_none"]

log = logging.getLogger(__name__)

NUMPY_N = 512  # 2 * 512^3 = 0.27 GFLOP per product
PYTHON_N = 64  # 0.5 MFLOP: a pure-Python loop is ~1000x slower than BLAS
MIN_REPEATS = 3
MATMUL_REPEATS = 40  # cap; a 512^3 product takes ~1 ms on a desktop, ~50 ms on a Pi 4
MATMUL_BUDGET = 0.4  # seconds of repeats after the minimum
MEM_BUFFER_MB = 128  # larger than the last-level cache of most CPUs
MEM_REPEATS = 8
MEM_BUDGET = 0.3


def numpy_or_none() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def matmul_method() -> str:
    return "numpy" if numpy_or_none() is not None else "python"


def _best(fn: Any, repeats: int, budget: float) -> float:
    """Fastest of at least min(MIN_REPEATS, repeats) timed runs, more while budget lasts."""
    fn()  # warm-up: page faults, BLAS thread start
    best = float("inf")
    start = time.perf_counter()
    for i in range(repeats):
        if i >= MIN_REPEATS and time.perf_counter() - start > budget:
            break
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def bench_matmul(
    prefer_numpy: bool = True, repeats: int = MATMUL_REPEATS
) -> tuple[float, str, int]:
    """(GFLOPS, method, n) of an n x n float32 matmul (float64 lists without numpy)."""
    np = numpy_or_none() if prefer_numpy else None
    if np is not None:
        n = NUMPY_N
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        out = np.empty((n, n), dtype=np.float32)
        seconds = _best(lambda: np.matmul(a, b, out=out), repeats, MATMUL_BUDGET)
        return 2 * n**3 / seconds / 1e9, "numpy", n
    n = PYTHON_N
    a_rows = [[float((i * n + j) % 7 - 3) for j in range(n)] for i in range(n)]
    b_cols = [[float((i + 2 * j) % 5 - 2) for i in range(n)] for j in range(n)]

    def product() -> list[list[float]]:
        return [[sum(x * y for x, y in zip(r, c, strict=True)) for c in b_cols] for r in a_rows]

    seconds = _best(product, min(repeats, MIN_REPEATS), MATMUL_BUDGET)
    return 2 * n**3 / seconds / 1e9, "python", n


def bench_memory(buffer_mb: int = MEM_BUFFER_MB, repeats: int = MEM_REPEATS) -> float:
    """memcpy bandwidth in GB/s, counting bytes read plus bytes written (as STREAM's copy)."""
    size = buffer_mb << 20
    # written in full first, so the copy reads real pages and not the shared zero page
    src = bytearray(bytes(range(256)) * (size // 256))
    dst = bytearray(size)
    view = memoryview(dst)

    def copy() -> None:
        view[:] = src

    seconds = _best(copy, repeats, MEM_BUDGET)
    view.release()
    return 2 * size / seconds / 1e9


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on Windows
        return None


def run_benchmarks() -> BenchResult:
    load = _load_avg()
    t0 = time.perf_counter()
    gflops, method, n = bench_matmul()
    gbps = bench_memory()
    seconds = time.perf_counter() - t0
    log.info("benchmarks: %.1f GFLOPS (%s), %.1f GB/s in %.2f s", gflops, method, gbps, seconds)
    return BenchResult(
        matmul_gflops=round(gflops, 3),
        matmul_method=method,
        matmul_n=n,
        mem_bandwidth_gbps=round(gbps, 3),
        mem_buffer_mb=MEM_BUFFER_MB,
        seconds=round(seconds, 3),
        load_avg=load,
    )
