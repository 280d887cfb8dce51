"""Counters in Triton's spirit: per node batches, per model requests; cheap and thread-safe.

Both classes accept listeners (``add_listener``), called after each record on the thread
that recorded it; the Prometheus exporter subscribes this way, so serving code never
depends on the metrics library.
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()


@contextmanager
def uncounted() -> Iterator[None]:
    """Model calls this thread makes inside are not counted (warm-up's, which are no traffic)."""
    _local.off = True
    try:
        yield
    finally:
        _local.off = False


class NodeStats:
    """What one node executed: batch count, sizes and compute time; and the model calls
    its backend made for those batches (a batch of mixed shapes may take several)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = 0
        self.failed_batches = 0
        self.compute_ns = 0
        self.batch_sizes: Counter[int] = Counter()
        self.model_calls = 0
        self.call_rows: Counter[int] = Counter()
        self.listeners: list[Callable[[int, int, bool], None]] = []  # (size, compute_ns, failed)
        self.call_listeners: list[Callable[[int], None]] = []  # (rows)

    def add_listener(self, listener: Callable[[int, int, bool], None]) -> None:
        self.listeners.append(listener)

    def add_call_listener(self, listener: Callable[[int], None]) -> None:
        self.call_listeners.append(listener)

    def record_call(self, rows: int) -> None:
        """One model call of ``rows`` rows (a backend reports each run of its model)."""
        if getattr(_local, "off", False):
            return
        with self._lock:
            self.model_calls += 1
            self.call_rows[rows] += 1
        for listener in self.call_listeners:
            listener(rows)

    def record_batch(self, size: int, compute_ns: int, failed: bool) -> None:
        with self._lock:
            self.batches += 1
            self.failed_batches += failed
            self.compute_ns += compute_ns
            self.batch_sizes[size] += 1
        for listener in self.listeners:
            listener(size, compute_ns, failed)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": self.batches,
                "failed_batches": self.failed_batches,
                "compute_ns": self.compute_ns,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "model_calls": self.model_calls,
                "call_rows": {str(k): v for k, v in sorted(self.call_rows.items())},
            }


class ModelStats:
    """Per-model request outcomes with cumulative queue and compute time (Triton's fields)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = 0
        self.failure: Counter[str] = Counter()
        self.queue_ns = 0
        self.compute_ns = 0
        self.listeners: list[Callable[[int, int, str | None], None]] = []  # (queue_ns, compute_ns, error)

    def add_listener(self, listener: Callable[[int, int, str | None], None]) -> None:
        self.listeners.append(listener)

    def record(self, queue_ns: int, compute_ns: int, error_name: str | None) -> None:
        with self._lock:
            if error_name is None:
                self.success += 1
            else:
                self.failure[error_name] += 1
            self.queue_ns += queue_ns
            self.compute_ns += compute_ns
        for listener in self.listeners:
            listener(queue_ns, compute_ns, error_name)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "success_count": self.success,
                "failure_count": sum(self.failure.values()),
                "failure_by_reason": dict(self.failure),
                "queue_ns": self.queue_ns,
                "compute_ns": self.compute_ns,
            }
