"""Counters in Triton's spirit: per node batches, per model requests; cheap and thread-safe."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class NodeStats:
    """What one node executed: batch count, sizes and compute time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = 0
        self.failed_batches = 0
        self.compute_ns = 0
        self.batch_sizes: Counter[int] = Counter()

    def record_batch(self, size: int, compute_ns: int, failed: bool) -> None:
        with self._lock:
            self.batches += 1
            self.failed_batches += failed
            self.compute_ns += compute_ns
            self.batch_sizes[size] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": self.batches,
                "failed_batches": self.failed_batches,
                "compute_ns": self.compute_ns,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            }


class ModelStats:
    """Per-model request outcomes with cumulative queue and compute time (Triton's fields)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = 0
        self.failure: Counter[str] = Counter()
        self.queue_ns = 0
        self.compute_ns = 0
        self.last_inference_ms = 0

    def record(self, queue_ns: int, compute_ns: int, error_name: str | None) -> None:
        with self._lock:
            if error_name is None:
                self.success += 1
            else:
                self.failure[error_name] += 1
            self.queue_ns += queue_ns
            self.compute_ns += compute_ns

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "success_count": self.success,
                "failure_count": sum(self.failure.values()),
                "failure_by_reason": dict(self.failure),
                "queue_ns": self.queue_ns,
                "compute_ns": self.compute_ns,
            }
