"""A closed loop of Python threads, one request in flight per thread: the simplest load."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


def closed_loop(call: Callable[[int], None], concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` threads each call ``call(thread_index)`` back to back for ``seconds``."""
    stop = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []

    def worker(i: int) -> None:
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                call(i)
                latencies[i].append(time.perf_counter() - t0)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    flat = sorted(x for per in latencies for x in per)
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]}")
    return {
        "per_s": len(flat) / elapsed,
        "p50_ms": flat[len(flat) // 2] * 1e3 if flat else float("nan"),
        "p99_ms": flat[min(len(flat) - 1, int(len(flat) * 0.99))] * 1e3 if flat else float("nan"),
        "count": len(flat),
    }
