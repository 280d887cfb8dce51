"""A node's instances: each builds its backend and runs the batches its node hands it.

An instance never decides anything and never writes its node's state: it runs a batch and
reports through the node's two public calls (the ``Owner`` protocol), ``complete`` (the
batch is done: count it, wake its callers) and ``release`` (this instance is free again).

* ``InstanceThread`` (the default): the instance owns a thread; ``init`` and every
  ``forward`` run on it, so a GPU backend can bind its stream there.  A forward that
  returns a ``Completion`` (SyncTensor with ``overlap = true``) lets the instance launch
  its next batch, if one is waiting, before it waits for this one: at most two batches
  of an instance are in flight.
* ``InlineInstance`` (``inline = true``): no thread; ``init`` runs on the loading thread
  and each batch on a thread that submitted or finished the node's work (node.py).  A
  hand-off to another thread costs two wake-ups and two GIL transfers (tens of
  microseconds on a VM); a backend that computes for microseconds is cheaper run where
  the request already is.  A ``Completion`` is waited for at once.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Protocol
from collections.abc import Callable

from .backend import Backend, InstanceContext
from .completion import Completion, batch_error
from .config import NodeConfig
from .errors import ModelUnavailableError, TrtserveError
from .expression import instantiate
from .request import Request


class Owner(Protocol):
    """What an instance may tell its node (node.py ``Node``)."""

    def complete(self, batch: list[Request], error: TrtserveError | None, start_ns: int) -> None: ...

    def release(self, instance: Instance, linger: bool = False) -> bool: ...


class Instance:
    """One instance of a node: its backend and batch range ``[lo, hi]``."""

    def __init__(self, index: int, config: NodeConfig, kwargs: dict[str, Any], owner: Owner) -> None:
        self.index = index
        self.config = config
        self.kwargs = kwargs
        self.owner = owner
        self.backend: Backend | None = None
        self.lo = self.hi = 1
        self.init_error: BaseException | None = None

    def runs_here(self) -> bool:
        """True on the thread now running this instance's work."""
        raise NotImplementedError

    def _build(self) -> None:
        """Build and initialise the backend on the current thread; record a failure."""
        node = self.config
        try:
            backend = instantiate(node.expr, node.options, node.backends)
            backend.is_root = True
            backend.init(InstanceContext.of(node.options, self.kwargs, self.index))
            self.lo, self.hi = int(backend.min()), int(backend.max())
            if not 1 <= self.lo <= self.hi:
                raise ModelUnavailableError(
                    f"node {node.name!r}: backend {node.expr} reports min={self.lo} max={self.hi}; "
                    "it needs 1 <= min <= max",
                    node=node.name,
                )
            self.backend = backend
        except BaseException as exc:  # reported to Node.start, which raises it to the loader
            self.init_error = exc

    def _forward(self, batch: list[Request]) -> tuple[TrtserveError | None, Completion | None]:
        """Run the batch's forward: its error, or the Completion it returned."""
        try:
            outcome = self.backend.forward([req.item for req in batch])  # type: ignore[union-attr]
        except BaseException as exc:  # noqa: B036 - SystemExit from a model's forward fails its batch, not the server
            return self._error(exc, batch, "forward failed on"), None
        return None, outcome if isinstance(outcome, Completion) else None

    def _error(self, exc: BaseException, batch: list[Request], what: str) -> TrtserveError:
        return batch_error(exc, self.config.name, f"{self.config.expr}.{what}", len(batch))

    def _wait(self, completion: Completion, batch: list[Request]) -> TrtserveError | None:
        try:
            completion.wait()
        except BaseException as exc:  # noqa: B036 - as in _forward
            return self._error(exc, batch, "forward failed while finishing")
        return None


