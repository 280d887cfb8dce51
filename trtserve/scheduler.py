"""One scheduler per pipeline node: instance threads plus dynamic batching.

Semantics (TorchPipe's, made precise):

* Each of ``instance_num`` instances owns a thread; ``init`` and every ``forward`` of that
  instance run on it.
* Batches form as batching.py says: only when an instance is free, on the instance that
  fits best, when full, timed out, or a lone request with nothing running.
* ``inline = true``: instances without threads (workers.py); a batch runs on a thread that
  submits or finishes the node's work, and bursts held by hold.py form batches.
* A request counts ``backend.request_size(item)`` toward ``max`` (a tensor's first
  dimension).  A request larger than every instance's ``max`` is refused at submit with
  InvalidInputError; it is never split.
* A batch never goes below an instance's ``min``; such requests wait for more work (or
  until their own deadline).
* An exception in ``forward`` (any: ``SystemExit`` too) fails every request of that batch
  with BackendError; a request whose item has no ``result`` afterwards simply finishes
  without one.

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
from typing import Any, Callable

from .backend import Backend
from .completion import Completion
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
from .batching import BatchForming
from .workers import Finisher, InlineInstance, InlineWork, InstanceThread

__all__ = ["DoneCallback", "Request", "Scheduler"]
# A batch whose forward took at least this long hands its callbacks to the finisher thread
# when more work is queued (see the module docstring).
_HAND_OFF_MIN_NS = 200_000


class Scheduler(BatchForming):
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
        self.inline_work = InlineWork(self)
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
            if drain and not self.inline_work.runs_here():
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
            self.inline_work.run()  # batches assigned but not yet picked up run now, here
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

    def on_each_instance(self, fn: Callable[[Any], Any]) -> list[Any]:
        """``fn(instance)`` on every instance's own thread, all at once; the results in
        instance order (the first exception is raised).  For load-time work such as warm-up."""
        futures = [inst.call(fn) for inst in self._instances]
        return [future.result() for future in futures]

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
            self.inline_work.run()

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
            self.inline_work.run()

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
            self.inline_work.run()

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
                        self.inline_work.run(limit=None)
                    finally:
                        self._lock.acquire()

    # -- execution (instance thread) ---------------------------------------------------
    def _execute(self, inst: InstanceThread, batch: list[Request]) -> None:
        items = [req.item for req in batch]
        start = time.perf_counter_ns()
        error: TrtserveError | None = None
        completion = None
        try:
            completion = inst.backend.forward(items)
            if isinstance(completion, Completion) and self.inline:
                completion.wait()  # an inline batch ends on the thread that ran it
                completion = None
        except BaseException as exc:  # noqa: B036 - SystemExit from a model's forward fails its batch, not the server
            error = self._batch_error(exc, batch, f"{self.node.expr}.forward failed on")
        if isinstance(completion, Completion):
            self._defer(inst, batch, completion, start)
            return
        if inst.pending is not None:  # a deferred batch before this one, whose forward ran first
            self._finish_pending(inst)
        elapsed = self._record(batch, start, error)
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

    def _defer(self, inst: InstanceThread, batch: list[Request], completion: Completion, start: int) -> None:
        """A batch still running on the device (its forward returned a Completion).

        The instance first finishes its previous deferred batch, if any (wait, then wake its
        callers), so at most two of its batches are in flight and its resources (two events,
        two staging buffers) are never reused early.  Then, if the scheduler hands it new
        work, it leaves this batch pending and prepares the next one while the device runs
        this one; otherwise it finishes this one at once.  Callbacks run on the instance
        thread before it takes more work, as on the plain path: slow callers still slow the
        intake, and one instance's slow batch never delays another's callers.
        """
        self._finish_pending(inst)
        inst.pending = (batch, completion, start)
        with self._lock:
            inst.busy = False
            self._busy -= 1
            expired = self._dispatch(time.monotonic())
            overlapped = inst.busy  # the next batch is in this instance's inbox
            if not overlapped:  # stay busy until the callers are woken, as on the plain path
                inst.busy = True
                self._busy += 1
        if not overlapped:
            self._finish_pending(inst)
            with self._lock:
                inst.busy = False
                self._busy -= 1
                expired += self._dispatch(time.monotonic())
                if self._busy == 0 and not self._queue:
                    self._idle.notify_all()
        self._fail_expired(expired)

    def _finish_pending(self, inst: Any) -> None:
        """Wait for the instance's deferred batch, count it and wake its callers."""
        if inst.pending is None:
            return
        batch, completion, start = inst.pending
        inst.pending = None
        error: TrtserveError | None = None
        try:
            completion.wait()
        except BaseException as exc:  # noqa: B036 - as in _execute
            error = self._batch_error(exc, batch, f"{self.node.expr} failed while finishing")
        # From forward's start to the wait's end: an upper bound on the batch's compute time.
        # Under overlap the wait comes after the instance prepared its next batch and woke
        # the callers of its previous one, so this counts that time too.
        self._record(batch, start, error)
        self._finish_batch(batch, error)

    def _batch_error(self, exc: BaseException, batch: list[Request], what: str) -> TrtserveError:
        """A backend's exception as the batch's error: typed errors as they are, others wrapped."""
        if isinstance(exc, TrtserveError):
            return exc
        return BackendError(
            f"node {self.node.name!r}: {what} a batch of {len(batch)}: {type(exc).__name__}: {exc}",
            node=self.node.name,
            exception=type(exc).__name__,
            batch_size=len(batch),
        )

    def _record(self, batch: list[Request], start: int, error: TrtserveError | None) -> int:
        """Count a finished batch in the node's statistics and its requests' compute time."""
        elapsed = time.perf_counter_ns() - start
        self.stats.record_batch(sum(r.size for r in batch), elapsed, failed=error is not None)
        for req in batch:
            req.compute_ns += elapsed
        return elapsed

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
