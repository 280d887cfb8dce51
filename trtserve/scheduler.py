"""One scheduler per pipeline node: instance threads plus dynamic batching.

Semantics (TorchPipe's, made precise):

* Each of ``instance_num`` instances owns a thread; ``init`` and every ``forward`` of that
  instance run on it.
* A batch is formed only when an instance is free, so batches grow while instances are busy.
  Among the free instances, the one whose ``[min, max]`` fits the queued work best is used:
  the smallest ``max`` that holds all of it, else the largest ``max``.
* A batch is dispatched when it fills the chosen instance's ``max``, when
  ``batching_timeout`` ms have passed since its oldest request was queued, or at once when a
  lone request arrives while no instance is busy (no latency penalty at low load).
* A request counts ``backend.request_size(item)`` toward ``max`` (a tensor's first
  dimension).  A request larger than every instance's ``max`` is refused at submit with
  InvalidInputError; it is never split.
* A batch never goes below an instance's ``min``; such requests wait for more work (or
  until their own deadline).
* An exception in ``forward`` fails every request of that batch with BackendError; a
  request whose item has no ``result`` afterwards simply finishes without one.

Dispatch decisions run inline on the thread that changed the state (the submitter or the
instance that just finished), so a lone request costs one thread hand-off each way; a small
timer thread only exists to honour ``batching_timeout`` and deadlines.

Under load the callers of a finished batch are woken by a finisher thread, not by the
instance: when the instance's next batch is already waiting, batches take long enough
(200 us or more) and the finisher is idle, the instance starts that batch at once and the
finisher runs the callbacks (each may wake a sleeping thread, ~30 us on a VM whose other
vCPU is halted) while the backend computes with the GIL released.  Otherwise the instance
runs the callbacks itself, so a lone request or a quick model pays no extra hand-off.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

from .backend import Backend
from .config import NodeConfig
from .errors import (
    BackendError,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidInputError,
    ModelUnavailableError,
    QueueFullError,
    ShuttingDownError,
    TrtserveError,
)
from .hold import current as current_hold
from .queues import PriorityQueue
from .request import DoneCallback, Request
from .stats import NodeStats
from .workers import Finisher, InlineInstance, InstanceThread

__all__ = ["DoneCallback", "Request", "Scheduler"]
# A batch whose forward took at least this long hands its callbacks to the finisher thread
# when more work is queued (see the module docstring).
_HAND_OFF_MIN_NS = 200_000
# Inline batches one thread runs in a row before the node's timer thread takes over the rest.
_COMBINE_LIMIT = 8


class Scheduler:
    def __init__(self, node: NodeConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.node = node
        self.kwargs = dict(kwargs or {}, node=node.name)
        self.timeout_s = float(node.batching_timeout) / 1000.0
        self.max_queue_size = int(node.max_queue_size)
        self.queue_timeout_s = float(node.queue_timeout) / 1000.0
        self.stats = NodeStats()
        self.inline = bool(node.inline)
        kind = InlineInstance if self.inline else InstanceThread
        self._instances: list[Any] = [kind(i, self) for i in range(node.instance_num)]
        # Inline batches assigned under the lock, run by the assigning thread right after.
        self.inline_work: deque[tuple[InlineInstance, list[Request]]] = deque()
        self.priority_levels = int(node.priority_levels)
        self.default_priority = int(node.default_priority) or self.priority_levels
        self._queue = PriorityQueue(self.priority_levels)
        self._queued_size = 0
        self._held = 0  # requests that bursts hold for this node (hold.py), not queued yet
        self._draining = False  # close(drain=True) is waiting for the accepted work
        self._timed = 0  # queued requests with a deadline: expiry scans run only when > 0
        self._busy = 0
        self._finisher = Finisher(self)
        self._lock = threading.Lock()
        self._timer_wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._wake_at: float | None = None
        self._closed = False
        self._timer_stop = False
        self._timer = threading.Thread(target=self._timer_loop, name=f"trtserve-{node.name}-timer", daemon=True)
        self.max_size = 1
        self._by_max: list[InstanceThread] = []
        self._admit: Callable[[dict[str, Any], bool], int] = self._not_started

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start every instance and wait for their init; re-raise the first init failure."""
        for inst in self._instances:
            inst.launch()
        for inst in self._instances:
            inst.wait_ready()
        failed = next((i.init_error for i in self._instances if i.init_error is not None), None)
        if failed is not None:
            self.close()
            if isinstance(failed, TrtserveError):
                raise failed
            raise ModelUnavailableError(
                f"node {self.node.name!r}: {self.node.expr} failed to initialise: {type(failed).__name__}: {failed}",
                node=self.node.name,
            ) from failed
        self.max_size = max(i.hi for i in self._instances)
        self._by_max = sorted(self._instances, key=lambda i: i.hi)  # best fit for a lone request
        self._admit = self._instances[0].backend.admit  # read-only: any instance answers
        if not self.inline:  # an inline batch wakes its callers on the thread that ran it
            self._finisher.thread.start()
        self._timer.start()

    def close(self, drain: bool = False) -> None:
        """Refuse new work and stop the instances once running batches finish.

        With ``drain`` every queued request still runs first (a hot reload lets the old
        version finish what it accepted); without it, queued requests fail with
        ShuttingDownError.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if drain and not self._runs_here():
                self._timer_wake.notify_all()  # partial batches are due now: nothing more will come
                hold = current_hold()
                own = hold.count(self) if hold is not None else 0  # released only after close returns
                self._draining = True  # held requests were accepted: submit_held still queues them
                self._idle.wait_for(lambda: not self._queue and self._busy == 0 and self._held == own)
                self._draining = False
            leftovers = [r for r in self._queue.clear() if not r.cancelled or r.cancel_error is not None]
            self._queued_size = self._timed = 0
            self._timer_stop = True
            self._timer_wake.notify_all()
        error = ShuttingDownError(f"node {self.node.name!r} is shutting down", node=self.node.name)
        for req in leftovers:
            self._finish(req, req.cancel_error if req.cancelled else error)
        if self.inline:
            self._run_inline()  # batches assigned but not yet picked up run now, here
            me = threading.get_ident()
            with self._lock:  # batches running on other threads finish first (not this one's own)
                self._idle.wait_for(lambda: all(not i.busy or i.running_on == me for i in self._instances))
        for inst in self._instances:
            inst.stop()
        # After the instances: every batch they handed off is finished before close returns
        # (a draining pipeline's next node is closed only then).
        self._finisher.stop()
        if self._timer.is_alive() and self._timer is not threading.current_thread():
            self._timer.join()  # (an inline batch or an expiry callback may run on the timer)

    def _not_started(self, item: dict[str, Any], sized: bool) -> int:
        raise ModelUnavailableError(f"node {self.node.name!r} is not started", node=self.node.name)

    @property
    def backend(self) -> Backend:
        """An initialised instance's backend, for read-only questions (validate, io_spec)."""
        backend = self._instances[0].backend
        if backend is None:
            raise ModelUnavailableError(f"node {self.node.name!r} is not started", node=self.node.name)
        return backend

    # -- submit ------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request; raises at once (nothing queued) for bad input or a full queue."""
        req.size = self._admit(req.item, self.max_size > 1)
        if req.size > self.max_size:
            raise InvalidInputError(
                f"node {self.node.name!r}: a request of size {req.size} exceeds the largest batch "
                f"this node runs (max = {self.max_size}); send at most {self.max_size} rows per request",
                node=self.node.name,
                request_size=req.size,
                max=self.max_size,
            )
        priority = req.priority
        req.priority = self.default_priority if type(priority) is int and priority == 0 else self._priority(priority)
        now = time.monotonic()
        req.enqueued = now
        if self.queue_timeout_s:
            queue_deadline = now + self.queue_timeout_s
            req.deadline = queue_deadline if req.deadline is None else min(req.deadline, queue_deadline)
        if self.inline:
            hold = current_hold()
            if hold is not None:  # this thread submits a burst: queued and run when it ends
                with self._lock:
                    self._check_accepting()
                    self._held += 1
                hold.add(self, req)
                return
        with self._lock:
            self._check_accepting()
            if (not self._queue and self._busy == 0 and not req.cancelled
                    and (req.deadline is None or req.deadline > now) and self._start_lone(req, now)):
                expired = None
            else:
                self._queue.append(req)
                req.owner = self
                self._queued_size += req.size
                self._timed += req.deadline is not None
                expired = self._dispatch(now)
                if req.deadline is not None and self._queue:
                    self._timer_wake.notify()  # the timer fails it the moment its deadline passes
        if expired:
            self._fail_expired(expired)
        if self.inline_work:
            self._run_inline()

    def _check_accepting(self) -> None:
        """Raise unless a request can be queued now (held requests count as queued)."""
        if self._closed:
            raise ShuttingDownError(f"node {self.node.name!r} is shutting down", node=self.node.name)
        if self.max_queue_size and len(self._queue) + self._held >= self.max_queue_size:
            raise QueueFullError(
                f"node {self.node.name!r}: queue is full ({self.max_queue_size} requests waiting); "
                "retry later or raise max_queue_size",
                node=self.node.name,
                max_queue_size=self.max_queue_size,
            )

    def submit_held(self, requests: list[Request]) -> None:
        """Queue the requests a burst held (hold.py), dispatch once, run what is due here."""
        now = time.monotonic()
        with self._lock:
            self._held -= len(requests)
            refused = requests if self._closed and not self._draining else []
            expired = []
            if not refused:
                for req in requests:
                    self._queue.append(req)
                    req.owner = self
                    self._queued_size += req.size
                    self._timed += req.deadline is not None
                expired = self._dispatch(now)
                if self._timed and self._queue:
                    self._timer_wake.notify()  # the timer fails them the moment a deadline passes
            if self._busy == 0 and not self._queue:
                self._idle.notify_all()  # a drain waits for held requests too (all cancelled, say)
        if refused:
            error = ShuttingDownError(f"node {self.node.name!r} is shutting down", node=self.node.name)
            for req in refused:
                self._finish(req, error)
        self._fail_expired(expired)
        if self.inline_work:
            self._run_inline()

    # -- batching (called with the lock held) ------------------------------------------
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

    def _best_fit(self, free: list[InstanceThread]) -> tuple[InstanceThread, int, int] | None:
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

    def _forget(self, req: Request) -> None:
        """Drop a cancelled request from the queue; what remains may now be due."""
        with self._lock:
            removed = self._queue.remove_if(lambda r: r is req)
            if not removed:
                return  # already running, finished, or dropped
            req.owner = None
            self._queued_size -= req.size
            self._timed -= req.deadline is not None
            expired = self._dispatch(time.monotonic())
        if req.cancel_error is not None:
            expired.insert(0, req)  # _fail_expired finishes it with its reason
        self._fail_expired(expired)
        if self.inline_work:
            self._run_inline()

    def _arm_timer(self, when: float) -> None:
        if self._wake_at is None or when < self._wake_at:
            self._wake_at = when
            self._timer_wake.notify()

    def _next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self._queue if r.deadline is not None] if self._timed else []
        candidates = [t for t in (self._wake_at, min(deadlines, default=None)) if t is not None]
        return min(candidates, default=None)

    def _timer_loop(self) -> None:
        with self._lock:
            while not self._timer_stop:
                wake = self._next_deadline()
                timeout = None if wake is None else max(wake - time.monotonic(), 0.0)
                if (timeout is None or timeout > 0) and not self.inline_work:
                    self._timer_wake.wait(timeout)
                now = time.monotonic()
                if self._wake_at is not None and now >= self._wake_at:
                    self._wake_at = None
                expired = self._dispatch(now)
                if expired or self.inline_work:  # both run without the lock
                    self._lock.release()
                    try:
                        self._fail_expired(expired)
                        self._run_inline(limit=None)
                    finally:
                        self._lock.acquire()

    # -- execution (instance thread) ---------------------------------------------------
    def _execute(self, inst: InstanceThread, batch: list[Request]) -> None:
        items = [req.item for req in batch]
        start = time.perf_counter_ns()
        error: TrtserveError | None = None
        try:
            inst.backend.forward(items)
        except TrtserveError as exc:
            error = exc
        except Exception as exc:
            error = BackendError(
                f"node {self.node.name!r}: {self.node.expr}.forward failed on a batch of {len(batch)}: "
                f"{type(exc).__name__}: {exc}",
                node=self.node.name,
                exception=type(exc).__name__,
                batch_size=len(batch),
            )
        elapsed = time.perf_counter_ns() - start
        self.stats.record_batch(sum(r.size for r in batch), elapsed, failed=error is not None)
        for req in batch:
            req.compute_ns += elapsed
        claimed = elapsed >= _HAND_OFF_MIN_NS and not self.inline and bool(self._queue) and self._claim_finisher()
        if not claimed:
            self._finish_batch(batch, error)  # callers first, then this instance takes new work
        with self._lock:
            inst.busy = False
            self._busy -= 1
            expired = self._dispatch(time.monotonic())
            hand_off = claimed and inst.busy  # this instance got its next batch: start it now
            if claimed and not hand_off:
                self._finisher.busy = False  # the queued work went elsewhere or must wait
            if self.inline or (self._busy == 0 and not self._queue):
                self._idle.notify_all()  # (inline: close() waits for each instance it does not run)
        if hand_off:
            self._finisher.put(batch, error)
        elif claimed:
            self._finish_batch(batch, error)  # this instance is free: as if it had not claimed
        self._fail_expired(expired)

    def _run_inline(self, limit: int | None = _COMBINE_LIMIT) -> None:
        """Run the inline batches assigned so far, here (the lock is not held).  A batch's
        end may assign the instance its next one, which this loop then runs too, up to
        ``limit`` batches: then the node's timer thread takes over, so a caller whose own
        request is done is not kept running other callers' batches for as long as they
        keep coming (the timer runs without a limit)."""
        work = self.inline_work
        ran = 0
        while work:
            if limit is not None and ran >= limit:
                with self._lock:
                    self._timer_wake.notify()
                return
            ran += 1
            try:
                inst, batch = work.popleft()
            except IndexError:  # another thread took the last one
                return
            if inst.stopped:  # closed from a callback while this batch waited
                self._abort(inst, batch)
            else:
                inst.run(batch)

    def _abort(self, inst: Any, batch: list[Request]) -> None:
        with self._lock:
            inst.busy = False
            self._busy -= 1
            self._idle.notify_all()
        inst.close_if_stopped()
        error = ShuttingDownError(f"node {self.node.name!r} is shutting down", node=self.node.name)
        self._finish_batch(batch, error)

    def _runs_here(self) -> bool:
        """True on a thread now running one of this node's inline batches (waiting for the
        node to go idle would wait for itself)."""
        me = threading.get_ident()
        return self.inline and any(inst.running_on == me for inst in self._instances)

    def _claim_finisher(self) -> bool:
        """Reserve the finisher for this batch's callbacks, if it is idle.  Only then: the
        backlog stays one batch, so slow callers still slow the intake (max_queue_size keeps
        its meaning), and a callback waiting for another request of this node never waits
        behind itself.  The handing off costs the finisher's wake-up, worth it only when the
        next forward (predicted by this one, >= 200 us) hides the callbacks."""
        with self._lock:
            if self._finisher.busy:
                return False
            self._finisher.busy = True
            return True

    def _finish_batch(self, batch: list[Request], error: TrtserveError | None) -> None:
        for req in batch:
            self._finish(req, error)

    def _finisher_idle(self) -> None:
        with self._lock:
            self._finisher.busy = False

    def _priority(self, priority: int) -> int:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= self.priority_levels:
            raise InvalidArgumentError(
                f"node {self.node.name!r}: priority {priority!r} is out of range; use 1 (highest) to "
                f"{self.priority_levels} (lowest), or 0 for the default level {self.default_priority}",
                node=self.node.name,
                priority=repr(priority),
                priority_levels=self.priority_levels,
            )
        return priority or self.default_priority

    def _fail_expired(self, expired: list[Request]) -> None:
        """Finish requests dropped from the queue: cancelled with a reason, or expired."""
        for req in expired:
            if req.cancelled:
                self._finish(req, req.cancel_error)
                continue
            self._finish(
                req,
                DeadlineExceededError(
                    f"node {self.node.name!r}: request waited {(time.monotonic() - req.enqueued) * 1e3:.1f} ms "
                    "in the queue and its deadline passed before it could run",
                    node=self.node.name,
                ),
            )

    def _finish(self, req: Request, error: TrtserveError | None) -> None:
        try:
            req.on_done(req, error)
        except Exception:  # a broken callback must not kill the instance thread
            import logging

            logging.getLogger("trtserve.scheduler").exception("request callback failed")

    # -- introspection -----------------------------------------------------------------
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def busy_instances(self) -> int:
        with self._lock:
            return self._busy