class _Call:
    """A function to run on an instance's own thread between batches (warm-up at load)."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[Instance], Any]) -> None:
        self.fn = fn
        self.future: Future = Future()

    def run(self, instance: Instance) -> None:
        try:
            self.future.set_result(self.fn(instance))
        except BaseException as exc:  # the caller re-raises it
            self.future.set_exception(exc)


class InstanceThread(Instance):
    """An instance with a thread of its own: ``init``, every batch and ``close`` run on it."""

    def __init__(self, index: int, config: NodeConfig, kwargs: dict[str, Any], owner: Owner) -> None:
        super().__init__(index, config, kwargs, owner)
        self.inbox: queue.SimpleQueue[list[Request] | _Call | None] = queue.SimpleQueue()
        self.ready = threading.Event()
        # A batch whose forward returned a Completion, not finished yet: (batch, completion, start ns).
        self.pending: tuple[list[Request], Completion, int] | None = None
        self.thread = threading.Thread(target=self._run, name=f"trtserve-{config.name}-{index}", daemon=True)

    def launch(self) -> None:
        self.thread.start()

    def wait_ready(self) -> None:
        self.ready.wait()

    def assign(self, batch: list[Request]) -> None:
        self.inbox.put(batch)

    def call(self, fn: Callable[[Instance], Any]) -> Future:
        """Run ``fn(instance)`` on this instance's thread, after the batch it is running."""
        call = _Call(fn)
        self.inbox.put(call)
        return call.future

    def runs_here(self) -> bool:
        return self.thread is threading.current_thread()

    def stop(self) -> None:
        """Finish the running batch, then end the thread (not waited for from itself)."""
        self.inbox.put(None)
        if self.thread.is_alive() and not self.runs_here():
            self.thread.join()

    def _run(self) -> None:
        self._build()
        self.ready.set()
        backend = self.backend
        if backend is None:
            return
        try:
            while (work := self.inbox.get()) is not None:
                if isinstance(work, _Call):
                    work.run(self)
                else:
                    self._serve(work)
                del work  # not held until the next get: its items may hold GPU buffers
        finally:
            self._finish_pending()  # the device finishes it and its callers are woken first
            backend.close()

    def _serve(self, batch: list[Request]) -> None:
        start = time.perf_counter_ns()
        error, completion = self._forward(batch)
        self._finish_pending()  # the previous batch, launched before this one
        if completion is None:
            try:
                self.owner.complete(batch, error, start)  # callers first, then new work
            finally:  # whatever happens, the node must not think this instance busy for ever
                self.owner.release(self)
            return
        self.pending = (batch, completion, start)
        # Free for the next batch: if one is waiting, it is launched before this one is
        # waited for; otherwise the node keeps this instance busy until its callers are woken,
        # so slow callers still slow the intake (max_queue_size keeps its meaning).
        if not self.owner.release(self, linger=True):
            try:
                self._finish_pending()
            finally:
                self.owner.release(self)

    def _finish_pending(self) -> None:
        """Wait for the deferred batch, then count it and wake its callers."""
        if self.pending is None:
            return
        batch, completion, start = self.pending
        self.pending = None
        # From forward's start to the wait's end: an upper bound on the batch's compute time.
        self.owner.complete(batch, self._wait(completion, batch), start)


class InlineInstance(Instance):
    """An instance without a thread: the node's ``due`` list holds its assigned batch until
    a thread of the node's callers takes it (node.py ``Node.run_due``)."""

    def __init__(self, index: int, config: NodeConfig, kwargs: dict[str, Any], owner: Owner,
                 due: deque[tuple[InlineInstance, list[Request]]]) -> None:
        super().__init__(index, config, kwargs, owner)
        self.due = due
        self.running_on: int | None = None  # the thread running this instance's batch
        self.stopped = False
        self._close_when_done = False
        self._closing = threading.Lock()

    def launch(self) -> None:
        self._build()

    def wait_ready(self) -> None:
        pass

    def assign(self, batch: list[Request]) -> None:
        self.due.append((self, batch))

    def call(self, fn: Callable[[Instance], Any]) -> Future:
        """Run ``fn(instance)`` here and now: an inline instance has no thread of its own."""
        call = _Call(fn)
        call.run(self)
        return call.future

    def runs_here(self) -> bool:
        return self.running_on == threading.get_ident()

    def run(self, batch: list[Request]) -> None:
        """Run an assigned batch here; its end may assign this instance its next batch."""
        me = self.running_on = threading.get_ident()
        try:
            start = time.perf_counter_ns()
            error, completion = self._forward(batch)
            if completion is not None:  # an inline batch ends on the thread that ran it
                error = self._wait(completion, batch)
            self.owner.complete(batch, error, start)
        finally:
            # Another thread may already run this instance's next batch: clear only our mark.
            if self.running_on == me:
                self.running_on = None
            self.owner.release(self)
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
        if self._close_when_done and self.running_on is None:
            self._close_backend()

    def _close_backend(self) -> None:
        with self._closing:  # exactly once, whichever thread gets here first
            backend, self.backend = self.backend, None
            self._close_when_done = False
        if backend is not None:
            backend.close()
