"""How a node forms batches: which queued requests run together, on which free instance,
and when (TorchPipe's semantics, made precise).  Every method runs with the scheduler's
lock held and only decides; ``_start`` hands the batch to the instance (workers.py).

* A batch is formed only when an instance is free, so batches grow while instances are busy.
  Among the free instances, the one whose ``[min, max]`` fits the queued work best is used:
  the smallest ``max`` that holds all of it, else the largest ``max``.
* A batch is dispatched when it fills the chosen instance's ``max`` (or the next request
  would not fit), when ``batching_timeout`` ms have passed since its oldest request was
  queued, at once when a lone request arrives while no instance is busy (no latency
  penalty at low load), or when the node drains.
* A batch never goes below an instance's ``min``; such requests wait for more work (or
  until their own deadline).  Cancelled requests are dropped unrun; expired ones are
  returned to be finished with DEADLINE_EXCEEDED after the lock.
"""
from __future__ import annotations

from typing import Any

from .request import Request


class BatchForming:
    """The batch-forming half of ``Scheduler`` (its queue, instances and counters)."""

    def _dispatch(self, now: float) -> list[Request]:
        """Hand out every batch that is due; return requests whose deadline passed."""
        if self._busy == len(self._instances) and not self._timed:
            return []  # the common case under load: nothing can start, nothing can expire
        expired = self._drop_dead_head(now)
        while self._queue:
            free = [i for i in self._instances if not i.busy]
            if not free:
                return expired
            choice = self._best_fit(free)
            if choice is None:  # below every free instance's min: wait for more work
                return expired
            inst, count, size = choice
            oldest = self._queue.oldest_enqueued()
            due = (
                size >= inst.hi
                or count < len(self._queue)  # the next request does not fit: it cannot grow
                or (len(self._queue) == 1 and self._busy == 0)
                or self._closed  # draining: no more work will arrive to fill the batch
                or now >= oldest + self.timeout_s
            )
            if not due:
                self._arm_timer(oldest + self.timeout_s)
                return expired
            popped = [self._queue.popleft() for _ in range(count)]
            for req in popped:
                req.owner = None
            self._queued_size -= size
            self._timed -= sum(r.deadline is not None for r in popped)
            # Cancelled requests (their caller went away) are dropped here, unrun; one cancelled
            # with a reason is finished with it after the lock, like an expired one.
            batch = [r for r in popped if not r.cancelled]
            expired += [r for r in popped if r.cancelled and r.cancel_error is not None]
            if not batch:
                continue
            self._start(inst, batch, now)
            expired += self._drop_dead_head(now)
        return expired

    def _start_lone(self, req: Request, now: float) -> bool:
        """The lone-item rule without the queue: nothing queued, nothing running, so ``req``
        alone is due at once, on the free instance that fits it best (the smallest max)."""
        for inst in self._by_max:
            if inst.lo <= req.size <= inst.hi:
                self._start(inst, [req], now)
                return True
        return False  # below every instance's min: it waits in the queue for more work

    def _start(self, inst: Any, batch: list[Request], now: float) -> None:
        inst.busy = True
        self._busy += 1
        for req in batch:
            req.queue_ns += int((now - req.enqueued) * 1e9)
        inst.assign(batch)

    def _best_fit(self, free: list[Any]) -> tuple[Any, int, int] | None:
        """The free instance that fits the queued work best, with its batch (count, size)."""
        fits, largest = None, None
        for inst in free:
            count, size = self._take(inst.hi)
            if count == 0 or size < inst.lo:
                continue
            if size == self._queued_size and (fits is None or inst.hi < fits[0].hi):
                fits = (inst, count, size)
            if largest is None or inst.hi > largest[0].hi:
                largest = (inst, count, size)
        return fits or largest

    def _take(self, limit: int) -> tuple[int, int]:
        count = size = 0
        for req in self._queue:
            if size + req.size > limit:
                break
            count += 1
            size += req.size
        return count, size

    def _drop_dead_head(self, now: float) -> list[Request]:
        """Remove and return queued requests whose deadline has passed (anywhere in the queue)."""
        if not self._timed:
            return []
        removed = self._queue.remove_if(lambda r: r.deadline is not None and r.deadline <= now)
        self._queued_size -= sum(r.size for r in removed)
        self._timed -= len(removed)
        return [r for r in removed if not r.cancelled or r.cancel_error is not None]
