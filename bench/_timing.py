"""Timing shared by the benchmarks that time a callable themselves (beside pytest-benchmark's own)."""
import statistics
import time


def median_seconds(fn, repeat=3):
    """Median wall time of `repeat` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
