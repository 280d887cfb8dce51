"""Closed-loop load from threads, for in-process targets (``trtserve.pipe()``, bare onnxruntime).

Same windows, stability rule and merged report as runner.py, so in-process and over-the-wire
numbers are directly comparable.  Each thread calls its target in a loop and appends
latencies to its own list; the main thread only reads list lengths at window boundaries.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable

from . import logic
from .runner import Settings, Window, merge


class _Worker(threading.Thread):
    def __init__(self, call: Callable[[], Any], stop: threading.Event, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.call, self.stop = call, stop
        self.latencies: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        call, latencies, clock = self.call, self.latencies, time.perf_counter_ns
        try:
            while not self.stop.is_set():
                start = clock()
                call()
                latencies.append(clock() - start)
        except BaseException as exc:  # reported by the main thread, which then stops the level
            self.error = exc


def threaded_level(
    make_call: Callable[[int], Callable[[], Any]],
    concurrency: int,
    settings: Settings,
    statistics: Callable[[], dict[str, Any] | None] | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """``concurrency`` threads, thread i calling ``make_call(i)()`` back to back.

    ``statistics`` (optional) returns a trtserve-shaped statistics entry, for the queue and
    compute breakdown.  Raises the first error a call raised.
    """
    stop = threading.Event()
    workers = [_Worker(make_call(i), stop, f"bench-{i}") for i in range(concurrency)]
    for worker in workers:
        worker.start()
    try:
        windows = _windows(workers, settings, statistics or (lambda: None))
    finally:
        stop.set()
        for worker in workers:
            worker.join(settings.drain_s)
    stable = logic.is_stable([w.throughput for w in windows], settings.stable_windows, settings.stability)
    row = {"label": label or f"c={concurrency}", "concurrency": concurrency, "stable": stable}
    row.update(merge(windows, settings.stable_windows))
    return row


def _windows(workers: list[_Worker], settings: Settings, statistics: Callable[[], Any]) -> list[Window]:
    time.sleep(settings.warmup_s)
    marks = [len(w.latencies) for w in workers]
    windows: list[Window] = []
    stats = statistics()
    while True:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        time.sleep(settings.window_s)
        ends = [len(w.latencies) for w in workers]
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        failed = next((w.error for w in workers if w.error is not None), None)
        if failed is not None:
            raise failed
        latencies = [v for w, a, b in zip(workers, marks, ends) for v in w.latencies[a:b]]
        after = statistics()
        windows.append(Window(wall, cpu, latencies, [], Counter(), stats, after))
        marks, stats = ends, after
        if logic.should_stop(
            [w.throughput for w in windows], settings.max_windows, windows=settings.stable_windows, tolerance=settings.stability
        ):
            return windows


def pipe_statistics(models: Any) -> dict[str, Any]:
    """A ``trtserve.pipe()``'s counters in the statistics op's shape (last node's batches)."""
    pipeline = models.pipeline
    entry = pipeline.stats.snapshot()
    entry["batch_sizes"] = pipeline.nodes[-1].stats.snapshot()["batch_sizes"]
    return entry
