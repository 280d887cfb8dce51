"""The instances of a node, and the finisher that wakes callers under load.

The dispatch decisions stay in scheduler.py; instances only run what it hands them, one
batch at a time each, through ``scheduler._execute(instance, batch)``:

* ``InstanceThread`` (the default): the instance owns a thread; ``init`` and every
  ``forward`` run on it, so a GPU backend can bind its stream there.
* ``InlineInstance`` (``inline = true``): no thread; ``init`` runs on the loading thread and
  each batch runs on the thread that dispatched it (the submitter, an instance finishing
  the previous batch of the node, or the node's timer), after that thread lets go of the
  scheduler's lock.  A hand-off to another thread costs two wake-ups and two GIL transfers
  (tens of microseconds on a VM); a backend that computes for microseconds is cheaper run
  where the request already is.

The finisher runs ``scheduler._finish_batch(batch, error)`` for every batch a threaded
instance handed off.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from .backend import Backend, InstanceContext
from .errors import ModelUnavailableError, ShuttingDownError, TrtserveError
from .expression import instantiate
from .request import Request

if TYPE_CHECKING:
    from .scheduler import Scheduler

# Inline batches one thread runs in a row before the node's timer thread takes over the rest.
COMBINE_LIMIT = 8


class _Instance:
    """What the scheduler sees of an instance: its backend, its batch range and ``busy``."""

    def __init__(self, index: int, scheduler: Scheduler) -> None:
        self.index = index
        self.scheduler = scheduler
        self.backend: Backend | None = None
        self.lo = self.hi = 1
        self.busy = False  # a batch is assigned (the scheduler's lock guards it)
        self.init_error: BaseException | None = None
        # A batch whose forward returned a Completion, not finished yet: (batch, completion,
        # start ns).  Only the instance's own thread reads or writes it (scheduler._defer).
        self.pending: tuple[list[Request], Any, int] | None = None

    def _build(self) -> None:
        """Build and initialise the backend on the current thread; record a failure."""
        node = self.scheduler.node
        try:
            backend = instantiate(node.expr, node.options, node.backends)
            backend.is_root = True
            backend.init(InstanceContext.of(node.options, self.scheduler.kwargs, self.index))
            self.lo, self.hi = int(backend.min()), int(backend.max())
            if not 1 <= self.lo <= self.hi:
                raise ModelUnavailableError(
                    f"node {node.name!r}: backend {node.expr} reports min={self.lo} max={self.hi}; "
                    "it needs 1 <= min <= max",
                    node=node.name,
                )
            self.backend = backend
        except BaseException as exc:  # reported to start(), which raises it to the loader
            self.init_error = exc


class _Call:
    """A function to run on an instance's own thread between batches (warm-up at load)."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[_Instance], Any]) -> None:
        self.fn = fn
        self.future: Future = Future()

    def run(self, instance: _Instance) -> None:
        try:
            self.future.set_result(self.fn(instance))
        except BaseException as exc:  # the caller re-raises it
            self.future.set_exception(exc)


class InstanceThread(_Instance):
    """One instance of a node: its backend, built, initialised and run on its own thread."""

    def __init__(self, index: int, scheduler: Scheduler) -> None:
        super().__init__(index, scheduler)
        self.inbox: queue.SimpleQueue[list[Request] | _Call | None] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name=f"trtserve-{scheduler.node.name}-{index}", daemon=True
        )

    def launch(self) -> None:
        self.thread.start()

    def wait_ready(self) -> None:
        self.ready.wait()

    def assign(self, batch: list[Request]) -> None:
        self.inbox.put(batch)

    def call(self, fn: Callable[[_Instance], Any]) -> Future:
        """Run ``fn(instance)`` on this instance's thread, after the batch it is running."""
        call = _Call(fn)
        self.inbox.put(call)
        return call.future

    def stop(self) -> None:
        """Finish the running batch, then end the thread (not waited for from itself)."""
        self.inbox.put(None)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()

    def _run(self) -> None:
        self._build()
        self.ready.set()
        backend = self.backend
        if backend is None:
            return
        try:
            while (batch := self.inbox.get()) is not None:
                if type(batch) is _Call:
                    batch.run(self)
                else:
                    self.scheduler._execute(self, batch)
                del batch  # not held until the next get: see _Finisher._run
        finally:
            # A deferred batch still in flight: the device finishes it and its callers are
            # woken before the backend closes.
            self.scheduler._finish_pending(self)
            backend.close()


