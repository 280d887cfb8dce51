"""In-process load: closed-loop threads, or one event loop driving a ``trtserve.pipe()``.

Same windows, stability rule and merged report as runner.py, so in-process and over-the-wire
numbers are directly comparable.

* ``threaded_level``: each thread calls its target (``trtserve.pipe()``, bare onnxruntime)
  in a loop and appends latencies to its own list; the main thread only reads list lengths
  at window boundaries.  Every waiting caller is a Python thread that competes for the GIL
  with the pipeline's instance threads.
* ``PipeDriver``: runner.py's driver interface over a pipe's callback core
  (``Pipeline.submit``), the way the server drives a model: the load comes from one event
  loop thread, and finished items come back through the server's doorbell.  The same
  concurrency then costs one thread instead of one per request in flight.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from trtserve.server.doorbell import Doorbell

from . import logic
from .drivers import Driver
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


class PipeDriver(Driver):
    """A ``trtserve.pipe()`` driven from the event loop, no socket in between.

    ``prepare`` turns input values into the item's ``data``: the lone array of a one-input
    dict (what ``pipe({"data": x})`` callers send), else the dict itself.
    """

    name = "pipe"

    def __init__(self, models: Any) -> None:
        self.models = models
        self.bell: Doorbell | None = None

    async def open(self) -> None:
        self.bell = Doorbell(asyncio.get_running_loop())

    async def close(self) -> None:
        self.bell = None

    def prepare(self, values: dict[str, Any]) -> Any:
        return next(iter(values.values())) if len(values) == 1 else values

    async def infer(self, slot: int, prepared: Any) -> None:
        future = asyncio.get_running_loop().create_future()
        bell = self.bell
        # Runs on the scheduler thread that finished the item: one loop wake-up per burst.
        self.models.pipeline.submit({"data": prepared}, lambda _item, error: bell.post(_settle, future, error))
        error = await future
        if error is not None:
            raise error

    async def statistics(self, model: str) -> dict[str, Any] | None:
        return pipe_statistics(self.models)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():  # a level being stopped may have cancelled the waiting task
        future.set_result(error)
