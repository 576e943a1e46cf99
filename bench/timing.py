"""Timing helpers the benchmarks share: A and B in turns, medians compared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(a: Callable[[], float], b: Callable[[], float], rounds: int) -> tuple[float, float]:
    """Run a and b in turns; median of each."""
    xs, ys = [], []
    for _ in range(rounds):
        xs.append(a())
        ys.append(b())
    return statistics.median(xs), statistics.median(ys)


def per_op_us(fn: Callable[[int], None], n: int) -> float:
    """Microseconds per call of ``fn(i)`` over ``n`` calls."""
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - started) / n * 1e6
