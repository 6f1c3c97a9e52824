"""The one timing loop the benchmarks share: best wall time of a jitted call."""

from __future__ import annotations

import time

import jax


def best_seconds(fn, args, iters: int) -> float:
    """Seconds of the fastest of `iters` calls `fn(*args)`, after one compile/warm-up call.

    The fastest, not the mean: on a shared machine the least disturbed run is the
    closest to the program's own cost.
    """
    jax.block_until_ready(fn(*args))
    best = float('inf')
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best
