"""A pipeline node: its queue, its instances and which of them are busy, under one lock.

``Node`` is the only writer of that state.  What it does with it:

* ``submit`` admits a request (``Backend.admit``), queues it and asks batching.py what is
  due now; due batches go to free instances at once.  A lone request (nothing queued,
  nothing running) goes straight to the best-fitting instance.
* An instance reports through two calls only: ``complete`` (the batch is done: count it,
  wake its callers; the one place a batch ends, whatever the backend) and ``release``
  (the instance is free: look again at what is due).
* Threaded instances (the default) run their batches on their own threads; ``inline``
  instances leave their assigned batches in ``_due`` for the thread that made them due
  (a submitter, a releasing instance, the alarm) to run once it lets go of the lock.  A
  burst of submits to an inline node (hold.py) is queued at once and dispatched at its
  end (``flush``), so it forms batches.
* Nothing else runs on a thread of the node's own: the process-wide alarm (alarm.py)
  wakes the node when a ``batching_timeout`` window ends or a deadline passes while every
  instance is busy.

A request counts ``backend.request_size(item)`` toward ``max``; one larger than every
instance's ``max``, or of size 0, is refused at submit with InvalidInputError (a split
request, or an empty one, has no batch to run in); a size that is not an integer is the
backend's bug, BackendError.  An exception
in ``forward`` (any: ``SystemExit`` too) fails every request of its batch with
BackendError; a request without ``result`` afterwards simply finishes without one.  An
exception in a caller's callback (any, again) is logged: the batch's other requests still
finish and the instance keeps serving.
"""
from __future__ import annotations

import logging
import operator
import threading
import time
from collections import deque
from typing import Any
from collections.abc import Callable

from .alarm import ALARM
from .backend import Backend
from .batching import Slot, Wait, Window, averaged, choose, next_gap
from .config import NodeConfig
from .hold import current as current_burst
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
from .instances import InlineInstance, Instance, InstanceThread
from .queues import PriorityQueue
from .request import Request
from .stats import NodeStats

__all__ = ["Node"]
log = logging.getLogger("trtserve.scheduler")
# Inline batches one thread runs in a row before the alarm thread takes over the rest: a
# caller whose own request is done is not kept running other callers' batches for long.
# The alarm itself runs as many, then wakes itself again, so the other nodes it serves get
# their wake-ups in between.
COMBINE_LIMIT = 8