class InlineInstance(_Instance):
    """An instance without a thread: its batches run on the thread that dispatched them.

    ``assign`` (under the scheduler's lock) only queues the batch on the scheduler's shared
    ``inline_work``; the dispatching thread runs it once it has let go of the lock
    (``InlineWork.run``).  Any thread may run any queued batch, and an instance is
    assigned one batch at a time, so its forward still never runs twice at once.
    """

    def __init__(self, index: int, scheduler: Scheduler) -> None:
        super().__init__(index, scheduler)
        self.running_on: int | None = None  # the thread running this instance's batch
        self.stopped = False
        self._close_when_done = False

    def launch(self) -> None:
        self._build()

    def wait_ready(self) -> None:
        pass

    def assign(self, batch: list[Request]) -> None:
        self.scheduler.inline_work.append((self, batch))

    def call(self, fn: Callable[[_Instance], Any]) -> Future:
        """Run ``fn(instance)`` here and now: an inline instance has no thread of its own."""
        call = _Call(fn)
        call.run(self)
        return call.future

    def run(self, batch: list[Request]) -> None:
        me = self.running_on = threading.get_ident()
        try:
            self.scheduler._execute(self, batch)
        finally:
            # The batch's end may have assigned this instance its next batch, and another
            # thread may be running it already: only this thread's own mark is cleared.
            if self.running_on == me:
                self.running_on = None
            self.close_if_stopped()

    def stop(self) -> None:
        """Close the backend; from inside this instance's own batch (a callback closing its
        model), once that batch is done."""
        self.stopped = True
        if self.running_on == threading.get_ident():
            self._close_when_done = True
        else:
            self._close_backend()

    def close_if_stopped(self) -> None:
        """Close a backend whose ``stop`` came from inside its own batch, once it is idle."""
        if self._close_when_done and not self.busy and self.running_on is None:
            self._close_backend()

    def _close_backend(self) -> None:
        with self.scheduler._lock:  # exactly once, whichever thread gets here first
            backend, self.backend = self.backend, None
            self._close_when_done = False
        if backend is not None:
            backend.close()


class InlineWork:
    """The inline batches a node's dispatch assigned, until a thread takes and runs them.

    Any thread may take any batch (an instance has one assigned at a time, so its forward
    never runs twice at once).  A thread runs at most ``limit`` in a row, then wakes the
    node's timer thread to run the rest (it runs without a limit): a caller whose own
    request is done is not kept running other callers' batches for as long as they come.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.pending: deque[tuple[InlineInstance, list[Request]]] = deque()

    def __bool__(self) -> bool:
        return bool(self.pending)

    def append(self, work: tuple[InlineInstance, list[Request]]) -> None:
        self.pending.append(work)

    def run(self, limit: int | None = COMBINE_LIMIT) -> None:
        """Run what is assigned, here (the scheduler's lock is not held).  A batch's end may
        assign the instance its next batch, which this loop then runs too."""
        pending, scheduler = self.pending, self.scheduler
        ran = 0
        while pending:
            if limit is not None and ran >= limit:
                with scheduler._lock:
                    scheduler._timer_wake.notify()
                return
            ran += 1
            try:
                inst, batch = pending.popleft()
            except IndexError:  # another thread took the last one
                return
            if inst.stopped:  # closed from a callback while this batch waited
                self._abort(inst, batch)
            else:
                inst.run(batch)

    def _abort(self, inst: InlineInstance, batch: list[Request]) -> None:
        scheduler = self.scheduler
        with scheduler._lock:
            inst.busy = False
            scheduler._busy -= 1
            scheduler._idle.notify_all()
        inst.close_if_stopped()
        node = scheduler.node.name
        scheduler._finish_batch(batch, ShuttingDownError(f"node {node!r} is shutting down", node=node))

    def runs_here(self) -> bool:
        """True on a thread now running one of this node's inline batches (waiting for the
        node to go idle would wait for itself)."""
        me = threading.get_ident()
        return self.scheduler.inline and any(inst.running_on == me for inst in self.scheduler._instances)


class Finisher:
    """A node's finisher thread: runs the callbacks of batches its instances handed off."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.inbox: queue.SimpleQueue[tuple[list[Request], TrtserveError | None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"trtserve-{scheduler.node.name}-finisher", daemon=True)
        self.busy = False  # a handed-off batch is not finished yet (the scheduler's lock guards it)

    def put(self, batch: list[Request], error: TrtserveError | None) -> None:
        self.inbox.put((batch, error))

    def _run(self) -> None:
        get, finish, idle = self.inbox.get, self.scheduler._finish_batch, self.scheduler._finisher_idle
        while True:
            work = get()
            if work is None:
                return
            finish(*work)
            # Let go of the batch now, not at the next get: its items may hold GPU buffers
            # that must be freed while their instance's stream still exists.
            del work
            idle()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.inbox.put(None)
            if self.thread is not threading.current_thread():  # close() from a callback
                self.thread.join()
