"""The measurement engine: closed-loop concurrency or open-loop request rate, in windows.

One load level runs like perf_analyzer's: warm up, then measure fixed-length windows until
the last three windows' throughputs agree within 10% (or ``max_windows`` is reached), and
report the merged last three windows.  Latency is per request, from send to decoded
answer.  Server-side queue/compute time per request comes from statistics snapshots taken
at the window boundaries.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import logic
from .drivers import Driver


@dataclass
class Settings:
    window_s: float = 1.0
    max_windows: int = 10
    stability: float = logic.STABILITY_TOLERANCE
    stable_windows: int = logic.STABILITY_WINDOWS
    warmup_s: float = 0.5
    max_inflight: int = 4096  # rate mode: open-loop sends stall (and show lag) beyond this
    arrival: str = "constant"
    seed: int = 0
    drain_s: float = 10.0  # how long stopping waits for requests still in flight


class Recorder:
    """Completions of the current window; ``swap`` hands them over and starts the next."""

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.lags: list[float] = []
        self.errors: Counter[str] = Counter()
        self.first_error: BaseException | None = None

    def ok(self, latency_ns: int) -> None:
        self.latencies.append(latency_ns)

    def fail(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1
        if self.first_error is None:
            self.first_error = exc

    def swap(self) -> tuple[list[int], list[float], Counter[str]]:
        taken = (self.latencies, self.lags, self.errors)
        self.latencies, self.lags, self.errors = [], [], Counter()
        return taken


@dataclass
class Window:
    wall_s: float
    cpu_s: float
    latencies: list[int]
    lags: list[float]
    errors: Counter
    stats_before: dict[str, Any] | None
    stats_after: dict[str, Any] | None

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s > 0 else 0.0


class Level:
    """One load level: the load tasks, the recorder, and the window loop around them."""

    def __init__(self, driver: Driver, model: str, requests: list[Any], settings: Settings, label: str) -> None:
        if not requests:
            raise ValueError("no request inputs to send")
        self.driver, self.model, self.requests = driver, model, requests
        self.settings, self.label = settings, label
        self.recorder = Recorder()
        self.stopping = False
        self.tasks: list[asyncio.Task] = []
        self.next_request = itertools.cycle(range(len(requests))).__next__

    async def one(self, slot: int) -> None:
        prepared = self.requests[self.next_request()]
        start = time.perf_counter_ns()
        try:
            await self.driver.infer(slot, prepared)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.recorder.fail(exc)
            # A driver that fails without suspending (a dead connection) would otherwise spin
            # this worker forever and starve the window timer: give the loop a turn.
            await asyncio.sleep(0)
        else:
            self.recorder.ok(time.perf_counter_ns() - start)

    async def closed_loop(self, slot: int) -> None:
        while not self.stopping:
            await self.one(slot)

    async def open_loop(self, rate: float) -> None:
        """Send on the arrival schedule; overdue sends go out at once (and record their lag)."""
        limit = asyncio.Semaphore(self.settings.max_inflight)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task] = set()
        for slot, offset in enumerate(logic.arrival_offsets(rate, self.settings.arrival, self.settings.seed)):
            if self.stopping:
                break
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await limit.acquire()
            self.recorder.lags.append(time.perf_counter() - (start + offset))
            task = loop.create_task(self.one(slot))
            in_flight.add(task)
            task.add_done_callback(lambda t: (in_flight.discard(t), limit.release()))
        if in_flight:
            await asyncio.wait(in_flight)

    async def measure(self, progress: Callable[[int, dict[str, Any]], None] | None) -> list[Window]:
        await asyncio.sleep(self.settings.warmup_s)
        self.recorder.swap()  # warm-up completions are not measured
        windows: list[Window] = []
        stats = await self.driver.statistics(self.model)
        while True:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            await asyncio.sleep(self.settings.window_s)
            latencies, lags, errors = self.recorder.swap()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            after = await self.driver.statistics(self.model)
            windows.append(Window(wall, cpu, latencies, lags, errors, stats, after))
            stats = after
            self._check_failing(windows[-1])
            if progress is not None:
                progress(len(windows), window_row(windows[-1]))
            throughputs = [w.throughput for w in windows]
            if logic.should_stop(
                throughputs, self.settings.max_windows, windows=self.settings.stable_windows, tolerance=self.settings.stability
            ):
                return windows

    def _check_failing(self, window: Window) -> None:
        """Every request failing means a wrong model name or input: stop and say why."""
        if not window.latencies and window.errors and self.recorder.first_error is not None:
            raise RuntimeError(f"every request failed ({dict(window.errors)}); first error: {self.recorder.first_error}")

    async def stop(self) -> None:
        self.stopping = True
        if not self.tasks:
            return
        done, pending = await asyncio.wait(self.tasks, timeout=self.settings.drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def window_row(window: Window) -> dict[str, Any]:
    """What the progress line shows for one window."""
    row = {"throughput": window.throughput, "errors": sum(window.errors.values()), "client_cpu": logic.cpu_fraction(window.cpu_s, window.wall_s)}
    row.update(logic.latency_summary(window.latencies))
    return row


def merge(windows: list[Window], keep: int) -> dict[str, Any]:
    """The reported numbers: the last ``keep`` windows merged (the stable ones, if stable)."""
    last = windows[-keep:]
    wall = sum(w.wall_s for w in last)
    cpu = sum(w.cpu_s for w in last)
    latencies = [value for w in last for value in w.latencies]
    lags = sorted(value for w in last for value in w.lags)
    errors = sum((w.errors for w in last), Counter())
    row: dict[str, Any] = {
        "throughput": len(latencies) / wall if wall > 0 else 0.0,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "windows": len(windows),
        "measured_s": wall,
        "client_cpu": logic.cpu_fraction(cpu, wall),
        "client_saturated": logic.cpu_saturated(cpu, wall),
    }
    row.update(logic.latency_summary(latencies))
    if lags:
        row["send_rate"] = len(lags) / wall
        row["send_lag_p99_ms"] = logic.percentile(lags, 99) * 1e3
    row.update(logic.server_breakdown(last[0].stats_before, last[-1].stats_after))
    return row


async def run_level(
    driver: Driver,
    model: str,
    requests: list[Any],
    settings: Settings,
    concurrency: int | None = None,
    rate: float | None = None,
    progress: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure one load level (exactly one of ``concurrency`` or ``rate``) and return its row."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    label = f"c={concurrency}" if concurrency is not None else f"r={rate:g}"
    level = Level(driver, model, requests, settings, label)
    loop = asyncio.get_running_loop()
    if concurrency is not None:
        level.tasks = [loop.create_task(level.closed_loop(slot)) for slot in range(concurrency)]
    else:
        level.tasks = [loop.create_task(level.open_loop(rate))]
    report = None if progress is None else (lambda n, row: progress(label, n, row))
    try:
        windows = await level.measure(report)
    finally:
        await level.stop()
    stable = logic.is_stable([w.throughput for w in windows], settings.stable_windows, settings.stability)
    row = {"label": label, "concurrency": concurrency, "target_rate": rate, "stable": stable}
    row.update(merge(windows, settings.stable_windows))
    return row


async def sweep(
    driver: Driver,
    model: str,
    requests: list[Any],
    settings: Settings,
    concurrencies: list[int] | None = None,
    rates: list[float] | None = None,
    progress: Callable[[str, int, dict[str, Any]], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every load level in order, one row each."""
    rows = []
    for concurrency in concurrencies or []:
        rows.append(await run_level(driver, model, requests, settings, concurrency=concurrency, progress=progress))
        if on_row:
            on_row(rows[-1])
    for rate in rates or []:
        rows.append(await run_level(driver, model, requests, settings, rate=rate, progress=progress))
        if on_row:
            on_row(rows[-1])
    return rows


def run_sync(coro: Any) -> Any:
    """Run a coroutine on uvloop when installed: the client must cost as little CPU as possible."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def measure(
    make_driver: Callable[[], Driver],
    model: str,
    values: list[dict[str, Any]],
    settings: Settings,
    concurrency: int | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """One load level from synchronous code: open a driver, measure, close it."""

    async def level() -> dict[str, Any]:
        driver = make_driver()
        await driver.open()
        try:
            requests = await driver.prepare_all(values)
            return await run_level(driver, model, requests, settings, concurrency=concurrency, rate=rate)
        finally:
            await driver.close()

    return run_sync(level())


def alternate(repeats: int, *measurements: Callable[[], dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Run each measurement in turn, ``repeats`` times; one list of rows per measurement
    (the bench suites compare two sides measured alternately, best of each)."""
    results: list[list[dict[str, Any]]] = [[] for _ in measurements]
    for _ in range(repeats):
        for rows, run in zip(results, measurements):
            rows.append(run())
    return results


def settings_dict(settings: Settings) -> dict[str, Any]:
    return asdict(settings)