class Node:
    def __init__(self, config: NodeConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.config = config
        self.name = config.name
        self.kwargs = dict(kwargs or {}, node=config.name)
        self.scheduling = sched = config.scheduling
        self.stats = NodeStats()
        self.inline = sched.inline
        self._due: deque[tuple[InlineInstance, list[Request]]] = deque()  # inline batches to run
        self._instances: list[Any] = [
            InlineInstance(i, config, self.kwargs, self, self._due) if self.inline
            else InstanceThread(i, config, self.kwargs, self)
            for i in range(sched.instance_num)
        ]
        self._running = [False] * sched.instance_num  # by instance index
        self._busy = 0  # how many are running
        self._queue: PriorityQueue[Request] = PriorityQueue(sched.priority_levels)
        self._queued_size = 0
        self._timed = 0  # queued requests that may expire: expiry scans run only when > 0
        self._closed = False
        self._shut = threading.Event()  # set when the first close() returns
        self._window = sched.batching_timeout_s
        self._last_arrival = float("-inf")
        self._gap = self._window  # the usual time between arrivals (batching.next_gap)
        self._service = 0.0  # recent batches' run time, seconds (written by complete only)
        self._wake_at: float | None = None  # the earliest wake-up asked of the alarm
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.max_size = 1
        self._slots: list[Slot] = []
        self._by_max: list[Instance] = []
        self._admit: Callable[[dict[str, Any], bool], int] = self._not_started

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start every instance and wait for their init; re-raise the first init failure."""
        ALARM.start()
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
                f"node {self.name!r}: {self.config.expr} failed to initialise: {type(failed).__name__}: {failed}",
                node=self.name,
            ) from failed
        self.max_size = max(i.hi for i in self._instances)
        self._slots = [Slot(i.index, i.lo, i.hi) for i in self._instances]
        self._by_max = sorted(self._instances, key=lambda i: i.hi)  # best fit for a lone request
        self._admit = self._instances[0].backend.admit  # read-only: any instance answers

    def close(self, drain: bool = False) -> None:
        """Refuse new work and stop the instances once running batches finish.

        With ``drain`` every queued request still runs first (a hot reload lets the old
        version finish what it accepted); without it, queued requests fail with
        ShuttingDownError.  On a thread of the node's own (a callback closing its model) a
        drain would wait for itself: there queued requests fail as without it.

        A second call waits until the first has returned (it could free the model's code
        under a running batch otherwise), except on a thread of the node's own.
        """
        here = self._runs_here()  # waiting for the node would wait for this thread itself
        with self._lock:
            first, self._closed = not self._closed, True
        if not first:
            if not here:
                self._shut.wait()
            return
        try:
            self._close(drain and not here)
        finally:
            self._shut.set()

    def _close(self, drain: bool) -> None:
        """The first close: run (``drain``) or fail what is queued, then stop the instances."""
        with self._lock:
            # No more work is coming: a drain runs requests below an instance's min as they are.
            self._slots = [slot._replace(lo=1) for slot in self._slots]
            expired = self._dispatch(time.monotonic(), flush=True) if drain else []  # partial batches are due now
            leftovers = [] if drain else self._clear()
        if drain:
            self._fail_expired(expired)
            self.run_due(limit=None)
            with self._lock:
                self._idle.wait_for(lambda: not self._queue and self._busy == 0)
                leftovers = self._clear()
        error = ShuttingDownError(f"node {self.name!r} is shutting down", node=self.name)
        for req in leftovers:
            self._finish(req, req.cancel_error if req.cancelled else error)
        if self.inline:
            self.run_due(limit=None)  # batches assigned but not yet picked up run now, here
            with self._lock:  # batches running on other threads finish first (not this one's own)
                self._idle.wait_for(lambda: all(not self._running[i.index] or i.runs_here() for i in self._instances))
        # A threaded instance finishes its running batch (and wakes its callers) before it
        # stops, so a draining pipeline's next node is closed only after that.
        for inst in self._instances:
            inst.stop()

    def _clear(self) -> list[Request]:
        """Empty the queue; the requests to fail (cancelled ones only if given a reason)."""
        removed = self._queue.clear()
        self._unqueued(removed)
        return [r for r in removed if not r.cancelled or r.cancel_error is not None]

    def on_each_instance(self, fn: Callable[[Any], Any]) -> list[Any]:
        """``fn(instance)`` on every instance's own thread, all at once; the results in
        instance order (the first exception is raised).  For load-time work such as warm-up."""
        futures = [inst.call(fn) for inst in self._instances]
        return [future.result() for future in futures]

    def _not_started(self, item: dict[str, Any], sized: bool) -> int:
        raise ModelUnavailableError(f"node {self.name!r} is not started", node=self.name)

    @property
    def backend(self) -> Backend:
        """An initialised instance's backend, for read-only questions (validate, io_spec)."""
        backend = self._instances[0].backend
        if backend is None:
            raise ModelUnavailableError(f"node {self.name!r} is not started", node=self.name)
        return backend

    # -- requests in -------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request; raises at once (nothing queued) for bad input or a full queue.
        A request cancelled already is never queued (it would count toward ``min``): it is
        finished with its cancel error, if it was given one."""
        if req.cancelled:
            if req.cancel_error is not None:
                self._finish(req, req.cancel_error)
            return
        now = self._prepare(req)
        with self._lock:
            self._check_accepting()
            if self._window:
                self._arrived(now)
            if self.inline and (burst := current_burst()) is not None:
                self._enqueue(req)  # dispatched when the burst ends (hold.py)
                burst[self] = None
                return
            if (not self._queue and self._busy == 0
                    and (req.expires is None or req.expires > now) and self._start_lone(req, now)):
                expired = None
            else:
                self._enqueue(req)
                expired = self._dispatch(now)
        if expired:
            self._fail_expired(expired)
        if self._due:
            self.run_due()

    def flush(self) -> None:
        """Dispatch as if no more work were coming (a burst ended, hold.py) and run what
        is due here."""
        with self._lock:
            expired = self._dispatch(time.monotonic(), flush=True)
        self._fail_expired(expired)
        if self._due:
            self.run_due()

    def _prepare(self, req: Request) -> float:
        """Admit ``req`` (raises for bad input) and set its size, priority and ``expires``, its
        deadline in this node's queue (the caller's ``deadline`` is left as it is, for the next
        node); returns the time it arrived."""
        size = self._admit(req.item, self.max_size > 1)
        if type(size) is not int or not 0 < size <= self.max_size:
            size = self._checked_size(size)
        req.size = size
        sched = self.scheduling
        priority = req.priority
        req.priority = sched.default_priority if type(priority) is int and priority == 0 else self._priority(priority)
        now = time.monotonic()
        req.enqueued = now
        req.expires = req.deadline
        if sched.queue_timeout_s:
            queue_deadline = now + sched.queue_timeout_s
            if req.deadline is None or queue_deadline < req.deadline:
                req.expires = queue_deadline
        return now

    def _checked_size(self, size: Any) -> int:
        """``size`` from the backend's request_size as an int in ``[1, max]``, or the error:
        a request of 0 rows fits no batch, and one past ``max`` is never split."""
        try:
            size = operator.index(size)  # an int, or an integer type such as numpy's
        except TypeError:
            raise BackendError(
                f"node {self.name!r}: {self.config.expr}.request_size returned {size!r}; it must return "
                "an int >= 1, the rows this request takes of the node's max",
                node=self.name,
                request_size=repr(size),
            ) from None
        if size < 1:
            raise InvalidInputError(
                f"node {self.name!r}: {self.config.expr}.request_size gives {size} for this request; a request "
                "must take at least 1 row of a batch (an empty request has nothing to run)",
                node=self.name,
                request_size=size,
            )
        if size > self.max_size:
            raise InvalidInputError(
                f"node {self.name!r}: a request of size {size} exceeds the largest batch "
                f"this node runs (max = {self.max_size}); send at most {self.max_size} rows per request",
                node=self.name,
                request_size=size,
                max=self.max_size,
            )
        return size

    def _check_accepting(self) -> None:
        if self._closed:
            raise ShuttingDownError(f"node {self.name!r} is shutting down", node=self.name)
        limit = self.scheduling.max_queue_size
        if limit and len(self._queue) >= limit:
            raise QueueFullError(
                f"node {self.name!r}: queue is full ({limit} requests waiting); retry later or raise max_queue_size",
                node=self.name,
                max_queue_size=limit,
            )

    def _arrived(self, now: float) -> None:
        """Track arrivals for the batching window (only a node with one needs them)."""
        self._gap = next_gap(self._gap, self._last_arrival, now, self._window)
        self._last_arrival = now

    def _enqueue(self, req: Request) -> None:
        self._queue.append(req)
        req.owner = self
        self._queued_size += req.size
        if req.expires is not None:
            self._timed += 1
            self._arm(req.expires)  # failed the moment it expires, even if all are busy

    def _unqueued(self, removed: list[Request]) -> None:
        """The bookkeeping for requests just taken off the queue (run, withdrawn, expired or
        cleared): the counts that follow the queue, and no owner to withdraw them from."""
        for req in removed:
            req.owner = None
            self._queued_size -= req.size
            self._timed -= req.expires is not None

    def withdraw(self, req: Request) -> None:
        """A queued request was cancelled: drop it; what remains may now be due."""
        with self._lock:
            removed = self._queue.remove_if(lambda r: r is req)
            if not removed:
                return  # already running, finished, or dropped
            self._unqueued(removed)
            expired = self._dispatch(time.monotonic())
        if req.cancel_error is not None:
            expired.insert(0, req)  # _fail_expired finishes it with its reason
        self._fail_expired(expired)
        if self._due:
            self.run_due()

    def wake(self) -> None:
        """The alarm: a batching window ended or a deadline passed."""
        now = time.monotonic()
        with self._lock:
            if self._wake_at is not None and now < self._wake_at:
                return  # an earlier wake-up, superseded
            self._wake_at = None
            expired = self._dispatch(now)
            if self._timed:
                self._arm(min(r.expires for r in self._queue if r.expires is not None))
        self._fail_expired(expired)
        self.run_due()  # COMBINE_LIMIT here too: the alarm is shared; past it, run_due re-arms

    def _arm(self, when: float) -> None:
        if self._wake_at is None or when < self._wake_at:
            self._wake_at = when
            ALARM.at(when, self)

    # -- batches out -------------------------------------------------------------------
    def _dispatch(self, now: float, flush: bool = False) -> list[Request]:
        """Hand out every batch that is due; return requests dropped with a reason to give
        them (expired, or cancelled with one), to be finished after the lock."""
        if self._busy == len(self._instances) and not self._timed:
            return []  # the common case under load: nothing can start, nothing can expire
        expired = self._drop_expired(now)
        while self._queue:
            free = [s for s in self._slots if not self._running[s.instance]]
            if not free:
                break
            window = Window(now, self._queue.oldest_enqueued(), self._window, self._queued_size, self._busy,
                            flush or self._closed, self._last_arrival, self._gap, self._service)
            decision = choose(self._queue, free, window)
            if decision is None:
                break
            if isinstance(decision, Wait):
                self._arm(decision.until)
                break
            popped = [self._queue.popleft() for _ in range(decision.requests)]
            self._unqueued(popped)
            # Cancelled requests (their caller went away) are dropped here, unrun.
            batch = [r for r in popped if not r.cancelled]
            expired += [r for r in popped if r.cancelled and r.cancel_error is not None]
            if batch:
                self._start(self._instances[decision.slot.instance], batch, now)
            expired += self._drop_expired(now)
        if self._closed and not self._queue and self._busy == 0:
            self._idle.notify_all()  # close(drain=True) waits for this (only close waits)
        return expired

    def _start_lone(self, req: Request, now: float) -> bool:
        """Nothing queued, nothing running: ``req`` alone is due at once, on the instance
        that fits it best (the smallest max)."""
        for inst in self._by_max:
            if inst.lo <= req.size <= inst.hi:
                self._start(inst, [req], now)
                return True
        return False  # below every instance's min: it waits in the queue for more work

    def _start(self, inst: Instance, batch: list[Request], now: float) -> None:
        self._running[inst.index] = True
        self._busy += 1
        for req in batch:
            req.queue_ns += int((now - req.enqueued) * 1e9)
        inst.assign(batch)  # type: ignore[attr-defined]

    def _drop_expired(self, now: float) -> list[Request]:
        if not self._timed:
            return []
        removed = self._queue.remove_if(lambda r: r.expires is not None and r.expires <= now)
        self._unqueued(removed)
        return [r for r in removed if not r.cancelled or r.cancel_error is not None]

    def run_due(self, limit: int | None = COMBINE_LIMIT) -> None:
        """Run the inline batches that are due, here (the lock is not held).  A batch's end
        may make more due, which this loop runs too, up to ``limit`` in a row."""
        due, ran = self._due, 0
        while due:
            if limit is not None and ran >= limit:
                with self._lock:
                    self._arm(time.monotonic())  # the alarm runs the rest
                return
            ran += 1
            try:
                inst, batch = due.popleft()
            except IndexError:  # another thread took the last one
                return
            if inst.stopped:  # closed from a callback while this batch waited
                self.release(inst)
                self._finish_batch(batch, ShuttingDownError(f"node {self.name!r} is shutting down", node=self.name))
            else:
                inst.run(batch)

    def _runs_here(self) -> bool:
        """True on a thread of this node's own: an instance's thread, or one now running an
        inline batch (a callback closing its model); waiting for the node would wait for itself."""
        return any(inst.runs_here() for inst in self._instances)

    # -- what instances report (instances.Owner) ----------------------------------------
    def complete(self, batch: list[Request], error: TrtserveError | None, start_ns: int) -> None:
        """A batch is done: count it, then wake its callers (on the reporting thread)."""
        elapsed = time.perf_counter_ns() - start_ns
        self._service = averaged(self._service, elapsed / 1e9)  # one float store: no lock needed
        self.stats.record_batch(sum(r.size for r in batch), elapsed, failed=error is not None)
        for req in batch:
            req.compute_ns += elapsed
        self._finish_batch(batch, error)

    def release(self, instance: Instance, linger: bool = False) -> bool:
        """``instance`` is free: dispatch what is due.  True if it got its next batch; with
        ``linger`` and no next batch, it stays busy (it calls ``release`` again later)."""
        index = instance.index
        with self._lock:
            self._running[index] = False
            self._busy -= 1
            expired = self._dispatch(time.monotonic())
            got = self._running[index]
            if linger and not got:
                self._running[index] = True
                self._busy += 1
            if self._closed and self.inline:
                self._idle.notify_all()  # close() waits for each instance it does not run itself
        self._fail_expired(expired)
        return got

    # -- callers -----------------------------------------------------------------------
    def _finish_batch(self, batch: list[Request], error: TrtserveError | None) -> None:
        for req in batch:
            self._finish(req, error)

    def _fail_expired(self, expired: list[Request]) -> None:
        """Finish requests dropped from the queue: cancelled with a reason, or expired."""
        for req in expired:
            if req.cancelled:
                self._finish(req, req.cancel_error)
                continue
            self._finish(req, self._expired_error(req))

    def _expired_error(self, req: Request) -> DeadlineExceededError:
        """Which limit expired (this node's queue_timeout or the request's own timeout), and
        what to do about it."""
        waited = f"request waited {(time.monotonic() - req.enqueued) * 1e3:.1f} ms in the queue"
        relief = "add instances (instance_num) or reduce the load"
        if req.expires != req.deadline:  # this node's queue_timeout came first
            limit_ms = self.scheduling.queue_timeout_s * 1e3
            return DeadlineExceededError(
                f"node {self.name!r}: {waited} and its queue_timeout = {limit_ms:g} ms expired before it "
                f"could run; raise queue_timeout, {relief}",
                node=self.name,
                limit="queue_timeout",
                queue_timeout_ms=limit_ms,
            )
        return DeadlineExceededError(
            f"node {self.name!r}: {waited} and the request's own timeout expired before it could run; "
            f"give the request a longer timeout, {relief}",
            node=self.name,
            limit="request timeout",
        )

    def _finish(self, req: Request, error: TrtserveError | None) -> None:
        try:
            req.on_done(req, error)
        except BaseException:  # noqa: B036 - a broken callback (sys.exit too) must not stop the batch's other callers or the thread
            log.exception("request callback failed")

    def _priority(self, priority: int) -> int:
        levels = self.scheduling.priority_levels
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= levels:
            raise InvalidArgumentError(
                f"node {self.name!r}: priority {priority!r} is out of range; use 1 (highest) to "
                f"{levels} (lowest), or 0 for the default level {self.scheduling.default_priority}",
                node=self.name,
                priority=repr(priority),
                priority_levels=levels,
            )
        return priority or self.scheduling.default_priority

    # -- introspection -----------------------------------------------------------------
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def busy_instances(self) -> int:
        with self._lock:
            return self._busy
